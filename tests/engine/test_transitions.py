"""Table-driven unit tests of every transition of the pure engine."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from uuid import UUID

import pytest

from saga.core.definition import RetryPolicy, SagaDefinition, Step, seed_for
from saga.core.engine import allowed_actions, decide, locate_command, reply_mismatch
from saga.core.engine import replace as engine_replace
from saga.core.errors import UnknownSagaError
from saga.core.ids import command_id, idempotency_key
from saga.core.state import (
    JSON,
    Direction,
    Event,
    HistoryEntry,
    HistoryKind,
    OperatorAbort,
    OperatorAction,
    OperatorResolve,
    OperatorRetry,
    Phase,
    ReplyFailed,
    ReplySucceeded,
    SagaContext,
    SagaStatus,
    Started,
    StepState,
    StepStatus,
    TimerFired,
)

from .helpers import (
    INITIAL_BACKOFF,
    MAX_BACKOFF,
    OTHER_SAGA_ID,
    SAGA_ID,
    T0,
    TIMEOUT,
    Driver,
    make_definition,
    run_forward,
    started,
)

S = StepStatus


# --- starting and moving forward ----------------------------------------------------------


def test_start_sends_the_first_action() -> None:
    d = make_definition(3)
    drv = Driver(d)
    t = drv.start({"order": 42}, key="client-key")

    assert t.applied
    [cmd] = t.commands
    assert cmd.message_id == command_id(SAGA_ID, "s1", "action", 1)
    assert cmd.idempotency_key == idempotency_key(SAGA_ID, "s1", "action")
    assert (cmd.step, cmd.direction, cmd.attempt) == ("s1", Direction.ACTION, 1)
    assert (cmd.participant, cmd.command_type) == ("p1", "do_s1")
    assert cmd.payload == {"order": 42}
    assert cmd.deadline == T0 + TIMEOUT
    assert (cmd.saga_id, cmd.saga_name) == (SAGA_ID, "test_saga")

    s = drv.s
    assert (s.status, s.phase, s.direction, s.current) == (
        SagaStatus.RUNNING,
        Phase.AWAITING_REPLY,
        Direction.ACTION,
        0,
    )
    assert s.awaiting == cmd.message_id and s.deadline == cmd.deadline
    assert (s.version, s.key, s.attempt, s.tries) == (1, "client-key", 1, 1)
    assert drv.statuses() == (S.RUNNING, S.PENDING, S.PENDING)
    assert [h.kind for h in t.history] == [HistoryKind.STARTED, HistoryKind.COMMAND_SENT]


def test_started_twice_is_ignored() -> None:
    drv = started(make_definition(2))
    before = drv.s
    t = drv.apply(Started(SAGA_ID, {"order": 2}))
    assert not t.applied and t.state is before
    assert [h.kind for h in t.history] == [HistoryKind.IGNORED]


def test_success_stores_output_by_step_name_for_later_payloads() -> None:
    def charge_payload(ctx: SagaContext) -> Mapping[str, JSON]:
        return {"reservation": ctx.output("s1")["id"], "order": ctx.input["order"]}

    drv = Driver(make_definition(3, payloads={1: charge_payload}))
    drv.start({"order": 7})
    t = drv.succeed({"id": "r-1"})

    assert t.applied and drv.s.version == 2
    [cmd] = t.commands
    assert (cmd.step, cmd.participant, cmd.attempt) == ("s2", "p2", 1)
    assert cmd.payload == {"reservation": "r-1", "order": 7}
    assert drv.s.context.outputs == {"s1": {"id": "r-1"}}
    assert drv.statuses() == (S.SUCCEEDED, S.RUNNING, S.PENDING)
    assert drv.s.current == 1 and drv.s.awaiting == cmd.message_id
    assert [h.kind for h in t.history] == [HistoryKind.STEP_SUCCEEDED, HistoryKind.COMMAND_SENT]

    drv.succeed({"id": "p-9"})  # a second step with the same key does not overwrite the first
    assert drv.s.context.outputs == {"s1": {"id": "r-1"}, "s2": {"id": "p-9"}}


@pytest.mark.parametrize("n", [1, 2, 5], ids=lambda n: f"{n}-steps")
def test_last_success_completes(n: int) -> None:
    drv = started(make_definition(n))
    run_forward(drv, n - 1)
    t = drv.succeed({"done": True})

    assert t.commands == ()
    s = drv.s
    assert (s.status, s.phase, s.awaiting, s.deadline) == (
        SagaStatus.COMPLETED,
        Phase.IDLE,
        None,
        None,
    )
    assert drv.statuses() == (S.SUCCEEDED,) * n
    assert s.version == n + 1
    assert t.history[-1].kind is HistoryKind.COMPLETED
    assert drv.sent() == [(f"s{i + 1}", 1) for i in range(n)]


# --- definitive failures and compensation -------------------------------------------------


@pytest.mark.parametrize(
    ("fail_at", "compensated"),
    [
        (0, []),
        (1, ["s1"]),
        (2, ["s2", "s1"]),
        (3, ["s3", "s2", "s1"]),
    ],
    ids=["fail-s1", "fail-s2", "fail-s3", "fail-s4"],
)
def test_non_retryable_failure_compensates_newest_first(
    fail_at: int, compensated: list[str]
) -> None:
    drv = started(make_definition(4))
    run_forward(drv, fail_at)
    t = drv.fail("out of stock")

    if compensated:
        assert drv.s.status is SagaStatus.COMPENSATING
        assert drv.s.failure is not None and "out of stock" in drv.s.failure
        assert [h.kind for h in t.history][:2] == [
            HistoryKind.STEP_FAILED,
            HistoryKind.COMPENSATION_STARTED,
        ]
    for _ in compensated:
        cmd = drv.last_command
        assert cmd.direction is Direction.COMPENSATION
        assert cmd.command_type == f"undo_{cmd.step}" and cmd.participant == f"p{cmd.step[1:]}"
        assert cmd.message_id == command_id(SAGA_ID, cmd.step, "compensation", 1)
        assert drv.status_of(cmd.step) is S.COMPENSATING
        drv.succeed()

    assert drv.compensation_order() == compensated
    assert drv.s.status is SagaStatus.COMPENSATED and drv.s.phase is Phase.IDLE
    assert drv.s.stuck_step is None
    expected = [S.COMPENSATED] * fail_at + [S.FAILED] + [S.PENDING] * (3 - fail_at)
    assert list(drv.statuses()) == expected
    assert drv.s.step(f"s{fail_at + 1}").error == "out of stock"
    assert drv.history()[-1].kind is HistoryKind.COMPENSATED


def test_compensation_payload_reads_the_step_output() -> None:
    def refund(ctx: SagaContext) -> Mapping[str, JSON]:
        return {"payment": ctx.output("s1")["payment_id"]}

    drv = started(make_definition(2, compensation_payloads={0: refund}))
    drv.succeed({"payment_id": "pay-1"})
    drv.fail("card declined")
    assert drv.last_command.payload == {"payment": "pay-1"}


# --- retries and timeouts -----------------------------------------------------------------


def test_retryable_failure_backs_off_then_succeeds() -> None:
    drv = started(make_definition(2))
    first = drv.last_command
    t = drv.fail("busy", retryable=True)

    assert t.commands == ()
    s = drv.s
    delay = RetryPolicy(3, INITIAL_BACKOFF, 2.0, MAX_BACKOFF).delay(
        1, *seed_for(SAGA_ID, "s1", Direction.ACTION)
    )
    assert (s.status, s.phase) == (SagaStatus.RUNNING, Phase.BACKOFF)
    assert s.awaiting == command_id(SAGA_ID, "s1", "action", 2)
    assert s.deadline == T0 + delay
    assert drv.status_of("s1") is S.RUNNING and drv.s.step("s1").error == "busy"
    assert [h.kind for h in t.history] == [HistoryKind.STEP_FAILED, HistoryKind.RETRY_SCHEDULED]

    t = drv.fire()
    [second] = t.commands
    assert (second.step, second.attempt) == ("s1", 2)
    assert second.message_id == s.awaiting != first.message_id
    assert second.idempotency_key == first.idempotency_key
    assert second.deadline == T0 + delay + TIMEOUT
    assert drv.s.phase is Phase.AWAITING_REPLY and drv.s.tries == 2

    t = drv.succeed({"ok": 1})
    assert drv.status_of("s1") is S.SUCCEEDED and drv.s.step("s1").error is None
    assert t.commands[0].step == "s2"


@pytest.mark.parametrize("limit", [1, 2, 4], ids=lambda k: f"max_attempts={k}")
def test_retries_exhausted_compensate(limit: int) -> None:
    drv = started(make_definition(3, max_attempts={1: limit}))
    drv.succeed()
    drv.retry_failed_attempts(limit - 1)
    t = drv.fail("busy", retryable=True)

    assert drv.sent(Direction.ACTION) == [("s1", 1)] + [("s2", k) for k in range(1, limit + 1)]
    assert drv.status_of("s2") is S.FAILED
    assert drv.s.status is SagaStatus.COMPENSATING
    assert drv.s.failure is not None and f"gave up after {limit} attempts" in drv.s.failure
    assert [(c.step, c.direction) for c in t.commands] == [("s1", Direction.COMPENSATION)]
    drv.succeed()
    assert drv.s.status is SagaStatus.COMPENSATED
    assert drv.statuses() == (S.COMPENSATED, S.FAILED, S.PENDING)


def test_timeout_is_retried() -> None:
    drv = started(make_definition(2))
    first = drv.last_command
    drv.advance(TIMEOUT)
    t = drv.apply(TimerFired(first.message_id))

    assert t.applied and t.commands == ()
    assert [h.kind for h in t.history] == [
        HistoryKind.STEP_TIMED_OUT,
        HistoryKind.RETRY_SCHEDULED,
    ]
    assert drv.s.phase is Phase.BACKOFF
    assert drv.s.awaiting == command_id(SAGA_ID, "s1", "action", 2)
    [second] = drv.fire().commands
    assert (second.step, second.attempt) == ("s1", 2)
    drv.succeed()
    assert drv.statuses() == (S.SUCCEEDED, S.RUNNING)


@pytest.mark.parametrize(
    ("position", "compensated"),
    [(0, ["s1"]), (1, ["s2", "s1"]), (2, ["s3", "s2", "s1"])],
    ids=["s1-times-out", "s2-times-out", "s3-times-out"],
)
def test_timeout_exhausted_compensates_the_timed_out_step_too(
    position: int, compensated: list[str]
) -> None:
    drv = started(make_definition(3, max_attempts=2))
    run_forward(drv, position)
    drv.time_out()
    drv.fire()  # attempt 2
    t = drv.time_out()

    assert drv.status_of(f"s{position + 1}") is S.COMPENSATING
    assert drv.s.status is SagaStatus.COMPENSATING
    assert drv.s.failure is not None and "timed out 2 times" in drv.s.failure
    assert HistoryKind.COMPENSATION_STARTED in [h.kind for h in t.history]
    drv.succeed_until_terminal()
    assert drv.compensation_order() == compensated
    assert drv.s.status is SagaStatus.COMPENSATED
    assert drv.statuses()[: position + 1] == (S.COMPENSATED,) * (position + 1)


def test_timed_out_status_is_kept_when_there_is_nothing_to_undo() -> None:
    drv = started(make_definition(2, not_compensatable=[1], max_attempts=1))
    drv.succeed()
    drv.time_out()
    assert drv.statuses() == (S.COMPENSATING, S.TIMED_OUT)
    drv.succeed()
    assert drv.s.status is SagaStatus.COMPENSATED
    assert drv.statuses() == (S.COMPENSATED, S.TIMED_OUT)


@pytest.mark.parametrize(
    ("skip", "fail_at", "compensated"),
    [
        ([1], 3, ["s3", "s1"]),
        ([0], 2, ["s2"]),
        ([0, 1, 2], 3, []),
        ([2], 3, ["s2", "s1"]),
    ],
    ids=["skip-middle", "skip-first", "skip-all", "skip-newest"],
)
def test_compensatable_false_steps_are_skipped(
    skip: list[int], fail_at: int, compensated: list[str]
) -> None:
    drv = started(make_definition(4, not_compensatable=skip))
    run_forward(drv, fail_at)
    drv.fail("no")
    drv.succeed_until_terminal()
    assert drv.compensation_order() == compensated
    assert drv.s.status is SagaStatus.COMPENSATED
    for i in skip:
        assert drv.statuses()[i] is S.SUCCEEDED


def test_compensatable_false_step_naming_a_compensation_is_not_compensated() -> None:
    # validate() accepts compensatable=False with a compensation; the flag still wins
    d = make_definition(3)
    steps = list(d.steps)
    steps[1] = replace(steps[1], compensatable=False)
    d = SagaDefinition(d.name, d.version, steps)
    d.validate()
    drv = run_forward(started(d), 2)
    drv.fail("no")
    drv.succeed_until_terminal()
    assert drv.compensation_order() == ["s1"]
    assert drv.statuses() == (S.COMPENSATED, S.SUCCEEDED, S.FAILED)


# --- the pivot ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pivot", "compensated"),
    [(0, []), (1, ["s1"]), (2, ["s2", "s1"])],
    ids=["pivot-s1", "pivot-s2", "pivot-s3"],
)
def test_failure_of_the_pivot_compensates_earlier_steps(pivot: int, compensated: list[str]) -> None:
    drv = started(make_definition(4, pivot=pivot))
    run_forward(drv, pivot)
    drv.fail("rejected")
    drv.succeed_until_terminal()
    assert drv.compensation_order() == compensated
    assert drv.s.status is SagaStatus.COMPENSATED
    assert drv.status_of(f"s{pivot + 1}") is S.FAILED


@pytest.mark.parametrize(
    "make_stuck",
    [
        pytest.param(lambda drv: drv.fail("refused"), id="non-retryable"),
        pytest.param(
            lambda drv: (drv.retry_failed_attempts(2), drv.fail("busy", retryable=True)),
            id="retries-exhausted",
        ),
        pytest.param(
            lambda drv: (drv.time_out(), drv.fire(), drv.time_out(), drv.fire(), drv.time_out()),
            id="timed-out",
        ),
    ],
)
@pytest.mark.parametrize("fail_at", [2, 3], ids=["after-pivot-s3", "after-pivot-s4"])
def test_failure_after_the_pivot_fails_then_operator_retry_completes(
    make_stuck: Callable[[Driver], object], fail_at: int
) -> None:
    drv = started(make_definition(4, pivot=1))
    run_forward(drv, fail_at)
    attempts_before = drv.last_command.attempt
    make_stuck(drv)
    stuck = f"s{fail_at + 1}"

    assert drv.s.status is SagaStatus.FAILED and drv.s.phase is Phase.IDLE
    assert drv.s.stuck_step == stuck
    assert drv.s.failure is not None
    assert drv.compensation_order() == []
    assert drv.history()[-1].kind is HistoryKind.FAILED

    last_attempt = drv.last_command.attempt
    assert last_attempt >= attempts_before
    t = drv.operator_retry()
    [cmd] = t.commands
    assert (cmd.step, cmd.direction, cmd.attempt) == (stuck, Direction.ACTION, last_attempt + 1)
    assert drv.s.status is SagaStatus.RUNNING and drv.s.stuck_step is None
    assert drv.s.tries == 1  # a fresh budget
    assert t.history[0].kind is HistoryKind.OPERATOR
    drv.succeed_until_terminal()
    assert drv.s.status is SagaStatus.COMPLETED
    assert drv.statuses() == (S.SUCCEEDED,) * 4


def test_pivot_timing_out_fails_instead_of_compensating() -> None:
    drv = started(make_definition(3, pivot=1, max_attempts=1))
    drv.succeed()
    drv.time_out()
    assert drv.s.status is SagaStatus.FAILED and drv.s.stuck_step == "s2"
    assert drv.compensation_order() == []


def test_operator_abort_of_a_pivot_stuck_in_doubt_compensates_the_earlier_steps() -> None:
    """The operator checked that the timed-out pivot never happened: undo what came before."""
    drv = started(make_definition(3, pivot=1, max_attempts=1))
    drv.succeed()
    drv.time_out()
    assert drv.s.status is SagaStatus.FAILED and drv.s.stuck_step == "s2"
    t = drv.operator_abort()
    assert t.applied and [h.actor for h in drv.history(HistoryKind.OPERATOR)] == ["alice"]
    assert drv.status_of("s2") is S.FAILED  # the pivot itself is never compensated
    drv.succeed_until_terminal()
    assert drv.s.status is SagaStatus.COMPENSATED
    assert drv.compensation_order() == ["s1"]


def test_abort_of_a_saga_failed_after_the_pivot_is_rejected() -> None:
    drv = run_forward(started(make_definition(3, pivot=0)), 1)
    drv.fail("refused")
    assert drv.s.status is SagaStatus.FAILED and drv.s.stuck_step == "s2"
    t = drv.operator_abort()
    assert not t.applied and t.history == ()
    assert t.refused is not None and "only a RUNNING saga can be aborted" in t.refused


def test_forward_operator_retry_clears_the_failure() -> None:
    drv = run_forward(started(make_definition(3, pivot=0)), 1)
    drv.fail("refused")
    assert drv.s.failure is not None
    drv.operator_retry()
    assert drv.s.failure is None
    drv.succeed_until_terminal()
    assert (drv.s.status, drv.s.failure) == (SagaStatus.COMPLETED, None)


def test_operator_resolve_after_the_pivot_continues_forward() -> None:
    drv = started(make_definition(4, pivot=1))
    run_forward(drv, 2)
    drv.fail("refused")
    assert drv.s.stuck_step == "s3"

    t = drv.operator_resolve({"shipment": "by-hand"})
    [cmd] = t.commands
    assert (cmd.step, cmd.attempt) == ("s4", 1)
    assert drv.status_of("s3") is S.SUCCEEDED and drv.s.step("s3").error is None
    assert drv.s.context.output("s3") == {"shipment": "by-hand"}
    assert (drv.s.status, drv.s.stuck_step) == (SagaStatus.RUNNING, None)
    drv.succeed()
    assert drv.s.status is SagaStatus.COMPLETED


def test_operator_resolve_of_the_last_step_completes() -> None:
    drv = started(make_definition(2, pivot=0))
    drv.succeed()
    drv.fail("refused")
    t = drv.operator_resolve()
    assert t.commands == () and drv.s.status is SagaStatus.COMPLETED


# --- compensation failures ------------------------------------------------------------------


def _compensating_s2(limit: int | None) -> Driver:
    """s1 and s2 succeeded, s3 failed: s2's compensation is in flight."""
    drv = started(make_definition(3, compensation_attempts=limit))
    run_forward(drv, 2)
    drv.fail("no")
    assert drv.last_command.step == "s2" and drv.s.direction is Direction.COMPENSATION
    return drv


