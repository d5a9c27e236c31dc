"""What the admin API answers, as pydantic models (so ``/openapi.json`` documents it), and the
pure functions that build them from the engine's values."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from itertools import pairwise
from typing import Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, field_validator

from saga.core.definition import RetryPolicy, SagaDefinition
from saga.core.engine import allowed_actions
from saga.core.state import (
    Direction,
    HistoryEntry,
    HistoryKind,
    OperatorAction,
    Phase,
    SagaState,
    SagaStatus,
    StepStatus,
)

__all__ = [
    "CAUSE_KINDS",
    "ActionRequest",
    "ActionResult",
    "DeadLetterActionResult",
    "DeadLetterBulkRequest",
    "DeadLetterDetail",
    "DeadLetterFilter",
    "DeadLetterPage",
    "DeadLetterQueueView",
    "DeadLetterSettled",
    "DeadLetterSummary",
    "DefinitionView",
    "ErrorBody",
    "Health",
    "HistoryView",
    "PendingMember",
    "PendingStep",
    "Readiness",
    "Resolution",
    "ResolveRequest",
    "RetryRun",
    "RootCause",
    "SagaDetail",
    "SagaPage",
    "SagaSummary",
    "Span",
    "StartRequest",
    "StartResult",
    "at_step",
    "at_steps",
    "definition_view",
    "pending_step",
    "resolution",
    "retry_runs",
    "root_cause",
    "saga_detail",
    "saga_summary",
    "step_spans",
]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True)


# --- answers ---------------------------------------------------------------------------------


class ErrorBody(_Model):
    """Every error: ``detail`` says why, in words an operator can act on."""

    detail: str
    errors: list[dict[str, Any]] | None = Field(
        None, description="422 only: each invalid field, as FastAPI reports it"
    )


class Health(_Model):
    status: str = "ok"


class Readiness(_Model):
    ready: bool
    #: each check and why it fails (null when it passes)
    checks: dict[str, str | None]


class RootCause(_Model):
    """What first went wrong: the failure that started the compensation or, past the pivot,
    stopped the saga. Kept apart from ``failure``, which later trouble (a compensation that
    failed too) overwrites, so a saga an operator fixed still says why it went wrong."""

    at: datetime
    step: str | None = Field(description="the step whose action failed, timed out or was aborted")
    error: str | None = Field(
        description="the participant's reason, e.g. `undeliverable_address`; null when the "
        "step timed out, was aborted or its command could not be built"
    )
    detail: str = Field(description="the engine's words, as in the history")


class Resolution(_Model):
    """The latest operator action that took the saga out of FAILED."""

    action: str = Field(description="`retry`, `resolve` or `abort`")
    actor: str
    reason: str
    at: datetime


class SagaSummary(_Model):
    """One line of the saga list."""

    saga_id: UUID
    name: str
    definition_version: int
    status: SagaStatus
    key: str | None
    created_at: datetime
    updated_at: datetime
    current_step: str | None = Field(description="the step being run or compensated")
    direction: Direction
    failure: str | None = Field(
        description="the engine's latest reason: why the saga compensates, or why it is stuck "
        "(FAILED); it is not cleared when an operator fixes a stuck compensation, so read "
        "root_cause and resolution for what started it and how it ended"
    )
    stuck_step: str | None = Field(description="the step an operator must look at (FAILED)")
    at_step: str | None = Field(
        description="the step to look at first: the one being run (RUNNING) or compensated "
        "(COMPENSATING), the stuck one (FAILED), the one whose failure, timeout or abort turned "
        "the saga back (COMPENSATED); null when COMPLETED. While a parallel group is in flight, "
        "its members still pending joined by `+` in step order, e.g. `flight+hotel` (each is "
        "in `at_steps`)"
    )
    at_steps: list[str] = Field(
        default_factory=list,
        description="the steps `at_step` names, one item each: several while a parallel "
        "group is in flight, else the one step, or none",
    )
    root_cause: RootCause | None = Field(
        None, description="the first failure, which started the compensation (null: none)"
    )
    resolution: Resolution | None = Field(
        None, description="how an operator last got the saga out of FAILED (null: never)"
    )


class SagaPage(_Model):
    items: list[SagaSummary]
    next_cursor: str | None = Field(
        description="pass as `cursor` for the next page; null on the last page"
    )


class Span(_Model):
    """When one direction of a step ran, from its history."""

    first_sent_at: datetime = Field(description="the first attempt's command was sent")
    last_sent_at: datetime = Field(description="the latest attempt's command was sent")
    finished_at: datetime | None = Field(
        description="it succeeded, failed for good, timed out for good, or an operator ended "
        "it; null while it runs or waits to retry"
    )
    duration_ms: float | None = Field(description="first_sent_at to finished_at")


class StepView(_Model):
    name: str
    participant: str | None = Field(description="null if the definition is not registered")
    status: StepStatus
    attempts: int
    compensation_attempts: int
    error: str | None
    action: Span | None
    compensation: Span | None


class HistoryView(_Model):
    at: datetime
    kind: HistoryKind
    step: str | None
    direction: Direction | None
    attempt: int | None
    message_id: UUID | None
    actor: str | None
    detail: str


class RetryRun(_Model):
    """Consecutive attempts of one step in one direction, shown as one line: a step retried
    ten times is some thirty near-identical history entries that say one thing."""

    step: str
    direction: Direction
    command: str | None = Field(
        description="the command type, e.g. `payment.refund`; null if the definition is not "
        "registered"
    )
    first: int = Field(description="index in `history` of the run's first entry")
    last: int = Field(description="index in `history` of its last entry (inclusive)")
    attempts: int = Field(description="commands sent in the run")
    first_attempt: int | None
    last_attempt: int | None
    errors: list[str] = Field(
        description="the distinct failures, first seen first; `timed out` for a timeout"
    )
    min_interval_s: float | None = Field(description="the shortest time between two sends")
    max_interval_s: float | None = Field(description="the longest time between two sends")
    first_at: datetime
    last_at: datetime


class PendingMember(_Model):
    """One member of a parallel group in flight: each has its own attempt, budget and
    deadline, which the saga's own fields show for only one of them."""

    step: str
    phase: Phase = Field(description="`awaiting_reply` or `backoff`")
    attempt: int = Field(description="attempts sent in its retry budget")
    max_attempts: int | None = Field(
        description="its budget; null when it retries forever or the definition is not registered"
    )
    attempts_sent: int
    last_error: str | None
    last_sent_at: datetime | None = Field(description="when its latest attempt was sent")
    next_retry_at: datetime | None = Field(description="its next attempt (phase `backoff`)")
    reply_deadline: datetime | None = Field(
        description="when its awaited reply times out (phase `awaiting_reply`)"
    )


