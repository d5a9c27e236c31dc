"""The saga's state, the events that change it, and what a decision produces.

Everything here is a frozen dataclass: the engine builds new values instead of mutating, so any
state can be kept, compared and replayed. Pydantic stays at the wire (``contracts``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import TypeAlias
from uuid import UUID

from saga.core.errors import UnknownSagaError

__all__ = [
    "JSON",
    "Command",
    "Direction",
    "Event",
    "HistoryEntry",
    "HistoryKind",
    "JSONObject",
    "Lane",
    "OperatorAbort",
    "OperatorAction",
    "OperatorResolve",
    "OperatorRetry",
    "Phase",
    "ReplyFailed",
    "ReplySucceeded",
    "SagaContext",
    "SagaState",
    "SagaStatus",
    "Started",
    "StepState",
    "StepStatus",
    "TimerFired",
    "Transition",
]

JSON: TypeAlias = str | int | float | bool | list["JSON"] | dict[str, "JSON"] | None
JSONObject: TypeAlias = dict[str, JSON]


class SagaStatus(StrEnum):
    RUNNING = "RUNNING"
    COMPENSATING = "COMPENSATING"
    COMPLETED = "COMPLETED"
    COMPENSATED = "COMPENSATED"
    FAILED = "FAILED"

    @property
    def is_terminal(self) -> bool:
        """FAILED counts: nothing more happens until an operator acts."""
        return self in (SagaStatus.COMPLETED, SagaStatus.COMPENSATED, SagaStatus.FAILED)


class StepStatus(StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"  # the participant said no: nothing to undo
    TIMED_OUT = "TIMED_OUT"  # outcome unknown after every retry: compensated to be safe
    ABORTED = "ABORTED"  # an operator aborted while it was in flight: outcome unknown too
    COMPENSATING = "COMPENSATING"
    COMPENSATED = "COMPENSATED"
    SKIPPED = "SKIPPED"  # its condition was false: nothing sent, nothing to undo


class Direction(StrEnum):
    ACTION = "action"
    COMPENSATION = "compensation"


class Phase(StrEnum):
    AWAITING_REPLY = "awaiting_reply"  # the command was sent; the deadline is its timeout
    BACKOFF = "backoff"  # the next attempt is sent when the deadline passes
    IDLE = "idle"  # terminal: no command, no timer


@dataclass(frozen=True, slots=True)
class SagaContext:
    """What steps can read: the saga's input and each step's reply data, kept apart by step name.

    Outputs are namespaced so two steps that both return ``id`` never overwrite each other.
    """

    input: Mapping[str, JSON] = field(default_factory=dict)
    outputs: Mapping[str, Mapping[str, JSON]] = field(default_factory=dict)
    #: the saga's own id: a natural business key for participants (e.g. an order reference)
    saga_id: UUID | None = None

    def output(self, step: str) -> Mapping[str, JSON]:
        """The data ``step`` replied with; a clear error if it has not succeeded yet."""
        try:
            return self.outputs[step]
        except KeyError:
            done = ", ".join(sorted(self.outputs)) or "none"
            raise UnknownSagaError(
                f"step {step!r} has no output yet (with output: {done})"
            ) from None

    def with_output(self, step: str, data: Mapping[str, JSON]) -> SagaContext:
        return SagaContext(self.input, {**self.outputs, step: dict(data)}, self.saga_id)


@dataclass(frozen=True, slots=True)
class StepState:
    name: str
    status: StepStatus = StepStatus.PENDING
    attempts: int = 0  # action attempts sent
    compensation_attempts: int = 0
    error: str | None = None  # the last failure reason, for operators


@dataclass(frozen=True, slots=True)
class Lane:
    """One member of a parallel group whose action is in flight: awaiting its reply, or in a
    backoff before its next attempt. Its attempt number is its step's ``attempts``."""

    index: int
    tries: int
    phase: Phase
    awaiting: UUID
    deadline: datetime
    sent_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class SagaState:
    """One saga instance. ``version`` goes up by exactly one per applied event."""

    saga_id: UUID
    name: str
    definition_version: int
    status: SagaStatus
    steps: tuple[StepState, ...]
    context: SagaContext
    current: int  # index of the step being run or compensated
    direction: Direction
    attempt: int  # attempt number of the current command; only ever grows, so ids never repeat
    tries: int  # attempts in the current retry budget (an operator retry starts a new one)
    phase: Phase
    awaiting: UUID | None  # id of the command awaited, or to be sent when the backoff ends
    deadline: datetime | None
    version: int
    created_at: datetime
    updated_at: datetime
    key: str | None = None
    failure: str | None = None  # why the saga compensates or failed
    stuck_step: str | None = None  # the step an operator must look at when FAILED
    #: when the awaited command was created (meaningful in AWAITING_REPLY): a step's latency
    sent_at: datetime | None = None
    #: W3C trace context of the saga's span (``traceparent``, ``tracestate``, and ``parent``:
    #: the starter's), kept with the saga so every step, on any instance, after any restart,
    #: continues one trace. The engine only carries it.
    trace: Mapping[str, str] | None = None
    #: the members of a parallel group in flight, one lane each; empty otherwise (then the
    #: fields above describe the one command in flight). While a group runs, ``current`` ..
    #: ``sent_at`` mirror the lane whose timer is due first, so the saga keeps one timer.
    lanes: tuple[Lane, ...] = ()
    #: the saga's own deadline, armed while RUNNING (``deadline`` is never later than it);
    #: None without one, and once the saga has left RUNNING
    expires_at: datetime | None = None

    def step(self, name: str) -> StepState:
        for s in self.steps:
            if s.name == name:
                return s
        raise UnknownSagaError(f"saga {self.name!r} has no step {name!r}")