@pytest.mark.parametrize(
    ("failures", "limit"),
    [(0, 3), (1, 3), (2, 3), (4, 5), (5, None)],
    ids=["k0-of-3", "k1-of-3", "k2-of-3", "k4-of-5", "k5-unlimited"],
)
def test_compensation_failing_fewer_times_than_the_limit_compensates(
    failures: int, limit: int | None
) -> None:
    drv = _compensating_s2(limit)
    drv.retry_failed_attempts(failures)
    assert drv.last_command.attempt == failures + 1
    drv.succeed_until_terminal()
    assert drv.s.status is SagaStatus.COMPENSATED
    assert drv.compensation_order() == ["s2"] * (failures + 1) + ["s1"]


@pytest.mark.parametrize("limit", [1, 2, 3], ids=lambda k: f"limit-{k}")
def test_compensation_failing_up_to_the_limit_fails_then_operator_retry(limit: int) -> None:
    drv = _compensating_s2(limit)
    drv.retry_failed_attempts(limit - 1)
    t = drv.fail("ledger locked", retryable=True)

    assert drv.s.status is SagaStatus.FAILED and drv.s.stuck_step == "s2"
    assert drv.s.failure is not None and f"after {limit} attempts" in drv.s.failure
    assert [h.kind for h in t.history] == [HistoryKind.COMPENSATION_FAILED, HistoryKind.FAILED]
    assert drv.status_of("s2") is S.COMPENSATING
    assert drv.s.phase is Phase.IDLE

    [cmd] = drv.operator_retry().commands
    assert (cmd.step, cmd.direction, cmd.attempt) == ("s2", Direction.COMPENSATION, limit + 1)
    assert drv.s.status is SagaStatus.COMPENSATING and drv.s.stuck_step is None
    drv.succeed_until_terminal()
    assert drv.s.status is SagaStatus.COMPENSATED
    assert drv.statuses() == (S.COMPENSATED, S.COMPENSATED, S.FAILED)