class PendingStep(_Model):
    """The step a RUNNING, COMPENSATING or FAILED saga waits on, with what an on-call engineer
    asks first: which try is this, what went wrong last, and when does something happen next."""

    step: str
    direction: Direction
    participant: str | None = Field(description="null if the definition is not registered")
    command: str | None = Field(description="the command type it sends")
    phase: Phase = Field(
        description="`awaiting_reply` (sent, waiting), `backoff` (waiting to send again) or "
        "`idle` (FAILED: waiting for an operator)"
    )
    attempt: int = Field(
        description="attempts sent in the current retry budget (an operator retry starts a new one)"
    )
    max_attempts: int | None = Field(
        description="the budget, from the definition's retry policy for this direction; null "
        "when it retries forever or the definition is not registered"
    )
    attempts_sent: int = Field(description="attempts sent in this direction, in all budgets")
    last_error: str | None = Field(description="the latest failure reason")
    last_sent_at: datetime | None = Field(description="when the latest attempt was sent")
    next_retry_at: datetime | None = Field(
        description="when the next attempt is sent (phase `backoff`)"
    )
    reply_deadline: datetime | None = Field(
        description="when the awaited reply times out (phase `awaiting_reply`)"
    )
    allowed_actions: list[OperatorAction] = Field(
        description="the operator actions the saga's state accepts now"
    )
    members: list[PendingMember] = Field(
        default_factory=list,
        description="while a parallel group is in flight, each of its members still pending, "
        "in step order, with its own attempt and deadline (the fields above are those of the "
        "member due first); empty otherwise",
    )


