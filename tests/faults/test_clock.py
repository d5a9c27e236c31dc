"""The clock jumps forward and back under a running orchestrator: each timer fires at most once.

Step timeouts and retry backoffs are deadlines in the store, fired by the service's timer loop
against the injected clock, on the real broker and a real SQLite file; the test plays the
participants by hand, so it decides when every reply arrives. The clock jumps an hour forward
(every deadline passes at once), two hours back (nothing may fire, and crossing an old deadline
again must not fire it again), then forward in small steps; each saga must still end COMPLETED
with every timeout and every attempt exactly once in its history and on the wire.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import UUID

import pytest

from saga.core.definition import RetryPolicy
from saga.core.state import HistoryEntry, HistoryKind, SagaStatus
from saga.orchestrator.service import OrchestratorService
from saga.protocol.envelope import CommandEnvelope, ReplyEnvelope
from saga.testing import FakeClock
from tests.faults._db_helpers import CommandTap, open_harness, slow_trip, start_orchestrator
from tests.integration.harness import Harness, describe

pytestmark = pytest.mark.rabbitmq

TIMEOUT = timedelta(seconds=60)
BACKOFF = timedelta(seconds=30)  # doubles per try; no jitter, so every deadline is exact
QUIET = 0.5  # ten passes of the timer loop: long enough for a timer that would fire to fire


async def _reply(harness: Harness, command: CommandEnvelope, reply: ReplyEnvelope) -> None:
    await harness.publish(
        harness.topology.reply_queue,
        reply.model_dump_json().encode(),
        message_id=str(reply.message_id),
    )


async def _ok(harness: Harness, command: CommandEnvelope) -> None:
    await _reply(harness, command, ReplyEnvelope.success(command, {}))


async def _history(service: OrchestratorService, saga_id: UUID) -> list[HistoryEntry]:
    return await service.orchestrator.history(saga_id)


async def _wait_for(
    service: OrchestratorService,
    saga_id: UUID,
    kind: HistoryKind,
    step: str | None = None,
    attempt: int | None = None,
) -> None:
    """Wait until ``saga_id`` has the (kind, step, attempt) entry."""
    for _ in range(200):
        history = await _history(service, saga_id)
        if any((h.kind, h.step, h.attempt) == (kind, step, attempt) for h in history):
            return
        await asyncio.sleep(0.05)
    lines = "\n    ".join(describe(h) for h in await _history(service, saga_id))
    pytest.fail(f"no {kind.value} {step} #{attempt} for {saga_id}:\n    {lines}")


async def _unchanged(service: OrchestratorService, sagas: Sequence[UUID]) -> None:
    """Nothing fires: after a quiet spell, no saga has a new history entry or version."""
    before = {s: await _history(service, s) for s in sagas}
    versions = {s: (await service.orchestrator.get(s)).version for s in sagas}
    await asyncio.sleep(QUIET)
    for saga_id in sagas:
        new = (await _history(service, saga_id))[len(before[saga_id]) :]
        fired = [describe(h) for h in new if h.kind is not HistoryKind.IGNORED]
        assert fired == [], f"{saga_id}: a timer fired: {fired}"
        assert all("not due" in h.detail or "stale timer" in h.detail for h in new), new
        assert (await service.orchestrator.get(saga_id)).version == versions[saga_id]


def _fired(history: Sequence[HistoryEntry]) -> list[tuple[str, str | None, int | None]]:
    """What changed the saga, in order, leaving out the events it ignored."""
    return [(h.kind.value, h.step, h.attempt) for h in history if h.kind is not HistoryKind.IGNORED]


async def test_clock_jumps_fire_each_timer_at_most_once(tmp_path: Path, unique: str) -> None:
    t0 = datetime.now(UTC).replace(microsecond=0)
    clock = FakeClock(t0)
    retry = RetryPolicy(max_attempts=3, initial_backoff=BACKOFF, max_backoff=BACKOFF * 4, jitter=0)
    async with open_harness(tmp_path, unique) as harness:
        service = await start_orchestrator(
            harness, slow_trip(timeout=TIMEOUT, retry=retry), clock=clock
        )
        tap = CommandTap(harness)
        waits = (await service.start_saga("trip", {"script": {}})).saga_id  # reply timeout
        backs = (await service.start_saga("trip", {"script": {}})).saga_id  # backoff
        sagas = [waits, backs]
        for saga_id in sagas:
            await _ok(harness, await tap.expect(saga_id, "alpha"))
        await tap.expect(waits, "beta")
        busy = await tap.expect(backs, "beta")
        await _reply(harness, busy, ReplyEnvelope.failure(busy, "busy", retryable=True))
        await _wait_for(service, backs, HistoryKind.RETRY_SCHEDULED, "beta", 1)
        assert (await service.orchestrator.get(backs)).deadline == t0 + BACKOFF

        # an hour forward: both deadlines pass at once, each timer fires once
        clock.set(t0 + timedelta(hours=1))
        await _wait_for(service, waits, HistoryKind.STEP_TIMED_OUT, "beta", 1)
        await _wait_for(service, backs, HistoryKind.COMMAND_SENT, "beta", 2)
        await _unchanged(service, sagas)
        t1 = clock.now()
        assert (await service.orchestrator.get(waits)).deadline == t1 + BACKOFF
        assert (await service.orchestrator.get(backs)).deadline == t1 + TIMEOUT

        # two hours back, then across the old deadlines again: they are gone, nothing fires
        for at in (t0 - timedelta(hours=1), t0 + BACKOFF, t0 + TIMEOUT, t0 + 2 * TIMEOUT, t1):
            clock.set(at + timedelta(seconds=1))
            await _unchanged(service, sagas)

        # forward past the waiting saga's backoff: its next attempt is sent, once
        clock.set(t1 + BACKOFF + timedelta(seconds=1))
        await _wait_for(service, waits, HistoryKind.COMMAND_SENT, "beta", 2)
        await _unchanged(service, sagas)
        # back before that backoff's deadline: the backoff and the attempt it sent share an id,
        # but the deadline is the attempt's reply timeout now, so nothing fires again
        clock.set(t1 + timedelta(seconds=5))
        await _unchanged(service, sagas)

        # forward past the other saga's attempt 2 timeout only; beta took attempt 2 off its
        # queue (a command still queued holds its step's timeout back, and once taken the step
        # has its whole timeout from then, on the orchestrator's clock: t1 + 5 s)
        await tap.poll()
        await asyncio.sleep(QUIET * 2)  # the timer loop looks at the queues every 0.5 s
        clock.set(t1 + TIMEOUT + timedelta(seconds=1))
        await _unchanged(service, sagas)
        timed_out_at = t1 + timedelta(seconds=5) + TIMEOUT + timedelta(seconds=1)
        clock.set(timed_out_at)
        await _wait_for(service, backs, HistoryKind.STEP_TIMED_OUT, "beta", 2)
        await _unchanged(service, sagas)

        # replies: the waiting saga finishes; the other's late reply to attempt 2 is ignored
        await _ok(harness, await tap.expect(waits, "beta", attempt=2))
        await _ok(harness, await tap.expect(waits, "gamma"))
        late = await tap.expect(backs, "beta", attempt=2)
        await _ok(harness, late)
        await _wait_for(service, waits, HistoryKind.COMPLETED)
        await asyncio.sleep(QUIET)
        t2 = timed_out_at + 2 * BACKOFF + timedelta(seconds=1)  # past the second backoff (60 s)
        clock.set(t2)
        await _ok(harness, await tap.expect(backs, "beta", attempt=3))
        await _ok(harness, await tap.expect(backs, "gamma"))
        await _wait_for(service, backs, HistoryKind.COMPLETED)

        # finished sagas have no timers: back and forth once more, nothing happens
        for at in (t0, t2 + timedelta(hours=2)):
            clock.set(at)
            await _unchanged(service, sagas)

        finals = await service.store.load_many(sagas)
        assert {finals[s].status for s in sagas} == {SagaStatus.COMPLETED}
        assert _fired(await _history(service, waits)) == [
            ("started", None, None),
            ("command_sent", "alpha", 1),
            ("step_succeeded", "alpha", 1),
            ("command_sent", "beta", 1),
            ("step_timed_out", "beta", 1),
            ("retry_scheduled", "beta", 1),
            ("command_sent", "beta", 2),
            ("step_succeeded", "beta", 2),
            ("command_sent", "gamma", 1),
            ("step_succeeded", "gamma", 1),
            ("completed", None, None),
        ]
        history = await _history(service, backs)
        assert _fired(history) == [
            ("started", None, None),
            ("command_sent", "alpha", 1),
            ("step_succeeded", "alpha", 1),
            ("command_sent", "beta", 1),
            ("step_failed", "beta", 1),
            ("retry_scheduled", "beta", 1),
            ("command_sent", "beta", 2),
            ("step_timed_out", "beta", 2),
            ("retry_scheduled", "beta", 2),
            ("command_sent", "beta", 3),
            ("step_succeeded", "beta", 3),
            ("command_sent", "gamma", 1),
            ("step_succeeded", "gamma", 1),
            ("completed", None, None),
        ]
        [ignored] = [h for h in history if h.kind is HistoryKind.IGNORED and h.message_id]
        assert "late reply to beta action attempt 2" in ignored.detail
        # on the wire too: every attempt was sent exactly once
        await tap.poll()
        sent = Counter((c.saga_id, c.step, c.attempt) for c in tap.received)
        assert set(sent.values()) == {1}, sent
        assert sorted((step, n) for s, step, n in sent if s == waits) == [
            ("alpha", 1),
            ("beta", 1),
            ("beta", 2),
            ("gamma", 1),
        ]
        assert sorted((step, n) for s, step, n in sent if s == backs) == [
            ("alpha", 1),
            ("beta", 1),
            ("beta", 2),
            ("beta", 3),
            ("gamma", 1),
        ]