@pytest.mark.parametrize(
    "make_stuck",
    [
        pytest.param(lambda drv: drv.fail("forbidden"), id="non-retryable"),
        pytest.param(
            lambda drv: (drv.time_out(), drv.fire(), drv.time_out()), id="compensation-timed-out"
        ),
    ],
)
def test_compensation_stuck_then_operator_resolve_continues_compensating(
    make_stuck: Callable[[Driver], object],
) -> None:
    drv = _compensating_s2(2)
    make_stuck(drv)
    assert drv.s.status is SagaStatus.FAILED and drv.s.stuck_step == "s2"

    t = drv.operator_resolve()
    [cmd] = t.commands
    assert (cmd.step, cmd.direction) == ("s1", Direction.COMPENSATION)
    assert drv.status_of("s2") is S.COMPENSATED
    assert drv.s.status is SagaStatus.COMPENSATING and drv.s.stuck_step is None
    drv.succeed()
    assert drv.s.status is SagaStatus.COMPENSATED


def test_resolving_the_oldest_stuck_compensation_ends_compensated() -> None:
    drv = started(make_definition(2))
    drv.succeed()
    drv.fail("no")
    drv.fail("forbidden")  # s1's compensation
    assert drv.s.stuck_step == "s1"
    t = drv.operator_resolve()
    assert t.commands == () and drv.s.status is SagaStatus.COMPENSATED


