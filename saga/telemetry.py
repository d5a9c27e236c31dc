"""Tracing and metrics: one trace per saga across every service and restart, and Prometheus
metrics counted from committed transitions.

A saga outlives any one process, so its spans cannot be held open in memory. Instead:

* the saga's span ids are chosen when it starts and stored with it (``SagaState.trace``); the
  ``saga <name>`` span itself is exported when the saga ends, with its real start time, by
  whichever process commits the end (and, while spans are exported, a provisional one when it
  starts, with the same ids). A restart in between changes nothing;
* every command attempt has a span (``step <step>`` / ``compensate <step>``) whose id is derived
  from the command's message id, so the ``traceparent`` written into the command's outbox row
  names it before it exists; it is exported when the attempt ends (reply applied, timed out,
  aborted), again by whichever process sees that;
* publish, process and database spans are ordinary spans, children of what they serve, and
  participants continue the trace from the ``traceparent`` AMQP header;
* while spans are exported, the saga, attempt and process spans of committed work are not sent
  from memory but written as records in the same transaction as the work, and exported from
  there (:class:`SpanExport`, ``saga.relay.SpanRelay``): a kill -9 loses none of them.

Exporting a span after the fact with an id fixed in advance needs the SDK's id generator to
hand out that id: :class:`ReservedIds`, installed by :func:`configure_tracing`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import random
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from datetime import datetime
from typing import Any
from uuid import UUID

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace import Span as SdkSpan
from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from saga import __version__
from saga.core.errors import ConfigError
from saga.core.state import Direction, HistoryKind, Phase, SagaState, SagaStatus, Transition
from saga.ports import BrokerStats
from saga.work import WorkCollector, WorkCounts

__all__ = [
    "LIVE_STATUSES",
    "Attempt",
    "Metrics",
    "MetricsServer",
    "ReservedIds",
    "SpanExport",
    "SpanRecord",
    "Tracing",
    "attempts_ended",
    "configure_tracing",
    "export_durably",
    "in_flight",
    "span_id_for",
    "trace_ids",
]

_PROPAGATOR = TraceContextTextMapPropagator()
_RESERVED: ContextVar[tuple[int, int] | None] = ContextVar("saga_reserved_ids", default=None)
_ENDING = {
    HistoryKind.STEP_SUCCEEDED: "succeeded",
    HistoryKind.STEP_COMPENSATED: "succeeded",
    HistoryKind.STEP_FAILED: "failed",
    HistoryKind.COMPENSATION_FAILED: "failed",
    HistoryKind.STEP_TIMED_OUT: "timed_out",
    HistoryKind.OPERATOR: "operator",
    HistoryKind.DEADLINE_PASSED: "deadline",
}
#: entries about the whole saga that end every attempt in flight without naming each one
_SAGA_WIDE = (HistoryKind.OPERATOR, HistoryKind.DEADLINE_PASSED)
_MESSAGING = {"messaging.system": "rabbitmq"}


class ReservedIds(IdGenerator):
    """Random ids, except for a span started inside :func:`_reserved`: it gets the ids that
    were handed out for it earlier (its children name it already)."""

    def __init__(self) -> None:
        self._random = RandomIdGenerator()

    def generate_span_id(self) -> int:
        reserved = _RESERVED.get()
        return reserved[1] if reserved is not None else self._random.generate_span_id()

    def generate_trace_id(self) -> int:
        reserved = _RESERVED.get()
        return reserved[0] if reserved is not None else self._random.generate_trace_id()


@contextlib.contextmanager
def _reserved(trace_id: int, span_id: int) -> Iterator[None]:
    token = _RESERVED.set((trace_id, span_id))
    try:
        yield
    finally:
        _RESERVED.reset(token)


def span_id_for(message_id: UUID) -> int:
    """The span id of a command attempt: a function of its message id, so any process can
    name it (in the command's headers) or export it (when the attempt ends)."""
    value = int.from_bytes(hashlib.blake2b(message_id.bytes, digest_size=8).digest(), "big")
    return value or 1


def _traceparent(trace_id: int, span_id: int, flags: int) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-{flags:02x}"


@functools.lru_cache(maxsize=4096)
def _parse(traceparent: str | None, tracestate: str | None = None) -> SpanContext | None:
    """The span context a ``traceparent`` (and ``tracestate``) names, or None when invalid.

    Cached: a saga's stored context is parsed again for every command and attempt span, and
    the same few thousand sagas are in flight at a time."""
    if not traceparent:
        return None
    fast = _fast_span_context(traceparent, tracestate)
    if fast is not None:
        return fast
    ctx = _PROPAGATOR.extract(
        {"traceparent": traceparent, **({"tracestate": tracestate} if tracestate else {})}
    )
    span_context = trace.get_current_span(ctx).get_span_context()
    return span_context if span_context.is_valid else None


def trace_ids() -> dict[str, str]:
    """``trace_id`` and ``span_id`` of the current span, for log lines; empty outside one."""
    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return {}
    return {"trace_id": f"{span_context.trace_id:032x}", "span_id": f"{span_context.span_id:016x}"}


def configure_tracing(service_name: str, *, exporter: SpanExporter | None = None) -> TracerProvider:
    """Install this process's tracer provider, chosen by the standard ``OTEL_*`` variables.

    ``OTEL_TRACES_EXPORTER``: ``otlp`` (OTLP over HTTP/protobuf to ``OTEL_EXPORTER_OTLP_ENDPOINT``,
    e.g. Jaeger's port 4318), ``console``, or ``none`` (the default). With no exporter nothing is
    recorded, but ids are still made and propagated, so logs carry trace ids. The sampler
    (``OTEL_TRACES_SAMPLER``), batch settings (``OTEL_BSP_*``) and resource
    (``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``) are read by the SDK itself.
    """
    exporters = [exporter] if exporter is not None else _exporters_from_env()
    resource = Resource.create(
        {"service.name": os.environ.get("OTEL_SERVICE_NAME") or service_name}
    )
    sampler = None if exporters or os.environ.get("OTEL_TRACES_SAMPLER") else ALWAYS_OFF
    provider = TracerProvider(resource=resource, id_generator=ReservedIds(), sampler=sampler)
    if exporters:
        # the drain exports from a thread of its own: exporters of its own (an OTLP exporter's
        # HTTP session is not shared between threads)
        drain = [exporter] if exporter is not None else _exporters_from_env()
        export_durably(provider, exporters, drain)
    trace.set_tracer_provider(provider)
    return provider


#: SpanRecord: one span as committed with the work it reports (JSON), exported by a drain
SpanRecord = dict[str, Any]
_DURABLE: weakref.WeakKeyDictionary[trace.TracerProvider, SpanExport] = weakref.WeakKeyDictionary()


def export_durably(
    provider: TracerProvider,
    exporters: Sequence[SpanExporter],
    drain: Sequence[SpanExporter] | None = None,
) -> SpanExport:
    """Send ``provider``'s live spans to ``exporters`` through a batch processor, and let the
    orchestrator and participants commit the spans of their work as records, exported by a
    drain straight to ``drain`` (by default the same exporters; :class:`SpanExport`)."""
    export = SpanExport(exporters if drain is None else drain, provider.resource)
    own = [] if drain is None else [e for e in drain if e not in exporters]
    provider.add_span_processor(
        _UnlessCommitted([BatchSpanProcessor(each) for each in exporters], export, own)
    )
    _DURABLE[provider] = export
    return export


class SpanExport:
    """Exports committed span records synchronously to the process's exporters.

    The batch processor holds spans in memory for seconds: a kill -9 loses them. Spans of
    committed work are instead written as records in the transaction that commits the work,
    and a drain (``saga.relay.SpanRelay``) hands them to :meth:`export`, deleting them only
    once every exporter took them. A live span (a message's ``process`` span) whose record
    was committed is then left out of the batch (:meth:`committed`), so it is sent once."""

    def __init__(self, exporters: Sequence[SpanExporter], resource: Resource):
        self.exporters = list(exporters)
        self.resource = resource
        self._scope = InstrumentationScope("saga", __version__)
        self._committed: dict[int, None] = {}  # live spans not to export (insertion-ordered)

    def committed(self, span_id: int) -> None:
        """The record of the live span ``span_id`` was committed: do not export it again."""
        self._committed[span_id] = None
        while len(self._committed) > 100_000:  # a span that never ended; bounded anyway
            del self._committed[next(iter(self._committed))]

    def taken(self, span_id: int) -> bool:
        return self._committed.pop(span_id, 0) is None

    def export(self, records: Sequence[SpanRecord]) -> bool:
        """Send ``records`` to every exporter (blocking: run it in a thread); whether all
        took them."""
        spans = [self._readable(r) for r in records]
        ok = True
        for exporter in self.exporters:
            ok = exporter.export(spans) is SpanExportResult.SUCCESS and ok
        return ok

    def _readable(self, r: SpanRecord) -> ReadableSpan:
        trace_id = int(r["trace"], 16)
        flags = TraceFlags(r["flags"])
        parent = None
        if r.get("parent"):
            parent = SpanContext(trace_id, int(r["parent"], 16), is_remote=True, trace_flags=flags)
        error = r.get("error")
        return ReadableSpan(
            name=r["name"],
            context=SpanContext(trace_id, int(r["span"], 16), is_remote=False, trace_flags=flags),
            parent=parent,
            resource=self.resource,
            attributes=r.get("attrs") or {},
            kind=SpanKind(r.get("kind", 0)),
            status=Status(StatusCode.ERROR, error) if error is not None else Status(),
            start_time=r["start"],
            end_time=r["end"],
            instrumentation_scope=self._scope,
        )


class _UnlessCommitted(SpanProcessor):
    """The batch processors, minus the live spans whose record was committed."""

    def __init__(
        self,
        processors: Sequence[SpanProcessor],
        export: SpanExport,
        drain: Sequence[SpanExporter] = (),
    ):
        self._processors = list(processors)
        self._export = export
        self._drain = list(drain)  # the drain's own exporters, shut down with the processors

    def on_start(self, span: SdkSpan, parent_context: otel_context.Context | None = None) -> None:
        for each in self._processors:
            each.on_start(span, parent_context=parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        context = span.context
        if context is not None and self._export.taken(context.span_id):
            return
        for each in self._processors:
            each.on_end(span)

    def shutdown(self) -> None:
        for each in self._processors:
            each.shutdown()
        for exporter in self._drain:
            exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return all(each.force_flush(timeout_millis) for each in self._processors)


def _record(
    name: str,
    trace_id: int,
    span_id: int,
    parent_id: int | None,
    flags: int,
    start: int,
    end: int,
    attributes: Mapping[str, Any],
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    error: str | None = None,
) -> SpanRecord:
    return {
        "name": name,
        "trace": f"{trace_id:032x}",
        "span": f"{span_id:016x}",
        "parent": None if not parent_id else f"{parent_id:016x}",
        "flags": flags,
        "kind": kind.value,
        "start": start,
        "end": end,
        "attrs": dict(attributes),
        "error": error,
    }


def _exporters_from_env() -> list[SpanExporter]:
    names = [
        n.strip().lower()
        for n in os.environ.get("OTEL_TRACES_EXPORTER", "none").split(",")
        if n.strip()
    ]
    exporters: list[SpanExporter] = []
    for name in names:
        if name == "none":
            continue
        if name == "otlp":
            protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get(
                "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
            )
            if protocol != "http/protobuf":
                raise ConfigError(
                    f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: saga ships the OTLP exporter "
                    "over HTTP; use http/protobuf (Jaeger and the Collector listen on 4318)"
                )
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
                OTLPSpanExporter,
            )

            exporters.append(OTLPSpanExporter())
        elif name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter  # noqa: PLC0415

            exporters.append(ConsoleSpanExporter())
        else:
            raise ConfigError(
                f"OTEL_TRACES_EXPORTER={name!r} is not supported; use otlp, console or none"
            )
    return exporters


def _global_provider() -> trace.TracerProvider | None:
    """The provider set with ``trace.set_tracer_provider``, or None while there is none.

    ``trace.get_tracer_provider()`` looks ``OTEL_PYTHON_TRACER_PROVIDER`` up in the environment
    on every call until a provider is set, a KeyError raised and caught each time: with tracing
    off, a few times per event, ~3 % of the orchestrator's CPU. The global it sets is read
    directly; the getter stays the way when that variable names a provider to load, or when
    the API no longer has that global."""
    if _PROVIDER_FROM_ENVIRONMENT or not hasattr(trace, "_TRACER_PROVIDER"):
        return trace.get_tracer_provider()
    provider: trace.TracerProvider | None = trace._TRACER_PROVIDER
    return provider


_PROVIDER_FROM_ENVIRONMENT = "OTEL_PYTHON_TRACER_PROVIDER" in os.environ


class Tracing:
    """The spans saga makes. ``provider`` defaults to the global one (:func:`configure_tracing`);
    tests pass their own."""

    def __init__(self, provider: trace.TracerProvider | None = None):
        self._provider = provider
        provider = provider if provider is not None else trace.get_tracer_provider()
        self.tracer = provider.get_tracer("saga", __version__)
        #: the broker node's (host, port), for ``server.address``/``server.port`` on messaging
        #: spans; set by whoever connects (read per span, so a fail-over shows)
        self.server: Callable[[], tuple[str, int] | None] | None = None

    def _server_attributes(self) -> dict[str, Any]:
        address = self.server() if self.server is not None else None
        if address is None:
            return {}
        return {"server.address": address[0], "server.port": address[1]}

    @property
    def recording(self) -> bool:
        """Whether spans made now could be exported at all. With no exporter (the default)
        nothing is: then no span is built per message, publish or commit, while ids are still
        made and propagated for the logs. Read at each use, as the global provider may be
        installed after this object was made; once it is an SDK provider it is kept, since the
        API sets its global once (asking the API each time reads the environment each time)."""
        provider = self._provider if self._provider is not None else _global_provider()
        if not isinstance(provider, SdkTracerProvider):
            return False
        self._provider = provider
        if provider.sampler is ALWAYS_OFF:
            return False
        return bool(getattr(provider._active_span_processor, "_span_processors", True))

    # --- the saga's own context ------------------------------------------------------------

    def saga_trace(self, name: str, parent: Mapping[str, Any] | None = None) -> dict[str, str]:
        """Ids for a new saga's span: a child of ``parent`` (a carrier such as a message's
        headers) or of the current span, else the root of a new trace."""
        ctx = _PROPAGATOR.extract(_text(parent)) if parent else otel_context.get_current()
        up = trace.get_current_span(ctx).get_span_context()
        if self.recording:
            # A span only to obtain ids and the sampling decision; never ended, so never
            # exported. The real one is made when the saga ends (see end_saga).
            span_context = self.tracer.start_span(f"saga {name}", context=ctx).get_span_context()
        elif up.is_valid:  # not recording here: stay in the caller's trace, as sampled as it
            span_context = SpanContext(
                up.trace_id,
                random.getrandbits(64) or 1,
                is_remote=False,
                trace_flags=up.trace_flags,
                trace_state=up.trace_state,
            )
        else:
            span_context = trace.INVALID_SPAN_CONTEXT
        if span_context.is_valid:
            trace_id, span_id = span_context.trace_id, span_context.span_id
            flags, state = int(span_context.trace_flags), span_context.trace_state
        else:  # tracing off altogether: ids anyway, for log correlation
            trace_id, span_id = random.getrandbits(128) or 1, random.getrandbits(64) or 1
            flags, state = 0, TraceState()
        carrier = {"traceparent": _traceparent(trace_id, span_id, flags)}
        if state:
            carrier["tracestate"] = state.to_header()
        if up.is_valid:
            carrier["parent"] = _traceparent(up.trace_id, up.span_id, int(up.trace_flags))
        return carrier

    @staticmethod
    def command_headers(state: SagaState, message_id: UUID) -> dict[str, str]:
        """``traceparent``/``tracestate`` naming the span of the attempt that sends
        ``message_id``; pure, so it is written into the outbox row with the command."""
        saga = _parse(*_saga_ids(state))
        if saga is None:
            return {}
        headers = {
            "traceparent": _traceparent(
                saga.trace_id, span_id_for(message_id), int(saga.trace_flags)
            )
        }
        if saga.trace_state:
            headers["tracestate"] = saga.trace_state.to_header()
        return headers

    # --- spans exported after the fact ---------------------------------------------------

    @property
    def durable(self) -> SpanExport | None:
        """The export of committed span records, when spans are recorded and exported by
        :func:`configure_tracing` (:func:`export_durably`); None otherwise: then nothing extra
        is written, and spans go through the batch processor as before."""
        provider = self._provider if self._provider is not None else _global_provider()
        if provider is None:
            return None
        export = _DURABLE.get(provider)
        return export if export is not None and self.recording else None

    def attempt_record(
        self,
        before: SagaState,
        attempt: Attempt,
        end: datetime,
        business: Mapping[str, Any] | None = None,
    ) -> SpanRecord | None:
        """The span of ``attempt`` of ``before``, which ended at ``end``, as a record to
        commit."""
        saga = _parse(*_saga_ids(before))
        if saga is None or not saga.trace_flags.sampled:
            return None
        name, span_id, start, attributes = _attempt(before, attempt, business)
        return _record(
            name, saga.trace_id, span_id, saga.span_id, int(saga.trace_flags), start, _ns(end),
            attributes, error=None if attempt.succeeded else attempt.detail or attempt.outcome,
        )  # fmt: skip

    def saga_record(
        self, state: SagaState, end: datetime, business: Mapping[str, Any] | None = None
    ) -> SpanRecord | None:
        """The saga's span as a record to commit: the final one once it ended, else the
        provisional one written when it starts (same ids, ending at its start, with
        ``saga.status=RUNNING``), so its children never miss their parent while it runs."""
        saga = _parse(*_saga_ids(state))
        if saga is None or not saga.trace_flags.sampled:
            return None
        assert state.trace is not None
        up = _parse(state.trace.get("parent"))
        attributes, error = _saga_span(state, business)
        return _record(
            f"saga {state.name}", saga.trace_id, saga.span_id,
            None if up is None else up.span_id, int(saga.trace_flags), _ns(state.created_at),
            _ns(end if state.status.is_terminal else state.created_at), attributes, error=error,
        )  # fmt: skip

    @staticmethod
    def process_record(
        context: otel_context.Context, end: int, attributes: Mapping[str, Any]
    ) -> tuple[SpanRecord, int] | None:
        """The ``process`` span current in ``context`` (a message being consumed), ended now
        with ``attributes`` added, as a record to commit with what the message did; and its
        span id, for :meth:`SpanExport.committed` once the commit went through."""
        span = trace.get_current_span(context)
        if (
            not isinstance(span, SdkSpan)
            or not span.is_recording()
            or span.kind is not SpanKind.CONSUMER
            or span.instrumentation_scope is None
            or span.instrumentation_scope.name != "saga"
        ):
            return None
        own = span.get_span_context()
        if not own.trace_flags.sampled or span.start_time is None:
            return None
        parent = span.parent
        status = span.status
        error = status.description or "error" if status.status_code is StatusCode.ERROR else None
        record = _record(
            span.name, own.trace_id, own.span_id, None if parent is None else parent.span_id,
            int(own.trace_flags), span.start_time, end,
            {**(span.attributes or {}), **attributes}, kind=SpanKind.CONSUMER, error=error,
        )  # fmt: skip
        return record, own.span_id

    def end_attempt(
        self,
        before: SagaState,
        attempt: Attempt,
        end: datetime,
        business: Mapping[str, Any] | None = None,
    ) -> None:
        """Export the span of ``attempt`` of ``before``, which ended at ``end`` (no durable
        export)."""
        if not self.recording:
            return
        saga = _parse(*_saga_ids(before))
        if saga is None:
            return
        name, span_id, start, attributes = _attempt(before, attempt, business)
        parent = trace.set_span_in_context(NonRecordingSpan(saga))
        with _reserved(saga.trace_id, span_id):
            span = self.tracer.start_span(
                name, context=parent, start_time=start, attributes=attributes
            )
        if not attempt.succeeded:
            span.set_status(Status(StatusCode.ERROR, attempt.detail or attempt.outcome))
        span.end(end_time=_ns(end))

    def end_saga(
        self, state: SagaState, end: datetime, business: Mapping[str, Any] | None = None
    ) -> None:
        """Export the saga's span, with the ids it was given when it started (no durable
        export)."""
        if not self.recording:
            return
        saga = _parse(*_saga_ids(state))
        if saga is None:
            return
        assert state.trace is not None
        up = _parse(state.trace.get("parent"))
        parent = (
            trace.set_span_in_context(NonRecordingSpan(up))
            if up is not None
            else otel_context.Context()  # a root: the trace id comes from the reservation
        )
        attributes, error = _saga_span(state, business)
        with _reserved(saga.trace_id, saga.span_id):
            span = self.tracer.start_span(
                f"saga {state.name}",
                context=parent,
                start_time=_ns(state.created_at),
                attributes=attributes,
            )
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, error))
        span.end(end_time=_ns(end))

    # --- messaging and database spans ----------------------------------------------------

    @contextlib.contextmanager
    def process(
        self,
        queue: str,
        headers: Mapping[str, Any] | None,
        message_id: str | None,
        body_size: int,
        delivery_tag: int | None = None,
        **attributes: Any,
    ) -> Iterator[trace.Span]:
        """The span of consuming a message from ``queue``: current while it is handled, a
        child of the span that published it (its ``traceparent`` header)."""
        if not self.recording:
            ctx = _remote_context(headers)
            # no span to build: the publisher's context is current, for the logs' ids; a
            # message without one gets ids of its own
            if not trace.get_current_span(ctx).get_span_context().is_valid:
                own = SpanContext(
                    random.getrandbits(128) or 1, random.getrandbits(64) or 1, is_remote=False
                )
                ctx = trace.set_span_in_context(NonRecordingSpan(own), ctx)
            token = otel_context.attach(ctx)
            try:
                yield trace.get_current_span(ctx)
            finally:
                otel_context.detach(token)
            return
        ctx = _PROPAGATOR.extract(_text(headers))
        attrs = {
            **_MESSAGING,
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": queue,
            "messaging.consumer.group.name": queue,
            "messaging.message.id": message_id or "",
            "messaging.message.body.size": body_size,
            **self._server_attributes(),
            **{k: v for k, v in attributes.items() if v is not None},
        }
        if delivery_tag is not None:
            attrs["messaging.rabbitmq.message.delivery_tag"] = delivery_tag
        with self.tracer.start_as_current_span(
            f"process {queue}", context=ctx, kind=SpanKind.CONSUMER, attributes=attrs
        ) as span:
            yield span

    def publish(
        self,
        exchange: str,
        routing_key: str,
        message_id: UUID,
        conversation_id: UUID,
        headers: Mapping[str, Any],
    ) -> tuple[trace.Span, dict[str, Any]]:
        """Start the span of publishing a message; returns it (end it once confirmed) and the
        headers to send.

        A message that carries a ``traceparent`` keeps it: that is its creation context (a
        command's attempt span, a reply's process span), which is committed with the work
        that made the message, so the consumer's span hangs under a span that is never lost;
        this publish span is its sibling under the same parent. A message without one (a
        start request published by a client) gets this span's context."""
        if not self.recording:
            return trace.INVALID_SPAN, dict(headers)
        # RabbitMQ's convention: the default exchange is named "" (and left out of the name)
        span = self.tracer.start_span(
            f"publish {exchange}" if exchange else "publish",
            context=_PROPAGATOR.extract(_text(headers)),
            kind=SpanKind.PRODUCER,
            attributes={
                **_MESSAGING,
                "messaging.operation.type": "send",
                "messaging.operation.name": "publish",
                "messaging.destination.name": exchange,
                "messaging.rabbitmq.destination.routing_key": routing_key,
                "messaging.message.id": str(message_id),
                "messaging.message.conversation_id": str(conversation_id),
                **self._server_attributes(),
            },
        )
        if not span.get_span_context().is_valid or "traceparent" in headers:
            return span, dict(headers)
        out = {k: v for k, v in headers.items() if k not in ("traceparent", "tracestate")}
        _PROPAGATOR.inject(out, context=trace.set_span_in_context(span))
        return span, out

    def database(
        self,
        system: str,
        parent: otel_context.Context | None,
        start: int,
        end: int,
        batch: int,
        operation: str = "COMMIT",
    ) -> None:
        """A span for one event's share of a (group) commit: from when its batch began to
        when it committed. Only inside a span (a message being processed): a timer's commit
        alone would be a trace of its own, which says nothing."""
        if parent is None or not self.recording:
            return
        if not trace.get_current_span(parent).get_span_context().is_valid:
            return
        span = self.tracer.start_span(
            f"{operation} {system}",
            context=parent,
            kind=SpanKind.CLIENT,
            start_time=start,
            attributes={
                "db.system.name": system,
                "db.operation.name": operation,
                "db.operation.batch.size": batch,
            },
        )
        span.end(end_time=end)


