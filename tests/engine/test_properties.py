"""Stateful property tests: random sagas driven by random, hostile event sequences.

A :class:`~hypothesis.stateful.RuleBasedStateMachine` starts one to three sagas over random
definitions (1-5 steps, optional pivot, random retry budgets and compensatable flags) and throws
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
from dataclasses import dataclass, field
from datetime import timedelta
from uuid import UUID

from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from saga.core.definition import RetryPolicy, SagaDefinition, Step
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

    @property
    def n(self) -> int:
        return len(self.definition.steps)

    @property
    def pivot(self) -> int | None:
        return next((i for i, s in enumerate(self.definition.steps) if s.pivot), None)


budgets = st.sampled_from([1, 1, 2, 3, None])


@st.composite
def specs(draw: st.DrawFn) -> Spec:
    n = draw(st.integers(1, 5))
    pivot = draw(st.one_of(st.none(), st.integers(0, n - 1)))
    steps, undoable = [], set()
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
            )
        )
    definition = SagaDefinition(f"prop{n}", 1, steps)
    definition.validate()
    return Spec(definition, frozenset(undoable))


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

        # the start of compensation fixes which steps must be undone
        began = after.status is SagaStatus.COMPENSATED or after.direction is Direction.COMPENSATION
        if before is not None and t.applied and not tr.compensation_began and began:
            tr.compensation_began = True
            must = {
                i
                for i, step in enumerate(before.steps)
                if step.status is StepStatus.SUCCEEDED and i in spec.undoable
            }
            # a step that timed out or was aborted in flight may have taken effect
            if isinstance(event, TimerFired | OperatorAbort) and before.current in spec.undoable:
                must.add(before.current)
            tr.must_undo = frozenset(must)

        # commands: fresh deterministic ids, compensations newest first and only when due
        names = [s.name for s in spec.definition.steps]
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
            assert after.awaiting == cmd.message_id and after.deadline == cmd.deadline
            if cmd.direction is Direction.COMPENSATION:
                assert i in spec.undoable, f"{cmd.step} has nothing to undo"
                assert i in tr.must_undo, f"{cmd.step} was never done, yet it is compensated"
                if tr.last_compensated_index is not None:
                    assert i <= tr.last_compensated_index, "compensation out of order"
                for j in range(i):
                    assert after.steps[j].status is not StepStatus.COMPENSATED
                for j in tr.must_undo:  # and none is skipped
                    assert j <= i or after.steps[j].status is StepStatus.COMPENSATED, j
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
            assert all(step.status is StepStatus.SUCCEEDED for step in s.steps)
            assert not tr.compensation_began
        if s.status is SagaStatus.COMPENSATED:
            assert tr.compensation_began
            assert set(tr.compensated) == set(tr.must_undo), (tr.compensated, tr.must_undo)
        if s.status is SagaStatus.FAILED:
            assert s.stuck_step is not None and s.stuck_step == s.steps[s.current].name
        else:
            assert s.stuck_step is None
        if s.status.is_terminal:
            assert (s.phase, s.awaiting, s.deadline) == (Phase.IDLE, None, None)
        else:
            assert s.phase is not Phase.IDLE and s.awaiting is not None and s.deadline is not None
            assert (s.status is SagaStatus.COMPENSATING) == (s.direction is Direction.COMPENSATION)

    def check_answer(self, tr: Tracked, before: SagaState, outcome: str) -> None:
        """The rules for one answer (``ok``, ``retryable``, ``fatal`` or ``timeout``) to the
        awaited command, written out independently of the engine."""
        after, spec, i = tr.s, tr.spec, before.current
        step_def, pivot = spec.definition.steps[i], spec.pivot
        name = step_def.name
        undoing = before.direction is Direction.COMPENSATION
        budget = (step_def.compensation_retry if undoing else step_def.retry).max_attempts
        retry = outcome in ("retryable", "timeout") and (budget is None or before.tries < budget)
        if outcome == "ok" and undoing:
            assert after.steps[i].status is StepStatus.COMPENSATED
            assert after.status in (SagaStatus.COMPENSATING, SagaStatus.COMPENSATED)
            assert after.status is SagaStatus.COMPENSATED or after.current < i
        elif outcome == "ok":
            assert after.steps[i].status is StepStatus.SUCCEEDED
            assert after.context.output(name) == {"from": step_def.participant}
            if i == spec.n - 1:
                assert after.status is SagaStatus.COMPLETED
            else:
                assert (after.status, after.current) == (SagaStatus.RUNNING, i + 1)
        elif retry:
            assert (after.status, after.phase, after.current) == (before.status, Phase.BACKOFF, i)
            assert after.direction is before.direction
            assert after.awaiting == command_id(
                tr.saga_id, name, before.direction.value, before.attempt + 1
            )
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
            t = self.apply(tr, Started(tr.saga_id, {"k": k}))
            assert [c.step for c in t.commands] == ["s1"]
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
        if s.phase is Phase.BACKOFF:
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