# --- operator abort -------------------------------------------------------------------------


@pytest.mark.parametrize("in_backoff", [False, True], ids=["awaiting-reply", "in-backoff"])
def test_operator_abort_compensates_including_the_in_flight_step(in_backoff: bool) -> None:
    drv = started(make_definition(4, pivot=3))
    run_forward(drv, 2)
    in_flight = drv.last_command
    if in_backoff:
        drv.fail("busy", retryable=True)
    t = drv.operator_abort()

    assert t.applied and drv.s.status is SagaStatus.COMPENSATING
    assert drv.s.failure == "aborted by alice: customer cancelled"
    assert [h.kind for h in t.history][:2] == [
        HistoryKind.OPERATOR,
        HistoryKind.COMPENSATION_STARTED,
    ]
    [cmd] = t.commands
    assert (cmd.step, cmd.direction) == ("s3", Direction.COMPENSATION)

    late = drv.succeed(to=in_flight)  # the aborted action's reply arrives afterwards
    assert not late.applied
    drv.succeed_until_terminal()
    assert drv.compensation_order() == ["s3", "s2", "s1"]
    assert drv.s.status is SagaStatus.COMPENSATED


def test_operator_abort_of_a_step_with_nothing_to_undo() -> None:
    drv = started(make_definition(3, not_compensatable=[1]))
    drv.succeed()
    drv.operator_abort()
    assert drv.statuses() == (S.COMPENSATING, S.ABORTED, S.PENDING)
    drv.succeed()
    assert drv.s.status is SagaStatus.COMPENSATED and drv.compensation_order() == ["s1"]


