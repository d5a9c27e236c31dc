"""Spans, metrics and log fields of the orchestrator, from the real runtime on the in-memory
harness: one trace per saga, ids fixed in advance, and the same trace after a restart."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import pytest
import structlog
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import StatusCode
from pydantic import BaseModel
from structlog.testing import LogCapture

from saga import Parallel, Step
from saga.core.definition import Registry, SagaDefinition
from saga.core.engine import decide
from saga.core.errors import ConfigError, DefinitionError
from saga.core.state import Direction, ReplyFailed, ReplySucceeded, SagaStatus, Started, TimerFired
from saga.orchestrator import runtime
from saga.orchestrator.runtime import Orchestrator
from saga.ports import BrokerStats
from saga.telemetry import (
    Attempt,
    Metrics,
    ReservedIds,
    Tracing,
    attempts_ended,
    configure_tracing,
    in_flight,
    span_id_for,
    trace_ids,
)
from saga.testing import Harness, fail, ok, silence
from tests.support.sagas import TRIP, registry


def tracer() -> tuple[Tracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(id_generator=ReservedIds())
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Tracing(provider), exporter


def harness(tracing: Tracing, metrics: Metrics | None = None) -> Harness:
    h = Harness(registry())
    h.orchestrator.tracing = tracing
    h.orchestrator.metrics = metrics
    return h


def named(spans: Sequence[ReadableSpan], prefix: str) -> list[ReadableSpan]:
    return sorted((s for s in spans if s.name.startswith(prefix)), key=lambda s: s.start_time or 0)


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_a_compensated_saga_is_one_trace_with_steps_and_compensations_in_order() -> None:
    tracing, exporter = tracer()
    h = harness(tracing)
    h.on("alpha.do", lambda c: ok(id="a1"))
    h.on("beta.do", lambda c: ok())
    h.on("gamma.do", lambda c: fail("declined"))
    h.on("beta.undo", lambda c: ok())
    h.on("alpha.undo", lambda c: ok())

    saga = await h.run("trip", {})

    assert saga.status is SagaStatus.COMPENSATED
    spans = exporter.get_finished_spans()
    (root,) = named(spans, "saga ")
    assert root.name == "saga trip" and root.parent is None
    assert saga.trace is not None
    _, trace_hex, span_hex, _ = saga.trace["traceparent"].split("-")
    assert (f"{root.context.trace_id:032x}", f"{root.context.span_id:016x}") == (
        trace_hex,
        span_hex,
    )
    assert {s.context.trace_id for s in spans} == {root.context.trace_id}
    steps = [s for s in spans if s.name.split(" ")[0] in ("step", "compensate")]
    assert [s.name for s in sorted(steps, key=lambda s: s.start_time or 0)] == [
        "step alpha",
        "step beta",
        "step gamma",
        "compensate beta",
        "compensate alpha",
    ]
    assert all(s.parent is not None and s.parent.span_id == root.context.span_id for s in steps)
    # each attempt's span id is the one its command's traceparent named
    by_id = {s.context.span_id: s for s in steps}
    for command in h.delivered:
        span = by_id[span_id_for(command.message_id)]
        assert span.attributes is not None
        assert span.attributes["saga.step"] == command.step
        assert span.attributes["saga.attempt"] == command.attempt
        assert span.attributes["messaging.message.id"] == str(command.message_id)
    (gamma,) = named(steps, "step gamma")
    assert gamma.status.status_code is StatusCode.ERROR
    assert gamma.attributes is not None and gamma.attributes["saga.outcome"] == "failed"
    assert root.attributes is not None and root.attributes["saga.status"] == "COMPENSATED"
    assert root.start_time == int(saga.created_at.timestamp() * 1e9)


async def test_commands_carry_the_traceparent_of_their_attempt() -> None:
    tracing, _ = tracer()
    h = harness(tracing)
    saga_id = await h.start("trip", {})
    (message,) = await h.store.pending_outbox(10)
    saga = await h.saga(saga_id)
    assert saga.trace is not None
    trace_hex = saga.trace["traceparent"].split("-")[1]
    assert message.headers["traceparent"] == (
        f"00-{trace_hex}-{span_id_for(message.message_id):016x}-01"
    )


async def test_a_saga_started_inside_a_trace_continues_it() -> None:
    tracing, exporter = tracer()
    h = harness(tracing)
    for step in ("alpha", "beta", "gamma"):
        h.on(f"{step}.do", lambda c: ok())
    caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    state = await h.orchestrator.start("trip", {}, trace_parent={"traceparent": caller})
    await h.settle()

    (root,) = named(exporter.get_finished_spans(), "saga ")
    assert f"{root.context.trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"
    assert root.parent is not None and f"{root.parent.span_id:016x}" == "b7ad6b7169203331"
    assert state.trace is not None and state.trace["parent"] == caller


async def test_after_a_restart_the_saga_continues_the_same_trace() -> None:
    before, first = tracer()
    h = harness(before)
    h.on("alpha.do", lambda c: ok())
    h.on("beta.do", silence)  # still waiting for beta when the process "dies"
    saga_id = await h.start("trip", {})
    await h.deliver()
    await h.deliver()
    assert first.get_finished_spans()  # alpha's attempt ended here
    assert not named(first.get_finished_spans(), "saga ")

    after, second = tracer()  # a new process: a new provider, the same database
    h.orchestrator = Orchestrator(h.registry, h.store, clock=h.clock, tracing=after)
    (beta,) = [c for c in h.delivered if c.command_type == "beta.do"]
    await h.reply(beta, ok())
    h.on("gamma.do", lambda c: ok())
    await h.settle()

    saga = await h.saga(saga_id)
    assert saga.status is SagaStatus.COMPLETED
    spans = [*first.get_finished_spans(), *second.get_finished_spans()]
    assert len({s.context.trace_id for s in spans}) == 1
    (root,) = named(second.get_finished_spans(), "saga ")
    assert [s.name for s in named(spans, "step ")] == ["step alpha", "step beta", "step gamma"]
    assert all(s.parent and s.parent.span_id == root.context.span_id for s in named(spans, "step"))


async def test_retries_and_timeouts_are_counted_and_each_attempt_is_a_span() -> None:
    tracing, exporter = tracer()
    metrics = Metrics()
    h = harness(tracing, metrics)
    calls: Counter[str] = Counter()

    def flaky(command: Any) -> Any:
        calls[command.command_type] += 1
        return None if calls[command.command_type] == 1 else ok()  # silent once: times out

    h.on("alpha.do", flaky)
    h.on("beta.do", lambda c: fail("busy", retryable=True) if c.attempt == 1 else ok())
    h.on("gamma.do", lambda c: ok())
    saga = await h.run("trip", {})

    assert saga.status is SagaStatus.COMPLETED
    alpha = named(exporter.get_finished_spans(), "step alpha")
    assert [s.attributes and s.attributes["saga.outcome"] for s in alpha] == [
        "timed_out",
        "succeeded",
    ]
    assert sample(metrics, "saga_started_total", saga_name="trip") == 1
    assert sample(metrics, "saga_finished_total", saga_name="trip", status="completed") == 1
    assert sample(metrics, "saga_step_timeouts_total", saga_name="trip", step="alpha",
                  direction="action") == 1  # fmt: skip
    assert sample(metrics, "saga_step_retries_total", saga_name="trip", step="alpha",
                  direction="action") == 1  # fmt: skip
    assert sample(metrics, "saga_step_retries_total", saga_name="trip", step="beta",
                  direction="action") == 1  # fmt: skip
    attempts = sum(
        sample(
            metrics,
            "saga_step_duration_seconds_count",
            saga_name="trip",
            step=step,
            direction="action",
            outcome=outcome,
        )
        for step in ("alpha", "beta", "gamma")
        for outcome in ("succeeded", "failed", "timed_out")
    )
    assert attempts == 5 == len(named(exporter.get_finished_spans(), "step "))
    assert sample(metrics, "saga_duration_seconds_count", saga_name="trip",
                  status="completed") == 1  # fmt: skip


async def test_log_lines_about_a_saga_carry_its_ids_and_its_trace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tracing, _ = tracer()
    h = harness(tracing)
    h.on("alpha.do", lambda c: ok())
    h.on("beta.do", lambda c: fail("declined"))
    h.on("alpha.undo", lambda c: ok())
    # A logger of our own: a module's cached logger ignores capture_logs() once the process has
    # configured structlog (another test may have).
    capture = LogCapture()
    monkeypatch.setattr(
        runtime,
        "log",
        structlog.wrap_logger(
            structlog.PrintLogger(),
            processors=[structlog.processors.add_log_level, capture],
            wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        ),
    )
    saga = await h.run("trip", {})
    logs = capture.entries

    assert saga.trace is not None
    trace_hex = saga.trace["traceparent"].split("-")[1]
    about = [e for e in logs if e.get("saga_id") == str(saga.saga_id)]
    kinds = [e["event"] for e in about if e["log_level"] == "info"]
    assert kinds == ["started", "step_failed", "compensation_started", "step_compensated",
                     "compensated"]  # fmt: skip
    assert {"command_sent", "step_succeeded"} <= {e["event"] for e in about}  # at debug
    for entry in about:
        assert entry["saga_name"] == "trip"
        assert entry["trace_id"] == trace_hex
        assert len(entry["span_id"]) == 16
    failed = next(e for e in about if e["event"] == "step_failed")
    (beta,) = [c for c in h.delivered if c.command_type == "beta.do"]
    assert (failed["step"], failed["attempt"], failed["message_id"]) == (
        "beta",
        1,
        str(beta.message_id),
    )
    assert failed["span_id"] == f"{span_id_for(beta.message_id):016x}"


@pytest.mark.parametrize("value", ["jaeger", "zipkin"])
def test_an_unknown_exporter_is_a_config_error(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", value)
    with pytest.raises(ConfigError, match="otlp, console or none"):
        configure_tracing("test")


def test_trip_definition_is_what_these_tests_assume() -> None:
    assert [s.name for s in TRIP.steps] == ["alpha", "beta", "gamma"]


def test_broker_connections_are_read_at_each_scrape_and_add_up() -> None:
    metrics = Metrics()
    first = BrokerStats(connected=True, reconnects=2, consumer_repairs=1)
    second = BrokerStats(connected=True)
    metrics.watch_broker(lambda: first)
    metrics.watch_broker(lambda: second)

    def value(name: str) -> float | None:
        return metrics.registry.get_sample_value(name)

    assert value("saga_broker_connected") == 1
    assert value("saga_broker_reconnects_total") == 2
    assert value("saga_broker_consumer_repairs_total") == 1
    second = BrokerStats(connected=False, reconnects=1)  # read anew: one connection is down
    assert value("saga_broker_connected") == 0
    assert value("saga_broker_reconnects_total") == 3


def test_with_nothing_to_export_no_span_is_built_but_logs_still_get_ids() -> None:
    """The default (ALWAYS_OFF, no exporter): ``process`` builds no span, yet a message logs
    under its publisher's ids, or under ids of its own when it came without a traceparent;
    a saga started under a sampled caller passes the caller's sampled flag on."""
    tracing = Tracing(TracerProvider(sampler=ALWAYS_OFF))
    assert not tracing.recording
    parent = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
    with tracing.process("q", {"traceparent": parent}, "m-1", 10):
        assert trace_ids() == {"trace_id": "ab" * 16, "span_id": "cd" * 8}
    with tracing.process("q", {}, "m-2", 10):
        ids = trace_ids()
        assert len(ids.get("trace_id", "")) == 32 and len(ids.get("span_id", "")) == 16
    assert trace_ids() == {}
    carrier = tracing.saga_trace("trip", {"traceparent": parent})
    assert carrier["traceparent"].startswith("00-" + "ab" * 16 + "-")
    assert carrier["traceparent"].endswith("-01")  # sampled upstream: still sampled
    assert carrier["parent"] == parent
    assert tracer()[0].recording  # with a span processor: recording


