"""The pure saga engine: ``decide(definition, state, event, now) -> Transition``.

No I/O, no clock, no randomness: time comes in as ``now``, message ids are derived from the saga
id, step, direction and attempt (:mod:`saga.core.ids`), and backoff jitter is seeded the same way.
Given the same inputs, ``decide`` always returns the same transition, so every rule below can be
unit-tested and property-tested without a broker or a database.

The rules (docs/semantics.md has the full table):

* Steps run in order. A success stores the reply data under the step's name and moves on.
* A retryable failure or a timeout is retried with backoff while the step's budget lasts.
* A definitive failure (or a spent budget) before the pivot compensates, newest first, every
  step that succeeded; a step that timed out is compensated too, because its outcome is unknown.
* After the pivot nothing is compensated: steps are retried, and a step that cannot go on leaves
  the saga ``FAILED`` naming it, for an operator.
* A compensation is retried with backoff; when its budget is spent the saga is ``FAILED`` and
  names the stuck step. An operator can retry it, or resolve it after fixing things by hand.
* A reply changes the saga only if it answers exactly the command the saga awaits now; anything
  else (a duplicate, a late reply) only adds a history entry. A reply that names one of the
  saga's commands but disagrees with it (another participant or command type) is refused
  outright: :func:`reply_mismatch` says why, and the caller dead-letters it.
* An operator action applies only where :func:`operator_refusal` finds nothing against it
  (:func:`allowed_actions` lists those); otherwise the transition is ``refused`` with the
  reason and writes nothing, not even history.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar
from uuid import UUID

from saga.core.definition import CompensationPolicy, SagaDefinition, seed_for
from saga.core.errors import UnknownSagaError
from saga.core.ids import command_id, idempotency_key
from saga.core.jsontext import dumps_finite
from saga.core.state import (
    Command,
    Direction,
    Event,
    HistoryEntry,
    HistoryKind,
    Lane,
    OperatorAbort,
    OperatorAction,
    OperatorResolve,
    OperatorRetry,
    Phase,
    ReplyFailed,
    ReplySucceeded,
    SagaContext,
    SagaState,
    SagaStatus,
    Started,
    StepState,
    StepStatus,
    TimerFired,
    Transition,
)

__all__ = [
    "allowed_actions",
    "decide",
    "describe_command",
    "locate_command",
    "operator_refusal",
    "reply_mismatch",
]

_NEEDS_UNDO = (StepStatus.SUCCEEDED, StepStatus.TIMED_OUT, StepStatus.ABORTED)

_V = TypeVar("_V")


def replace(value: _V, /, **changes: Any) -> _V:
    """``dataclasses.replace`` for the frozen state values, without running ``__init__``.

    A decision replaces the state several times; through ``__init__`` that was a tenth of the
    orchestrator's CPU per event (docs/benchmarks.md), and a loop over the fields by name was
    still 8 % (profile_decide). So each class and set of changed fields gets a copier of its
    own, written out field by field once (:func:`_copier`). For values with a
    ``__post_init__`` it is ``dataclasses.replace``.
    """
    key = (type(value), *changes)
    copy = _COPIERS.get(key)
    if copy is None:
        copy = _COPIERS[key] = _copier(type(value), tuple(changes))
    return copy(value, changes)  # type: ignore[no-any-return]


_COPIERS: dict[tuple[Any, ...], Callable[[Any, dict[str, Any]], Any]] = {}


def _copier(cls: type, changed: tuple[str, ...]) -> Callable[[Any, dict[str, Any]], Any]:
    """A function ``(value, changes) -> copy`` for the dataclass ``cls`` and the fields
    ``changed``: a new instance without ``__init__``, those fields from ``changes`` and every
    other one from ``value``."""
    if hasattr(cls, "__post_init__"):
        return lambda value, changes: dataclasses.replace(value, **changes)
    names = tuple(cls.__dataclass_fields__)  # type: ignore[attr-defined]
    unknown = set(changed) - set(names)
    if unknown:
        raise TypeError(f"{cls.__name__} has no field {unknown}")
    lines = [
        "def copy(value, changes):",
        "    new = new_object(cls)",
        *(
            f"    setattr(new, {n!r}, changes[{n!r}])"
            if n in changed
            else f"    setattr(new, {n!r}, value.{n})"
            for n in names  # field names are identifiers: the source holds nothing else
        ),
        "    return new",
    ]
    scope: dict[str, Any] = {"cls": cls, "new_object": object.__new__}
    scope["setattr"] = object.__setattr__
    exec("\n".join(lines), scope)  # the source is built above from field names only
    copy: Callable[[Any, dict[str, Any]], Any] = scope["copy"]
    return copy


@dataclass
class _Out:
    """Collects what one decision emits; local to a single ``decide`` call."""

    now: datetime
    commands: list[Command] = field(default_factory=list)
    history: list[HistoryEntry] = field(default_factory=list)

    def note(
        self, kind: HistoryKind, detail: str, state: SagaState | None = None, **kw: object
    ) -> None:
        if state is not None and "step" not in kw and state.current < len(state.steps):
            kw.setdefault("step", state.steps[state.current].name)
            kw.setdefault("direction", state.direction)
            kw.setdefault("attempt", state.attempt)
        self.history.append(HistoryEntry(self.now, kind, detail, **kw))  # type: ignore[arg-type]


def decide(
    definition: SagaDefinition, state: SagaState | None, event: Event, now: datetime
) -> Transition:
    """Apply ``event`` to ``state``; ``state`` is None only for :class:`Started`."""
    out = _Out(now)
    if isinstance(event, Started):
        if state is not None:
            out.note(HistoryKind.IGNORED, "saga already started", state)
            return Transition(state, (), tuple(out.history), applied=False)
        return Transition(_start(definition, event, out), tuple(out.commands), tuple(out.history))
    if state is None:
        raise UnknownSagaError(f"event {type(event).__name__} for a saga that does not exist")
    if state.name != definition.name or state.definition_version != definition.version:
        raise UnknownSagaError(
            f"saga {state.saga_id} runs {state.name} v{state.definition_version}, "
            f"not {definition.name} v{definition.version}"
        )

    if isinstance(event, OperatorRetry | OperatorAbort | OperatorResolve):
        why = operator_refusal(definition, state, _ACTIONS[type(event)])
        if why is not None:
            refused = f"{type(event).__name__} rejected: {why}"
            return Transition(state, (), (), applied=False, refused=refused)
    new = _dispatch_event(definition, state, event, out)
    if new is None:
        return Transition(state, (), tuple(out.history), applied=False)
    new = replace(new, version=state.version + 1, updated_at=now)
    return Transition(new, tuple(out.commands), tuple(out.history))


def _dispatch_event(d: SagaDefinition, s: SagaState, event: Event, out: _Out) -> SagaState | None:
    match event:
        case ReplySucceeded() | ReplyFailed():
            return _on_reply(d, s, event, out)
        case TimerFired():
            return _on_timer(d, s, event, out)
        case OperatorRetry():
            return _on_operator_retry(d, s, event, out)
        case OperatorAbort():
            return _on_operator_abort(d, s, event, out)
        case OperatorResolve():
            return _on_operator_resolve(d, s, event, out)
        case _:  # Started is handled by the caller
            raise TypeError(f"unexpected event {event!r}")


# --- starting and sending --------------------------------------------------------------------


def _start(d: SagaDefinition, event: Started, out: _Out) -> SagaState:
    state = SagaState(
        saga_id=event.saga_id,
        name=d.name,
        definition_version=d.version,
        status=SagaStatus.RUNNING,
        steps=tuple(StepState(step.name) for step in d.steps),
        context=SagaContext(dict(event.input), {}, event.saga_id),
        current=0,
        direction=Direction.ACTION,
        attempt=0,
        tries=0,
        phase=Phase.IDLE,
        awaiting=None,
        deadline=None,
        version=1,
        created_at=out.now,
        updated_at=out.now,
        key=event.key,
        trace=None if event.trace is None else dict(event.trace),
        expires_at=None if d.deadline is None else out.now + d.deadline,
    )
    out.note(HistoryKind.STARTED, f"saga {d.name} v{d.version} started")
    return _enter(d, state, 0, out)


def _with_step(state: SagaState, index: int, **changes: object) -> SagaState:
    return replace(state, steps=_steps_with(state, index, **changes))


def _steps_with(state: SagaState, index: int, **changes: object) -> tuple[StepState, ...]:
    """``state``'s steps with step ``index`` changed: for a caller that changes the saga's
    own fields in the same copy (each copy of the state is ~25 fields set)."""
    steps = list(state.steps)
    steps[index] = replace(steps[index], **changes)
    return tuple(steps)


def _clamp(state: SagaState, deadline: datetime) -> datetime:
    """The saga's timer: the step's deadline, or the saga's own if that comes first."""
    expires = state.expires_at
    return deadline if expires is None or deadline <= expires else expires