# --- rejected operator actions --------------------------------------------------------------


def _running() -> Driver:
    return run_forward(started(make_definition(3)), 1)


def _compensating() -> Driver:
    drv = run_forward(started(make_definition(3)), 2)
    drv.fail("no")
    return drv


def _pivot_in_flight() -> Driver:
    return run_forward(started(make_definition(3, pivot=1)), 1)


def _after_pivot() -> Driver:
    return run_forward(started(make_definition(3, pivot=1)), 2)


def _failed() -> Driver:
    drv = _after_pivot()
    drv.fail("refused")
    return drv


def _completed() -> Driver:
    return run_forward(started(make_definition(2)), 2)


def _compensated() -> Driver:
    drv = run_forward(started(make_definition(2)), 1)
    drv.fail("no")
    drv.succeed()
    return drv


SCENARIOS = {
    "running": _running,
    "compensating": _compensating,
    "pivot-in-flight": _pivot_in_flight,
    "after-pivot": _after_pivot,
    "failed": _failed,
    "completed": _completed,
    "compensated": _compensated,
}

RETRY = OperatorRetry("bob", "try again")
ABORT = OperatorAbort("bob", "stop")
RESOLVE = OperatorResolve("bob", "fixed")


REJECTIONS = [
    ("running", RETRY, "only a FAILED saga can be retried"),
    ("compensating", RETRY, "only a FAILED saga can be retried"),
    ("completed", RETRY, "only a FAILED saga can be retried"),
    ("compensated", RETRY, "only a FAILED saga can be retried"),
    ("running", RESOLVE, "only a FAILED saga can be resolved"),
    ("compensating", RESOLVE, "only a FAILED saga can be resolved"),
    ("completed", RESOLVE, "only a FAILED saga can be resolved"),
    ("compensated", RESOLVE, "only a FAILED saga can be resolved"),
    ("after-pivot", ABORT, "can only go forward"),
    ("pivot-in-flight", ABORT, "can only go forward"),
    ("compensating", ABORT, "only a RUNNING saga can be aborted"),
    ("failed", ABORT, "only a RUNNING saga can be aborted"),
    ("completed", ABORT, "only a RUNNING saga can be aborted"),
    ("compensated", ABORT, "only a RUNNING saga can be aborted"),
]


@pytest.mark.parametrize(
    ("scenario", "event", "why"),
    [pytest.param(*row, id=f"{type(row[1]).__name__}-on-{row[0]}") for row in REJECTIONS],
)
def test_operator_action_rejected(scenario: str, event: Event, why: str) -> None:
    drv = SCENARIOS[scenario]()
    before = drv.s
    t = drv.apply(event)
    assert not t.applied and t.state is before and t.commands == ()
    assert t.history == (), "a refusal changed nothing, so the audit trail does not change"
    assert t.refused is not None and why in t.refused
    assert t.refused.startswith(f"{type(event).__name__} rejected: ")
    action = {OperatorRetry: "retry", OperatorAbort: "abort", OperatorResolve: "resolve"}
    assert OperatorAction(action[type(event)]) not in allowed_actions(drv.definition, before)


def _stuck_at_pivot() -> Driver:
    drv = started(make_definition(3, pivot=1, max_attempts=1))
    drv.succeed()
    drv.time_out()  # the pivot's outcome is unknown: FAILED at the pivot itself
    return drv


A = OperatorAction


@pytest.mark.parametrize(
    ("scenario", "allowed"),
    [
        ("running", (A.ABORT,)),
        ("pivot-in-flight", ()),
        ("after-pivot", ()),
        ("compensating", ()),
        ("failed", (A.RETRY, A.RESOLVE)),
        ("stuck-at-pivot", (A.RETRY, A.ABORT, A.RESOLVE)),
        ("completed", ()),
        ("compensated", ()),
    ],
)
def test_allowed_actions_are_what_the_engine_accepts(
    scenario: str, allowed: tuple[OperatorAction, ...]
) -> None:
    drv = _stuck_at_pivot() if scenario == "stuck-at-pivot" else SCENARIOS[scenario]()
    assert allowed_actions(drv.definition, drv.s) == allowed
    for event in (RETRY, ABORT, RESOLVE):
        accepted = decide(drv.definition, drv.s, event, drv.now).applied
        action = {OperatorRetry: A.RETRY, OperatorAbort: A.ABORT, OperatorResolve: A.RESOLVE}
        assert accepted == (action[type(event)] in allowed), event


# --- messages that must not change anything -------------------------------------------------


def _assert_ignored(drv: Driver, event: Event, *fragments: str) -> None:
    before = drv.s
    t = drv.apply(event)
    assert not t.applied
    assert t.state is before and t.state.version == before.version
    assert t.commands == ()
    [entry] = t.history
    assert entry.kind is HistoryKind.IGNORED
    for fragment in fragments:
        assert fragment in entry.detail, entry.detail