# --- the publisher's context without the propagator's regular expression --------------------

_VALID = "00-" + "0af7651916cd43dd8448eb211c80319c" + "-" + "b7ad6b7169203331" + "-01"


@pytest.mark.parametrize(
    "headers",
    [
        {"traceparent": _VALID},
        {"traceparent": _VALID.encode()},  # AMQP headers may arrive as bytes
        {"traceparent": _VALID[:-2] + "00"},  # not sampled
        {"traceparent": _VALID, "tracestate": "vendor=a1,other=b2"},
        {"traceparent": _VALID.upper()},  # W3C wants lower case
        {"traceparent": "ff" + _VALID[2:]},  # a forbidden version
        {"traceparent": "01" + _VALID[2:] + "-future"},  # a later version with more fields
        {"traceparent": "00-" + "0" * 32 + "-b7ad6b7169203331-01"},  # an invalid trace id
        {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-" + "0" * 16 + "-01"},
        {"traceparent": _VALID[:-1]},
        {"traceparent": _VALID.replace("-", "_")},
        {"traceparent": "00-0af7651916cd43dd8448eb211c80319g-b7ad6b7169203331-01"},
        {"traceparent": 42},
        {},
        None,
    ],
)
def test_the_fast_parse_reads_what_the_w3c_propagator_reads(headers: Any) -> None:
    from opentelemetry import trace  # noqa: PLC0415

    from saga import telemetry  # noqa: PLC0415

    fast = trace.get_current_span(telemetry._remote_context(headers)).get_span_context()
    slow = trace.get_current_span(
        telemetry._PROPAGATOR.extract(telemetry._text(headers))
    ).get_span_context()
    assert fast == slow
    assert fast.is_remote == slow.is_remote
    assert fast.trace_flags == slow.trace_flags
    assert dict(fast.trace_state) == dict(slow.trace_state)


async def test_business_keys_named_by_the_definition_go_on_the_saga_and_attempt_spans() -> None:
    tracing, exporter = tracer()
    keyed = SagaDefinition("trip", 1, TRIP.steps, span_attributes=("order", "lines"))
    h = Harness([keyed])
    h.orchestrator.tracing = tracing
    for participant in ("alpha", "beta", "gamma"):
        h.on(f"{participant}.do", lambda c: ok())

    saga = await h.run("trip", {"order": "A-17", "lines": [1, 2], "note": "x"}, key="k-1")

    assert saga.status is SagaStatus.COMPLETED
    spans = exporter.get_finished_spans()
    (root,) = named(spans, "saga ")
    steps = named(spans, "step ")
    assert len(steps) == 3
    for span in (root, *steps):
        assert span.attributes is not None
        assert span.attributes["saga.key"] == "k-1"
        assert span.attributes["saga.input.order"] == "A-17"
        assert span.attributes["saga.input.lines"] == "[1, 2]"
        assert "saga.input.note" not in span.attributes


def test_span_attributes_must_name_fields_of_the_input_model() -> None:
    class TripInput(BaseModel):
        order: str

    bad = SagaDefinition("trip", 1, TRIP.steps, input_model=TripInput, span_attributes=("ordr",))
    with pytest.raises(DefinitionError, match="'ordr' is not a field of the input model"):
        Registry([bad])


def test_every_member_of_a_group_ends_its_own_attempt_once() -> None:
    """A reply ends only its member's attempt, even when it moves the saga's one timer to
    another lane; the saga's deadline ends every member still in flight at once."""

    def step(name: str) -> Step:
        return Step(name, participant=name, action=f"{name}.do", compensation=f"{name}.undo")

    group = SagaDefinition(
        "grouped", 1, [Parallel(step("a"), step("b"), step("c"))], deadline=timedelta(minutes=1)
    )
    t0 = datetime(2030, 1, 1, tzinfo=UTC)
    started = decide(group, None, Started(UUID(int=7), {}), t0)
    a, b, c = started.commands
    assert [x.message_id for x in in_flight(started.state)] == [
        a.message_id,
        b.message_id,
        c.message_id,
    ]
    assert len({span_id_for(x.message_id) for x in (a, b, c)}) == 3

    later = t0 + timedelta(seconds=1)
    failed = decide(group, started.state, ReplyFailed(b.message_id, "b", "busy", True), later)
    assert failed.state.awaiting != started.state.awaiting  # b's backoff is due first now
    [ended] = attempts_ended(started.state, failed)
    assert (ended.step, ended.outcome, ended.sent_at) == ("b", "failed", t0)
    assert ended.message_id == b.message_id

    done = decide(group, failed.state, ReplySucceeded(c.message_id, "c"), later)
    [ended] = attempts_ended(failed.state, done)
    assert (ended.step, ended.outcome) == ("c", "succeeded")

    assert done.state.expires_at is not None and done.state.awaiting is not None
    expired = decide(group, done.state, TimerFired(done.state.awaiting), done.state.expires_at)
    assert [(x.step, x.outcome) for x in attempts_ended(done.state, expired)] == [("a", "deadline")]


async def test_each_member_of_a_parallel_group_has_its_attempt_span_and_duration() -> None:
    """While a group runs, the saga's ``current`` mirrors one lane only: the other members'
    replies end attempts too, each with its own span and ``saga_step_duration``, including a
    member that answers after its sibling failed and one stopped in its backoff."""
    tracing, exporter = tracer()
    metrics = Metrics()
    members = [
        Step(name, participant="p", action=f"p.{name}", compensation=f"p.un{name}")
        for name in ("first", "left", "middle", "right")
    ]
    shop = SagaDefinition("shop", 1, [members[0], Parallel(*members[1:])])
    h = Harness([shop])
    h.orchestrator.tracing = tracing
    h.orchestrator.metrics = metrics
    for step in members:
        h.on(f"p.un{step.name}", lambda c: ok())
    h.on("p.first", lambda c: ok())
    h.on("p.left", lambda c: ok())
    h.on("p.right", lambda c: ok())
    h.on("p.middle", lambda c: ok())
    assert (await h.run("shop", {})).status is SagaStatus.COMPLETED
    spans = exporter.get_finished_spans()
    assert sorted(s.name for s in named(spans, "step ")) == [
        "step first", "step left", "step middle", "step right"]  # fmt: skip

    def duration(step: str, outcome: str, direction: str = "action") -> float:
        return sample(metrics, "saga_step_duration_seconds_count", saga_name="shop", step=step,
                      direction=direction, outcome=outcome)  # fmt: skip

    assert [duration(s.name, "succeeded") for s in members] == [1, 1, 1, 1]

    exporter.clear()
    h.on("p.right", lambda c: fail("refused"))
    h.on("p.middle", lambda c: fail("busy", retryable=True))  # in backoff when right fails
    # (the members' commands are answered in step order: left, middle, right)
    saga = await h.run("shop", {})
    assert saga.status is SagaStatus.COMPENSATED
    spans = exporter.get_finished_spans()
    outcomes = {
        s.name: s.attributes and s.attributes["saga.outcome"] for s in named(spans, "step ")
    }
    assert outcomes == {
        "step first": "succeeded",
        "step left": "succeeded",
        "step right": "failed",
        "step middle": "failed",  # its first attempt; its retry was never sent
    }
    assert len(named(spans, "step ")) == 4
    assert duration("right", "failed") == 1 and duration("middle", "failed") == 1
    undone = sorted(s.name for s in named(spans, "compensate "))
    assert undone == ["compensate first", "compensate left", "compensate middle"]


def test_the_labelled_children_looked_up_once_are_the_metrics_own() -> None:
    """``Metrics`` keeps each child it asked ``labels()`` for: later samples go to the very
    child ``labels()`` gives, and another ``Metrics`` (another registry) counts apart."""
    metrics, other = Metrics(), Metrics()
    sent = datetime(2024, 1, 1, tzinfo=UTC)
    attempt = Attempt("alpha", Direction.ACTION, 1, UUID(int=1), sent, outcome="succeeded")
    for seconds in (1, 2, 3):
        metrics.attempt("trip", attempt, sent + timedelta(seconds=seconds))
    other.attempt("trip", attempt, sent + timedelta(seconds=5))
    labels = {"saga_name": "trip", "step": "alpha", "direction": "action",
              "outcome": "succeeded"}  # fmt: skip
    assert sample(metrics, "saga_step_duration_seconds_count", **labels) == 3
    assert sample(metrics, "saga_step_duration_seconds_sum", **labels) == 6
    assert sample(other, "saga_step_duration_seconds_sum", **labels) == 5
    child = metrics._child(metrics.step_duration, "trip", "alpha", "action", "succeeded")
    assert child is metrics.step_duration.labels("trip", "alpha", "action", "succeeded")