_HEX = frozenset("0123456789abcdef")


def _fast_span_context(parent: str, state: str | None) -> SpanContext | None:
    """The remote span context of a ``traceparent`` of version 00, parsed without the
    propagator's regular expression (a tenth of a millisecond per call); None for anything
    else, which the caller gives to the propagator."""
    parts = parent.split("-")
    if (
        len(parent) == 55
        and len(parts) == 4
        and parts[0] == "00"
        and len(parts[1]) == 32
        and len(parts[2]) == 16
        and len(parts[3]) == 2
        and _HEX.issuperset(parent.replace("-", ""))
    ):
        trace_id, span_id = int(parts[1], 16), int(parts[2], 16)
        if trace_id and span_id:
            return SpanContext(
                trace_id,
                span_id,
                is_remote=True,
                trace_flags=TraceFlags(int(parts[3], 16)),
                trace_state=TraceState.from_header([state]) if state else None,
            )
    return None


def _remote_context(carrier: Mapping[str, Any] | None) -> otel_context.Context:
    """The publisher's span context, when nothing is recorded and only the logs' ids are
    wanted: the fast parse, else the propagator, which gives what it gives (an empty context
    included)."""
    text = _text(carrier)
    context = _fast_span_context(text.get("traceparent", ""), text.get("tracestate"))
    if context is not None:
        return trace.set_span_in_context(NonRecordingSpan(context))
    return _PROPAGATOR.extract(text)


