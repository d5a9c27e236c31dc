"""Parallel groups, conditional steps, the compensation-failure policy and the saga deadline,
decided by the pure engine (docs/semantics.md, "Parallel groups" and after)."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import pytest

from saga.core.definition import Parallel, SagaDefinition, Step
from saga.core.errors import DefinitionError
from saga.core.ids import command_id
from saga.core.state import (
    Command,
    Direction,
    HistoryKind,
    Phase,
    SagaStatus,
    StepStatus,
    TimerFired,
)

from .helpers import SAGA_ID, TIMEOUT, Driver, policy

S = StepStatus


def step(name: str, **kw: object) -> Step:
    defaults: dict[str, object] = {
        "participant": f"p_{name}",
        "action": f"do_{name}",
        "compensation": f"undo_{name}",
        "timeout": TIMEOUT,
        "retry": policy(2),
        "compensation_retry": policy(2),
    }
    defaults.update(kw)
    return Step(name=name, **defaults)  # type: ignore[arg-type]


def fan(**kw: object) -> SagaDefinition:
    """a, then b and c in parallel, then d."""
    d = SagaDefinition("fan", 1, [step("a"), Parallel(step("b"), step("c")), step("d")], **kw)  # type: ignore[arg-type]
    d.validate()
    return d


def sent_to(t: object, name: str) -> Command:
    return next(c for c in t.commands if c.step == name)  # type: ignore[attr-defined]


def cmd(driver: Driver, name: str, direction: Direction = Direction.ACTION) -> Command:
    return [c for c in driver.commands if c.step == name and c.direction is direction][-1]


# --- definitions ---------------------------------------------------------------------------


def test_a_group_is_flattened_into_consecutive_steps() -> None:
    d = fan()
    assert [s.name for s in d.steps] == ["a", "b", "c", "d"]
    assert d.groups == ((1, 2),)
    assert d.unit_last == (0, 2, 2, 3) and d.unit_first == (0, 1, 1, 3)


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ([Parallel(step("a"))], "at least two steps"),
        ([step("a"), Parallel(step("b"), step("c", compensation=None, pivot=True))], "pivot"),
        (
            [
                step("a", compensation=None, pivot=True),
                Parallel(step("b", compensation=None), step("c", compensation=None)),
            ],
            "before the pivot",
        ),
    ],
)
def test_groups_are_refused_where_they_cannot_be_undone(steps: list[object], message: str) -> None:
    with pytest.raises(DefinitionError, match=message):
        SagaDefinition("bad", 1, steps).validate()  # type: ignore[arg-type]


def test_bad_policy_and_deadline_are_refused_with_what_to_change() -> None:
    with pytest.raises(DefinitionError, match="on_compensation_failure must be one of"):
        SagaDefinition("bad", 1, [step("a")], on_compensation_failure="sometimes")
    with pytest.raises(DefinitionError, match="deadline must be positive"):
        SagaDefinition("bad", 1, [step("a")], deadline=timedelta(0)).validate()


# --- parallel groups -------------------------------------------------------------------------


def test_a_group_sends_every_member_in_one_transition_and_joins() -> None:
    drv = Driver(fan())
    drv.start()
    drv.succeed({"n": 1})
    t = drv.transitions[-1]
    assert [(c.step, c.attempt) for c in t.commands] == [("b", 1), ("c", 1)]
    assert drv.statuses() == (S.SUCCEEDED, S.RUNNING, S.RUNNING, S.PENDING)
    assert {lane.index for lane in drv.s.lanes} == {1, 2}
    b, c = sent_to(t, "b"), sent_to(t, "c")
    assert b.message_id == command_id(SAGA_ID, "b", "action", 1) != c.message_id
    assert drv.succeed({"b": 1}, to=c).commands == ()  # one member done: wait for the other
    assert drv.s.lanes[0].index == 1 and drv.s.awaiting == b.message_id
    t = drv.succeed({"b": 2}, to=b)
    assert [c.step for c in t.commands] == ["d"] and drv.s.lanes == ()
    assert drv.s.context.output("b") == {"b": 2} and drv.s.context.output("c") == {"b": 1}
    drv.succeed()
    assert drv.s.status is SagaStatus.COMPLETED


def test_a_failed_member_waits_for_its_sibling_then_compensates_the_group_first() -> None:
    drv = Driver(fan())
    drv.start()
    t = drv.succeed()
    b, c = sent_to(t, "b"), sent_to(t, "c")
    t = drv.fail("no stock", to=b)
    assert t.commands == () and drv.s.status is SagaStatus.COMPENSATING
    assert [lane.index for lane in drv.s.lanes] == [2]  # c is still awaited, not compensated yet
    drv.succeed(to=c)
    assert drv.compensation_order() == ["c"]
    drv.succeed_until_terminal()
    assert drv.compensation_order() == ["c", "a"]
    assert drv.statuses() == (S.COMPENSATED, S.FAILED, S.COMPENSATED, S.PENDING)
    assert drv.s.status is SagaStatus.COMPENSATED


def test_a_sibling_that_times_out_while_awaited_is_compensated_too() -> None:
    drv = Driver(fan())
    drv.start()
    t = drv.succeed()
    c = sent_to(t, "c")
    drv.fail("no stock", to=sent_to(t, "b"))
    t = drv.fire()  # c's reply deadline: no retry once the group failed
    assert [h.kind for h in t.history][:2] == [HistoryKind.STEP_TIMED_OUT, HistoryKind.COMMAND_SENT]
    assert drv.last_command.step == "c" and drv.last_command.direction is Direction.COMPENSATION
    drv.succeed_until_terminal()
    assert drv.compensation_order() == ["c", "a"]
    assert c.attempt == 1 and len(drv.sent(Direction.ACTION)) == 3


def test_a_member_retries_on_its_own_and_a_sibling_in_backoff_is_stopped_when_one_fails() -> None:
    drv = Driver(fan())
    drv.start()
    t = drv.succeed()
    b, c = sent_to(t, "b"), sent_to(t, "c")
    drv.fail("busy", retryable=True, to=c)
    assert [lane.phase for lane in drv.s.lanes] == [Phase.AWAITING_REPLY, Phase.BACKOFF]
    t = drv.fail("no stock", to=b)
    assert drv.s.lanes == () and [c.step for c in t.commands] == ["c"]  # stopped, compensated
    assert drv.last_command.direction is Direction.COMPENSATION
    drv.succeed_until_terminal()
    assert drv.compensation_order() == ["c", "a"]


def test_backoff_of_a_member_sends_its_next_attempt() -> None:
    drv = Driver(fan())
    drv.start()
    t = drv.succeed()
    drv.fail("busy", retryable=True, to=sent_to(t, "c"))
    assert drv.s.phase is Phase.BACKOFF and drv.s.current == 2  # its timer is due first
    t = drv.fire()
    assert [(c.step, c.attempt) for c in t.commands] == [("c", 2)]
    drv.succeed(to=t.commands[0])
    drv.succeed(to=cmd(drv, "b"))
    assert drv.last_command.step == "d"


def test_an_operator_abort_of_a_group_compensates_every_member_in_flight() -> None:
    drv = Driver(fan())
    drv.start()
    t = drv.succeed()
    drv.succeed(to=sent_to(t, "b"))
    t = drv.operator_abort()
    assert drv.statuses()[1:3] == (S.SUCCEEDED, S.COMPENSATING) and drv.s.lanes == ()
    assert [(c.step, c.direction) for c in t.commands] == [("c", Direction.COMPENSATION)]
    drv.succeed_until_terminal()
    assert drv.compensation_order() == ["c", "b", "a"]


def test_a_late_final_answer_to_an_earlier_member_attempt_counts() -> None:
    drv = Driver(fan())
    drv.start()
    t = drv.succeed()
    c1 = sent_to(t, "c")
    drv.fail("busy", retryable=True, to=c1)
    drv.fire()
    drv.succeed(to=c1)  # the answer to attempt 1 arrives after attempt 2 was sent
    assert drv.status_of("c") is S.SUCCEEDED


def test_a_reply_to_no_lane_is_ignored() -> None:
    drv = Driver(fan())
    drv.start()
    t = drv.succeed()
    drv.succeed(to=sent_to(t, "b"))
    again = drv.succeed(to=sent_to(t, "b"))
    assert not again.applied and "duplicate or late reply to b action attempt 1" in (
        again.history[0].detail
    )


# --- conditional steps -----------------------------------------------------------------------


def test_a_skipped_step_sends_nothing_and_is_never_compensated() -> None:
    d = SagaDefinition(
        "cond",
        1,
        [
            step("a"),
            step("b", when=lambda ctx: ctx.input.get("gift") is True),
            Parallel(step("c"), step("e", when=lambda ctx: False)),
            step("d"),
        ],
    )
    d.validate()
    drv = Driver(d)
    drv.start({"gift": False})
    t = drv.succeed()
    assert [c.step for c in t.commands] == ["c"] and drv.s.lanes == ()
    assert [h.step for h in t.history if h.kind is HistoryKind.STEP_SKIPPED] == ["b", "e"]
    drv.fail("no", to=t.commands[0])
    drv.succeed_until_terminal()
    assert drv.compensation_order() == ["a"]
    assert drv.statuses() == (S.COMPENSATED, S.SKIPPED, S.FAILED, S.SKIPPED, S.PENDING)


def test_a_saga_whose_last_steps_are_skipped_completes() -> None:
    d = SagaDefinition("cond", 1, [step("a"), step("b", when=lambda ctx: False)])
    drv = Driver(d)
    drv.start()
    drv.succeed()
    assert drv.s.status is SagaStatus.COMPLETED and drv.status_of("b") is S.SKIPPED


def test_a_condition_that_raises_fails_the_step_like_a_builder_error() -> None:
    d = SagaDefinition("cond", 1, [step("a"), step("b", when=lambda ctx: ctx.output("x"))])
    drv = Driver(d)
    drv.start()
    drv.succeed()
    assert drv.status_of("b") is S.FAILED and "condition raised" in (drv.s.failure or "")
    assert drv.compensation_order() == ["a"]


# --- compensation-failure policy -------------------------------------------------------------


def three(policy_name: str) -> SagaDefinition:
    return SagaDefinition(
        "pol", 1, [step("a"), step("b"), step("c"), step("d")],
        on_compensation_failure=policy_name,
    )  # fmt: skip


def test_continue_compensates_the_older_steps_and_fails_naming_every_stuck_one() -> None:
    drv = Driver(three("continue"))
    drv.start()
    for _ in range(3):
        drv.succeed()
    drv.fail("declined")  # d
    drv.fail("gone")  # compensation of c: not retryable
    assert drv.last_command.step == "b"  # not halted
    drv.succeed()
    drv.fail("gone")  # a
    assert drv.s.status is SagaStatus.FAILED and drv.s.stuck_step == "c"
    assert "c, a" in (drv.s.failure or "")
    assert drv.statuses() == (S.COMPENSATING, S.COMPENSATED, S.COMPENSATING, S.FAILED)
    t = drv.operator_retry()
    assert [(c.step, c.direction) for c in t.commands] == [("c", Direction.COMPENSATION)]
    t = drv.succeed()
    assert [c.step for c in t.commands] == ["a"]  # the retry goes on with every stuck step
    drv.succeed()
    assert drv.s.status is SagaStatus.COMPENSATED


def test_continue_resolve_finishes_the_rest() -> None:
    drv = Driver(three("continue"))
    drv.start()
    for _ in range(3):
        drv.succeed()
    drv.fail("declined")
    drv.fail("gone")  # c stuck
    drv.fail("gone")  # b stuck
    drv.succeed()  # a
    assert (drv.s.status, drv.s.stuck_step) == (SagaStatus.FAILED, "c")
    drv.operator_resolve()
    assert drv.last_command.step == "b"
    drv.succeed()
    assert drv.s.status is SagaStatus.COMPENSATED


def test_halt_stays_the_default() -> None:
    drv = Driver(three("halt"))
    drv.start()
    for _ in range(3):
        drv.succeed()
    drv.fail("declined")
    drv.fail("gone")
    assert (drv.s.status, drv.s.stuck_step) == (SagaStatus.FAILED, "c")
    assert drv.statuses()[:2] == (S.SUCCEEDED, S.SUCCEEDED)


# --- saga deadline -------------------------------------------------------------------------


def test_the_deadline_compensates_a_running_saga_with_its_step_in_flight() -> None:
    d = SagaDefinition("dl", 1, [step("a"), step("b")], deadline=timedelta(seconds=5))
    drv = Driver(d)
    drv.start()
    assert drv.s.deadline == drv.now + timedelta(seconds=5)  # before a's own timeout
    drv.advance(timedelta(seconds=3))
    drv.succeed()
    assert drv.s.deadline == drv.s.expires_at
    t = drv.fire()
    assert [h.kind for h in t.history][:2] == [
        HistoryKind.DEADLINE_PASSED,
        HistoryKind.COMPENSATION_STARTED,
    ]
    assert drv.status_of("b") is S.COMPENSATING and drv.s.expires_at is None
    drv.succeed_until_terminal()
    assert drv.compensation_order() == ["b", "a"]


def test_the_deadline_after_the_pivot_fails_the_saga_for_an_operator() -> None:
    d = SagaDefinition(
        "dl", 1, [step("a"), step("b", compensation=None, pivot=True),
                  step("c", compensation=None)], deadline=timedelta(seconds=5),
    )  # fmt: skip
    drv = Driver(d)
    drv.start()
    drv.succeed()
    drv.succeed()
    drv.fire()
    assert (drv.s.status, drv.s.stuck_step) == (SagaStatus.FAILED, "c")
    assert "deadline" in (drv.s.failure or "")
    drv.operator_retry()
    drv.advance(timedelta(hours=1))
    assert drv.s.deadline == cmd(drv, "c").deadline  # the deadline fired once; it is gone
    drv.succeed()
    assert drv.s.status is SagaStatus.COMPLETED


def test_the_deadline_aborts_every_member_in_flight() -> None:
    drv = Driver(fan(deadline=timedelta(seconds=12)))
    drv.start()
    drv.advance(timedelta(seconds=5))
    t = drv.succeed()
    drv.succeed(to=sent_to(t, "b"))
    t = drv.fire()
    assert any(h.kind is HistoryKind.DEADLINE_PASSED for h in t.history)
    drv.succeed_until_terminal()
    assert drv.compensation_order() == ["c", "b", "a"]


def test_no_deadline_while_compensating() -> None:
    d = SagaDefinition("dl", 1, [step("a"), step("b")], deadline=timedelta(seconds=50))
    drv = Driver(d)
    drv.start()
    drv.succeed()
    drv.fail("no")
    assert (
        drv.s.expires_at is None
        and drv.s.deadline == cmd(drv, "a", Direction.COMPENSATION).deadline
    )
    drv.advance(timedelta(seconds=60))
    assert drv.apply(TimerFired(drv.awaiting)).applied  # the compensation's own timeout
    assert drv.s.phase is Phase.BACKOFF and drv.s.status is SagaStatus.COMPENSATING


def test_dataclasses_replace_keeps_a_definition_and_its_groups() -> None:
    """Users (and saga bench) derive definitions with ``dataclasses.replace``: a step swapped,
    a timeout changed. The groups, the derived step units and the pivot come along."""
    original = SagaDefinition(
        "fan", 1, [step("a"), Parallel(step("b"), step("c")), step("d")], deadline=timedelta(1)
    )
    longer = [dataclasses.replace(s, timeout=timedelta(seconds=60)) for s in original.steps]
    derived = dataclasses.replace(original, steps=tuple(longer))
    assert derived.groups == original.groups == ((1, 2),)
    assert (derived.unit_first, derived.unit_last) == (original.unit_first, original.unit_last)
    assert derived.deadline == original.deadline
    assert [s.timeout for s in derived.steps] == [timedelta(seconds=60)] * 4
    assert dataclasses.replace(original) == original
    with pytest.raises(DefinitionError, match="not both"):
        SagaDefinition("fan", 1, [step("a"), Parallel(step("b"), step("c"))], groups=[(0, 1)])
    with pytest.raises(DefinitionError, match="not a run"):
        SagaDefinition("fan", 1, [step("a"), step("b")], groups=[(1, 2)])
