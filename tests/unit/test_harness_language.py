"""Parallel groups, conditions and the saga deadline through the in-memory runtime: the
orchestrator sends a group's commands together, keeps one timer per saga across several
members in flight, and fires the saga's own deadline."""

from __future__ import annotations

from datetime import timedelta

from saga import Parallel, RetryPolicy, SagaDefinition, Step
from saga.core.state import HistoryKind, SagaStatus, StepStatus
from saga.testing import Harness, fail, ok, silence

ONCE = RetryPolicy(max_attempts=1)


def trip(**kw: object) -> SagaDefinition:
    return SagaDefinition(
        "trip",
        1,
        [
            Step("pay", participant="bank", action="bank.charge", compensation="bank.refund"),
            Parallel(
                Step("flight", participant="air", action="air.book", compensation="air.cancel",
                     timeout=timedelta(seconds=4), retry=ONCE),
                Step("hotel", participant="inn", action="inn.book", compensation="inn.cancel",
                     timeout=timedelta(seconds=6), retry=ONCE),
                Step("car", participant="cars", action="cars.rent", compensation="cars.return",
                     when=lambda ctx: bool(ctx.input.get("car"))),
            ),
            Step("mail", participant="post", action="post.send", compensatable=False),
        ],
        **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def harness(definition: SagaDefinition) -> Harness:
    h = Harness([definition])
    for command_type in ("bank.charge", "bank.refund", "air.cancel", "inn.cancel", "post.send"):
        h.on(command_type, lambda cmd: ok())
    h.on("air.book", lambda cmd: ok(seat="12A"))
    h.on("inn.book", lambda cmd: ok(room=7))
    h.on("cars.rent", lambda cmd: ok())
    h.on("cars.return", lambda cmd: ok())
    return h


async def test_a_group_runs_its_members_and_joins_before_the_next_step() -> None:
    h = harness(trip())
    saga = await h.run("trip", {"car": False})
    assert saga.status is SagaStatus.COMPLETED
    assert h.commands(saga.saga_id) == ["bank.charge", "air.book", "inn.book", "post.send"]
    assert saga.context.output("flight") == {"seat": "12A"}
    assert saga.step("car").status is StepStatus.SKIPPED


async def test_a_failing_member_compensates_its_siblings_then_the_steps_before() -> None:
    h = harness(trip())
    h.on("inn.book", lambda cmd: fail("full"))
    saga = await h.run("trip", {"car": True})
    assert saga.status is SagaStatus.COMPENSATED
    sent = h.commands(saga.saga_id)
    assert sent[:1] == ["bank.charge"] and set(sent[1:4]) == {"air.book", "inn.book", "cars.rent"}
    assert sent[4:] == ["cars.return", "air.cancel", "bank.refund"]


async def test_members_time_out_on_their_own_timers() -> None:
    h = harness(trip())
    h.on("air.book", silence)
    h.on("inn.book", silence)
    start = h.clock.now()
    saga = await h.run("trip", {})
    assert saga.status is SagaStatus.COMPENSATED
    # flight timed out at 4 s and failed the group; hotel was awaited until its own 6 s
    assert h.clock.now() - start >= timedelta(seconds=6)
    assert h.commands(saga.saga_id)[3:] == ["inn.cancel", "air.cancel", "bank.refund"]
    kinds = [e.kind for e in await h.history(saga.saga_id)]
    assert kinds.count(HistoryKind.STEP_TIMED_OUT) == 2


async def test_the_saga_deadline_fires_through_the_timer_loop() -> None:
    h = harness(trip(deadline=timedelta(seconds=2)))
    h.on("air.book", silence)
    h.on("inn.book", silence)
    start = h.clock.now()
    saga = await h.run("trip", {})
    assert saga.status is SagaStatus.COMPENSATED
    assert timedelta(seconds=2) <= h.clock.now() - start < timedelta(seconds=4)
    assert "deadline" in (saga.failure or "")
    assert h.commands(saga.saga_id)[3:] == ["inn.cancel", "air.cancel", "bank.refund"]


async def test_the_saga_deadline_is_not_held_for_a_participant_backlog() -> None:
    """A step's reply timeout waits while its participant's queue is backed up (its silence
    may be ours); the saga's own deadline is a bound on the whole run and fires anyway."""
    h = harness(trip(deadline=timedelta(seconds=2)))
    h.on("air.book", silence)
    h.on("inn.book", silence)
    saga_id = await h.start("trip", {})
    while await h.deliver():
        pass
    h.clock.advance(2)
    backlog = {"air": 0.0, "inn": 0.0}  # both queues just drained: reply timeouts are held
    assert await h.orchestrator.fire_due_timers(hold=backlog) == 1
    saga = await h.saga(saga_id)
    assert saga.status is SagaStatus.COMPENSATING and "deadline" in (saga.failure or "")