@pytest.mark.parametrize("success", [True, False], ids=["dup-success", "dup-failure"])
def test_duplicate_reply_is_ignored(success: bool) -> None:
    drv = started(make_definition(3))
    first = drv.last_command
    reply: Event = (
        ReplySucceeded(first.message_id, "p1", {"id": 1})
        if success
        else ReplyFailed(first.message_id, "p1", "no", retryable=False)
    )
    drv.apply(ReplySucceeded(first.message_id, "p1", {"id": 1}))
    assert drv.s.current == 1
    _assert_ignored(
        drv,
        reply,
        "duplicate or late reply to s1 action attempt 1",
        "awaiting s2 action attempt 1",
    )
    assert drv.s.context.outputs == {"s1": {"id": 1}}


def test_a_transient_late_reply_to_an_old_attempt_is_ignored() -> None:
    drv = started(make_definition(2))
    first = drv.last_command
    drv.time_out()
    drv.fire()  # attempt 2 is awaited now
    _assert_ignored(
        drv,
        ReplyFailed(first.message_id, "p1", "busy", retryable=True),
        "s1 action attempt 1",
        "awaiting s1 action attempt 2",
    )
    drv.succeed()
    assert drv.status_of("s1") is S.SUCCEEDED


@pytest.mark.parametrize("success", [True, False], ids=["success", "refusal"])
def test_a_final_late_reply_to_an_old_attempt_is_the_answer(success: bool) -> None:
    """Every attempt has the same idempotency key, so the first final answer to arrive is the
    step's answer: waiting for the newest attempt's copy would only let it time out again."""
    drv = started(make_definition(2))
    first = drv.last_command
    drv.time_out()
    drv.fire()  # attempt 2 is awaited now
    event: Event = (
        ReplySucceeded(first.message_id, "p1")
        if success
        else ReplyFailed(first.message_id, "p1", "no", retryable=False)
    )
    assert drv.apply(event).applied
    assert drv.status_of("s1") is (S.SUCCEEDED if success else S.FAILED)


def test_a_final_late_reply_is_the_answer_during_a_backoff_too() -> None:
    drv = started(make_definition(3))
    first = drv.last_command
    drv.time_out()
    drv.fire()  # attempt 2 is sent...
    second = drv.last_command
    drv.fail("busy", retryable=True)  # ...and answers busy: a backoff before attempt 3
    # attempt 2 has answered: a second, different answer to it is not believed
    _assert_ignored(drv, ReplySucceeded(second.message_id, "p1"), "no reply is awaited")
    # attempt 1 never answered: its final answer is the step's
    assert drv.apply(ReplySucceeded(first.message_id, "p1")).applied
    assert drv.status_of("s1") is S.SUCCEEDED


def test_a_reply_to_an_attempt_not_sent_yet_is_ignored() -> None:
    drv = started(make_definition(2))
    drv.fail("busy", retryable=True)
    _assert_ignored(drv, ReplySucceeded(drv.awaiting, "p1"), "no reply is awaited")


@pytest.mark.parametrize("success", [True, False], ids=["success", "failure"])
def test_reply_from_the_wrong_participant_is_ignored(success: bool) -> None:
    drv = started(make_definition(2))
    cmd = drv.last_command
    event: Event = (
        ReplySucceeded(cmd.message_id, "p2") if success else ReplyFailed(cmd.message_id, "p2", "x")
    )
    _assert_ignored(drv, event, "comes from participant 'p2'", "the command went to 'p1'")
    # the runtime refuses it before the engine sees it: the engine says why
    assert reply_mismatch(drv.definition, drv.s, event) is not None


@pytest.mark.parametrize("success", [True, False], ids=["success", "failure"])
def test_a_reply_naming_another_command_type_does_not_match_its_command(success: bool) -> None:
    drv = started(make_definition(2))
    cmd = drv.last_command
    event: Event = (
        ReplySucceeded(cmd.message_id, "p1", command_type="p1.teleport")
        if success
        else ReplyFailed(cmd.message_id, "p1", "x", command_type="p1.teleport")
    )
    why = reply_mismatch(drv.definition, drv.s, event)
    assert why is not None and "'p1.teleport'" in why and repr(cmd.command_type) in why
    _assert_ignored(drv, event, "names command type 'p1.teleport'")
    right = ReplySucceeded(cmd.message_id, "p1", command_type=cmd.command_type)
    assert reply_mismatch(drv.definition, drv.s, right) is None


@pytest.mark.parametrize(
    "causation",
    [
        command_id(OTHER_SAGA_ID, "s1", "action", 1),
        command_id(SAGA_ID, "s1", "action", 7),
        command_id(SAGA_ID, "nope", "action", 1),
        UUID(int=0),
    ],
    ids=["other-saga", "unsent-attempt", "unknown-step", "random"],
)
def test_reply_answering_no_command_of_this_saga_is_ignored(causation: UUID) -> None:
    drv = started(make_definition(2))
    _assert_ignored(drv, ReplySucceeded(causation, "p1"), "reply answers no command of this saga")
    _assert_ignored(drv, ReplyFailed(causation, "p1", "boom"), "answers no command")


# --- timers ---------------------------------------------------------------------------------


def test_early_timer_is_ignored() -> None:
    drv = started(make_definition(2))
    drv.advance(TIMEOUT - timedelta(microseconds=1))
    _assert_ignored(drv, TimerFired(drv.awaiting), "not due until")
    drv.advance(timedelta(microseconds=1))  # exactly at the deadline it acts
    assert drv.fire(due=False).applied


def test_early_backoff_timer_is_ignored() -> None:
    drv = started(make_definition(2))
    drv.fail("busy", retryable=True)
    _assert_ignored(drv, TimerFired(drv.awaiting), "not due until")