def _condition(d: SagaDefinition, index: int, ctx: SagaContext) -> bool | str:
    """Whether step ``index`` runs; the error text when its predicate raised."""
    when = d.steps[index].when
    if when is None:
        return True
    try:
        return bool(when(ctx))
    except Exception as exc:  # a predicate bug must not wedge the saga: it fails the step
        return f"condition raised {type(exc).__name__}: {exc}"


def _enter(d: SagaDefinition, state: SagaState, index: int, out: _Out) -> SagaState:
    """Run the unit (a step or a parallel group) at ``index``, or the first one after it that
    has a step to run; ``COMPLETED`` when none is left. Conditions are asked here, once."""
    n = len(d.steps)
    while index < n:
        last = d.unit_last[index]
        if last == index and d.steps[index].when is None:  # the plain sequential step
            return _send(d, state, index, Direction.ACTION, out, new_budget=True)
        run: list[int] = []
        for i in range(index, last + 1):
            verdict = _condition(d, i, state.context)
            name = d.steps[i].name
            if verdict is True:
                run.append(i)
            elif verdict is False:
                state = _with_step(state, i, status=StepStatus.SKIPPED)
                out.note(HistoryKind.STEP_SKIPPED, f"{name} skipped: its condition is false",
                         step=name, direction=Direction.ACTION)  # fmt: skip
            else:
                state = _with_step(state, i, status=StepStatus.FAILED, error=verdict)
                state = replace(state, current=i, direction=Direction.ACTION)
                out.note(HistoryKind.STEP_FAILED, f"{name} cannot be decided: {verdict}",
                         step=name, direction=Direction.ACTION)  # fmt: skip
                return _action_failed(d, state, out, verdict)  # nothing of the unit was sent
        if len(run) == 1:
            return _send(d, state, run[0], Direction.ACTION, out, new_budget=True)
        if run:
            return _fan_out(d, state, run, out)
        index = last + 1
    out.note(HistoryKind.COMPLETED, "every step succeeded", step=None)
    return _idle(replace(state, status=SagaStatus.COMPLETED, current=n, expires_at=None))


