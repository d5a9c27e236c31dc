"""The in-memory harness drives the production orchestrator; these check it end to end."""

import asyncio
import logging
from datetime import timedelta

import pytest
import structlog
from pydantic import BaseModel, Field
from structlog.testing import LogCapture

from saga import HistoryKind, InvalidInputError, RetryPolicy, SagaDefinition, SagaStatus, Step
from saga.orchestrator import runtime
from saga.orchestrator.runtime import Outcome
from saga.testing import FakeClock, Harness, fail, ok, silence

PAY = SagaDefinition(
    "pay",
    1,
    [
        Step("reserve", participant="stock", action="stock.reserve", compensation="stock.release"),
        Step(
            "charge",
            participant="bank",
            action="bank.charge",
            compensation="bank.refund",
            payload=lambda ctx: {
                "hold": ctx.output("reserve")["hold"],
                "amount": ctx.input["amount"],
            },
            timeout=timedelta(seconds=3),
            retry=RetryPolicy(max_attempts=2, initial_backoff=timedelta(seconds=1)),
            compensation_retry=RetryPolicy(max_attempts=2, initial_backoff=timedelta(seconds=1)),
        ),
    ],
)


def harness() -> Harness:
    h = Harness([PAY])
    h.on("stock.reserve", lambda cmd: ok(hold="H1"))
    h.on("stock.release", lambda cmd: ok())
    h.on("bank.charge", lambda cmd: ok(payment="P1"))
    h.on("bank.refund", lambda cmd: ok())
    return h


async def test_outputs_flow_into_later_payloads() -> None:
    h = harness()
    saga = await h.run("pay", {"amount": "12.50"})
    assert saga.status is SagaStatus.COMPLETED
    charge = next(c for c in h.delivered if c.command_type == "bank.charge")
    assert charge.payload == {"hold": "H1", "amount": "12.50"}
    assert saga.context.output("charge") == {"payment": "P1"}


async def test_timeout_retries_then_compensates_both_steps_in_reverse() -> None:
    h = harness()
    h.on("bank.charge", silence)
    start = h.clock.now()
    saga = await h.run("pay", {"amount": "1.00"})
    assert saga.status is SagaStatus.COMPENSATED
    assert h.commands(saga.saga_id) == [
        "stock.reserve",
        "bank.charge",
        "bank.charge",
        "bank.refund",
        "stock.release",
    ]
    assert h.clock.now() - start >= timedelta(seconds=6)  # two 3 s timeouts on the fake clock
    kinds = [e.kind for e in await h.history(saga.saga_id)]
    assert kinds.count(HistoryKind.STEP_TIMED_OUT) == 2


async def test_stuck_compensation_fails_then_operator_retry_compensates() -> None:
    h = harness()
    h.on("bank.charge", lambda cmd: fail("declined"))
    h.on("stock.release", lambda cmd: fail("locked", retryable=True))
    saga = await h.run("pay", {"amount": "1.00"})
    assert saga.status is SagaStatus.FAILED and saga.stuck_step == "reserve"
    h.on("stock.release", lambda cmd: ok())
    result = await h.orchestrator.retry(saga.saga_id, actor="ops", reason="unlocked by hand")
    assert result.outcome is Outcome.APPLIED
    await h.settle()
    final = await h.saga(saga.saga_id)
    assert final.status is SagaStatus.COMPENSATED
    operator = [e for e in await h.history(saga.saga_id) if e.kind is HistoryKind.OPERATOR]
    assert operator[0].actor == "ops" and "unlocked by hand" in operator[0].detail


async def test_start_is_idempotent_by_key() -> None:
    h = harness()
    first = await h.start("pay", {"amount": "1.00"}, key="order-7")
    second = await h.start("pay", {"amount": "999.00"}, key="order-7")
    assert first == second
    await h.settle()
    assert h.commands(first).count("stock.reserve") == 1


async def test_rejected_operator_action_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    h = harness()
    capture = LogCapture()  # a logger of our own: the module's may be cached already
    logger = structlog.wrap_logger(
        structlog.PrintLogger(),
        processors=[capture],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
    )
    monkeypatch.setattr(runtime, "log", logger)
    saga = await h.run("pay", {"amount": "1.00"})
    history = await h.history(saga.saga_id)
    result = await h.orchestrator.abort(saga.saga_id, actor="ops", reason="too late")
    assert result.outcome is Outcome.REJECTED
    assert result.transition is not None and result.transition.refused is not None
    assert "only a RUNNING saga can be aborted" in result.transition.refused
    assert (await h.saga(saga.saga_id)).version == saga.version
    # nothing was written, not even a history entry: trying a button leaves no trace there
    assert await h.history(saga.saga_id) == history
    # ... it is in the log, with who tried what and why it was refused
    [line] = [e for e in capture.entries if e["event"] == "operator_action_refused"]
    assert line["actor"] == "ops" and line["action"] == "OperatorAbort"
    assert line["reason"] == "too late" and line["saga_id"] == str(saga.saga_id)
    assert "only a RUNNING saga can be aborted; this one is COMPLETED" in line["detail"]