@pytest.mark.parametrize(
    "timer",
    [
        command_id(SAGA_ID, "s1", "action", 1),
        command_id(SAGA_ID, "s2", "action", 2),
        command_id(OTHER_SAGA_ID, "s2", "action", 1),
    ],
    ids=["old-attempt", "not-armed", "other-saga"],
)
def test_stale_timer_is_ignored(timer: UUID) -> None:
    drv = run_forward(started(make_definition(2)), 1)
    drv.advance(timedelta(hours=1))
    _assert_ignored(drv, TimerFired(timer), "stale timer", "awaiting s2 action attempt 1")


def test_timer_firing_twice_sends_once() -> None:
    drv = started(make_definition(2))
    drv.fail("busy", retryable=True)
    timer = TimerFired(drv.awaiting)
    drv.fire()
    assert drv.sent() == [("s1", 1), ("s1", 2)]
    _assert_ignored(drv, timer, "not due until")

    drv.time_out()
    # the timeout moved the saga to a backoff for attempt 3: the timeout timer is stale now
    _assert_ignored(drv, timer, "stale timer")
    assert drv.sent() == [("s1", 1), ("s1", 2)]
    drv.fire()
    _assert_ignored(drv, TimerFired(drv.awaiting), "not due until")
    assert drv.sent() == [("s1", 1), ("s1", 2), ("s1", 3)]


# --- settled sagas ignore everything --------------------------------------------------------


def _events_for(drv: Driver) -> list[Event]:
    events: list[Event] = []
    for cmd in drv.commands:
        events += [
            ReplySucceeded(cmd.message_id, cmd.participant),
            ReplyFailed(cmd.message_id, cmd.participant, "late", retryable=True),
            TimerFired(cmd.message_id),
        ]
    return [*events, Started(SAGA_ID, {}), RETRY, ABORT, RESOLVE]


@pytest.mark.parametrize("scenario", ["completed", "compensated"])
def test_settled_saga_ignores_every_event(scenario: str) -> None:
    drv = SCENARIOS[scenario]()
    drv.advance(timedelta(days=1))
    settled = drv.s
    for event in _events_for(drv):
        t = drv.apply(event)
        assert not t.applied and t.state is settled and t.commands == ()
        if isinstance(event, OperatorRetry | OperatorAbort | OperatorResolve):
            assert t.history == () and t.refused is not None
        else:
            [entry] = t.history
            assert entry.kind is HistoryKind.IGNORED
    assert allowed_actions(drv.definition, settled) == ()


# --- payload builders that raise ------------------------------------------------------------


def _broken(ctx: SagaContext) -> Mapping[str, JSON]:
    return {"x": ctx.output("missing")["id"]}


@pytest.mark.parametrize(
    ("position", "compensated"),
    [(0, []), (1, ["s1"]), (2, ["s2", "s1"])],
    ids=["builder-s1", "builder-s2", "builder-s3"],
)
def test_raising_payload_builder_fails_the_step(position: int, compensated: list[str]) -> None:
    drv = Driver(make_definition(3, payloads={position: _broken}))
    drv.start()
    run_forward(drv, position)

    step = drv.s.step(f"s{position + 1}")
    assert step.status is S.FAILED
    assert step.error is not None
    assert step.error.startswith("payload builder raised UnknownSagaError:")
    assert "'missing' has no output yet" in step.error
    assert all(c.step != step.name for c in drv.commands)
    [entry] = [h for h in drv.history(HistoryKind.STEP_FAILED) if h.step == step.name]
    assert "cannot be built" in entry.detail and entry.attempt is None
    drv.succeed_until_terminal()
    assert drv.compensation_order() == compensated
    assert drv.s.status is SagaStatus.COMPENSATED
    assert drv.s.failure is not None and "payload builder raised" in drv.s.failure


def test_payload_that_is_not_json_fails_the_step_not_the_runtime() -> None:
    """A UUID or a Decimal would break the wire encoding later, outside the engine."""

    def not_json(ctx: SagaContext) -> Mapping[str, JSON]:
        return {"ref": ctx.saga_id}  # type: ignore[dict-item]

    drv = Driver(make_definition(2, payloads={1: not_json}))
    drv.start()
    drv.succeed()
    assert drv.status_of("s2") is S.FAILED
    error = drv.s.step("s2").error
    assert error is not None and error.startswith("payload builder raised TypeError")
    drv.succeed_until_terminal()
    assert drv.s.status is SagaStatus.COMPENSATED and drv.compensation_order() == ["s1"]


def test_raising_payload_builder_after_the_pivot_fails_the_saga() -> None:
    drv = run_forward(started(make_definition(3, pivot=0, payloads={2: _broken})), 2)
    assert drv.s.status is SagaStatus.FAILED and drv.s.stuck_step == "s3"
    assert drv.s.failure is not None and "payload builder raised" in drv.s.failure


def test_raising_compensation_builder_fails_the_saga_naming_the_step() -> None:
    def refund(ctx: SagaContext) -> Mapping[str, JSON]:
        raise ValueError("no refund address")

    drv = run_forward(started(make_definition(3, compensation_payloads={1: refund})), 2)
    drv.fail("no")
    assert drv.s.status is SagaStatus.FAILED and drv.s.stuck_step == "s2"
    assert drv.s.failure is not None
    assert "payload builder raised ValueError: no refund address" in drv.s.failure
    assert drv.compensation_order() == []
    drv.operator_resolve()  # the operator refunds by hand; s1 is compensated next
    assert drv.compensation_order() == ["s1"]


# --- determinism ----------------------------------------------------------------------------


def _eventful_run(saga_id: UUID) -> Driver:
    drv = started(make_definition(3, compensation_attempts=3), saga_id=saga_id)
    drv.retry_failed_attempts(2)
    drv.succeed()
    drv.time_out()
    drv.fire()
    drv.fail("no")
    drv.retry_failed_attempts(1)
    drv.succeed()
    return drv