def _text(carrier: Mapping[str, Any] | None) -> dict[str, str]:
    """AMQP header values may be bytes; the propagator wants text."""
    if not carrier:
        return {}
    out: dict[str, str] = {}
    for key in ("traceparent", "tracestate"):
        value = carrier.get(key)
        if isinstance(value, bytes):
            value = value.decode("ascii", "replace")
        if isinstance(value, str):
            out[key] = value
    return out


def _saga_ids(state: SagaState) -> tuple[str | None, str | None]:
    if not state.trace:
        return None, None
    return state.trace.get("traceparent"), state.trace.get("tracestate")


def _attempt(
    before: SagaState, attempt: Attempt, business: Mapping[str, Any] | None
) -> tuple[str, int, int, dict[str, Any]]:
    """(name, span id, start, attributes) of the span of ``attempt``, one of ``before``'s."""
    verb = "step" if attempt.direction is Direction.ACTION else "compensate"
    attributes = {
        **_saga_attributes(before),
        "saga.step": attempt.step,
        "saga.direction": attempt.direction.value,
        "saga.attempt": attempt.attempt,
        "saga.outcome": attempt.outcome,
        "messaging.message.id": str(attempt.message_id),
        **(business or {}),
    }
    return (
        f"{verb} {attempt.step}",
        span_id_for(attempt.message_id),
        _ns(attempt.sent_at),
        attributes,
    )


