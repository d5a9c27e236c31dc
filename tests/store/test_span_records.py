"""Spans committed with the transitions they report (``saga_spans``) and the drain that exports
them: written only while spans are exported, exported then deleted, kept when the exporter
refuses."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
import sqlalchemy as sa
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from saga.core.state import SagaStatus
from saga.relay import SpanExportError, SpanRelay
from saga.store.schema import spans
from saga.store.sql import SqlStore
from saga.telemetry import ReservedIds, SpanExport, Tracing, export_durably, span_id_for
from saga.testing import Harness, ok
from tests.store.conftest import sql_store
from tests.support.sagas import registry


@pytest.fixture(params=["sqlite", "postgres"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, unique: str
) -> AsyncIterator[SqlStore]:
    async with sql_store(request.param, tmp_path, unique) as sql:
        yield sql


def on_sql(store: SqlStore, tracing: Tracing) -> Harness:
    h = Harness(registry())
    h.store = store  # type: ignore[assignment]
    h.orchestrator.store = store
    h.orchestrator.tracing = tracing
    for command in ("alpha.do", "beta.do", "gamma.do"):
        h.on(command, lambda c: ok())
    return h


async def rows(store: SqlStore) -> int:
    async with store._read.connect() as conn:
        return int(await conn.scalar(sa.select(sa.func.count()).select_from(spans)) or 0)


def durable(exporter: SpanExporter) -> tuple[Tracing, SpanExport]:
    provider = TracerProvider(id_generator=ReservedIds())
    return Tracing(provider), export_durably(provider, [exporter])


async def test_without_an_exporter_no_span_is_written(store: SqlStore) -> None:
    h = on_sql(store, Tracing(TracerProvider(id_generator=ReservedIds())))
    assert h.orchestrator.tracing.durable is None
    saga = await h.run("trip", {})
    assert saga.status is SagaStatus.COMPLETED
    assert await rows(store) == 0


async def test_committed_spans_are_exported_by_the_drain_then_deleted(store: SqlStore) -> None:
    exporter = InMemorySpanExporter()
    tracing, export = durable(exporter)
    h = on_sql(store, tracing)
    saga = await h.run("trip", {})
    assert saga.status is SagaStatus.COMPLETED
    assert await rows(store) > 0
    assert exporter.get_finished_spans() == (), "nothing leaves before the drain"

    drain = SpanRelay(store, export)
    assert await drain.flush() > 0
    assert await rows(store) == 0
    assert await drain.flush() == 0, "exported rows are gone"

    got = exporter.get_finished_spans()
    assert saga.trace is not None
    _, trace_hex, saga_hex, _ = saga.trace["traceparent"].split("-")
    assert {f"{s.context.trace_id:032x}" for s in got if s.context} == {trace_hex}
    roots = [s for s in got if s.name == "saga trip"]
    assert [r.attributes["saga.status"] for r in roots if r.attributes] == [
        "RUNNING",
        "COMPLETED",
    ], "provisional at the start, final at the end, one id"
    assert {f"{r.context.span_id:016x}" for r in roots if r.context} == {saga_hex}
    commands = [c.message_id for c in h.delivered]
    attempts = {s.context.span_id: s for s in got if s.name.startswith("step ") and s.context}
    assert set(attempts) == {span_id_for(m) for m in commands}
    assert all(s.parent and f"{s.parent.span_id:016x}" == saga_hex for s in attempts.values())


class Refusing(SpanExporter):
    def __init__(self) -> None:
        self.calls = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.calls += 1
        return SpanExportResult.FAILURE

    def shutdown(self) -> None:
        pass


async def test_spans_an_exporter_refused_stay_to_be_exported_later(store: SqlStore) -> None:
    refusing = Refusing()
    tracing, export = durable(refusing)
    h = on_sql(store, tracing)
    await h.run("trip", {})
    waiting = await rows(store)
    assert waiting > 0

    with pytest.raises(SpanExportError):
        await SpanRelay(store, export).flush()
    assert refusing.calls == 1
    assert await rows(store) == waiting, "kept for the next round"