class SagaDetail(SagaSummary):
    version: int = Field(description="goes up by one per applied event")
    phase: Phase
    awaiting: UUID | None = Field(description="the command awaited or to be sent next")
    deadline: datetime | None
    in_flight: list[str] = Field(
        description="the steps whose command is awaited or in backoff: the members of a "
        "parallel group in flight, or the one step being run or compensated"
    )
    expires_at: datetime | None = Field(
        description="the saga's own deadline while it runs forward; null without one"
    )
    stuck_steps: list[str] = Field(
        description="when FAILED while compensating: every step whose compensation is stuck "
        "(several with the continue policy); the newest is stuck_step"
    )
    input: dict[str, Any]
    outputs: dict[str, dict[str, Any]]
    steps: list[StepView]
    history: list[HistoryView]
    allowed_actions: list[OperatorAction] = Field(
        description="the operator actions the saga's state accepts now (POST "
        "/api/sagas/{id}/<action>); any other answers 409. Empty when nothing applies, or when "
        "the saga's definition version is not registered"
    )
    pending: PendingStep | None = Field(
        None,
        description="the step the saga waits on (RUNNING, COMPENSATING, FAILED); null when it "
        "is COMPLETED or COMPENSATED",
    )
    retry_runs: list[RetryRun] = Field(
        default_factory=list,
        description="runs of two or more attempts of one step in `history`, each of which a "
        "reader can show as one line",
    )


class RetryView(_Model):
    max_attempts: int | None = Field(description="null: retried forever")
    initial_backoff_s: float
    multiplier: float
    max_backoff_s: float
    jitter: float


class StepDefinitionView(_Model):
    name: str
    participant: str
    action: str
    compensation: str | None
    compensated: bool = Field(description="whether the step is undone when the saga compensates")
    pivot: bool
    timeout_s: float
    compensation_timeout_s: float
    retry: RetryView
    compensation_retry: RetryView
    group: int | None = Field(
        description="index of the parallel group the step belongs to (its members run "
        "together); null for a step run on its own"
    )
    conditional: bool = Field(description="whether the step runs only when its condition holds")


class DefinitionView(_Model):
    name: str
    version: int
    steps: list[StepDefinitionView]
    deadline_s: float | None = Field(description="the saga's own deadline; null without one")
    on_compensation_failure: str = Field(
        description="halt: a compensation failing for good stops there; continue: the older "
        "steps are compensated and the saga ends FAILED naming every stuck one"
    )


class StartResult(_Model):
    created: bool = Field(description="false when a saga with this key existed already")
    saga: SagaSummary


class ActionResult(_Model):
    saga: SagaSummary
    entries: list[HistoryView] = Field(description="what the action wrote to the history")


# --- requests --------------------------------------------------------------------------------


class StartRequest(_Model):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=100)
    input: dict[str, Any] = Field(default_factory=dict)
    key: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="business or idempotency key: starting twice with it finds the same saga",
    )


