"""Background upkeep of the store: inbox pruning, the outbox, saga and queue gauges of
/metrics, and the admission slots of sagas that ended elsewhere."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

import structlog

from saga.core.state import SagaStatus
from saga.orchestrator.admission import Admission
from saga.ports import SagaFilter
from saga.store.sql import SqlStore
from saga.telemetry import LIVE_STATUSES, Metrics
from saga.transport.broker import Broker
from saga.transport.link import own_cancellation

__all__ = [
    "adopt_in_flight",
    "outbox_gauges",
    "prune_inbox",
    "queue_gauges",
    "reconcile_admission",
    "saga_gauges",
]

_IN_FLIGHT = frozenset({SagaStatus.RUNNING, SagaStatus.COMPENSATING})

log = structlog.get_logger("saga.orchestrator")


async def prune_inbox(store: SqlStore, retention: timedelta, every: float = 3600.0) -> None:
    """Forget inbox ids older than ``retention``, hourly: their redeliveries are long over."""
    while not own_cancellation():  # see TimerLoop.run: a swallowed cancellation ends it too
        try:
            pruned = await store.prune_inbox(datetime.now(UTC) - retention)
            if pruned:
                log.info("inbox_pruned", rows=pruned)
        except Exception as exc:
            log.warning("housekeeping_failed", error=repr(exc))
        await asyncio.sleep(every)


async def outbox_gauges(store: SqlStore, metrics: Metrics, every: float = 5.0) -> None:
    """Outbox size and the age of its oldest row, for /metrics: a stuck relay shows here."""
    while not own_cancellation():
        try:
            size, age = await store.outbox_stats(datetime.now(UTC))
            metrics.outbox_size.set(size)
            metrics.outbox_age.set(age)
        except Exception as exc:
            log.warning("outbox_stats_failed", error=repr(exc))
        await asyncio.sleep(every)


async def saga_gauges(store: SqlStore, metrics: Metrics, every: float = 5.0) -> None:
    """Sagas by name and status and the age of the oldest, for /metrics: read from the store,
    so every instance sharing a database reports the same numbers (aggregate with max, not
    sum); one indexed query every ``every`` seconds, whatever the scrape rate."""
    while not own_cancellation():
        try:
            metrics.sagas(await store.live_counts(LIVE_STATUSES, datetime.now(UTC)))
        except Exception as exc:
            log.warning("saga_stats_failed", error=repr(exc))
        await asyncio.sleep(every)


async def queue_gauges(
    broker: Callable[[], Broker | None],
    queues: Sequence[str],
    metrics: Metrics,
    every: float = 5.0,
) -> None:
    """Messages ready in each of ``queues`` (a passive declare each), for /metrics; a queue
    that cannot be read now keeps its last value."""
    while not own_cancellation():
        current = broker()
        if current is not None:
            counts = await asyncio.gather(*(current.ready_count(q) for q in queues))
            for queue, count in zip(queues, counts, strict=True):
                if count is not None:
                    metrics.queue_ready.labels(queue).set(count)
        await asyncio.sleep(every)


async def adopt_in_flight(store: SqlStore, admission: Admission, page: int = 1000) -> int:
    """Give the sagas in flight at start-up (recovered after a restart) their slots."""
    position = None
    adopted = 0
    while True:
        found = await store.list_sagas(
            SagaFilter(statuses=_IN_FLIGHT, limit=page, start_after=position)
        )
        admission.adopt(s.saga_id for s in found)
        adopted += len(found)
        if len(found) < page:
            return adopted
        position = (found[-1].created_at, found[-1].saga_id)


async def reconcile_admission(store: SqlStore, admission: Admission, every: float = 5.0) -> None:
    """Free the slots of sagas that ended in another instance (or were deleted)."""
    while not own_cancellation():
        await asyncio.sleep(every)
        try:
            ids = admission.active()
            if ids:
                states = await store.load_many(ids)
                admission.release(i for i in ids if i not in states or states[i].status.is_terminal)
        except Exception as exc:
            log.warning("admission_reconcile_failed", error=repr(exc))
