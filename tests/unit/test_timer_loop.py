"""The timer loop stops when its task is cancelled, even if an inner call swallowed the
cancellation (Python 3.11's wait_for can), instead of running on and hanging a graceful stop;
and it asks the broker about its reply queue at every turn only once a deadline has passed."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
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


async def test_no_deadline_passed_the_reply_queue_is_asked_only_every_backlog_every() -> None:
    probes = 0

    async def replies_waiting() -> bool:
        nonlocal probes
        probes += 1
        return False

    orchestrator = _Orchestrator(due=False)
    task = _running(orchestrator, replies_waiting, credit_max=1, backlog_every=60)
    await wait_until(lambda: orchestrator.asked >= 20, "twenty turns of the loop")
    assert (probes, orchestrator.fired) == (1, 0)  # once at the start, not every 1 ms turn
    orchestrator.due = True  # a deadline passes: the reply queue is asked, then timers fire
    await wait_until(lambda: orchestrator.fired >= 3, "three firings")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert probes >= 4  # and at every turn once deadlines pass


async def test_a_steady_reply_backlog_holds_deadlines_once_not_at_every_deadline() -> None:
    """The reply queue's credit counts from when its backlog began: once it is used up,
    deadlines fire as they pass, even though the queue is never empty and none was due in
    between (a loop that forgot the backlog whenever nothing was due held every deadline
    for the whole credit again)."""
    events: list[str] = []

    class Alternating(_Orchestrator):
        async def timers_due(self) -> bool:  # a deadline passes every other turn
            self.asked += 1
            due = self.asked % 2 == 1
            if due:
                events.append("due")
            return due

        async def fire_due_timers(self, hold: Any = None) -> int:
            events.append("fire")
            self.fired += 1
            return 0

    async def replies_waiting() -> bool:
        return True  # a backlog that never ends

    orchestrator = Alternating()
    task = _running(orchestrator, replies_waiting, credit_max=0.2, backlog_every=0.001)
    await wait_until(lambda: orchestrator.fired >= 6, "six firings")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    after = events[events.index("fire") :]
    dues = [i for i, e in enumerate(after) if e == "due"]
    held = [i for i in dues if i + 1 >= len(after) or after[i + 1] != "fire"]
    assert held == [] or held == [dues[-1]], after  # every deadline after the first fired


def _running(
    orchestrator: _Orchestrator,
    replies_waiting: Callable[[], Awaitable[bool]],
    *,
    credit_max: float,
    backlog_every: float,
) -> asyncio.Task[None]:
    """A timer loop turning every millisecond, with no broker and no start-up grace."""
    timers = TimerLoop(
        cast(Any, orchestrator), lambda: None, replies_waiting, interval=0.001, grace=0,
        credit_max=credit_max, backlog_every=backlog_every,
    )  # fmt: skip
    return asyncio.create_task(timers.run())