class ActionRequest(_Model):
    model_config = ConfigDict(frozen=True, extra="forbid")

    reason: str = Field(min_length=1, max_length=2000, description="goes into the history")

    @field_validator("reason")
    @classmethod
    def _said(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("say why: the reason goes into the saga's history")
        return value.strip()


class ResolveRequest(ActionRequest):
    data: dict[str, Any] = Field(
        default_factory=dict,
        description="when resolving a stuck action: the step's output, as its reply would have",
    )


# --- dead letters ----------------------------------------------------------------------------


class DeadLetterSummary(_Model):
    """One message in a dead-letter queue."""

    id: str = Field(
        description="its message id, or `sha256:<digest of the body>` when it has none; "
        "copies with one id are one message to every receiver"
    )
    dead_letter_queue: str
    queue: str = Field(description="the queue it was dead-lettered from; a replay goes there")
    reason: str = Field(description="why: `invalid_json`, `unknown_command`, `poison`, ...")
    detail: str
    saga_id: UUID | None = Field(description="the saga it belongs to, when it says")
    message_id: str | None
    message_type: str | None
    dead_lettered_at: datetime | None
    age_s: float | None = Field(description="seconds since it was dead-lettered")
    size: int = Field(description="bytes of the body")
    replays: int = Field(description="times it was replayed before and came back")
    copies: int = Field(1, description="copies with this id in the queue (acted on together)")


class DeadLetterQueueView(_Model):
    dead_letter_queue: str
    queue: str = Field(description="the queue whose rejects it holds")
    depth: int | None = Field(description="messages in it when it was read (null: unreadable)")
    scanned: int = Field(description="messages read, in order, from the front")
    error: str | None = Field(None, description="why it could not be read")


class DeadLetterPage(_Model):
    queues: list[DeadLetterQueueView]
    items: list[DeadLetterSummary] = Field(description="oldest first within each queue")
    truncated: bool = Field(
        description="more matched than `limit`, or a queue was longer than the scan limit"
    )


class DeadLetterDetail(DeadLetterSummary):
    correlation_id: str | None
    content_type: str | None
    headers: dict[str, Any]
    body: str = Field(description="indented when it is JSON; base64 when it is not text")
    body_format: Literal["json", "text", "base64"]
    body_truncated: bool = Field(description="only the first bytes are shown")


class DeadLetterFilter(_Model):
    """Which dead letters a bulk action takes; every criterion given must match."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    queue: str | None = Field(None, max_length=255, description="a queue or its `.dlq`")
    reason: str | None = Field(None, max_length=64, description="the dead-letter reason")
    saga_id: UUID | None = None
    since: datetime | None = Field(None, description="dead-lettered at or after")
    until: datetime | None = Field(None, description="dead-lettered before")
    all: bool = Field(False, description="every dead letter: an empty filter is refused")

    def empty(self) -> bool:
        criteria = self.model_dump(exclude={"all"}).values()
        return not self.all and all(v is None for v in criteria)


class DeadLetterBulkRequest(ActionRequest):
    filter: DeadLetterFilter
    limit: int = Field(100, ge=1, le=1000, description="messages to act on at most")


class DeadLetterSettled(_Model):
    id: str
    dead_letter_queue: str
    queue: str
    message_id: str | None
    saga_id: UUID | None
    dead_letter_reason: str
    copies: int
    outcome: Literal["replayed", "discarded", "refused"]
    why: str | None = Field(None, description="why it was refused (it stays where it is)")


class DeadLetterActionResult(_Model):
    """What a replay or discard did, as the audit log records it."""

    action: Literal["replay", "discard"]
    actor: str
    reason: str
    at: datetime
    messages: list[DeadLetterSettled]
    truncated: bool = Field(
        False, description="a queue was longer than the scan limit: run it again for the rest"
    )


# --- building them (pure) --------------------------------------------------------------------


def at_steps(s: SagaState) -> list[str]:
    """Where an on-call engineer looks first. While a parallel group is in flight, every
    member still pending: the saga's own fields name only the one whose timer is due first,
    and a list naming one member would hide a sibling that is the slow or failing one. For a
    COMPENSATED saga the engine's current step is the last one compensated (often the first
    step), which says nothing; the step that failed says why it went back, and without one (a
    timeout or an abort, then compensated) the furthest step it ran. A parallel group's member
    that failed may come before a sibling that succeeded, and a skipped step never ran, so
    neither "furthest" alone will do."""
    if s.lanes:
        return _in_flight(s)
    if s.status is SagaStatus.COMPLETED:
        return []
    if s.status is SagaStatus.FAILED:
        return [] if s.stuck_step is None else [s.stuck_step]
    if s.status is SagaStatus.COMPENSATED:
        failed = [st.name for st in s.steps if st.status is StepStatus.FAILED]
        if failed:
            return failed[:1]
        ran = (StepStatus.PENDING, StepStatus.SKIPPED)
        reached = [st.name for st in s.steps if st.status not in ran]
        return reached[-1:]
    return [s.steps[s.current].name] if s.current < len(s.steps) else []


def at_step(s: SagaState) -> str | None:
    """:func:`at_steps` as one string for a list's column: ``flight+hotel`` for a group."""
    return "+".join(at_steps(s)) or None


#: the history kinds :func:`root_cause` and :func:`resolution` read
CAUSE_KINDS = frozenset(
    {
        HistoryKind.STEP_FAILED,
        HistoryKind.STEP_TIMED_OUT,
        HistoryKind.COMPENSATION_STARTED,
        HistoryKind.FAILED,
        HistoryKind.OPERATOR,
    }
)
#: the engine's words for each operator action, as its history entries begin
_ACTIONS = {"retry": "retry", "resolved by hand": "resolve", "abort": "abort"}


