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
from collections.abc import Awaitable, Callable, Sequence
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
        publish: Callable[[Sequence[OutboxMessage]], Awaitable[Sequence[Exception | None]]],
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
        """``publish`` is a broker's ``publish_many``: it sends a chunk of rows and returns,
        per row, None once the broker confirmed it or the error."""
        self.store = store
        self.publish = publish
        self.batch = batch
        self.max_in_flight = max_in_flight
        self.poll_interval = poll_interval
        self.max_backoff = max_backoff
        self.tracing = tracing if tracing is not None else Tracing()
        self.metrics = metrics
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
        """Publish one batch of pending rows, at most ``max_in_flight`` unconfirmed at a time;
        returns how many were confirmed.

        Raises when any publish failed (after marking the confirmed ones), so ``run`` backs off.
        """
        async with self._flushing:
            return await self._flush()

    async def _flush(self) -> int:
        pending = await self.store.pending_outbox(self.batch)
        if not pending:
            return 0
        results: list[Exception | None] = []
        for i in range(0, len(pending), self.max_in_flight):
            results += await self._publish(pending[i : i + self.max_in_flight])
        confirmed: list[UUID] = [
            m.message_id for m, r in zip(pending, results, strict=True) if r is None
        ]
        crash_point("after_confirm_before_mark")
        await self.store.mark_sent(confirmed)
        self.published += len(confirmed)
        errors = [r for r in results if r is not None]
        if errors:
            raise errors[0]
        return len(confirmed)

    async def _publish(self, chunk: Sequence[OutboxMessage]) -> Sequence[Exception | None]:
        spans: list[trace.Span] = []
        if self.tracing.recording:  # each publish span's context goes in a copy of its row
            traced = []
            for m in chunk:
                span, headers = self.tracing.publish(
                    m.exchange, m.routing_key, m.message_id, m.saga_id, m.headers
                )
                spans.append(span)
                traced.append(dataclasses.replace(m, headers=headers))
            chunk = traced
        began = time.perf_counter()
        try:
            results = await self._send(chunk)
        except BaseException as exc:
            for span in spans:
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                span.end()
            raise
        for span, result in zip(spans, results if spans else (), strict=True):
            if result is not None:
                span.record_exception(result)
                span.set_status(Status(StatusCode.ERROR, type(result).__name__))
            span.end()
        if self.metrics is not None:
            self._observe(chunk, results, time.perf_counter() - began)
        return results

    def _observe(
        self, chunk: Sequence[OutboxMessage], results: Sequence[Exception | None], took: float
    ) -> None:
        assert self.metrics is not None
        now = datetime.now(UTC)
        for m, result in zip(chunk, results, strict=True):
            if result is not None:
                continue
            self.metrics.published.inc()
            self.metrics.publish_latency.observe(took)
            if m.created_at.year > 1970:  # the placeholder of rows without a time
                self.metrics.outbox_lag.observe(max((now - m.created_at).total_seconds(), 0.0))

    async def _send(self, chunk: Sequence[OutboxMessage]) -> Sequence[Exception | None]:
        if armed("after_publish_before_confirm"):
            sending = asyncio.ensure_future(self.publish(chunk))
            await asyncio.sleep(0.02)  # the frames are on the wire; the confirms are not in
            crash_point("after_publish_before_confirm")
            return await sending
        return await self.publish(chunk)
