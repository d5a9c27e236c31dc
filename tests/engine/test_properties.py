"""Stateful property tests: random sagas driven by random, hostile event sequences.

A :class:`~hypothesis.stateful.RuleBasedStateMachine` starts one to three sagas over random
definitions (1-6 steps, optional pivot, random retry budgets and compensatable flags, parallel
groups before the pivot, steps skipped by their condition, either compensation-failure policy,
an optional saga deadline) and throws
at them replies to the awaited command, duplicate and late replies to anything ever sent (also
another saga's commands), replies with random causation ids or from the wrong participant, due,
early, stale and doubled timers, clock jumps and operator actions. Every transition is checked
against the engine's rules; at the end every saga must still reach COMPLETED or COMPENSATED when
driven only with success replies, due timers and operator retries.

1,000 examples always (about 15 s on one core), so CI needs no special profile;
``SAGA_PROPERTY_EXAMPLES=100`` makes a quick local run.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from uuid import UUID

from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from saga.core.definition import CompensationPolicy, Parallel, RetryPolicy, SagaDefinition, Step
from saga.core.engine import allowed_actions, decide
from saga.core.ids import command_id
from saga.core.state import (
    Command,
    Direction,
    Event,
    HistoryKind,
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
    StepStatus,
    TimerFired,
    Transition,
)

from .helpers import T0, is_settled

EXAMPLES = int(os.environ.get("SAGA_PROPERTY_EXAMPLES") or 1000)
MAX_SAGAS = 3

# --- random definitions ---------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """A generated definition plus what the test expects of it, computed independently."""

    definition: SagaDefinition
    undoable: frozenset[int]  # steps whose effect must be undone when the saga compensates
    skipped: frozenset[int] = frozenset()  # steps whose condition is false for this saga
    units: tuple[tuple[int, int], ...] = ()  # (first, last) of each step or group, in order

    @property
    def n(self) -> int:
        return len(self.definition.steps)

    @property
    def continues(self) -> bool:
        return self.definition.on_compensation_failure is CompensationPolicy.CONTINUE

    def unit_of(self, i: int) -> tuple[int, int]:
        return next(u for u in self.units if u[0] <= i <= u[1])

    def next_run(self, after: int) -> list[int]:
        """The steps sent when the unit ending at ``after`` is done: the first later unit with
        a step that is not skipped; empty when the saga completes."""
        for first, last in self.units:
            run = [i for i in range(first, last + 1) if i not in self.skipped]
            if first > after and run:
                return run
        return []

    @property
    def pivot(self) -> int | None:
        return next((i for i, s in enumerate(self.definition.steps) if s.pivot), None)


budgets = st.sampled_from([1, 1, 2, 3, None])


@st.composite
def specs(draw: st.DrawFn) -> Spec:
    n = draw(st.integers(1, 6))
    pivot = draw(st.one_of(st.none(), st.integers(0, n - 1)))
    steps, undoable, skipped = [], set(), set()
    for i in range(n):
        forward_only = pivot is not None and i >= pivot
        compensatable = draw(st.sampled_from([True, True, True, False]))
        # before the pivot a compensatable step needs a compensation; a step with nothing to
        # undo may still name one (the definition allows it), but must never be compensated
        has_compensation = not forward_only and (compensatable or draw(st.booleans()))
        if not forward_only and compensatable:
            undoable.add(i)
        backoff = timedelta(milliseconds=draw(st.integers(0, 2000)))
        steps.append(
            Step(
                name=f"s{i + 1}",
                participant=f"p{i + 1}",
                action=f"do_s{i + 1}",
                compensation=f"undo_s{i + 1}" if has_compensation else None,
                timeout=timedelta(seconds=draw(st.integers(1, 30))),
                compensation_timeout=draw(
                    st.one_of(st.none(), st.integers(1, 30).map(lambda s: timedelta(seconds=s)))
                ),
                retry=RetryPolicy(
                    max_attempts=draw(budgets),
                    initial_backoff=backoff,
                    max_backoff=backoff * 4,
                    jitter=draw(st.sampled_from([0.0, 0.1, 0.5])),
                ),
                compensation_retry=RetryPolicy(
                    max_attempts=draw(budgets), initial_backoff=backoff, max_backoff=backoff * 4
                ),
                compensatable=compensatable,
                pivot=i == pivot,
                when=_unless_skipped(f"s{i + 1}") if draw(st.integers(0, 3)) == 0 else None,
            )
        )
        if steps[-1].when is not None and draw(st.booleans()):
            skipped.add(i)
    if len(skipped) == n:
        skipped.discard(0)  # something must run, or the saga sends nothing to reply to
    # parallel groups of two or three steps, all before the pivot
    units: list[tuple[int, int]] = []
    items: list[Step | Parallel] = []
    i, grouping_ends = 0, n if pivot is None else pivot
    while i < n:
        size = draw(st.sampled_from([1, 1, 2, 3]))
        if size > 1 and i + size <= grouping_ends:
            items.append(Parallel(*steps[i : i + size]))
        else:
            size = 1
            items.append(steps[i])
        units.append((i, i + size - 1))
        i += size
    definition = SagaDefinition(
        f"prop{n}",
        1,
        items,
        deadline=draw(st.one_of(st.none(), st.integers(1, 90).map(lambda s: timedelta(seconds=s)))),
        on_compensation_failure=draw(st.sampled_from(list(CompensationPolicy))),
    )
    definition.validate()
    return Spec(definition, frozenset(undoable), frozenset(skipped), tuple(units))


def _unless_skipped(name: str) -> Callable[[SagaContext], bool]:
    """A step's condition: false when the saga's input names the step (a pure function of the
    context, as conditions must be)."""

    def when(ctx: SagaContext) -> bool:
        skip = ctx.input["skip"]
        assert isinstance(skip, list)
        return name not in skip

    return when


# --- one tracked saga -----------------------------------------------------------------------


@dataclass
class Tracked:
    spec: Spec
    saga_id: UUID
    state: SagaState | None = None
    sent: list[Command] = field(default_factory=list)
    last_compensated_index: int | None = None  # step of the last compensation command
    compensation_began: bool = False
    must_undo: frozenset[int] = frozenset()
    compensated: Counter[int] = field(default_factory=Counter)
    seen: set[str] = field(default_factory=set)  # statuses and history kinds, for statistics
    reopened: bool = False  # an operator restarted a compensation run (``continue`` policy)

    @property
    def s(self) -> SagaState:
        assert self.state is not None
        return self.state

    def copy(self) -> Tracked:
        return Tracked(
            self.spec,
            self.saga_id,
            self.state,
            list(self.sent),
            self.last_compensated_index,
            self.compensation_began,
            self.must_undo,
            Counter(self.compensated),
            set(self.seen),
            self.reopened,
        )


def reply(causation: UUID, participant: str, outcome: str) -> Event:
    if outcome == "ok":
        return ReplySucceeded(causation, participant, {"from": participant})
    return ReplyFailed(causation, participant, "refused", retryable=outcome == "retryable")


outcomes = st.sampled_from(["ok", "ok", "retryable", "fatal"])
picks = st.integers(0, MAX_SAGAS - 1)


class SagaMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.sagas: list[Tracked] = []
        self.now = T0
        self.broken = False  # a check failed: teardown must not bury it under a second error

    # --- the checker every event goes through ------------------------------------------

    def apply(self, tr: Tracked, event: Event) -> Transition:
        try:
            return self._apply(tr, event)
        except Exception:
            self.broken = True
            raise

    def _apply(self, tr: Tracked, event: Event) -> Transition:
        spec, before = tr.spec, tr.state
        t = decide(spec.definition, before, event, self.now)
        after = t.state

        # version and no-op rules
        if before is None:
            assert t.applied and after.version == 1
        elif t.applied:
            assert after.version == before.version + 1, (before.version, after.version)
            assert after.updated_at == self.now
        else:
            assert after is before, "an event that is not applied leaves the state alone"
            assert t.commands == ()
            if t.refused is not None:  # an operator action the state refuses: no history
                assert isinstance(event, OperatorRetry | OperatorAbort | OperatorResolve)
                assert t.history == ()
            else:
                assert t.history
                assert {h.kind for h in t.history} == {HistoryKind.IGNORED}
        if before is not None and is_settled(before):
            assert not t.applied and t.commands == (), f"{event} changed a {before.status} saga"
        if before is not None and before.status is SagaStatus.FAILED and t.applied:
            assert isinstance(event, OperatorRetry | OperatorResolve | OperatorAbort), (
                "FAILED waits for an operator"
            )

        names = [s.name for s in spec.definition.steps]
        began = after.status in (SagaStatus.COMPENSATING, SagaStatus.COMPENSATED)
        if (
            before is not None
            and t.applied
            and (began or after.direction is Direction.COMPENSATION)
        ):
            tr.compensation_began = True

        # a step only fails (nothing to undo) on a failure reply to one of its actions, or an
        # abort of the stuck pivot; it is only skipped when its condition is false
        for i, new in enumerate(after.steps):
            old = None if before is None else before.steps[i].status
            if new.status is StepStatus.FAILED and old is not StepStatus.FAILED:
                by_reply = isinstance(event, ReplyFailed) and any(
                    c.message_id == event.causation_id
                    and c.step == names[i]
                    and c.direction is Direction.ACTION
                    for c in tr.sent
                )
                by_abort = isinstance(event, OperatorAbort) and i == spec.pivot
                assert by_reply or by_abort, f"{names[i]} FAILED by {event}"
            if new.status is StepStatus.SKIPPED:
                assert i in spec.skipped, f"{names[i]} skipped, yet its condition is true"

        # every step whose action was sent may have had an effect, unless it was refused
        acted = {
            names.index(c.step) for c in (*tr.sent, *t.commands) if c.direction is Direction.ACTION
        }
        tr.must_undo = frozenset(
            i
            for i in spec.undoable
            if i in acted and after.steps[i].status is not StepStatus.FAILED
        )

        # commands: fresh deterministic ids, compensations newest first and only when due
        lanes = {lane.awaiting: lane for lane in after.lanes}
        for cmd in t.commands:
            i = names.index(cmd.step)
            assert cmd.saga_id == tr.saga_id
            assert cmd.message_id == command_id(
                tr.saga_id, cmd.step, cmd.direction.value, cmd.attempt
            )
            assert all(cmd.message_id != c.message_id for c in tr.sent), "message id reused"
            step_def = spec.definition.steps[i]
            timeout = step_def.timeout
            if cmd.direction is Direction.COMPENSATION and step_def.compensation_timeout:
                timeout = step_def.compensation_timeout
            assert cmd.deadline == self.now + timeout
            assert i not in spec.skipped, f"{cmd.step} is skipped, yet it was sent"
            if cmd.message_id in lanes:  # a member of a group in flight
                assert lanes[cmd.message_id].deadline == cmd.deadline
                assert spec.unit_of(i)[0] < spec.unit_of(i)[1]
            else:
                assert len(t.commands) == 1, "only a group sends several commands at once"
                assert after.awaiting == cmd.message_id
                expires = after.expires_at
                assert after.deadline == (
                    cmd.deadline if expires is None else min(cmd.deadline, expires)
                )
            if cmd.direction is Direction.COMPENSATION:
                assert i in spec.undoable, f"{cmd.step} has nothing to undo"
                assert i in tr.must_undo, f"{cmd.step} was never done, yet it is compensated"
                # only once every member in flight has answered or timed out
                assert not after.lanes
                assert all(st.status is not StepStatus.RUNNING for st in after.steps)
                if tr.last_compensated_index is not None:
                    assert i <= tr.last_compensated_index, "compensation out of order"
                if not tr.reopened:
                    for j in range(i):
                        assert after.steps[j].status is not StepStatus.COMPENSATED
                for j in tr.must_undo:  # and none is passed over (group boundaries included)
                    left = after.steps[j].status
                    assert (
                        j <= i
                        or left is StepStatus.COMPENSATED
                        or (spec.continues and left is StepStatus.COMPENSATING)  # stuck
                    ), j
                tr.last_compensated_index = i
            else:
                assert not tr.compensation_began, "an action sent after compensation began"
            tr.sent.append(cmd)

        # each step is compensated at most once, and stays compensated
        if before is not None:
            for i, (old, new) in enumerate(zip(before.steps, after.steps, strict=True)):
                if old.status is StepStatus.COMPENSATED:
                    assert new.status is StepStatus.COMPENSATED
                elif new.status is StepStatus.COMPENSATED:
                    tr.compensated[i] += 1
        assert all(v == 1 for v in tr.compensated.values())

        if any("left for an operator" in h.detail for h in t.history):
            tr.seen.add("continued past a stuck compensation")
        if after.status is SagaStatus.FAILED and (after.failure or "").startswith(
            "compensation failed for good of"
        ):
            tr.seen.add("failed naming every stuck compensation")
        tr.state = after
        tr.seen.add(f"status {after.status}")
        tr.seen.update(f"history {h.kind}" for h in t.history)
        self.check_state(tr)
        return t

    def check_state(self, tr: Tracked) -> None:
        s, spec = tr.s, tr.spec
        pivot = spec.pivot
        if pivot is not None:
            for step in s.steps[pivot:]:
                assert step.status not in (StepStatus.COMPENSATING, StepStatus.COMPENSATED)
        if s.status is SagaStatus.COMPLETED:
            assert all(
                step.status is (StepStatus.SKIPPED if i in spec.skipped else StepStatus.SUCCEEDED)
                for i, step in enumerate(s.steps)
            )
            assert not tr.compensation_began
        if s.status is SagaStatus.COMPENSATED:
            assert tr.compensation_began
            assert set(tr.compensated) == set(tr.must_undo), (tr.compensated, tr.must_undo)
        if s.status is SagaStatus.FAILED:
            assert s.stuck_step is not None and s.stuck_step == s.steps[s.current].name
            if s.direction is Direction.COMPENSATION:  # the newest stuck compensation is named
                stuck = [i for i, st in enumerate(s.steps) if st.status is StepStatus.COMPENSATING]
                assert stuck and s.current == max(stuck)
                assert spec.continues or stuck == [s.current]
        else:
            assert s.stuck_step is None
        if s.status is not SagaStatus.RUNNING:
            assert s.expires_at is None, "the saga's deadline only bounds the forward run"
        elif s.expires_at is not None:
            assert s.deadline is not None and s.deadline <= s.expires_at
        if s.status.is_terminal:
            assert (s.phase, s.awaiting, s.deadline) == (Phase.IDLE, None, None)
            assert s.lanes == ()
        else:
            assert s.phase is not Phase.IDLE and s.awaiting is not None and s.deadline is not None
        if s.lanes:
            # a group in flight (or draining after one member failed): the saga's one timer is
            # the lane due first, every lane's step is running, all in one group
            first = min(s.lanes, key=lambda lane: (lane.deadline, lane.index))
            assert (s.current, s.awaiting, s.tries) == (first.index, first.awaiting, first.tries)
            expires = s.expires_at
            assert s.deadline == (
                first.deadline if expires is None else min(first.deadline, expires)
            )
            assert s.direction is Direction.ACTION
            assert len({spec.unit_of(lane.index) for lane in s.lanes}) == 1
            assert all(s.steps[lane.index].status is StepStatus.RUNNING for lane in s.lanes)
            if s.status is SagaStatus.COMPENSATING:
                assert all(lane.phase is Phase.AWAITING_REPLY for lane in s.lanes), "no retries"
        elif not s.status.is_terminal:
            assert (s.status is SagaStatus.COMPENSATING) == (s.direction is Direction.COMPENSATION)

    def check_answer(self, tr: Tracked, before: SagaState, outcome: str) -> None:
        """The rules for one answer (``ok``, ``retryable``, ``fatal`` or ``timeout``) to the
        awaited command, written out independently of the engine."""
        if before.lanes:
            self.check_member_answer(tr, before, before.current, outcome)
            return
        after, spec, i = tr.s, tr.spec, before.current
        step_def, pivot = spec.definition.steps[i], spec.pivot
        name = step_def.name
        undoing = before.direction is Direction.COMPENSATION
        budget = (step_def.compensation_retry if undoing else step_def.retry).max_attempts
        retry = outcome in ("retryable", "timeout") and (budget is None or before.tries < budget)
        if outcome == "ok" and undoing:
            assert after.steps[i].status is StepStatus.COMPENSATED
            if spec.continues and after.status is SagaStatus.FAILED:
                return  # the run is over, but older compensations are stuck
            assert after.status in (SagaStatus.COMPENSATING, SagaStatus.COMPENSATED)
            assert after.status is SagaStatus.COMPENSATED or after.current < i
        elif outcome == "ok":
            assert after.steps[i].status is StepStatus.SUCCEEDED
            assert after.context.output(name) == {"from": step_def.participant}
            self.check_moved_on(tr, i)
        elif retry:
            assert (after.status, after.phase, after.current) == (before.status, Phase.BACKOFF, i)
            assert after.direction is before.direction
            assert after.awaiting == command_id(
                tr.saga_id, name, before.direction.value, before.attempt + 1
            )
        elif undoing and spec.continues:  # left for an operator; the older steps go on
            assert after.steps[i].status is StepStatus.COMPENSATING
            assert after.status is SagaStatus.FAILED or after.current < i
        elif undoing:
            assert (after.status, after.stuck_step) == (SagaStatus.FAILED, name)
        elif pivot is not None and (i > pivot or (i == pivot and outcome == "timeout")):
            # past the pivot (or the pivot's outcome unknown): wait for an operator
            assert (after.status, after.stuck_step) == (SagaStatus.FAILED, name)
            assert tr.last_compensated_index is None
        else:
            assert after.status in (SagaStatus.COMPENSATING, SagaStatus.COMPENSATED)
            if outcome == "timeout":
                assert after.steps[i].status in (StepStatus.TIMED_OUT, StepStatus.COMPENSATING)
            else:
                assert after.steps[i].status is StepStatus.FAILED

    def check_moved_on(self, tr: Tracked, i: int) -> None:
        """Step ``i`` (the last of its unit to finish) succeeded: the next unit with a step
        to run is sent, all of its steps at once, or the saga is complete."""
        after, spec = tr.s, tr.spec
        run = spec.next_run(spec.unit_of(i)[1])
        if not run:
            assert after.status is SagaStatus.COMPLETED
            return
        assert after.status is SagaStatus.RUNNING and after.current in run
        assert sorted(lane.index for lane in after.lanes) == (run if len(run) > 1 else [])
        for j in range(spec.unit_of(i)[1] + 1, run[0]):
            assert after.steps[j].status is StepStatus.SKIPPED

    def check_member_answer(self, tr: Tracked, before: SagaState, i: int, outcome: str) -> None:
        """The rules for one answer to a member of a group in flight."""
        after, spec = tr.s, tr.spec
        lane = next(lane for lane in before.lanes if lane.index == i)
        rest = {other.index for other in before.lanes if other.index != i}
        running = before.status is SagaStatus.RUNNING
        budget = spec.definition.steps[i].retry.max_attempts
        retry = running and outcome in ("retryable", "timeout")
        retry = retry and (budget is None or lane.tries < budget)
        if outcome == "ok":
            # after the group failed, the last member awaited may be compensated at once
            done = (
                (StepStatus.SUCCEEDED,)
                if running
                else (StepStatus.SUCCEEDED, StepStatus.COMPENSATING)
            )
            assert after.steps[i].status in done
            if rest:
                assert {other.index for other in after.lanes} == rest
                assert after.status is before.status
            elif running:
                self.check_moved_on(tr, i)
            else:  # the last member awaited after the group failed: compensation begins
                assert after.status in (SagaStatus.COMPENSATING, SagaStatus.COMPENSATED)
                assert after.lanes == ()
        elif retry:
            assert after.status is SagaStatus.RUNNING
            [again] = [other for other in after.lanes if other.index == i]
            assert again.phase is Phase.BACKOFF and again.tries == lane.tries
        else:
            # the group fails: members in backoff are stopped, members in flight awaited
            assert after.status in (SagaStatus.COMPENSATING, SagaStatus.COMPENSATED)
            if outcome == "timeout":
                assert after.steps[i].status in (StepStatus.TIMED_OUT, StepStatus.COMPENSATING)
            else:
                assert after.steps[i].status is StepStatus.FAILED
            awaited = {
                other.index
                for other in before.lanes
                if other.index != i and other.phase is Phase.AWAITING_REPLY
            }
            assert {other.index for other in after.lanes} == awaited
            for j in rest - awaited:
                assert after.steps[j].status in (StepStatus.ABORTED, StepStatus.COMPENSATING)
            if awaited:
                assert after.status is SagaStatus.COMPENSATING and after.failure is not None
                tr.seen.add("group failed with a member still awaited")

    def check_expiry(self, tr: Tracked, before: SagaState, t: Transition) -> None:
        """The saga's own deadline passed while it ran forward."""
        after, spec = tr.s, tr.spec
        assert t.history[0].kind is HistoryKind.DEADLINE_PASSED
        assert after.expires_at is None
        assert all(c.direction is Direction.COMPENSATION for c in t.commands)
        pivot = spec.pivot
        if not before.lanes and pivot is not None and before.current >= pivot:
            assert (after.status, after.stuck_step) == (
                SagaStatus.FAILED,
                before.steps[before.current].name,
            )
            assert t.commands == ()
            tr.seen.add("deadline after the pivot")
            return
        assert after.status in (SagaStatus.COMPENSATING, SagaStatus.COMPENSATED)
        assert after.lanes == ()
        for j in {lane.index for lane in before.lanes} | {before.current}:
            assert after.steps[j].status in (
                StepStatus.ABORTED,
                StepStatus.COMPENSATING,
                StepStatus.COMPENSATED,
            )
        tr.seen.add("deadline compensated")

    def pick(self, index: int) -> Tracked:
        return self.sagas[index % len(self.sagas)]

    def awaited_participant(self, tr: Tracked) -> str:
        s = tr.s
        return tr.spec.definition.steps[min(s.current, tr.spec.n - 1)].participant

    # --- set-up -------------------------------------------------------------------------

    @initialize(
        many=st.sampled_from([1, 1, 2, 3]).flatmap(
            lambda k: st.lists(specs(), min_size=k, max_size=k)
        )
    )
    def start(self, many: list[Spec]) -> None:
        for k, spec in enumerate(many):
            tr = Tracked(spec, UUID(int=k + 1))
            skip: list[str] = [f"s{i + 1}" for i in sorted(spec.skipped)]
            t = self.apply(tr, Started(tr.saga_id, {"k": k, "skip": list(skip)}))
            assert [c.step for c in t.commands] == [f"s{i + 1}" for i in spec.next_run(-1)]
            self.sagas.append(tr)

    # --- replies -------------------------------------------------------------------------

    @rule(
        index=picks,
        answers=st.lists(
            st.sampled_from(["ok", "ok", "retryable", "fatal", "timeout"]), max_size=8
        ),
    )
    def participant_session(self, index: int, answers: list[str]) -> None:
        """A run of answers to whatever the saga awaits, with due backoff timers in between:
        a rule of its own so that sagas get deep enough to fail, and to fail to compensate,
        several steps in."""
        tr = self.pick(index)
        for answer in answers:
            if tr.s.phase is Phase.BACKOFF:
                self.due_timer(index, twice=False)
            if tr.s.phase is not Phase.AWAITING_REPLY:
                break
            if answer == "timeout":
                self.due_timer(index, twice=False)
            else:
                self.reply_to_awaited(index, answer)

    @rule(index=picks, outcome=outcomes)
    def reply_to_awaited(self, index: int, outcome: str) -> None:
        tr = self.pick(index)
        s = tr.s
        # in a backoff, ``awaiting`` is the id of the attempt not sent yet: still no reply
        target = s.awaiting or tr.sent[-1].message_id
        t = self.apply(tr, reply(target, self.awaited_participant(tr), outcome))
        assert t.applied == (s.phase is Phase.AWAITING_REPLY)
        if t.applied:
            self.check_answer(tr, s, outcome)

    @rule(index=picks, which=st.integers(0, 10**6), outcome=outcomes)
    def reply_to_anything_sent(self, index: int, which: int, outcome: str) -> None:
        """Duplicates and late replies, including to another saga's commands."""
        tr = self.pick(index)
        pool = [c for other in self.sagas for c in other.sent]
        cmd = pool[which % len(pool)]
        s = tr.s
        t = self.apply(tr, reply(cmd.message_id, cmd.participant, outcome))
        if s.lanes:
            lane = next((lane for lane in s.lanes if s.steps[lane.index].name == cmd.step), None)
            ours = cmd.saga_id == tr.saga_id and lane is not None
            ours = ours and cmd.direction is Direction.ACTION
            awaited = (
                ours and lane.phase is Phase.AWAITING_REPLY and cmd.message_id == lane.awaiting
            )  # type: ignore[union-attr]
            late = ours and cmd.attempt < s.steps[lane.index].attempts and outcome != "retryable"  # type: ignore[union-attr]
            assert t.applied == (awaited or late)
            if t.applied:
                assert lane is not None
                self.check_member_answer(tr, s, lane.index, outcome)
                tr.seen.add("member answered out of turn")
            else:
                [entry] = t.history
                assert entry.kind is HistoryKind.IGNORED
            return
        earlier = (  # a final answer to an older attempt of what is being run counts
            cmd.saga_id == tr.saga_id
            and s.phase in (Phase.AWAITING_REPLY, Phase.BACKOFF)
            and not s.status.is_terminal
            and cmd.step == s.steps[s.current].name
            and cmd.direction is s.direction
            and cmd.attempt < s.attempt
            and outcome != "retryable"
        )
        if earlier:
            assert t.applied
            self.check_answer(tr, s, outcome)
            return
        if cmd.message_id != s.awaiting or s.phase is not Phase.AWAITING_REPLY:
            assert not t.applied
            [entry] = t.history
            assert entry.kind is HistoryKind.IGNORED
            if cmd.saga_id != tr.saga_id:
                assert "answers no command of this saga" in entry.detail
            else:
                assert "duplicate or late reply" in entry.detail

    @rule(index=picks, causation=st.uuids(), intruder=st.booleans(), outcome=outcomes)
    def spoofed_reply(self, index: int, causation: UUID, intruder: bool, outcome: str) -> None:
        """A random causation id, or the awaited one from the wrong participant."""
        tr = self.pick(index)
        if intruder:
            event = reply(tr.s.awaiting or tr.sent[-1].message_id, "intruder", outcome)
        else:
            event = reply(causation, self.awaited_participant(tr), outcome)
        t = self.apply(tr, event)
        assert not t.applied and t.history[0].kind is HistoryKind.IGNORED

    # --- time ----------------------------------------------------------------------------

    @rule(millis=st.integers(0, 60_000))
    def clock_advances(self, millis: int) -> None:
        self.now += timedelta(milliseconds=millis)

    @precondition(lambda self: any(tr.s.deadline is not None for tr in self.sagas))
    @rule(index=picks, twice=st.booleans())
    def due_timer(self, index: int, twice: bool) -> None:
        tr = self.pick(index)
        s = tr.s
        if s.awaiting is None or s.deadline is None:
            assert not self.apply(tr, TimerFired(tr.sent[-1].message_id)).applied
            return
        self.now = max(self.now, s.deadline)
        timer = TimerFired(s.awaiting)
        t = self.apply(tr, timer)
        assert t.applied
        if s.expires_at is not None and self.now >= s.expires_at:
            self.check_expiry(tr, s, t)
        elif s.lanes and s.phase is Phase.BACKOFF:
            assert [c.message_id for c in t.commands] == [s.awaiting]
            assert tr.s.steps[s.current].attempts == s.attempt + 1
        elif s.lanes:
            assert any(h.kind is HistoryKind.STEP_TIMED_OUT for h in t.history)
            assert all(c.direction is Direction.COMPENSATION for c in t.commands)
            self.check_member_answer(tr, s, s.current, "timeout")
        elif s.phase is Phase.BACKOFF:
            assert [c.message_id for c in t.commands] == [s.awaiting]
            assert (tr.s.attempt, tr.s.tries) == (s.attempt + 1, s.tries + 1)
        else:
            # a timeout never re-sends at once: it backs off, compensates or fails
            assert any(h.kind is HistoryKind.STEP_TIMED_OUT for h in t.history)
            assert all(c.direction is Direction.COMPENSATION for c in t.commands)
            assert all(c.message_id != s.awaiting for c in t.commands)
            self.check_answer(tr, s, "timeout")
        if twice:  # a timer delivered twice never acts twice
            again = self.apply(tr, timer)
            assert not again.applied

    @rule(index=picks, which=st.integers(0, 10**6), early=st.booleans(), late=st.booleans())
    def undue_timer(self, index: int, which: int, early: bool, late: bool) -> None:
        """The awaited timer before its deadline, or any other (possibly long past) timer."""
        tr = self.pick(index)
        s = tr.s
        if early:
            if s.awaiting is not None and s.deadline is not None and self.now < s.deadline:
                t = self.apply(tr, TimerFired(s.awaiting))
                assert not t.applied
                assert "not due" in t.history[0].detail
            return
        pool = [c for other in self.sagas for c in other.sent]
        cmd = pool[which % len(pool)]
        if late:
            self.now = max(self.now, cmd.deadline)
        if cmd.message_id != s.awaiting:
            t = self.apply(tr, TimerFired(cmd.message_id))
            assert not t.applied
            assert "stale timer" in t.history[0].detail

    # --- operators -----------------------------------------------------------------------

    @rule(index=picks, action=st.sampled_from(["retry", "abort", "resolve"]), alerted=st.booleans())
    def operator(self, index: int, action: str, alerted: bool) -> None:
        """``alerted``: the operator looks at a FAILED saga, if there is one."""
        failed = [tr for tr in self.sagas if tr.s.status is SagaStatus.FAILED]
        tr = failed[index % len(failed)] if alerted and failed else self.pick(index)
        s = tr.s
        pivot = tr.spec.pivot
        if tr.spec.continues and s.status is SagaStatus.FAILED and action != "abort":
            # a retry or resolve restarts the run over the stuck steps, newest first again
            tr.reopened, tr.last_compensated_index = True, None
        if action == "retry":
            t = self.apply(tr, OperatorRetry("op", "retry"))
            assert t.applied == (s.status is SagaStatus.FAILED)
            if t.applied:
                [cmd] = t.commands
                assert (cmd.step, cmd.direction) == (s.steps[s.current].name, s.direction)
                assert tr.s.tries == 1
        elif action == "abort":
            stuck_at_pivot = (
                s.status is SagaStatus.FAILED
                and s.direction is Direction.ACTION
                and s.current == pivot
            )
            allowed = stuck_at_pivot or (
                s.status is SagaStatus.RUNNING and (pivot is None or s.current < pivot)
            )
            t = self.apply(tr, OperatorAbort("op", "abort"))
            assert t.applied == allowed
            if t.applied:
                assert tr.s.status in (SagaStatus.COMPENSATING, SagaStatus.COMPENSATED)
            if t.applied and stuck_at_pivot:
                assert tr.s.steps[s.current].status is StepStatus.FAILED  # never compensated
                tr.seen.add("aborted at a stuck pivot")
        else:
            t = self.apply(tr, OperatorResolve("op", "resolved", {"by": "hand"}))
            assert t.applied == (s.status is SagaStatus.FAILED)
            if t.applied and s.direction is Direction.ACTION:
                assert tr.s.context.output(s.steps[s.current].name) == {"by": "hand"}
            elif t.applied:
                assert tr.s.steps[s.current].status is StepStatus.COMPENSATED
                left = len([j for j in tr.must_undo if j < s.current])
                tr.seen.add(f"resolved a stuck compensation, {min(left, 2)} more to undo")
        if not t.applied:
            assert t.history == () and t.refused is not None, "a refusal says why, off the record"
        # what the admin API offers is exactly what the engine (and this model) accepts
        offered = OperatorAction(action) in allowed_actions(tr.spec.definition, s)
        assert offered == t.applied, (action, s.status, s.current, offered)

    # --- liveness ------------------------------------------------------------------------

    def help_along(self, tr: Tracked) -> None:
        """One helpful event: a success reply, a due timer or an operator retry."""
        s = tr.s
        if s.status is SagaStatus.FAILED:
            if tr.spec.continues:
                tr.reopened, tr.last_compensated_index = True, None
            assert self.apply(tr, OperatorRetry("op", "retry")).applied
        elif s.phase is Phase.BACKOFF:
            assert s.deadline is not None and s.awaiting is not None
            self.now = max(self.now, s.deadline)
            assert self.apply(tr, TimerFired(s.awaiting)).applied
        else:
            assert s.phase is Phase.AWAITING_REPLY and s.awaiting is not None
            assert self.apply(tr, reply(s.awaiting, self.awaited_participant(tr), "ok")).applied
            self.check_answer(tr, s, "ok")

    def drive_home(self, tr: Tracked) -> None:
        """Only helpful events from here: the saga must settle, and within a bounded number."""
        budget = 2 * tr.spec.n + 4
        for _ in range(budget):
            if is_settled(tr.s):
                return
            self.help_along(tr)
        raise AssertionError(f"saga not settled after {budget} events: {tr.s}")

    @rule(index=picks, count=st.integers(1, 3))
    def helpful_events(self, index: int, count: int) -> None:
        tr = self.pick(index)
        for _ in range(count):
            if not is_settled(tr.s):
                self.help_along(tr)

    @rule(index=picks)
    def from_here_the_saga_can_still_settle(self, index: int) -> None:
        self.drive_home(self.pick(index).copy())

    @invariant()
    def sagas_are_consistent(self) -> None:
        for tr in self.sagas:
            self.check_state(tr)

    def teardown(self) -> None:
        if self.broken:
            return
        for tr in self.sagas:
            for seen in sorted(tr.seen):
                event(seen)
            self.drive_home(tr)
            event(f"driven home to {tr.s.status}")


TestSagaMachine = SagaMachine.TestCase
TestSagaMachine.settings = settings(
    max_examples=EXAMPLES, stateful_step_count=40, deadline=None, database=None
)