def _saga_span(
    state: SagaState, business: Mapping[str, Any] | None
) -> tuple[dict[str, Any], str | None]:
    """The attributes of the saga's span, and its error (a FAILED saga)."""
    attributes = {
        **_saga_attributes(state),
        "saga.status": state.status.value,
        **(business or {}),
    }
    if state.failure or state.status is SagaStatus.FAILED:
        attributes["saga.failure"] = state.failure or "failed"
    if state.status is SagaStatus.FAILED:
        attributes["error.type"] = "saga_failed"
        return attributes, state.failure or "failed"
    return attributes, None


def _saga_attributes(state: SagaState) -> dict[str, Any]:
    return {
        "saga.id": str(state.saga_id),
        "saga.name": state.name,
        "saga.definition_version": state.definition_version,
    }


def business_attributes(state: SagaState, fields: Sequence[str]) -> dict[str, Any]:
    """``saga.key`` and ``saga.input.<field>`` for ``fields`` of the saga's input: what an
    operator searches a trace by. Values that are not scalars go as JSON text."""
    out: dict[str, Any] = {} if state.key is None else {"saga.key": state.key}
    for name in fields:
        value = state.context.input.get(name)
        if value is None:
            continue
        if not isinstance(value, str | int | float | bool):
            value = json.dumps(value, sort_keys=True)
        out[f"saga.input.{name}"] = value
    return out