def _build(
    d: SagaDefinition, state: SagaState, index: int, direction: Direction
) -> tuple[dict[str, Any], None] | tuple[None, str]:
    """The payload of step ``index`` in ``direction``, or why it cannot be built."""
    try:
        payload = dict(d.steps[index].build(direction, state.context))
        dumps_finite(payload)  # it goes on the wire: JSON values only
    except Exception as exc:  # a builder bug must not wedge the saga: it fails the step
        return None, f"payload builder raised {type(exc).__name__}: {exc}"
    return payload, None


def _emit(
    d: SagaDefinition,
    state: SagaState,
    index: int,
    direction: Direction,
    attempt: int,
    payload: dict[str, Any],
    out: _Out,
) -> tuple[tuple[StepState, ...], UUID, datetime]:
    """Emit attempt ``attempt`` of (step ``index``, ``direction``); returns the steps with
    that step marked in flight (for the caller's next copy of the state), the command's id
    and its reply deadline."""
    step_def = d.steps[index]
    message_id = command_id(state.saga_id, step_def.name, direction.value, attempt)
    deadline = out.now + step_def.timeout_for(direction)
    command_type = step_def.command_type(direction)
    out.commands.append(
        Command(
            message_id=message_id,
            idempotency_key=idempotency_key(state.saga_id, step_def.name, direction.value),
            saga_id=state.saga_id,
            saga_name=d.name,
            step=step_def.name,
            direction=direction,
            attempt=attempt,
            participant=step_def.participant,
            command_type=command_type,
            payload=payload,
            deadline=deadline,
        )
    )
    if direction is Direction.COMPENSATION:
        steps = _steps_with(
            state, index, status=StepStatus.COMPENSATING, compensation_attempts=attempt
        )
    else:
        steps = _steps_with(state, index, status=StepStatus.RUNNING, attempts=attempt)
    out.note(
        HistoryKind.COMMAND_SENT,
        f"sent {command_type} to {step_def.participant}",
        step=step_def.name,
        direction=direction,
        attempt=attempt,
        message_id=message_id,
    )
    return steps, message_id, deadline


def _send(
    d: SagaDefinition,
    state: SagaState,
    index: int,
    direction: Direction,
    out: _Out,
    *,
    new_budget: bool,
) -> SagaState:
    """Emit the next attempt of (step ``index``, ``direction``) and wait for its reply."""
    step_def = d.steps[index]
    compensating = direction is Direction.COMPENSATION
    payload, reason = _build(d, state, index, direction)  # reads the context only
    if payload is None:
        assert reason is not None
        state = replace(state, current=index, direction=direction)
        state = _with_step(state, index, error=reason)
        # nothing was sent, so no attempt is counted and the entry names none
        if compensating:
            out.note(HistoryKind.COMPENSATION_FAILED, reason, state, attempt=None)
            why = f"compensation of {step_def.name} cannot be built: {reason}"
            return _compensation_stuck(d, state, out, why)
        out.note(HistoryKind.STEP_FAILED, f"{step_def.name} cannot be built: {reason}", state,
                 attempt=None)  # fmt: skip
        return _action_failed(d, _with_step(state, index, status=StepStatus.FAILED), out, reason)
    step = state.steps[index]
    attempt = (step.compensation_attempts if compensating else step.attempts) + 1
    tries = 1 if new_budget else state.tries + 1
    steps, message_id, deadline = _emit(d, state, index, direction, attempt, payload, out)
    return replace(  # one copy of the state for the whole send
        state,
        steps=steps,
        current=index,
        direction=direction,
        attempt=attempt,
        tries=tries,
        phase=Phase.AWAITING_REPLY,
        awaiting=message_id,
        deadline=_clamp(state, deadline),
        sent_at=out.now,
    )


def _schedule_retry(d: SagaDefinition, state: SagaState, out: _Out, why: str) -> SagaState:
    step_def = d.steps[state.current]
    policy = step_def.retry_for(state.direction)
    delay = policy.delay(state.tries, *seed_for(state.saga_id, step_def.name, state.direction))
    next_id = command_id(state.saga_id, step_def.name, state.direction.value, state.attempt + 1)
    deadline = _clamp(state, out.now + delay)
    state = replace(state, phase=Phase.BACKOFF, awaiting=next_id, deadline=deadline)
    out.note(
        HistoryKind.RETRY_SCHEDULED,
        f"{why}; attempt {state.attempt + 1} in {delay.total_seconds():.3f}s",
        state,
    )
    return state


def _advance(d: SagaDefinition, state: SagaState, out: _Out) -> SagaState:
    return _enter(d, state, d.unit_last[state.current] + 1, out)


def _idle(state: SagaState) -> SagaState:
    return replace(state, phase=Phase.IDLE, awaiting=None, deadline=None)


def _fail(state: SagaState, out: _Out, reason: str) -> SagaState:
    stuck = state.steps[state.current].name
    state = _idle(
        replace(state, status=SagaStatus.FAILED, failure=reason, stuck_step=stuck, expires_at=None)
    )
    out.note(HistoryKind.FAILED, f"needs an operator: {reason}", state)
    return state


