"""The timer loop stops when its task is cancelled, even if an inner call swallowed the
cancellation (Python 3.11's wait_for can), instead of running on and hanging a graceful stop."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from saga.orchestrator.timers import TimerLoop


class _Orchestrator:
    async def fire_due_timers(self) -> int:
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