def _ns(at: datetime) -> int:
    return int(at.timestamp() * 1e9)


# --- what a committed transition says --------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Attempt:
    """One command attempt that a transition ended, with what ended it: the attempt's span
    and its latency sample are made from this."""

    step: str
    direction: Direction
    attempt: int
    message_id: UUID
    sent_at: datetime
    outcome: str = "ended"  # succeeded, failed, timed_out, operator, deadline
    detail: str = ""  # the engine's words, the span's error when it did not succeed

    @property
    def succeeded(self) -> bool:
        return self.outcome == "succeeded"


def in_flight(state: SagaState) -> tuple[Attempt, ...]:
    """The attempts ``state`` awaits a reply to: every member of a parallel group whose
    command is out (not those in backoff), or the one command being awaited."""
    if state.lanes:
        steps = state.steps
        return tuple(
            Attempt(
                steps[lane.index].name,
                Direction.ACTION,
                steps[lane.index].attempts,
                lane.awaiting,
                lane.sent_at,
            )
            for lane in state.lanes
            if lane.phase is Phase.AWAITING_REPLY and lane.sent_at is not None
        )
    if state.phase is not Phase.AWAITING_REPLY or state.awaiting is None or state.sent_at is None:
        return ()
    step = state.steps[state.current].name
    return (Attempt(step, state.direction, state.attempt, state.awaiting, state.sent_at),)