def _action_failed(d: SagaDefinition, state: SagaState, out: _Out, reason: str) -> SagaState:
    """The current action can never succeed: compensate, or fail if past the pivot."""
    name = d.steps[state.current].name
    pivot = d.pivot_index
    if pivot is not None and state.current > pivot:
        return _fail(state, out, f"step {name} after the pivot cannot complete: {reason}")
    return _begin_compensation(d, state, state.current - 1, out, f"step {name} failed: {reason}")


def _begin_compensation(
    d: SagaDefinition, state: SagaState, below: int, out: _Out, reason: str
) -> SagaState:
    state = replace(state, status=SagaStatus.COMPENSATING, failure=reason, expires_at=None)
    out.note(HistoryKind.COMPENSATION_STARTED, reason, step=None)
    return _compensate_next(d, state, below, out)


#: what a compensation run undoes: a step that may have had an effect, or one whose
#: compensation is stuck (retried by an operator, or passed over by the ``continue`` policy)
_UNDO = (*_NEEDS_UNDO, StepStatus.COMPENSATING)


def _compensate_next(d: SagaDefinition, state: SagaState, below: int, out: _Out) -> SagaState:
    """Compensate the newest step at or below ``below`` that may have had an effect."""
    steps = state.steps
    for i in range(below, -1, -1):
        # compensatable=False means nothing to undo, even if the step names a compensation
        if steps[i].status in _UNDO and d.needs_compensation(i):
            return _send(d, state, i, Direction.COMPENSATION, out, new_budget=True)
    if d.on_compensation_failure is CompensationPolicy.CONTINUE:
        stuck = [i for i in range(len(steps) - 1, -1, -1) if steps[i].status in _STUCK]
        if stuck:
            names = ", ".join(steps[i].name for i in stuck)
            why = "; ".join(f"{steps[i].name}: {steps[i].error}" for i in stuck)
            state = replace(state, current=stuck[0], direction=Direction.COMPENSATION)
            return _fail(state, out, f"compensation failed for good of {names} ({why})")
    out.note(HistoryKind.COMPENSATED, "every completed step is compensated", step=None)
    return _idle(replace(state, status=SagaStatus.COMPENSATED, stuck_step=None))


_STUCK = (StepStatus.COMPENSATING,)


def _compensation_stuck(d: SagaDefinition, state: SagaState, out: _Out, reason: str) -> SagaState:
    """The current compensation failed for good: stop (``halt``), or leave it for an operator
    and go on with the older steps (``continue``)."""
    if d.on_compensation_failure is CompensationPolicy.HALT:
        return _fail(state, out, reason)
    state = _with_step(state, state.current, status=StepStatus.COMPENSATING, error=reason)
    out.note(
        HistoryKind.COMPENSATION_FAILED,
        f"{reason}; left for an operator, compensating the older steps",
        state,
    )
    return _compensate_next(d, _idle(state), state.current - 1, out)


# --- replies -------------------------------------------------------------------------------


def locate_command(
    d: SagaDefinition, state: SagaState, message_id: UUID
) -> tuple[int, Direction, int] | None:
    """(step index, direction, attempt) of the command of this saga with ``message_id``."""
    for i, step_def in enumerate(d.steps):
        step = state.steps[i]
        for direction, sent in (
            (Direction.ACTION, step.attempts),
            (Direction.COMPENSATION, step.compensation_attempts),
        ):
            for attempt in range(1, sent + 2):
                if command_id(state.saga_id, step_def.name, direction.value, attempt) == message_id:
                    return i, direction, attempt
    return None


def describe_command(d: SagaDefinition, state: SagaState, message_id: UUID) -> str | None:
    """Which command of this saga ``message_id`` is, e.g. ``charge action attempt 2``."""
    found = locate_command(d, state, message_id)
    if found is None:
        return None
    index, direction, attempt = found
    return f"{d.steps[index].name} {direction.value} attempt {attempt}"


def reply_mismatch(
    d: SagaDefinition, state: SagaState, event: ReplySucceeded | ReplyFailed
) -> str | None:
    """Why a reply that names one of this saga's commands (its causation id) cannot be its
    answer: it comes from another participant, or names another command type. None when it
    agrees, or names no command of this saga (then it is only noted as ignored)."""
    if state.phase is Phase.AWAITING_REPLY and event.causation_id == state.awaiting:
        # the common case, the command awaited: known without deriving every command's id
        found: tuple[int, Direction, int] | None = (state.current, state.direction, state.attempt)
    else:
        found = locate_command(d, state, event.causation_id)
    if found is None:
        return None
    index, direction, attempt = found
    step_def = d.steps[index]
    if direction is Direction.COMPENSATION and step_def.compensation is None:
        return None
    sent = f"{step_def.name} {direction.value} attempt {attempt}"
    if event.participant != step_def.participant:
        return (
            f"reply to {sent} comes from participant {event.participant!r}, but the command "
            f"went to {step_def.participant!r}"
        )
    expected = step_def.command_type(direction)
    if event.command_type is not None and event.command_type != expected:
        return (
            f"reply to {sent} names command type {event.command_type!r}, but {expected!r} was sent"
        )
    return None


