"""What the admin API shows of a saga, built by pure functions from the engine's state."""

from __future__ import annotations

from saga.admin.models import at_step
from saga.core.state import SagaStatus
from tests.engine.helpers import Driver, make_definition, run_forward, started


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