# --- events -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Started:
    saga_id: UUID
    input: Mapping[str, JSON]
    key: str | None = None
    trace: Mapping[str, str] | None = None  # see SagaState.trace


@dataclass(frozen=True, slots=True)
class ReplySucceeded:
    """A participant's success reply; ``causation_id`` is the id of the command it answers."""

    causation_id: UUID
    participant: str
    data: Mapping[str, JSON] = field(default_factory=dict)
    message_id: UUID | None = None
    command_type: str | None = None  # None: not checked (events built by hand in tests)


@dataclass(frozen=True, slots=True)
class ReplyFailed:
    causation_id: UUID
    participant: str
    reason: str
    retryable: bool = False
    message_id: UUID | None = None
    command_type: str | None = None  # None: not checked (events built by hand in tests)


@dataclass(frozen=True, slots=True)
class TimerFired:
    """The saga's deadline passed. ``timer_id`` is the ``awaiting`` id it was armed for, so a
    timer that fires twice (clock jump, two pollers) is recognised and ignored."""

    timer_id: UUID


class OperatorAction(StrEnum):
    """The operator actions, named as the admin API's paths and the CLI's commands name them."""

    RETRY = "retry"
    ABORT = "abort"
    RESOLVE = "resolve"


@dataclass(frozen=True, slots=True)
class OperatorRetry:
    actor: str
    reason: str


@dataclass(frozen=True, slots=True)
class OperatorAbort:
    actor: str
    reason: str


@dataclass(frozen=True, slots=True)
class OperatorResolve:
    actor: str
    reason: str
    data: Mapping[str, JSON] = field(default_factory=dict)


Event: TypeAlias = (
    Started
    | ReplySucceeded
    | ReplyFailed
    | TimerFired
    | OperatorRetry
    | OperatorAbort
    | OperatorResolve
)


# --- what a decision produces ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Command:
    """A message to a participant. The runtime turns it into an outbox row."""

    message_id: UUID
    idempotency_key: UUID
    saga_id: UUID
    saga_name: str
    step: str
    direction: Direction
    attempt: int
    participant: str
    command_type: str
    payload: Mapping[str, JSON]
    deadline: datetime


class HistoryKind(StrEnum):
    STARTED = "started"
    COMMAND_SENT = "command_sent"
    RETRY_SCHEDULED = "retry_scheduled"
    STEP_SUCCEEDED = "step_succeeded"
    STEP_FAILED = "step_failed"
    STEP_TIMED_OUT = "step_timed_out"
    STEP_SKIPPED = "step_skipped"  # its condition was false
    DEADLINE_PASSED = "deadline_passed"  # the saga's own deadline, not a step's timeout
    COMPENSATION_STARTED = "compensation_started"
    STEP_COMPENSATED = "step_compensated"
    COMPENSATION_FAILED = "compensation_failed"
    COMPLETED = "completed"
    COMPENSATED = "compensated"
    FAILED = "failed"
    OPERATOR = "operator"
    IGNORED = "ignored"  # a duplicate, late or spoofed message, or a stale timer
    #: an operator action that did not apply: written by earlier versions only (a refusal is
    #: now answered and logged, never stored), kept so their histories still load
    REJECTED = "rejected"


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One line of a saga's audit trail."""

    at: datetime
    kind: HistoryKind
    detail: str
    step: str | None = None
    direction: Direction | None = None
    attempt: int | None = None
    message_id: UUID | None = None
    actor: str | None = None


@dataclass(frozen=True, slots=True)
class Transition:
    """The result of one decision. When ``applied`` is false the state is unchanged (same
    version) and either ``history`` says why the event was ignored, or ``refused`` says why an
    operator action does not apply. A refusal has no history: it changed nothing, and an
    operator trying buttons must not fill the saga's audit trail; the caller answers and logs
    it."""

    state: SagaState
    commands: tuple[Command, ...] = ()
    history: tuple[HistoryEntry, ...] = ()
    applied: bool = True
    refused: str | None = None
