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
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import structlog
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from saga.faults import armed, crash_point
from saga.ports import OutboxMessage, OutboxSource, SpanSource
from saga.telemetry import Metrics, SpanExport, Tracing

__all__ = ["Relay", "SpanRelay", "span_interval"]

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
            # asyncio.timeout, not wait_for: no task of its own, so a wake-up reaches the
            # publish in one turn of the loop, ahead of the acks and logs of the commit's events
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_interval):
                    await self._wake.wait()

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


def span_interval() -> float:
    """Seconds between two exports of committed spans: ``OTEL_BSP_SCHEDULE_DELAY`` (ms, 5 s
    by default), the delay an operator already set for the batch span processor."""
    try:
        return max(int(os.environ.get("OTEL_BSP_SCHEDULE_DELAY", "5000")), 1) / 1000
    except ValueError:
        return 5.0


class SpanExportError(Exception):
    """An exporter did not take the spans: they stay in the table, tried again later."""


class SpanRelay:
    """Exports the span records committed with the work they report, then deletes them: the
    outbox relay's twin for traces. At-least-once: a crash between the export and the delete
    exports those spans again, with the same ids (a duplicate, which a backend that dedupes by
    span id drops and one that does not shows twice). Runs from start-up, so what a killed
    process committed and never exported leaves with the first round."""

    def __init__(
        self,
        source: SpanSource,
        export: SpanExport,
        *,
        interval: float = 5.0,
        batch: int = 200,
        max_backoff: float = 30.0,
    ):
        self.source = source
        self.export = export
        self.interval = interval
        self.batch = batch
        self.max_backoff = max_backoff
        self._stop = asyncio.Event()
        self._flushing = asyncio.Lock()
        self.exported = 0  # rows of records exported

    async def run(self) -> None:
        backoff = 0.0
        while not self._stop.is_set():
            try:
                moved = await self.flush()
            except Exception as exc:
                backoff = min(max(backoff * 2, self.interval), self.max_backoff)
                log.warning("span_export_backoff", error=repr(exc), retry_in_s=backoff)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), backoff)
                continue
            backoff = 0.0
            if moved >= self.batch:
                continue  # more are waiting
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval)

    async def flush(self) -> int:
        """Export one batch of rows; returns how many."""
        async with self._flushing:
            moved = await self.source.drain_spans(self.batch, self._export)
        self.exported += moved
        return moved

    async def _export(self, records: list[Mapping[str, Any]]) -> None:
        if not await asyncio.to_thread(self.export.export, [dict(r) for r in records]):
            raise SpanExportError(f"an exporter refused {len(records)} spans")

    async def shutdown(self, task: asyncio.Task[None] | None, timeout: float) -> None:  # noqa: ASYNC109
        """Stop ``task`` (this drain's :meth:`run`), then export what is left, within
        ``timeout``: a graceful stop leaves no span behind when the exporter answers."""
        self._stop.set()
        with contextlib.suppress(Exception, TimeoutError):
            async with asyncio.timeout(timeout):
                if task is not None:
                    await asyncio.wait([task])
                while await self.flush() >= self.batch:
                    pass