def _awaited(state: SagaState) -> str:
    if state.lanes:
        waits = ", ".join(
            f"{state.steps[lane.index].name} action attempt {state.steps[lane.index].attempts}"
            + (" (backoff)" if lane.phase is Phase.BACKOFF else "")
            for lane in state.lanes
        )
        return f"awaiting {waits}"
    if state.phase is not Phase.AWAITING_REPLY:
        return f"no reply is awaited (saga {state.status.value}, {state.phase.value})"
    step = state.steps[state.current].name
    return f"awaiting {step} {state.direction.value} attempt {state.attempt}"


def _final_answer_to_earlier_attempt(
    d: SagaDefinition, state: SagaState, event: ReplySucceeded | ReplyFailed
) -> bool:
    """A final reply (success or a non-retryable failure) to an earlier attempt of the step
    and direction being run counts as the answer: every attempt carries the same idempotency
    key, so the participant gives every attempt that same final answer. Waiting for the latest
    attempt's copy instead would let a slow participant time out attempt after attempt, each
    retry adding load, until the budget runs out on a step that had in fact been answered."""
    if state.phase not in (Phase.AWAITING_REPLY, Phase.BACKOFF) or state.status.is_terminal:
        return False
    if isinstance(event, ReplyFailed) and event.retryable:
        return False  # a transient answer to an old attempt says nothing about the newer ones
    name = d.steps[state.current].name
    return any(
        command_id(state.saga_id, name, state.direction.value, attempt) == event.causation_id
        for attempt in range(1, state.attempt)
    )


def _ignore_reply(
    d: SagaDefinition, state: SagaState, event: ReplySucceeded | ReplyFailed, out: _Out
) -> None:
    known = describe_command(d, state, event.causation_id)
    if known is None:
        why = "reply answers no command of this saga"
    else:
        why = f"duplicate or late reply to {known}; {_awaited(state)}"
    out.note(HistoryKind.IGNORED, why, step=None, message_id=event.message_id)


def _on_reply(
    d: SagaDefinition, state: SagaState, event: ReplySucceeded | ReplyFailed, out: _Out
) -> SagaState | None:
    if state.lanes:
        return _on_member_reply(d, state, event, out)
    current = state.phase is Phase.AWAITING_REPLY and event.causation_id == state.awaiting
    if not current and not _final_answer_to_earlier_attempt(d, state, event):
        _ignore_reply(d, state, event, out)
        return None
    step_def = d.steps[state.current]
    mismatch = reply_mismatch(d, state, event)
    if mismatch is not None:  # the runtime dead-letters these before deciding
        out.note(HistoryKind.IGNORED, mismatch, state, message_id=event.message_id)
        return None
    if state.direction is Direction.ACTION:
        if isinstance(event, ReplySucceeded):
            state = replace(
                state,
                steps=_steps_with(state, state.current, status=StepStatus.SUCCEEDED, error=None),
                context=state.context.with_output(step_def.name, event.data),
            )
            out.note(HistoryKind.STEP_SUCCEEDED, f"{step_def.name} succeeded", state)
            return _advance(d, state, out)
        state = _with_step(state, state.current, error=event.reason)
        out.note(
            HistoryKind.STEP_FAILED,
            f"{step_def.name} failed: {event.reason}" + (" (retryable)" if event.retryable else ""),
            state,
        )
        return _on_action_failure(d, state, out, event.reason, retryable=event.retryable)
    # compensation
    if isinstance(event, ReplySucceeded):
        state = _with_step(state, state.current, status=StepStatus.COMPENSATED, error=None)
        out.note(HistoryKind.STEP_COMPENSATED, f"{step_def.name} compensated", state)
        return _compensate_next(d, state, state.current - 1, out)
    state = _with_step(state, state.current, error=event.reason)
    out.note(
        HistoryKind.COMPENSATION_FAILED,
        f"compensation of {step_def.name} failed: {event.reason}"
        + (" (retryable)" if event.retryable else ""),
        state,
    )
    return _on_compensation_failure(d, state, out, event.reason, retryable=event.retryable)


def _on_action_failure(
    d: SagaDefinition, state: SagaState, out: _Out, reason: str, *, retryable: bool
) -> SagaState:
    step_def = d.steps[state.current]
    if retryable and not step_def.retry.exhausted(state.tries):
        return _schedule_retry(d, state, out, f"{step_def.name} failed: {reason}")
    if retryable:
        reason = f"{reason} (gave up after {state.tries} attempts)"
    state = _with_step(state, state.current, status=StepStatus.FAILED)
    return _action_failed(d, state, out, reason)


def _on_compensation_failure(
    d: SagaDefinition, state: SagaState, out: _Out, reason: str, *, retryable: bool
) -> SagaState:
    step_def = d.steps[state.current]
    if retryable and not step_def.compensation_retry.exhausted(state.tries):
        return _schedule_retry(d, state, out, f"compensation of {step_def.name} failed: {reason}")
    suffix = f" after {state.tries} attempts" if retryable else " (not retryable)"
    why = f"compensation of {step_def.name} failed{suffix}: {reason}"
    return _compensation_stuck(d, state, out, why)


# --- timers --------------------------------------------------------------------------------


