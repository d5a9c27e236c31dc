"""Messaging spans follow OpenTelemetry's messaging conventions (RabbitMQ flavour), checked on
the real broker with the SDK's in-memory exporter: the peer on every publish and process span,
the delivery tag on consumer spans, the default exchange named "", the saga on the span of a
start, error status on dead-lettered messages and on a saga that ends FAILED."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from yarl import URL

from saga.client import SagaClient
from saga.core.ids import saga_id_for_key
from saga.core.state import SagaStatus
from saga.telemetry import ReservedIds, Tracing
from tests.integration.harness import Harness, wait_terminal, wait_until

pytestmark = pytest.mark.rabbitmq


def _tracer() -> tuple[Tracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(id_generator=ReservedIds())
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Tracing(provider), exporter


def _named(spans: Sequence[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


async def test_messaging_spans_name_the_peer_the_delivery_and_the_saga(harness: Harness) -> None:
    tracing, exporter = _tracer()
    service = await harness.start_service(tracing=tracing)
    await harness.start_responder()
    url = URL(harness.rabbitmq_url)
    peer = {"server.address": url.host, "server.port": url.port or 5672}
    key = f"order-{uuid.uuid4().hex[:8]}"
    async with await SagaClient.connect(
        harness.rabbitmq_url, prefix=harness.prefix, tracing=tracing
    ) as client:
        saga_id = await client.start("trip", {"script": {}}, key=key)
    [final] = await wait_terminal(service, [saga_id])
    assert final.status is SagaStatus.COMPLETED
    topology = harness.topology
    spans = exporter.get_finished_spans()

    [start_publish] = _named(spans, "publish")  # the client's, on the default exchange
    assert start_publish.kind is SpanKind.PRODUCER
    assert start_publish.attributes is not None
    assert start_publish.attributes["messaging.destination.name"] == ""
    assert start_publish.attributes["messaging.rabbitmq.destination.routing_key"] == (
        topology.start_queue
    )
    assert {k: start_publish.attributes.get(k) for k in peer} == peer

    [start] = _named(spans, f"process {topology.start_queue}")
    assert start.attributes is not None
    assert start.attributes["saga.id"] == str(saga_id_for_key("trip", key))
    assert start.attributes["messaging.message.conversation_id"] == str(saga_id)
    assert start.attributes["saga.outcome"] == "applied"
    assert {k: start.attributes.get(k) for k in peer} == peer
    assert isinstance(start.attributes["messaging.rabbitmq.message.delivery_tag"], int)

    commands = _named(spans, f"publish {topology.commands_exchange}")
    assert len(commands) == 3
    for span in commands:
        assert span.attributes is not None
        assert {k: span.attributes.get(k) for k in peer} == peer
    replies = _named(spans, f"process {topology.reply_queue}")
    assert len(replies) == 3
    for span in replies:
        assert span.attributes is not None
        assert {k: span.attributes.get(k) for k in peer} == peer
        assert span.attributes["messaging.rabbitmq.message.delivery_tag"] >= 1  # type: ignore[operator]


async def test_dead_lettered_messages_and_failed_sagas_have_error_spans(harness: Harness) -> None:
    tracing, exporter = _tracer()
    service = await harness.start_service(tracing=tracing)
    await harness.start_responder()
    start_queue = harness.topology.start_queue
    bad = await harness.publish(start_queue, b"not json at all")
    stuck = await service.start_saga(
        "trip", {"script": {"beta": ["fail"], "alpha~undo": ["retry"] * 4}}
    )
    [final] = await wait_terminal(service, [stuck.saga_id], timeout=20)
    assert final.status is SagaStatus.FAILED
    await wait_until(lambda: service.dead_lettered == 1, "the bad start to be dead-lettered")
    spans = exporter.get_finished_spans()

    [dead] = [
        s
        for s in _named(spans, f"process {start_queue}")
        if s.attributes is not None and s.attributes.get("messaging.message.id") == bad
    ]
    assert dead.status.status_code is StatusCode.ERROR
    assert dead.attributes is not None and dead.attributes["error.type"] == "invalid_json"

    [saga] = _named(spans, "saga trip")
    assert saga.status.status_code is StatusCode.ERROR
    assert saga.attributes is not None
    assert saga.attributes["saga.status"] == "FAILED"
    assert saga.attributes["saga.failure"] == final.failure
    assert saga.attributes["error.type"] == "saga_failed"
