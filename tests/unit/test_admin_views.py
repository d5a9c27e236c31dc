"""What the admin API shows of a saga, built by pure functions from the engine's state."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from saga import Parallel, SagaDefinition, Step
from saga.admin.models import at_step, pending_step, retry_runs, saga_detail, step_spans
from saga.core.state import (
    Direction,
    HistoryKind,
    OperatorAction,
    Phase,
    SagaStatus,
    StepStatus,
)
from saga.testing import Harness, fail, ok
from tests.engine.helpers import TIMEOUT, Driver, make_definition, run_forward, started


def test_a_compensated_saga_is_shown_at_the_step_that_turned_it_back() -> None:
    """Its engine position is the last step compensated (the first step, usually), which tells
    an on-call engineer nothing; the step that failed does."""
    drv = run_forward(started(make_definition(3)), 2)
    drv.fail("declined")
    drv.succeed_until_terminal()
    assert drv.s.status is SagaStatus.COMPENSATED and drv.s.steps[drv.s.current].name == "s1"
    assert at_step(drv.s) == "s3"


def test_a_step_that_timed_out_or_was_aborted_is_the_one_shown() -> None:
    timed_out = started(make_definition(3, max_attempts=1))
    timed_out.succeed()
    timed_out.time_out()  # s2 timed out: compensated too, it may have taken effect
    timed_out.succeed_until_terminal()
    assert timed_out.s.status is SagaStatus.COMPENSATED and at_step(timed_out.s) == "s2"

    aborted = run_forward(started(make_definition(3)), 1)
    aborted.operator_abort()
    aborted.succeed_until_terminal()
    assert aborted.s.status is SagaStatus.COMPENSATED and at_step(aborted.s) == "s2"


async def test_a_failed_member_of_a_group_is_shown_not_its_sibling_or_a_skipped_step() -> None:
    """The charge fails while the reservation beside it succeeds (and is undone); the skipped
    step after it never ran. The furthest step reached is neither why it went back."""
    steps = {
        name: Step(name, participant=name, action=f"{name}.do", compensation=f"{name}.undo")
        for name in ("order", "charge", "reserve", "ship")
    }
    definition = SagaDefinition(
        "shop",
        1,
        [
            steps["order"],
            Parallel(
                steps["charge"],
                replace(steps["reserve"], when=lambda ctx: bool(ctx.input.get("physical"))),
            ),
            replace(steps["ship"], when=lambda ctx: bool(ctx.input.get("physical"))),
        ],
    )
    h = Harness([definition])
    for name in steps:
        h.on(f"{name}.do", lambda c: ok())
        h.on(f"{name}.undo", lambda c: ok())
    h.on("charge.do", lambda c: fail("declined"))
    for physical in (True, False):
        saga = await h.run("shop", {"physical": physical})
        assert saga.status is SagaStatus.COMPENSATED
        assert saga.step("reserve").status is (
            StepStatus.COMPENSATED if physical else StepStatus.SKIPPED
        )
        assert at_step(saga) == "charge"


def test_running_compensating_failed_and_completed() -> None:
    drv: Driver = run_forward(started(make_definition(3)), 1)
    assert drv.s.status is SagaStatus.RUNNING and at_step(drv.s) == "s2"
    drv.fail("declined")
    assert drv.s.status is SagaStatus.COMPENSATING and at_step(drv.s) == "s1"

    stuck = run_forward(started(make_definition(3, pivot=0)), 1)
    stuck.fail("refused")
    assert stuck.s.status is SagaStatus.FAILED and at_step(stuck.s) == "s2"

    done = run_forward(started(make_definition(2)), 2)
    assert done.s.status is SagaStatus.COMPLETED and at_step(done.s) is None


# --- a retry run read as one line ------------------------------------------------------------


def test_a_retry_run_is_one_line_with_its_attempts_errors_and_intervals() -> None:
    """s3 fails, and s2's compensation fails ten times (each reply a second after its send):
    some thirty entries that say one thing."""
    drv = run_forward(started(make_definition(3, compensation_attempts=10)), 2)
    drv.fail("out_of_stock")
    for _ in range(9):
        drv.advance(timedelta(seconds=1))
        drv.fail("gateway_down", retryable=True)
        drv.fire()
    drv.advance(timedelta(seconds=1))
    drv.fail("gateway_down", retryable=True)
    assert drv.s.status is SagaStatus.FAILED
    history = drv.history()

    [run] = retry_runs(history, {("s2", Direction.COMPENSATION): "undo_s2"})
    assert (run.step, run.direction, run.command) == ("s2", Direction.COMPENSATION, "undo_s2")
    assert (run.attempts, run.first_attempt, run.last_attempt) == (10, 1, 10)
    assert run.errors == ["gateway_down"]
    sent = [h for h in history if h.kind is HistoryKind.COMMAND_SENT and h.step == "s2"]
    undo = [h for h in sent if h.direction is Direction.COMPENSATION]
    assert history[run.first] is undo[0] and run.first_at == undo[0].at
    # the last failure is inside the run; what it led to (FAILED) is not
    assert history[run.last].kind is HistoryKind.COMPENSATION_FAILED
    assert history[run.last + 1].kind is HistoryKind.FAILED and run.last_at == history[run.last].at
    # a second per reply, plus the backoff: 0.1 s doubling up to its 2 s cap (jitter 10 %)
    assert run.min_interval_s is not None and 1.08 < run.min_interval_s < 1.12
    assert run.max_interval_s is not None and 2.79 < run.max_interval_s < 3.21
    # the same run in the saga's detail, with the command type from the definition
    detail = saga_detail(drv.s, history, drv.definition)
    assert detail.retry_runs == [run]


def test_runs_end_at_an_outcome_or_an_operator_and_keep_late_replies_inside() -> None:
    drv = run_forward(started(make_definition(2, max_attempts=3, compensation_attempts=2)), 1)
    first = drv.last_command
    drv.fail("busy", retryable=True)
    drv.fire()
    drv.fail("busy", retryable=True, to=first)  # a late answer to attempt 1: ignored
    drv.time_out()
    drv.fire()
    drv.fail("busy", retryable=True)  # the third: s2 gives up, s1 is compensated
    drv.fail("ledger_locked", retryable=True)
    drv.fire()
    drv.fail("ledger_locked", retryable=True)
    assert drv.s.status is SagaStatus.FAILED
    drv.operator_retry()
    drv.succeed()
    assert drv.s.status is SagaStatus.COMPENSATED
    history = drv.history()

    forward, undo = retry_runs(history)
    assert (forward.step, forward.direction, forward.attempts) == ("s2", Direction.ACTION, 3)
    assert forward.errors == ["busy", "timed out"]
    inside = history[forward.first : forward.last + 1]
    assert HistoryKind.IGNORED in {h.kind for h in inside}
    assert history[forward.last + 1].kind is HistoryKind.COMPENSATION_STARTED
    assert forward.command is None  # no command types given
    assert (undo.step, undo.direction, undo.attempts, undo.errors) == (
        "s1",
        Direction.COMPENSATION,
        2,
        ["ledger_locked"],
    )
    # the operator's retry is in view, and the one attempt after it is not a run
    assert history[undo.last + 1].kind is HistoryKind.FAILED
    assert history[undo.last + 2].kind is HistoryKind.OPERATOR
    # a single attempt is never collapsed; a threshold of 4 leaves these alone too
    assert retry_runs(history, min_attempts=4) == []


# --- the pending step's card -----------------------------------------------------------------


def test_the_pending_card_of_a_running_step_in_backoff_then_awaiting_its_reply() -> None:
    drv = run_forward(started(make_definition(3, max_attempts=5)), 1)
    drv.advance(timedelta(seconds=2))
    drv.fail("busy", retryable=True)
    sent = [h for h in drv.history(HistoryKind.COMMAND_SENT) if h.step == "s2"][-1]
    card = pending_step(drv.s, drv.definition, step_spans(drv.history()))
    assert card is not None
    assert (card.step, card.direction, card.participant, card.command) == (
        "s2",
        Direction.ACTION,
        "p2",
        "do_s2",
    )
    assert (card.phase, card.attempt, card.max_attempts, card.attempts_sent) == (
        Phase.BACKOFF,
        1,
        5,
        1,
    )
    assert card.last_error == "busy" and card.last_sent_at == sent.at
    assert card.next_retry_at == drv.s.deadline and card.reply_deadline is None
    assert card.allowed_actions == [OperatorAction.ABORT]

    drv.fire()  # the second attempt is out: its reply's deadline, no retry time
    card = pending_step(drv.s, drv.definition, step_spans(drv.history()))
    assert card is not None and (card.phase, card.attempt) == (Phase.AWAITING_REPLY, 2)
    assert card.last_sent_at == drv.now and card.reply_deadline == drv.now + TIMEOUT
    assert card.next_retry_at is None


def test_the_pending_card_of_a_failed_compensation_and_after_an_operator_retry() -> None:
    drv = run_forward(started(make_definition(3, compensation_attempts=3)), 2)
    drv.fail("out_of_stock")
    drv.retry_failed_attempts(2, reason="gateway_down")
    drv.fail("gateway_down", retryable=True)
    assert drv.s.status is SagaStatus.FAILED
    card = pending_step(drv.s, drv.definition, step_spans(drv.history()))
    assert card is not None
    assert (card.step, card.direction, card.command) == ("s2", Direction.COMPENSATION, "undo_s2")
    assert (card.attempt, card.max_attempts, card.attempts_sent) == (3, 3, 3)
    assert (card.phase, card.next_retry_at, card.reply_deadline) == (Phase.IDLE, None, None)
    assert card.last_error == "gateway_down"
    assert card.allowed_actions == [OperatorAction.RETRY, OperatorAction.RESOLVE]
    # unknown definition: what the state says, nothing from the definition, no action offered
    bare = pending_step(drv.s, None, step_spans(drv.history()))
    assert bare is not None and (bare.participant, bare.command, bare.max_attempts) == (
        None,
        None,
        None,
    )
    assert bare.allowed_actions == [] and bare.attempt == 3

    drv.operator_retry()  # a new budget: attempt 1 of 3, the fourth sent in all
    card = pending_step(drv.s, drv.definition, step_spans(drv.history()))
    assert card is not None and drv.s.status is SagaStatus.COMPENSATING
    assert (card.attempt, card.max_attempts, card.attempts_sent) == (1, 3, 4)
    drv.succeed_until_terminal()
    assert pending_step(drv.s, drv.definition, step_spans(drv.history())) is None
    assert saga_detail(drv.s, drv.history(), drv.definition).pending is None