def test_message_ids_are_deterministic_and_distinct_per_attempt() -> None:
    one, two = _eventful_run(SAGA_ID), _eventful_run(SAGA_ID)
    assert one.commands == two.commands
    assert [t.state for t in one.transitions] == [t.state for t in two.transitions]
    ids = [c.message_id for c in one.commands]
    assert len(ids) == len(set(ids)) == 7
    for c in one.commands:
        assert c.message_id == command_id(SAGA_ID, c.step, c.direction.value, c.attempt)
        assert c.idempotency_key == idempotency_key(SAGA_ID, c.step, c.direction.value)
    assert one.sent() == [
        ("s1", 1),
        ("s1", 2),
        ("s1", 3),
        ("s2", 1),
        ("s2", 2),
        ("s1", 1),
        ("s1", 2),
    ]
    other = _eventful_run(OTHER_SAGA_ID)
    assert not {c.message_id for c in other.commands} & set(ids)


def test_decide_is_a_pure_function() -> None:
    d = make_definition(2)
    state = started(d).s
    event = ReplyFailed(command_id(SAGA_ID, "s1", "action", 1), "p1", "busy", retryable=True)
    now = T0 + timedelta(seconds=1)
    assert decide(d, state, event, now) == decide(d, state, event, now)
    assert decide(d, replace(state), event, now).state.deadline == (
        decide(d, state, event, now).state.deadline
    )


@pytest.mark.parametrize(
    "retry",
    [
        RetryPolicy(),
        RetryPolicy(initial_backoff=timedelta(seconds=1), multiplier=3, jitter=0.5),
        RetryPolicy(initial_backoff=timedelta(0), jitter=0.9),
        RetryPolicy(jitter=0),
    ],
    ids=["default", "wide-jitter", "zero-backoff", "no-jitter"],
)
def test_jitter_is_deterministic_and_bounded(retry: RetryPolicy) -> None:
    for tries in range(1, 15):
        base = min(
            retry.initial_backoff.total_seconds() * retry.multiplier ** (tries - 1),
            retry.max_backoff.total_seconds(),
        )
        delays = set()
        for n in range(20):
            seed = seed_for(UUID(int=n), "s1", Direction.ACTION)
            delay = retry.delay(tries, *seed)
            assert delay == retry.delay(tries, *seed)
            lo, hi = base * (1 - retry.jitter), base * (1 + retry.jitter)
            assert lo - 1e-6 <= delay.total_seconds() <= hi + 1e-6
            delays.add(delay)
        if retry.jitter and base:
            assert len(delays) > 10, "jitter should spread different sagas apart"
        else:
            assert delays == {timedelta(seconds=base)}


def test_engine_backoff_uses_the_seeded_delay() -> None:
    deadlines = []
    for saga_id in (SAGA_ID, SAGA_ID, OTHER_SAGA_ID):
        drv = started(make_definition(1, compensation_attempts=3), saga_id=saga_id)
        drv.fail("busy", retryable=True)
        expected = drv.definition.steps[0].retry.delay(
            1, *seed_for(saga_id, "s1", Direction.ACTION)
        )
        assert drv.s.deadline == T0 + expected
        deadlines.append(drv.s.deadline)
    assert deadlines[0] == deadlines[1] != deadlines[2]


@pytest.mark.parametrize(
    "event",
    [
        ReplySucceeded(UUID(int=1), "p1"),
        TimerFired(UUID(int=1)),
        OperatorRetry("a", "b"),
    ],
    ids=["reply", "timer", "operator"],
)
def test_event_before_start_is_an_error(event: Event) -> None:
    with pytest.raises(UnknownSagaError):
        decide(make_definition(1), None, event, T0)


def test_state_of_another_definition_is_an_error() -> None:
    state = started(make_definition(2)).s
    with pytest.raises(UnknownSagaError):
        decide(make_definition(2, name="other"), state, OperatorRetry("a", "b"), T0)


def test_the_awaited_command_is_located_as_every_other_command() -> None:
    """reply_mismatch knows the awaited command from the state; it must agree with
    locate_command, which derives the id of every command the saga sent."""
    d = SagaDefinition(
        "pair",
        1,
        [
            Step("a", participant="p", action="p.a", compensation="p.undo_a"),
            Step("b", participant="q", action="q.b", compensation="q.undo_b"),
        ],
    )
    t = decide(d, None, Started(SAGA_ID, {}, None), T0)
    seen = 0
    while t.state.phase is Phase.AWAITING_REPLY:
        state = t.state
        assert state.awaiting is not None
        assert locate_command(d, state, state.awaiting) == (
            state.current,
            state.direction,
            state.attempt,
        )
        seen += 1
        if state.current == 1 and state.direction is Direction.ACTION:
            event = ReplyFailed(state.awaiting, "q", "refused")  # compensate a
        else:
            event = ReplySucceeded(state.awaiting, d.steps[state.current].participant, {})
        t = decide(d, state, event, T0)
    assert seen == 3  # a, b refused, undo a


def test_the_engines_replace_copies_as_dataclasses_replace_does() -> None:
    """The engine's copier (one per class and set of changed fields) gives what
    :func:`dataclasses.replace` gives, leaves the original alone, and refuses unknown fields."""
    step = StepState("charge", StepStatus.RUNNING, 2, 0, None)
    for changes in ({"attempts": 3}, {"error": "x", "status": StepStatus.FAILED}, {}):
        copied = engine_replace(step, **changes)
        assert copied == replace(step, **changes)
        assert copied is not step
    assert step.attempts == 2
    # the same fields in another order, and another class with a field of the same name
    assert engine_replace(step, status=StepStatus.FAILED, error="x") == engine_replace(
        step, error="x", status=StepStatus.FAILED
    )
    at = datetime(2030, 1, 1, tzinfo=UTC)
    entry = HistoryEntry(at, HistoryKind.STARTED, "started")
    assert engine_replace(entry, detail="x") == replace(entry, detail="x")
    with pytest.raises(TypeError, match="no field"):
        engine_replace(step, nope=1)
