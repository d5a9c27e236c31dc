"""The timer loop stops when its task is cancelled, even if an inner call swallowed the
cancellation (Python 3.11's wait_for can), instead of running on and hanging a graceful stop;
and it asks the broker about its queues only once a deadline has passed."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from saga.orchestrator.timers import TimerLoop
from tests.integration.harness import wait_until


class _Orchestrator:
    def __init__(self, due: bool = True):
        self.due = due
        self.asked = 0
        self.fired = 0

    async def timers_due(self) -> bool:
        self.asked += 1
        return self.due

    async def fire_due_timers(self, hold: Any = None) -> int:
        self.fired += 1
        return 0


async def test_a_swallowed_cancellation_still_stops_the_loop() -> None:
    inside = asyncio.Event()
    swallowed = 0

    async def replies_waiting() -> bool:
        nonlocal swallowed
        if swallowed:  # the loop went on after its cancellation: end it, so the test fails
            raise RuntimeError("the timer loop kept running after it was cancelled")
        inside.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:  # what a wait_for racing its inner call can do
            swallowed += 1
        return False

    orchestrator: Any = _Orchestrator()
    timers = TimerLoop(
        orchestrator, lambda: None, replies_waiting, interval=0.001, grace=0, credit_max=1
    )
    task = asyncio.create_task(timers.run())
    await asyncio.wait_for(inside.wait(), 5)
    task.cancel()  # lands in replies_waiting, which swallows it
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    assert swallowed == 1


async def test_no_deadline_passed_no_question_to_the_broker() -> None:
    probes = 0

    async def replies_waiting() -> bool:
        nonlocal probes
        probes += 1
        return False

    orchestrator = _Orchestrator(due=False)
    timers = TimerLoop(
        cast(Any, orchestrator), lambda: None, replies_waiting, interval=0.001, grace=0,
        credit_max=1,
    )  # fmt: skip
    task = asyncio.create_task(timers.run())
    await wait_until(lambda: orchestrator.asked >= 20, "twenty turns of the loop")
    assert (probes, orchestrator.fired) == (0, 0)
    orchestrator.due = True  # a deadline passes: the reply queue is asked, then timers fire
    await wait_until(lambda: orchestrator.fired >= 3, "three firings")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert probes >= 3