def attempts_ended(before: SagaState | None, transition: Transition) -> tuple[Attempt, ...]:
    """The attempts ``before`` awaited that ``transition`` ended, each with its outcome: the
    entry about its own step (its reply, its timeout), else one about the whole saga (an
    operator's abort, the saga's deadline), which ends every member of a group at once."""
    if before is None or not transition.applied:
        return ()
    awaited = in_flight(before)
    if not awaited:
        return ()
    still = {a.message_id for a in in_flight(transition.state)}
    ended = []
    for awaiting in awaited:
        if awaiting.message_id in still:
            continue
        own = next(
            (
                e
                for e in transition.history
                if e.kind in _ENDING
                and e.step == awaiting.step
                and e.direction in (None, awaiting.direction)
            ),
            None,
        )
        if own is None:
            own = next((e for e in transition.history if e.kind in _SAGA_WIDE), None)
        ended.append(
            awaiting
            if own is None
            else dataclasses.replace(awaiting, outcome=_ENDING[own.kind], detail=own.detail)
        )
    return tuple(ended)


class Metrics:
    """Prometheus metrics of one orchestrator or participant; a registry of its own, so
    several in one process (tests) never mix their counts."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        self._brokers: list[Callable[[], BrokerStats]] | None = None
        self._work: list[Callable[[], WorkCounts]] | None = None
        r = self.registry
        self.started = Counter("saga_started", "Sagas started.", ["saga_name"], registry=r)
        self.finished = Counter(
            "saga_finished",
            "Sagas that reached an end: completed, compensated or failed.",
            ["saga_name", "status"],
            registry=r,
        )
        self.duration = Histogram(
            "saga_duration_seconds",
            "From start to end, by how it ended.",
            ["saga_name", "status"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600),
            registry=r,
        )
        self.step_duration = Histogram(
            "saga_step_duration_seconds",
            "One attempt of a step or compensation, from its command to its reply or timeout.",
            ["saga_name", "step", "direction", "outcome"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.retries = Counter(
            "saga_step_retries",
            "Retries scheduled after a retryable failure or a timeout.",
            ["saga_name", "step", "direction"],
            registry=r,
        )
        self.timeouts = Counter(
            "saga_step_timeouts",
            "Attempts that got no reply in time.",
            ["saga_name", "step", "direction"],
            registry=r,
        )
        self.dead_lettered = Counter(
            "saga_dead_lettered",
            "Messages moved to a dead-letter queue, by queue and reason.",
            ["queue", "reason"],
            registry=r,
        )
        self.messages = Counter(
            "saga_messages_consumed",
            "Messages consumed, by queue and what came of them.",
            ["queue", "outcome"],
            registry=r,
        )
        self.outbox_size = Gauge(
            "saga_outbox_messages", "Messages committed and not yet confirmed.", registry=r
        )
        self.outbox_age = Gauge(
            "saga_outbox_oldest_age_seconds",
            "Age of the oldest unsent outbox message (0 when empty).",
            registry=r,
        )
        self.published = Counter(
            "saga_relay_published", "Outbox messages the broker confirmed.", registry=r
        )
        self.publish_latency = Histogram(
            "saga_relay_publish_seconds",
            "From publish to the broker's confirm.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
            registry=r,
        )
        self.outbox_lag = Histogram(
            "saga_outbox_lag_seconds",
            "From the commit that wrote a message to its confirm.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30),
            registry=r,
        )
        self.commands = Counter(
            "saga_participant_commands",
            "Commands a participant answered, by type and outcome (duplicate: answered before).",
            ["participant", "command_type", "outcome"],
            registry=r,
        )
        self.handling = Histogram(
            "saga_participant_handling_seconds",
            "A command in a participant, from its delivery to its ack (the reply committed).",
            ["participant", "command_type"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.queue_ready = Gauge(
            "saga_queue_messages_ready",
            "Messages ready in a queue of the deployment, not yet delivered (refreshed every 5 s).",
            ["queue"],
            registry=r,
        )
        self._sagas: _SagaCollector | None = None
        #: each metric's child per label values, looked up once: ``labels()`` checks and
        #: converts its arguments and takes the metric's lock on every call (~2 per event).
        #: The children are the metric's own (it keeps them too; none is ever removed).
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, the same child object, from a dict after the first."""
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def watch_broker(self, stats: Callable[[], BrokerStats]) -> None:
        """Report a broker connection's health at every scrape; several connections of one
        process (``saga-service all``) add up, and count as connected only when all are."""
        if self._brokers is None:
            self._brokers = []
            self.registry.register(_BrokerCollector(self._brokers))
        self._brokers.append(stats)

    def watch_sagas(self, names: Sequence[str]) -> None:
        """Export the store's sagas by status (:meth:`sagas`), with a zero for every saga name
        in ``names`` until the first reading says otherwise."""
        if self._sagas is None:
            self._sagas = _SagaCollector(names)
            self.registry.register(self._sagas)

    def sagas(self, rows: Sequence[tuple[str, SagaStatus, int, float]]) -> None:
        """A fresh reading of the store: (saga name, status, how many, age in seconds of the
        oldest) for every status :data:`LIVE_STATUSES` with sagas."""
        if self._sagas is not None:
            self._sagas.rows = list(rows)

    def watch_work(self, read: Callable[[], WorkCounts]) -> None:
        """Export what ``read`` counts as ``saga_work_total{kind}``, read at each scrape;
        several sources of one process add up."""
        if self._work is None:
            self._work = []
            self.registry.register(WorkCollector(self._work))
        self._work.append(read)

    def work(self) -> WorkCounts:
        """The work counted so far by every source given to :meth:`watch_work`."""
        total = WorkCounts()
        for read in self._work or ():
            total = total + read()
        return total

    def transition(self, before: SagaState | None, transition: Transition) -> None:
        """Count what one committed transition did."""
        after = transition.state
        name = after.name
        for entry in transition.history:
            if entry.kind is HistoryKind.STARTED:
                self._child(self.started, name).inc()
            elif entry.kind is HistoryKind.RETRY_SCHEDULED:
                self.retries.labels(name, entry.step or "", _direction(entry.direction)).inc()
            elif entry.kind is HistoryKind.STEP_TIMED_OUT:
                self.timeouts.labels(name, entry.step or "", _direction(entry.direction)).inc()
        if after.status.is_terminal and (before is None or not before.status.is_terminal):
            status = after.status.value.lower()
            self._child(self.finished, name, status).inc()
            self._child(self.duration, name, status).observe(
                (after.updated_at - after.created_at).total_seconds()
            )

    def attempt(self, name: str, attempt: Attempt, end: datetime) -> None:
        """One latency sample: ``attempt`` of a saga named ``name`` ended at ``end``."""
        self._child(
            self.step_duration, name, attempt.step, attempt.direction._value_, attempt.outcome
        ).observe(max((end - attempt.sent_at).total_seconds(), 0.0))


