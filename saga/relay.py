"""The outbox relay: publish committed messages with confirms, then mark them sent.

At-least-once by design. A row is deleted only after the broker confirmed it; a crash between
the confirm and the delete re-sends it after restart, and consumers dedupe by message id. The
relay is woken right after each commit (low latency) and also polls slowly (recovery after a
crash or a broker outage). While the broker is down it backs off instead of spinning.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from uuid import UUID

import structlog
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from saga.faults import armed, crash_point
from saga.ports import OutboxMessage, OutboxSource
from saga.telemetry import Metrics, Tracing

__all__ = ["Relay"]

log = structlog.get_logger("saga.relay")


class Relay:
    def __init__(
        self,
        store: OutboxSource,
        publish: Callable[[OutboxMessage], Awaitable[None]],
        *,
        batch: int = 500,
        max_in_flight: int = 256,
        poll_interval: float = 1.0,
        # short: once the broker is back (the connection retries every second), a long sleep
        # here would hold every reply and command back, long enough for their steps to time out
        max_backoff: float = 1.0,
        tracing: Tracing | None = None,
        metrics: Metrics | None = None,
    ):
        self.store = store
        self.publish = publish
        self.batch = batch
        self.poll_interval = poll_interval
        self.max_backoff = max_backoff
        self.tracing = tracing if tracing is not None else Tracing()
        self.metrics = metrics
        self._slots = asyncio.Semaphore(max_in_flight)
        self._wake = asyncio.Event()
        self._flushing = asyncio.Lock()  # one flush at a time, or two would send the same rows
        self._stopping = False
        self.published = 0
        self.failures = 0

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    async def shutdown(self, task: asyncio.Task[None] | None, timeout: float) -> None:  # noqa: ASYNC109
        """Stop ``task`` (this relay's :meth:`run`), then publish what is left once more: a
        graceful stop sends every row it can before the process exits."""
        self.stop()
        if task is not None:
            await asyncio.wait([task], timeout=timeout)
        with contextlib.suppress(Exception):
            await self.flush()

    async def run(self) -> None:
        backoff = 0.0
        while not self._stopping:
            if backoff:
                await asyncio.sleep(backoff)
            self._wake.clear()  # before reading: a commit during the read wakes us again
            try:
                moved = await self.flush()
            except Exception as exc:
                self.failures += 1
                backoff = min(max(backoff * 2, 0.1), self.max_backoff)
                log.warning("relay_backoff", error=repr(exc), retry_in_s=backoff)
                continue
            backoff = 0.0
            if moved:
                continue  # there may be more right away
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_interval)

    async def flush(self) -> int:
        """Publish one batch of pending rows concurrently; returns how many were confirmed.

        Raises when any publish failed (after marking the confirmed ones), so ``run`` backs off.
        """
        async with self._flushing:
            return await self._flush()

    async def _flush(self) -> int:
        pending = await self.store.pending_outbox(self.batch)
        if not pending:
            return 0
        results = await asyncio.gather(*(self._one(m) for m in pending), return_exceptions=True)
        confirmed: list[UUID] = [
            m.message_id for m, r in zip(pending, results, strict=True) if r is None
        ]
        crash_point("after_confirm_before_mark")
        await self.store.mark_sent(confirmed)
        self.published += len(confirmed)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]
        return len(confirmed)

    async def _one(self, message: OutboxMessage) -> None:
        async with self._slots:
            span: trace.Span = trace.INVALID_SPAN
            if self.tracing.recording:  # the publish span's context goes in a copy of the row
                span, headers = self.tracing.publish(
                    message.exchange,
                    message.routing_key,
                    message.message_id,
                    message.saga_id,
                    message.headers,
                )
                message = dataclasses.replace(message, headers=headers)
            began = time.perf_counter()
            try:
                await self._send(message)
            except BaseException as exc:
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                raise
            finally:
                span.end()
            if self.metrics is not None:
                self.metrics.published.inc()
                self.metrics.publish_latency.observe(time.perf_counter() - began)
                if message.created_at.year > 1970:  # the placeholder of rows without a time
                    lag = (datetime.now(UTC) - message.created_at).total_seconds()
                    self.metrics.outbox_lag.observe(max(lag, 0.0))

    async def _send(self, message: OutboxMessage) -> None:
        if armed("after_publish_before_confirm"):
            sending = asyncio.ensure_future(self.publish(message))
            await asyncio.sleep(0.02)  # the frames are on the wire; the confirm is not in
            crash_point("after_publish_before_confirm")
            await sending
            return
        await self.publish(message)