def _on_timer(
    d: SagaDefinition, state: SagaState, event: TimerFired, out: _Out
) -> SagaState | None:
    if state.phase is Phase.IDLE or event.timer_id != state.awaiting:
        out.note(HistoryKind.IGNORED, f"stale timer; {_awaited(state)}", step=None)
        return None
    assert state.deadline is not None
    if out.now < state.deadline:
        out.note(
            HistoryKind.IGNORED,
            f"timer not due until {state.deadline.isoformat()}",
            state,
        )
        return None
    if state.expires_at is not None and out.now >= state.expires_at:
        return _on_expiry(d, state, out)
    if state.lanes:
        return _on_member_timer(d, state, out)
    if state.phase is Phase.BACKOFF:
        return _send(d, state, state.current, state.direction, out, new_budget=False)

    step_def = d.steps[state.current]
    policy = step_def.retry_for(state.direction)
    timeout = step_def.timeout_for(state.direction).total_seconds()
    what = (
        step_def.name if state.direction is Direction.ACTION else f"compensation of {step_def.name}"
    )
    out.note(HistoryKind.STEP_TIMED_OUT, f"{what} got no reply within {timeout:g}s", state)
    if not policy.exhausted(state.tries):
        return _schedule_retry(d, state, out, f"{what} timed out")
    reason = f"{what} timed out {state.tries} times; its outcome is unknown"
    state = _with_step(state, state.current, error=reason)
    if state.direction is Direction.COMPENSATION:
        return _compensation_stuck(d, state, out, reason)
    if d.is_forward_only(state.current):
        return _fail(state, out, reason)
    state = _with_step(state, state.current, status=StepStatus.TIMED_OUT)
    # the timed-out step is compensated too: it may have taken effect
    return _begin_compensation(d, state, state.current, out, reason)


def _on_expiry(d: SagaDefinition, state: SagaState, out: _Out) -> SagaState:
    """The saga's own deadline passed while it ran forward: stop as an abort does, or, from
    the pivot on, wait for an operator."""
    assert state.expires_at is not None and d.deadline is not None
    reason = (
        f"the saga's deadline of {d.deadline.total_seconds():g}s passed "
        f"at {state.expires_at.isoformat()}"
    )
    out.note(HistoryKind.DEADLINE_PASSED, reason, step=None)
    state = replace(state, expires_at=None)
    if not state.lanes and d.is_forward_only(state.current):
        return _fail(state, out, reason)  # the step in flight stays RUNNING: outcome unknown
    return _stop_running(d, state, out, reason)


def _stop_running(d: SagaDefinition, state: SagaState, out: _Out, reason: str) -> SagaState:
    """Stop whatever is in flight forward (its outcome is unknown, so it is compensated too)
    and compensate from the newest step of the current unit."""
    if state.lanes:
        for lane in state.lanes:
            state = _with_step(state, lane.index, status=StepStatus.ABORTED)
        state = replace(state, lanes=())
    else:
        state = _with_step(state, state.current, status=StepStatus.ABORTED)
    return _begin_compensation(d, _idle(state), d.unit_last[state.current], out, reason)


# --- parallel groups -----------------------------------------------------------------------


def _fan_out(d: SagaDefinition, state: SagaState, run: list[int], out: _Out) -> SagaState:
    """Send the actions of the group members in ``run``, all in this one transition. Every
    payload is built first: if one cannot be, nothing of the group is sent."""
    built: list[tuple[int, dict[str, Any]]] = []
    for i in run:
        payload, reason = _build(d, state, i, Direction.ACTION)
        if payload is None:
            assert reason is not None
            name = d.steps[i].name
            state = _with_step(state, i, status=StepStatus.FAILED, error=reason)
            state = replace(state, current=i, direction=Direction.ACTION)
            out.note(HistoryKind.STEP_FAILED, f"{name} cannot be built: {reason}",
                     step=name, direction=Direction.ACTION)  # fmt: skip
            return _action_failed(d, state, out, reason)
        built.append((i, payload))
    lanes: list[Lane] = []
    for i, payload in built:
        attempt = state.steps[i].attempts + 1
        steps, message_id, deadline = _emit(d, state, i, Direction.ACTION, attempt, payload, out)
        state = replace(state, steps=steps)
        lanes.append(Lane(i, 1, Phase.AWAITING_REPLY, message_id, deadline, out.now))
    return _mirror(replace(state, lanes=tuple(lanes)))


def _mirror(state: SagaState) -> SagaState:
    """Show the lane whose timer is due first in the saga's own fields: the store keeps one
    timer per saga, and the first one due is the one that must fire."""
    lane = min(state.lanes, key=lambda lane: (lane.deadline, lane.index))
    return replace(
        state,
        current=lane.index,
        direction=Direction.ACTION,
        attempt=state.steps[lane.index].attempts,
        tries=lane.tries,
        phase=lane.phase,
        awaiting=lane.awaiting,
        deadline=_clamp(state, lane.deadline),
        sent_at=lane.sent_at,
    )


def _with_lane(state: SagaState, k: int, lane: Lane | None) -> SagaState:
    lanes = state.lanes
    rest = (*lanes[:k], lane, *lanes[k + 1 :]) if lane is not None else lanes[:k] + lanes[k + 1 :]
    return replace(state, lanes=rest)