def root_cause(history: Iterable[HistoryEntry]) -> RootCause | None:
    """The first entry that sent the saga backwards (``compensation_started``) or stopped it
    (``failed``), with the step and the participant's reason from the action entry before it."""
    culprit: HistoryEntry | None = None
    for h in history:
        if h.kind in CAUSE_KINDS - {HistoryKind.COMPENSATION_STARTED, HistoryKind.FAILED}:
            if h.direction is Direction.ACTION and h.step is not None:
                culprit = h
            continue
        if h.kind is HistoryKind.FAILED:
            step, detail = h.step, h.detail.removeprefix("needs an operator: ")
        elif h.kind is HistoryKind.COMPENSATION_STARTED:
            step, detail = (None if culprit is None else culprit.step), h.detail
        else:
            continue
        error = None
        if culprit is not None and culprit.kind is HistoryKind.STEP_FAILED:
            said = culprit.detail.removeprefix(f"{culprit.step} failed: ")
            if said != culprit.detail:  # a reply said no (not a payload that cannot be built)
                error = said.removesuffix(" (retryable)")
        return RootCause(at=h.at, step=step, error=error, detail=detail)
    return None


def resolution(history: Iterable[HistoryEntry]) -> Resolution | None:
    """The latest operator entry that follows a ``failed`` one: only an operator moves a FAILED
    saga, so that entry is what got it going again."""
    failed, found = False, None
    for h in history:
        if h.kind is HistoryKind.FAILED:
            failed = True
        elif h.kind is HistoryKind.OPERATOR and failed:
            said, _, reason = h.detail.partition(": ")
            found = Resolution(
                action=_ACTIONS.get(said, said), actor=h.actor or "", reason=reason, at=h.at
            )
            failed = False
    return found


def saga_summary(s: SagaState, history: Sequence[HistoryEntry] | None = None) -> SagaSummary:
    """``history`` (all of it, or at least its :data:`CAUSE_KINDS`) fills in the root cause
    and the resolution; without it they are null."""
    return SagaSummary(
        saga_id=s.saga_id,
        name=s.name,
        definition_version=s.definition_version,
        status=s.status,
        key=s.key,
        created_at=s.created_at,
        updated_at=s.updated_at,
        current_step=s.steps[s.current].name if s.current < len(s.steps) else None,
        direction=s.direction,
        failure=s.failure,
        stuck_step=s.stuck_step,
        at_step=at_step(s),
        at_steps=at_steps(s),
        root_cause=None if history is None else root_cause(history),
        resolution=None if history is None else resolution(history),
    )


def history_view(h: HistoryEntry) -> HistoryView:
    return HistoryView(
        at=h.at,
        kind=h.kind,
        step=h.step,
        direction=h.direction,
        attempt=h.attempt,
        message_id=h.message_id,
        actor=h.actor,
        detail=h.detail,
    )


#: entries that end one direction of a step, unless a later attempt is sent
_ENDS = frozenset(
    {
        HistoryKind.STEP_SUCCEEDED,
        HistoryKind.STEP_FAILED,
        HistoryKind.STEP_TIMED_OUT,
        HistoryKind.STEP_COMPENSATED,
        HistoryKind.COMPENSATION_FAILED,
        HistoryKind.OPERATOR,
    }
)


def step_spans(history: Iterable[HistoryEntry]) -> dict[tuple[str, Direction], Span]:
    """When each (step, direction) was first sent and when it finished, replayed from the
    history: a sent command opens it, a retry reopens it, an outcome closes it."""
    first: dict[tuple[str, Direction], datetime] = {}
    last: dict[tuple[str, Direction], datetime] = {}
    done: dict[tuple[str, Direction], datetime | None] = {}
    for h in history:
        if h.step is None or h.direction is None:
            continue
        where = (h.step, h.direction)
        if h.kind is HistoryKind.COMMAND_SENT:
            first.setdefault(where, h.at)
            last[where] = h.at
            done[where] = None
        elif h.kind is HistoryKind.RETRY_SCHEDULED:
            done[where] = None
        elif h.kind in _ENDS and where in first:
            done[where] = h.at
    spans = {}
    for where, started in first.items():
        finished = done.get(where)
        spans[where] = Span(
            first_sent_at=started,
            last_sent_at=last[where],
            finished_at=finished,
            duration_ms=None
            if finished is None
            else round((finished - started).total_seconds() * 1000, 3),
        )
    return spans


#: entries that belong to one attempt of a step: sent, failed or timed out, retry scheduled
_RUN_KINDS = frozenset(
    {
        HistoryKind.COMMAND_SENT,
        HistoryKind.STEP_FAILED,
        HistoryKind.COMPENSATION_FAILED,
        HistoryKind.STEP_TIMED_OUT,
        HistoryKind.RETRY_SCHEDULED,
    }
)