#: the statuses the store gauges report: sagas in flight, and the ones waiting for an operator.
#: COMPLETED and COMPENSATED sagas pile up for ever; saga_finished_total counts them.
LIVE_STATUSES = (SagaStatus.RUNNING, SagaStatus.COMPENSATING, SagaStatus.FAILED)


class _SagaCollector:
    """The last reading of the store's sagas by status, served at each scrape (the reading
    itself is a periodic query, never a scrape's)."""

    def __init__(self, names: Sequence[str]):
        self._names = sorted(set(names))
        self.rows: list[tuple[str, SagaStatus, int, float]] = []

    def collect(self) -> Iterator[Metric]:
        counts = GaugeMetricFamily(
            "saga_sagas",
            "Sagas in the store by name and status (running, compensating, failed).",
            labels=["saga_name", "status"],
        )
        ages = GaugeMetricFamily(
            "saga_oldest_age_seconds",
            "Age (since its start) of the oldest saga by name and status; 0 when there is none.",
            labels=["saga_name", "status"],
        )
        found = {(name, status): (n, age) for name, status, n, age in self.rows}
        names = sorted(set(self._names) | {name for name, _ in found})
        for name in names:
            for status in LIVE_STATUSES:
                n, age = found.get((name, status), (0, 0.0))
                counts.add_metric([name, status.value.lower()], n)
                ages.add_metric([name, status.value.lower()], age)
        yield counts
        yield ages