def _lane_for_reply(
    d: SagaDefinition, state: SagaState, event: ReplySucceeded | ReplyFailed
) -> int | None:
    """The lane ``event`` answers: its awaited command, or (a final answer) an earlier attempt
    of it, as for a single step."""
    for k, lane in enumerate(state.lanes):
        if lane.phase is Phase.AWAITING_REPLY and lane.awaiting == event.causation_id:
            return k
    if isinstance(event, ReplyFailed) and event.retryable:
        return None
    for k, lane in enumerate(state.lanes):
        name = d.steps[lane.index].name
        for attempt in range(1, state.steps[lane.index].attempts):
            if (
                command_id(state.saga_id, name, Direction.ACTION.value, attempt)
                == event.causation_id
            ):
                return k
    return None


def _on_member_reply(
    d: SagaDefinition, state: SagaState, event: ReplySucceeded | ReplyFailed, out: _Out
) -> SagaState | None:
    k = _lane_for_reply(d, state, event)
    if k is None:
        _ignore_reply(d, state, event, out)
        return None
    mismatch = reply_mismatch(d, state, event)
    if mismatch is not None:  # the runtime dead-letters these before deciding
        out.note(HistoryKind.IGNORED, mismatch, step=None, message_id=event.message_id)
        return None
    lane = state.lanes[k]
    i, name = lane.index, d.steps[lane.index].name
    where: dict[str, Any] = {
        "step": name,
        "direction": Direction.ACTION,
        "attempt": state.steps[i].attempts,
    }
    if isinstance(event, ReplySucceeded):
        state = _with_step(state, i, status=StepStatus.SUCCEEDED, error=None)
        state = replace(state, context=state.context.with_output(name, event.data))
        out.note(HistoryKind.STEP_SUCCEEDED, f"{name} succeeded", **where)
        return _lane_ended(d, _with_lane(state, k, None), i, out)
    reason = event.reason
    state = _with_step(state, i, error=reason)
    out.note(
        HistoryKind.STEP_FAILED,
        f"{name} failed: {reason}" + (" (retryable)" if event.retryable else ""),
        **where,
    )
    running = state.status is SagaStatus.RUNNING
    if running and event.retryable and not d.steps[i].retry.exhausted(lane.tries):
        return _lane_backoff(d, state, k, out, f"{name} failed: {reason}")
    if running and event.retryable:
        reason = f"{reason} (gave up after {lane.tries} attempts)"
    state = _with_step(state, i, status=StepStatus.FAILED)
    return _lane_failed(d, _with_lane(state, k, None), i, out, f"step {name} failed: {reason}")


def _lane_backoff(d: SagaDefinition, state: SagaState, k: int, out: _Out, why: str) -> SagaState:
    lane = state.lanes[k]
    name = d.steps[lane.index].name
    attempt = state.steps[lane.index].attempts
    delay = d.steps[lane.index].retry.delay(
        lane.tries, *seed_for(state.saga_id, name, Direction.ACTION)
    )
    next_id = command_id(state.saga_id, name, Direction.ACTION.value, attempt + 1)
    lane = replace(lane, phase=Phase.BACKOFF, awaiting=next_id, deadline=out.now + delay)
    out.note(
        HistoryKind.RETRY_SCHEDULED,
        f"{why}; attempt {attempt + 1} in {delay.total_seconds():.3f}s",
        step=name,
        direction=Direction.ACTION,
        attempt=attempt,
    )
    return _mirror(_with_lane(state, k, lane))


def _lane_ended(d: SagaDefinition, state: SagaState, index: int, out: _Out) -> SagaState:
    """A member's lane closed; when it was the last one, the group is over."""
    if state.lanes:
        return _mirror(state)
    if state.status is SagaStatus.RUNNING:  # every member succeeded (or was skipped)
        return _enter(d, state, d.unit_last[index] + 1, out)
    # the group failed and its last member in flight has answered or timed out
    return _compensate_next(d, state, d.unit_last[index], out)


def _lane_failed(
    d: SagaDefinition, state: SagaState, index: int, out: _Out, reason: str
) -> SagaState:
    """Member ``index`` failed for good (its lane is closed): the group fails. Members in
    backoff are stopped (outcome unknown: compensated); members awaiting a reply are awaited,
    without retries, so that what they did is known before it is compensated."""
    if state.status is SagaStatus.RUNNING:
        state = replace(state, status=SagaStatus.COMPENSATING, failure=reason, expires_at=None)
        out.note(HistoryKind.COMPENSATION_STARTED, reason, step=None)
        waiting: list[Lane] = []
        for lane in state.lanes:
            if lane.phase is Phase.BACKOFF:
                state = _with_step(state, lane.index, status=StepStatus.ABORTED)
            else:
                waiting.append(lane)
        state = replace(state, lanes=tuple(waiting))
    return _lane_ended(d, state, index, out)


