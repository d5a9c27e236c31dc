"""Step timeouts do not run while the orchestrator's own broker connection is down, while
replies wait undelivered, or while the step's participant has commands it has not taken yet.

A timeout measures the participant's silence; while our connection is down no reply can arrive
and no retry can leave, and while the command waits in its queue the participant has not had it,
so firing timers then would only burn retry budgets. The service runs on a real SQLite file with
the in-memory broker, whose connection the test takes down and back up.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from uuid import UUID

import pytest

from saga.core.state import Direction, HistoryKind, SagaStatus
from saga.orchestrator.service import OrchestratorService
from saga.settings import Settings, load_settings
from saga.transport.broker import IncomingMessage
from saga.transport.memory import MemoryBroker
from tests.support.sagas import registry


class FlakyBroker(MemoryBroker):
    """Its connection can be down; its reply queue can claim a backlog of undelivered replies."""

    def __init__(self) -> None:
        super().__init__()
        self.up = True
        self.backlog = 0

    def is_connected(self) -> bool:
        return self.up

    async def ready_count(self, queue: str) -> int | None:
        return self.backlog if queue.endswith(".replies") else await super().ready_count(queue)


def _settings(tmp_path: Path, **extra: object) -> Settings:
    return load_settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'saga.db'}",
        prefix="pause",
        timer_interval=0.05,
        timer_grace=0.2,
        auto_migrate=True,
        **extra,
    )


async def _timeouts(service: OrchestratorService, saga_id: UUID) -> list[int | None]:
    return [
        e.attempt
        for e in await service.store.history(saga_id)
        if e.kind is HistoryKind.STEP_TIMED_OUT
    ]


async def test_no_timeout_fires_while_the_broker_is_down_and_they_resume_after(
    tmp_path: Path,
) -> None:
    broker = FlakyBroker()
    # nobody takes alpha's commands: they are held back while queued, at most 6 s in a row
    settings = _settings(tmp_path, timer_outage_credit_max=6.0)
    service = OrchestratorService(settings, registry(), broker=broker)
    await service.start()
    try:
        # nobody consumes alpha's commands: its step (1.5 s timeout) can only time out
        broker.up = False
        saga = await service.start_saga("trip", {"n": 1})
        await asyncio.sleep(4.0)  # well past the deadline: nothing may fire while down
        history = await service.store.history(saga.saga_id)
        assert not [e for e in history if e.kind is HistoryKind.STEP_TIMED_OUT]
        assert not [e for e in history if e.kind is HistoryKind.RETRY_SCHEDULED]

        broker.up = True  # 4 s down: timers wait about that long again
        await asyncio.sleep(2.0)
        history = await service.store.history(saga.saga_id)
        assert not [e for e in history if e.kind is HistoryKind.STEP_TIMED_OUT], (
            "fired before the outage credit ran out"
        )
        for _ in range(400):
            state = (await service.store.load_many([saga.saga_id]))[saga.saga_id]
            if state.status.is_terminal:
                break
            await asyncio.sleep(0.1)
        history = await service.store.history(saga.saga_id)
        timed_out = [
            (e.direction, e.attempt) for e in history if e.kind is HistoryKind.STEP_TIMED_OUT
        ]
        # every attempt of the action, then of its compensation, timed out once and only once
        assert timed_out == [(Direction.ACTION, n) for n in (1, 2, 3)] + [
            (Direction.COMPENSATION, n) for n in (1, 2, 3, 4)
        ], history
        # nobody answers the compensation either: an operator must look at alpha
        assert state.status is SagaStatus.FAILED
        assert state.stuck_step == "alpha"
    finally:
        await service.stop()


async def _timed_out(
    service: OrchestratorService, saga_id: UUID, within: float
) -> list[int | None]:
    """The saga's timed-out attempts, once there are any (or after ``within`` seconds)."""
    for _ in range(int(within / 0.05)):
        if found := await _timeouts(service, saga_id):
            return found
        await asyncio.sleep(0.05)
    return await _timeouts(service, saga_id)


async def _silent(message: IncomingMessage) -> None:
    await message.ack()  # a participant that takes its command and never answers


async def test_timeouts_wait_while_replies_queue_up_undelivered(tmp_path: Path) -> None:
    broker = FlakyBroker()
    service = OrchestratorService(_settings(tmp_path), registry(), broker=broker)
    await service.start()
    await broker.consume("pause.cmd.alpha", _silent, prefetch=10)
    try:
        broker.backlog = 40  # replies wait in the queue: they come before any timeout
        saga = await service.start_saga("trip", {"n": 1})
        await asyncio.sleep(3.5)  # the 1.5 s deadline is long past
        assert await _timeouts(service, saga.saga_id) == []
        broker.backlog = 0
        assert await _timed_out(service, saga.saga_id, 5) == [1]
    finally:
        await service.stop()


async def test_a_step_s_timeout_waits_while_its_command_is_still_queued(tmp_path: Path) -> None:
    """Schedule-to-start is not start-to-close: alpha's command waits in alpha's queue (nobody
    takes it) well past the step's 1.5 s; once a consumer takes it, the step's whole timeout
    runs from then (a restarted service drains its queue in turn: the last command it takes
    must not time out the moment the queue is empty), and only then, silent, it times out."""
    broker = FlakyBroker()
    service = OrchestratorService(_settings(tmp_path), registry(), broker=broker)
    await service.start()
    try:
        saga = await service.start_saga("trip", {"n": 1})
        await asyncio.sleep(3.5)
        assert await _timeouts(service, saga.saga_id) == []
        assert await broker.ready_count("pause.cmd.alpha") == 1
        consumer = await broker.consume("pause.cmd.alpha", _silent, prefetch=10)
        taken = asyncio.get_running_loop().time()
        try:
            assert await _timed_out(service, saga.saga_id, 5) == [1]
            waited = asyncio.get_running_loop().time() - taken
            assert waited >= 1.5, f"timed out {waited:.2f}s after the command was taken"
        finally:
            await consumer.cancel()
    finally:
        await service.stop()


@pytest.mark.parametrize("backlog", ["replies queued for us", "commands never taken"])
async def test_a_backlog_that_never_drains_holds_timeouts_back_only_so_long(
    tmp_path: Path, backlog: str
) -> None:
    broker = FlakyBroker()
    settings = _settings(tmp_path, timer_outage_credit_max=1.0)
    service = OrchestratorService(settings, registry(), broker=broker)
    await service.start()
    try:
        if backlog == "replies queued for us":
            broker.backlog = 40
            await broker.consume("pause.cmd.alpha", _silent, prefetch=10)
        saga = await service.start_saga("trip", {"n": 1})
        # deadline 1.5 s, held back at most 1 s more
        assert await _timed_out(service, saga.saga_id, 10) == [1]
    finally:
        await service.stop()
