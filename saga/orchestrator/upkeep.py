"""Background upkeep of the store: inbox pruning, and the outbox gauges of /metrics."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import structlog

from saga.store.sql import SqlStore
from saga.telemetry import Metrics
from saga.transport.link import own_cancellation

__all__ = ["outbox_gauges", "prune_inbox"]

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