def _on_member_timer(d: SagaDefinition, state: SagaState, out: _Out) -> SagaState:
    """The timer of the mirrored lane (the first due) fired."""
    k = next(k for k, lane in enumerate(state.lanes) if lane.awaiting == state.awaiting)
    lane = state.lanes[k]
    i, step_def = lane.index, d.steps[lane.index]
    if lane.phase is Phase.BACKOFF:
        payload, reason = _build(d, state, i, Direction.ACTION)
        if payload is None:
            assert reason is not None
            state = _with_step(state, i, status=StepStatus.FAILED, error=reason)
            out.note(HistoryKind.STEP_FAILED, f"{step_def.name} cannot be built: {reason}",
                     step=step_def.name, direction=Direction.ACTION)  # fmt: skip
            why = f"step {step_def.name} failed: {reason}"
            return _lane_failed(d, _with_lane(state, k, None), i, out, why)
        attempt = state.steps[i].attempts + 1
        steps, message_id, deadline = _emit(d, state, i, Direction.ACTION, attempt, payload, out)
        state = replace(state, steps=steps)
        sent = Lane(i, lane.tries + 1, Phase.AWAITING_REPLY, message_id, deadline, out.now)
        return _mirror(_with_lane(state, k, sent))
    timeout = step_def.timeout.total_seconds()
    out.note(HistoryKind.STEP_TIMED_OUT, f"{step_def.name} got no reply within {timeout:g}s",
             step=step_def.name, direction=Direction.ACTION,
             attempt=state.steps[i].attempts)  # fmt: skip
    if state.status is SagaStatus.RUNNING and not step_def.retry.exhausted(lane.tries):
        return _lane_backoff(d, state, k, out, f"{step_def.name} timed out")
    reason = f"{step_def.name} timed out {lane.tries} times; its outcome is unknown"
    state = _with_step(state, i, status=StepStatus.TIMED_OUT, error=reason)
    return _lane_failed(d, _with_lane(state, k, None), i, out, reason)


# --- operator actions ----------------------------------------------------------------------

_ACTIONS: dict[type, OperatorAction] = {
    OperatorRetry: OperatorAction.RETRY,
    OperatorAbort: OperatorAction.ABORT,
    OperatorResolve: OperatorAction.RESOLVE,
}


def operator_refusal(d: SagaDefinition, state: SagaState, action: OperatorAction) -> str | None:
    """Why the state machine refuses ``action`` on ``state``, or None when it accepts it.

    The one place these rules live: :func:`decide` refuses an operator event with this reason,
    and :func:`allowed_actions` (what the admin API and the dashboard offer) asks the same
    question, so an offered action is never refused for its state."""
    status = state.status
    if action is OperatorAction.RETRY:
        if status is not SagaStatus.FAILED:
            return f"only a FAILED saga can be retried; this one is {status}"
        return None
    if action is OperatorAction.RESOLVE:
        if status is not SagaStatus.FAILED:
            return f"only a FAILED saga can be resolved; this one is {status}"
        return None
    if _stuck_at_pivot(d, state):
        return None
    if status is not SagaStatus.RUNNING:
        return f"only a RUNNING saga can be aborted; this one is {status}"
    if d.is_forward_only(state.current):
        return "the pivot step has run; the saga can only go forward"
    return None


def allowed_actions(d: SagaDefinition, state: SagaState) -> tuple[OperatorAction, ...]:
    """The operator actions :func:`decide` accepts in ``state``, in a fixed order."""
    return tuple(a for a in OperatorAction if operator_refusal(d, state, a) is None)


def _operator_note(
    out: _Out, state: SagaState, action: str, event: OperatorRetry | OperatorAbort | OperatorResolve
) -> None:
    out.note(HistoryKind.OPERATOR, f"{action}: {event.reason}", state, actor=event.actor)


# The handlers below run only for an action operator_refusal accepted (decide checks first).


def _on_operator_retry(
    d: SagaDefinition, state: SagaState, event: OperatorRetry, out: _Out
) -> SagaState:
    _operator_note(out, state, "retry", event)
    status = (
        SagaStatus.COMPENSATING if state.direction is Direction.COMPENSATION else SagaStatus.RUNNING
    )
    forward = state.direction is Direction.ACTION
    failure = None if forward else state.failure  # going forward again: no longer failing
    state = replace(state, status=status, stuck_step=None, failure=failure)
    return _send(d, state, state.current, state.direction, out, new_budget=True)


def _stuck_at_pivot(d: SagaDefinition, state: SagaState) -> bool:
    return (
        state.status is SagaStatus.FAILED
        and state.direction is Direction.ACTION
        and state.current == d.pivot_index
    )


def _on_operator_abort(
    d: SagaDefinition, state: SagaState, event: OperatorAbort, out: _Out
) -> SagaState:
    if _stuck_at_pivot(d, state):
        # The pivot's outcome is unknown (it timed out) or it cannot complete. The operator
        # checked that it did not take effect, so the steps before it are compensated.
        _operator_note(out, state, "abort", event)
        state = _with_step(state, state.current, status=StepStatus.FAILED)
        state = replace(state, stuck_step=None)
        reason = f"aborted by {event.actor} at the pivot: {event.reason}"
        return _begin_compensation(d, state, state.current - 1, out, reason)
    _operator_note(out, state, "abort", event)
    reason = f"aborted by {event.actor}: {event.reason}"
    return _stop_running(d, state, out, reason)


def _on_operator_resolve(
    d: SagaDefinition, state: SagaState, event: OperatorResolve, out: _Out
) -> SagaState:
    _operator_note(out, state, "resolved by hand", event)
    name = state.steps[state.current].name
    if state.direction is Direction.COMPENSATION:
        state = _with_step(state, state.current, status=StepStatus.COMPENSATED, error=None)
        state = replace(state, status=SagaStatus.COMPENSATING, stuck_step=None)
        return _compensate_next(d, state, state.current - 1, out)
    state = _with_step(state, state.current, status=StepStatus.SUCCEEDED, error=None)
    state = replace(
        state,
        status=SagaStatus.RUNNING,
        stuck_step=None,
        failure=None,
        context=state.context.with_output(name, event.data),
    )
    return _advance(d, state, out)