class _BrokerCollector:
    """Reads the broker connections when scraped, so the numbers are never stale."""

    def __init__(self, sources: list[Callable[[], BrokerStats]]):
        self._sources = sources

    def collect(self) -> Iterator[Metric]:
        stats = [read() for read in self._sources]
        yield GaugeMetricFamily(
            "saga_broker_connected",
            "1 while every broker connection of the process is up (and restored), else 0.",
            value=float(all(s.connected for s in stats)),
        )
        yield CounterMetricFamily(
            "saga_broker_reconnects",
            "Broker connections lost and made again (on the next node of a cluster).",
            value=sum(s.reconnects for s in stats),
        )
        yield CounterMetricFamily(
            "saga_broker_consumer_repairs",
            "Consumers the broker cancelled or whose channel it closed, attached again.",
            value=sum(s.consumer_repairs for s in stats),
        )


def _direction(direction: Direction | None) -> str:
    return "" if direction is None else direction.value


class MetricsServer:
    """``GET /metrics`` in Prometheus' text format, served from a thread of its own, so a
    scrape never waits for the event loop (nor slows it)."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.port = 0

    def start(self, host: str, port: int) -> None:
        try:
            self._server, self._thread = start_http_server(port, host, self.registry)
        except OSError as exc:
            raise ConfigError(
                f"cannot serve /metrics on {host}:{port}: {exc.strerror or exc}; "
                "choose a free port with SAGA_METRICS_PORT (0 turns metrics off)"
            ) from None
        self.port = int(self._server.server_address[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