def _error_of(h: HistoryEntry) -> str | None:
    """The participant's reason in a failure entry, without the engine's framing, so that
    ten failures with one reason read as one error."""
    if h.kind is HistoryKind.STEP_TIMED_OUT:
        return "timed out"
    if h.kind is HistoryKind.STEP_FAILED:
        said = h.detail.removeprefix(f"{h.step} failed: ")
    elif h.kind is HistoryKind.COMPENSATION_FAILED:
        said = h.detail.removeprefix(f"compensation of {h.step} failed: ")
    else:
        return None
    return said.removesuffix(" (retryable)")


def retry_runs(
    history: Sequence[HistoryEntry],
    commands: Mapping[tuple[str, Direction], str] | None = None,
    min_attempts: int = 2,
) -> list[RetryRun]:
    """Each run of ``min_attempts`` or more attempts of one (step, direction) in a row: from
    its first ``command_sent`` to the last entry of its last attempt. An ``ignored`` entry (a
    late reply) between attempts stays inside the run; anything else ends it, so outcomes,
    compensation starts and operator actions stay in view. ``commands`` names each (step,
    direction)'s command type."""
    runs: list[RetryRun] = []
    i = 0
    while i < len(history):
        h = history[i]
        if h.kind is not HistoryKind.COMMAND_SENT or h.step is None or h.direction is None:
            i += 1
            continue
        where = (h.step, h.direction)
        last = i
        for k in range(i + 1, len(history)):
            e = history[k]
            if e.kind in _RUN_KINDS and (e.step, e.direction) == where:
                last = k
            elif e.kind is not HistoryKind.IGNORED:
                break
        entries = history[i : last + 1]
        sent = [e for e in entries if e.kind is HistoryKind.COMMAND_SENT]
        if len(sent) >= min_attempts:
            errors: list[str] = []
            for e in entries:
                error = _error_of(e)
                if error is not None and error not in errors:
                    errors.append(error)
            gaps = [(b.at - a.at).total_seconds() for a, b in pairwise(sent)]
            runs.append(
                RetryRun(
                    step=h.step,
                    direction=h.direction,
                    command=(commands or {}).get(where),
                    first=i,
                    last=last,
                    attempts=len(sent),
                    first_attempt=sent[0].attempt,
                    last_attempt=sent[-1].attempt,
                    errors=errors,
                    min_interval_s=round(min(gaps), 3),
                    max_interval_s=round(max(gaps), 3),
                    first_at=entries[0].at,
                    last_at=entries[-1].at,
                )
            )
        i = last + 1
    return runs


def pending_step(
    s: SagaState,
    definition: SagaDefinition | None,
    spans: Mapping[tuple[str, Direction], Span],
) -> PendingStep | None:
    """What the saga waits on, or None when it is COMPLETED or COMPENSATED. The deadline is
    the next retry's time in a backoff and the reply's timeout while a command is out; a FAILED
    saga has neither: it waits for an operator."""
    if s.status not in (SagaStatus.RUNNING, SagaStatus.COMPENSATING, SagaStatus.FAILED):
        return None
    index = s.current
    if s.status is SagaStatus.FAILED and s.stuck_step is not None:
        index = next((i for i, st in enumerate(s.steps) if st.name == s.stuck_step), index)
    if index >= len(s.steps):
        return None
    st = s.steps[index]
    compensating = s.direction is Direction.COMPENSATION
    known = definition is not None and index < len(definition.steps)
    step_def = definition.steps[index] if definition is not None and known else None
    span = spans.get((st.name, s.direction))
    return PendingStep(
        step=st.name,
        direction=s.direction,
        participant=None if step_def is None else step_def.participant,
        command=None
        if step_def is None
        else (step_def.compensation if compensating else step_def.action),
        phase=s.phase,
        attempt=s.tries,
        max_attempts=None if step_def is None else step_def.retry_for(s.direction).max_attempts,
        attempts_sent=st.compensation_attempts if compensating else st.attempts,
        last_error=st.error,
        last_sent_at=None if span is None else span.last_sent_at,
        next_retry_at=s.deadline if s.phase is Phase.BACKOFF else None,
        reply_deadline=s.deadline if s.phase is Phase.AWAITING_REPLY else None,
        allowed_actions=[] if definition is None else list(allowed_actions(definition, s)),
        members=_members(s, definition),
    )


