"""Small builders and a driver that keep the engine tests short.

``make_definition(n)`` builds a valid saga of ``n`` steps named ``s1..sN`` run by participants
``p1..pN`` (actions ``do_sK``, compensations ``undo_sK``). :class:`Driver` holds one saga's
state and a clock, applies events through :func:`saga.core.engine.decide`, checks the version
rule on every transition and remembers everything that was emitted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from uuid import UUID

from saga.core.definition import PayloadBuilder, RetryPolicy, SagaDefinition, Step, pass_input
from saga.core.engine import decide
from saga.core.state import (
    JSON,
    Command,
    Direction,
    Event,
    HistoryEntry,
    HistoryKind,
    OperatorAbort,
    OperatorResolve,
    OperatorRetry,
    Phase,
    ReplyFailed,
    ReplySucceeded,
    SagaState,
    SagaStatus,
    Started,
    StepStatus,
    TimerFired,
    Transition,
)

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
SAGA_ID = UUID("00000000-0000-4000-8000-000000000001")
OTHER_SAGA_ID = UUID("00000000-0000-4000-8000-000000000002")
TIMEOUT = timedelta(seconds=10)
INITIAL_BACKOFF = timedelta(milliseconds=100)
MAX_BACKOFF = timedelta(seconds=2)


def step_name(index: int) -> str:
    return f"s{index + 1}"


def participant(index: int) -> str:
    return f"p{index + 1}"


def policy(max_attempts: int | None) -> RetryPolicy:
    return RetryPolicy(
        max_attempts=max_attempts, initial_backoff=INITIAL_BACKOFF, max_backoff=MAX_BACKOFF
    )


def make_definition(
    n: int = 3,
    *,
    pivot: int | None = None,
    not_compensatable: Iterable[int] = (),
    max_attempts: int | Mapping[int, int | None] | None = 3,
    compensation_attempts: int | Mapping[int, int | None] | None = 3,
    payloads: Mapping[int, PayloadBuilder] | None = None,
    compensation_payloads: Mapping[int, PayloadBuilder] | None = None,
    name: str = "test_saga",
) -> SagaDefinition:
    """A valid definition of ``n`` steps; indexes are 0-based, names 1-based (``s1`` is 0)."""
    skip = set(not_compensatable)

    def per_step(value: int | Mapping[int, int | None] | None, i: int) -> int | None:
        return value.get(i, 3) if isinstance(value, Mapping) else value

    steps = []
    for i in range(n):
        forward_only = pivot is not None and i >= pivot
        undoable = i not in skip and not forward_only
        steps.append(
            Step(
                name=step_name(i),
                participant=participant(i),
                action=f"do_{step_name(i)}",
                payload=(payloads or {}).get(i, pass_input),
                compensation=f"undo_{step_name(i)}" if undoable else None,
                compensation_payload=(compensation_payloads or {}).get(i, pass_input),
                timeout=TIMEOUT,
                retry=policy(per_step(max_attempts, i)),
                compensation_retry=policy(per_step(compensation_attempts, i)),
                compensatable=i not in skip,
                pivot=i == pivot,
            )
        )
    definition = SagaDefinition(name, 1, steps)
    definition.validate()
    return definition


@dataclass
class Driver:
    """One saga, a clock, and everything the engine emitted for it."""

    definition: SagaDefinition
    saga_id: UUID = SAGA_ID
    now: datetime = T0
    state: SagaState | None = None
    transitions: list[Transition] = field(default_factory=list)

    # --- applying events ---------------------------------------------------------------

    def apply(self, event: Event) -> Transition:
        before = self.state
        t = decide(self.definition, before, event, self.now)
        if before is not None:
            if t.applied:
                assert t.state.version == before.version + 1, "applied: version + 1"
                assert t.state.updated_at == self.now
            else:
                assert t.state == before, "not applied: state unchanged"
                assert t.state.version == before.version
                assert t.commands == ()
                # ignored: one history entry says why; refused: the reason, and no history
                if t.refused is None:
                    assert t.history, "an ignored event must say why"
                else:
                    assert t.history == (), "a refused operator action writes no history"
        self.state = t.state
        self.transitions.append(t)
        return t

    def start(self, data: Mapping[str, JSON] | None = None, key: str | None = None) -> Transition:
        return self.apply(Started(self.saga_id, dict(data or {"order": 1}), key))

    @property
    def s(self) -> SagaState:
        assert self.state is not None, "start the saga first"
        return self.state

    @property
    def awaiting(self) -> UUID:
        assert self.s.awaiting is not None, "nothing is awaited"
        return self.s.awaiting

    # --- replies -----------------------------------------------------------------------

    @property
    def commands(self) -> list[Command]:
        return [c for t in self.transitions for c in t.commands]

    @property
    def last_command(self) -> Command:
        assert self.commands, "no command was sent"
        return self.commands[-1]

    def succeed(
        self,
        data: Mapping[str, JSON] | None = None,
        *,
        to: Command | None = None,
        participant: str | None = None,
    ) -> Transition:
        """Reply success to ``to`` (default: the last command sent)."""
        cmd = to or self.last_command
        return self.apply(
            ReplySucceeded(cmd.message_id, participant or cmd.participant, dict(data or {}))
        )

    def fail(
        self,
        reason: str = "declined",
        *,
        retryable: bool = False,
        to: Command | None = None,
        participant: str | None = None,
    ) -> Transition:
        cmd = to or self.last_command
        return self.apply(
            ReplyFailed(cmd.message_id, participant or cmd.participant, reason, retryable)
        )

    # --- time --------------------------------------------------------------------------

    def advance(self, delta: timedelta) -> None:
        self.now += delta

    def fire(self, timer_id: UUID | None = None, *, due: bool = True) -> Transition:
        """Fire the timer armed for ``awaiting`` (or ``timer_id``); ``due`` moves the clock to
        the deadline first."""
        if due and self.s.deadline is not None:
            self.now = max(self.now, self.s.deadline)
        tid = timer_id if timer_id is not None else self.s.awaiting
        assert tid is not None, "no timer is armed"
        return self.apply(TimerFired(tid))

    def retry_failed_attempts(self, times: int, *, reason: str = "busy") -> None:
        """Fail the current command ``times`` times retryably, sending each next attempt."""
        for _ in range(times):
            self.fail(reason, retryable=True)
            assert self.s.phase is Phase.BACKOFF
            self.fire()

    def time_out(self) -> Transition:
        assert self.s.phase is Phase.AWAITING_REPLY
        return self.fire()

    # --- operators -----------------------------------------------------------------------

    def operator_retry(self) -> Transition:
        return self.apply(OperatorRetry("alice", "fixed the participant"))

    def operator_abort(self) -> Transition:
        return self.apply(OperatorAbort("alice", "customer cancelled"))

    def operator_resolve(self, data: Mapping[str, JSON] | None = None) -> Transition:
        return self.apply(OperatorResolve("alice", "done by hand", dict(data or {})))

    # --- reading what happened ----------------------------------------------------------

    def status_of(self, name: str) -> StepStatus:
        return self.s.step(name).status

    def statuses(self) -> tuple[StepStatus, ...]:
        return tuple(step.status for step in self.s.steps)

    def sent(self, direction: Direction | None = None) -> list[tuple[str, int]]:
        """(step, attempt) of each command sent, optionally of one direction."""
        return [
            (c.step, c.attempt)
            for c in self.commands
            if direction is None or c.direction is direction
        ]

    def compensation_order(self) -> list[str]:
        return [c.step for c in self.commands if c.direction is Direction.COMPENSATION]

    def history(self, kind: HistoryKind | None = None) -> list[HistoryEntry]:
        return [h for t in self.transitions for h in t.history if kind is None or h.kind is kind]

    def succeed_until_terminal(self, limit: int = 100) -> None:
        """Answer every command with success (and fire due backoff timers) until the saga is
        terminal."""
        for _ in range(limit):
            if self.s.status.is_terminal:
                return
            if self.s.phase is Phase.BACKOFF:
                self.fire()
            else:
                self.succeed()
        raise AssertionError(f"saga still {self.s.status} after {limit} events")


def started(definition: SagaDefinition, saga_id: UUID = SAGA_ID) -> Driver:
    driver = Driver(definition, saga_id)
    driver.start()
    return driver


def run_forward(driver: Driver, successes: int) -> Driver:
    """Answer the next ``successes`` actions with success (data ``{"n": k}``)."""
    for k in range(successes):
        driver.succeed({"n": k})
    return driver


def is_settled(state: SagaState) -> bool:
    """COMPLETED or COMPENSATED: nothing can ever change again."""
    return state.status in (SagaStatus.COMPLETED, SagaStatus.COMPENSATED)