async def test_concurrent_events_share_commits() -> None:
    h = harness()
    h.on("stock.reserve", silence)
    ids = await asyncio.gather(*(h.start("pay", {"amount": "1.00"}) for _ in range(50)))
    assert len(set(ids)) == 50
    assert h.orchestrator.batches < 50  # group commit: fewer transactions than events
    await h.deliver()
    h.clock.advance(timedelta(seconds=11))
    assert await h.orchestrator.fire_due_timers() == 50


async def test_missing_participant_is_a_clear_error() -> None:
    h = Harness([PAY])
    with pytest.raises(LookupError, match=r"harness.on\('stock.reserve', ...\)"):
        await h.run("pay", {"amount": "1.00"})


def test_fake_clock_only_moves_forward() -> None:
    clock = FakeClock()
    with pytest.raises(ValueError, match="only moves forward"):
        clock.advance(-1)


async def test_a_caller_that_gives_up_does_not_fail_its_batch_mates() -> None:
    """Cancelling one submitter while its batch commits leaves the others' results intact."""
    h = harness()
    h.on("stock.reserve", silence)
    commit = h.store.commit
    gate = asyncio.Event()

    async def slow_commit(changes):  # type: ignore[no-untyped-def]
        await gate.wait()
        return await commit(changes)

    h.store.commit = slow_commit  # type: ignore[method-assign]
    first = asyncio.create_task(h.start("pay", {"amount": "1.00"}, key="a"))
    second = asyncio.create_task(h.start("pay", {"amount": "1.00"}, key="b"))
    await asyncio.sleep(0.01)
    first.cancel()
    gate.set()
    saga_id = await second
    assert (await h.saga(saga_id)).status is SagaStatus.RUNNING
    assert len(await h.store.pending_outbox(10)) == 2  # both committed, both commands queued


# --- operator actions, replies twice, validated input -----------------------------------------


async def test_operator_retry_finishes_a_saga_stuck_in_its_compensation() -> None:
    h = harness()
    h.on("bank.charge", lambda cmd: fail("declined"))
    h.on("stock.release", lambda cmd: fail("warehouse_offline", retryable=True))
    saga = await h.run("pay", {"amount": 5})
    assert saga.status is SagaStatus.FAILED
    h.on("stock.release", lambda cmd: ok())  # the warehouse is back
    fixed = await h.retry(saga.saga_id, "warehouse back online", actor="ops")
    assert fixed.status is SagaStatus.COMPENSATED
    retried = [e for e in await h.history(saga.saga_id) if e.kind is HistoryKind.OPERATOR]
    assert [(e.actor, e.detail) for e in retried][-1][0] == "ops"


async def test_operator_abort_compensates_a_running_saga() -> None:
    h = harness()
    h.on("bank.charge", silence)
    saga_id = await h.start("pay", {"amount": 5})
    await h.deliver()  # the reserve is answered, the charge is waiting
    assert (await h.saga(saga_id)).status is SagaStatus.RUNNING
    aborted = await h.abort(saga_id, "customer cancelled")
    assert aborted.status is SagaStatus.COMPENSATED
    assert h.commands(saga_id) == [
        "stock.reserve",
        "bank.charge",
        "bank.refund",
        "stock.release",
    ]


async def test_operator_resolve_marks_a_stuck_compensation_done() -> None:
    h = harness()
    h.on("bank.charge", lambda cmd: fail("declined"))
    h.on("stock.release", lambda cmd: fail("gone"))  # final: the saga stops for an operator
    saga = await h.run("pay", {"amount": 5})
    assert saga.status is SagaStatus.FAILED
    resolved = await h.resolve(saga.saga_id, "released by hand")
    assert resolved.status is SagaStatus.COMPENSATED


async def test_replies_delivered_twice_change_nothing_the_second_time() -> None:
    h = harness()
    for command_type in ("stock.reserve", "bank.charge"):
        h.on(command_type, lambda cmd: ok(hold="H1", payment="P1"), twice=True)
    saga = await h.run("pay", {"amount": 5})
    assert saga.status is SagaStatus.COMPLETED
    assert h.commands(saga.saga_id) == ["stock.reserve", "bank.charge"]
    assert [r.outcome for r in h.outcomes] == [
        Outcome.APPLIED,
        Outcome.DUPLICATE,
        Outcome.APPLIED,
        Outcome.DUPLICATE,
    ]


async def test_an_input_that_does_not_fit_the_input_model_is_refused_before_anything() -> None:
    class PayInput(BaseModel):
        amount: int = Field(gt=0)

    checked = SagaDefinition("pay", 2, PAY.steps, input_model=PayInput)
    h = Harness([checked])
    with pytest.raises(InvalidInputError) as refused:
        await h.run("pay", {"amount": -1})
    assert [(e.loc, e.type) for e in refused.value.errors] == [(("amount",), "greater_than")]
    assert h.store._sagas == {}  # nothing stored
    assert await h.store.pending_outbox(10) == []  # nothing to send
    assert h.delivered == []