def _members(s: SagaState, definition: SagaDefinition | None) -> list[PendingMember]:
    """Each lane of the group in flight as the pending card shows it."""
    members = []
    for lane in sorted(s.lanes, key=lambda lane: lane.index):
        st = s.steps[lane.index]
        known = definition is not None and lane.index < len(definition.steps)
        policy = definition.steps[lane.index].retry if definition is not None and known else None
        backoff = lane.phase is Phase.BACKOFF
        members.append(
            PendingMember(
                step=st.name,
                phase=lane.phase,
                attempt=lane.tries,
                max_attempts=None if policy is None else policy.max_attempts,
                attempts_sent=st.attempts,
                last_error=st.error,
                last_sent_at=lane.sent_at,
                next_retry_at=lane.deadline if backoff else None,
                reply_deadline=None if backoff else lane.deadline,
            )
        )
    return members


def saga_detail(
    s: SagaState, history: Sequence[HistoryEntry], definition: SagaDefinition | None
) -> SagaDetail:
    spans = step_spans(history)
    commands = (
        {}
        if definition is None
        else {
            (d.name, direction): d.command_type(direction)
            for d in definition.steps
            for direction in Direction
            if direction is Direction.ACTION or d.compensation is not None
        }
    )
    participants = {} if definition is None else {d.name: d.participant for d in definition.steps}
    steps = [
        StepView(
            name=st.name,
            participant=participants.get(st.name),
            status=st.status,
            attempts=st.attempts,
            compensation_attempts=st.compensation_attempts,
            error=st.error,
            action=spans.get((st.name, Direction.ACTION)),
            compensation=spans.get((st.name, Direction.COMPENSATION)),
        )
        for st in s.steps
    ]
    return SagaDetail(
        **dict(saga_summary(s, history)),
        version=s.version,
        phase=s.phase,
        awaiting=s.awaiting,
        deadline=s.deadline,
        in_flight=_in_flight(s),
        expires_at=s.expires_at,
        stuck_steps=_stuck_steps(s),
        input=dict(s.context.input),
        outputs={name: dict(data) for name, data in s.context.outputs.items()},
        steps=steps,
        history=[history_view(h) for h in history],
        allowed_actions=[] if definition is None else list(allowed_actions(definition, s)),
        pending=pending_step(s, definition, spans),
        retry_runs=retry_runs(history, commands),
    )


def _in_flight(s: SagaState) -> list[str]:
    if s.lanes:
        return [s.steps[lane.index].name for lane in sorted(s.lanes, key=lambda lane: lane.index)]
    if s.phase is Phase.IDLE or s.current >= len(s.steps):
        return []
    return [s.steps[s.current].name]


def _stuck_steps(s: SagaState) -> list[str]:
    if s.status is not SagaStatus.FAILED or s.direction is not Direction.COMPENSATION:
        return [] if s.stuck_step is None else [s.stuck_step]
    return [st.name for st in reversed(s.steps) if st.status is StepStatus.COMPENSATING]


def _retry_view(p: RetryPolicy) -> RetryView:
    return RetryView(
        max_attempts=p.max_attempts,
        initial_backoff_s=p.initial_backoff.total_seconds(),
        multiplier=p.multiplier,
        max_backoff_s=p.max_backoff.total_seconds(),
        jitter=p.jitter,
    )


def definition_view(d: SagaDefinition) -> DefinitionView:
    groups = {i: g for g, (first, last) in enumerate(d.groups) for i in range(first, last + 1)}
    return DefinitionView(
        name=d.name,
        version=d.version,
        steps=[
            StepDefinitionView(
                name=step.name,
                participant=step.participant,
                action=step.action,
                compensation=step.compensation,
                compensated=d.needs_compensation(i),
                pivot=step.pivot,
                timeout_s=step.timeout.total_seconds(),
                compensation_timeout_s=step.timeout_for(Direction.COMPENSATION).total_seconds(),
                retry=_retry_view(step.retry),
                compensation_retry=_retry_view(step.compensation_retry),
                group=groups.get(i),
                conditional=step.when is not None,
            )
            for i, step in enumerate(d.steps)
        ],
        deadline_s=None if d.deadline is None else d.deadline.total_seconds(),
        on_compensation_failure=d.on_compensation_failure.value,
    )
