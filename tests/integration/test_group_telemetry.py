"""Every member of a parallel group gets its attempt span and its latency sample, on the real
stack (the orchestrator service on RabbitMQ and SQLite, the tour participants built with the
participant library): whether the member answers, fails, times out or is aborted, and whatever
lane the saga's one timer mirrors. Every command sent is one attempt, so a finished saga has
exactly one ``step``/``compensate`` span and one ``saga_step_duration_seconds`` sample per
``command_sent`` entry of its history.

The member that is not mirrored (the hotel: the flight comes first among equal deadlines) is
made to end first, by holding the flight at its participant's gate until the store shows the
hotel done, so nothing here depends on which of two replies wins a race.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from saga.core.state import (
    Direction,
    HistoryEntry,
    HistoryKind,
    SagaState,
    SagaStatus,
    StepStatus,
)
from saga.orchestrator.service import OrchestratorService
from saga.telemetry import ReservedIds, Tracing, export_durably, span_id_for
from tests.integration.harness import Harness, wait_terminal
from tests.integration.test_language_rabbitmq import wait_state
from tests.support.language import Participants, registry, running_participants

pytestmark = pytest.mark.rabbitmq


def tracing(durable: bool) -> tuple[Tracing, InMemorySpanExporter]:
    """Spans committed with the work and drained by the service (``durable``), or exported
    from memory after each commit."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(id_generator=ReservedIds())
    if durable:
        export_durably(provider, [exporter])
    else:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Tracing(provider), exporter


@pytest.fixture(params=["durable", "memory"])
def traced(request: pytest.FixtureRequest) -> tuple[Tracing, InMemorySpanExporter]:
    return tracing(request.param == "durable")


@pytest.fixture
async def stack(
    harness: Harness, tmp_path: Path, traced: tuple[Tracing, InMemorySpanExporter]
) -> AsyncIterator[Participants]:
    await harness.start_service(definitions=registry(), tracing=traced[0])
    async with running_participants(
        tmp_path / "participants", harness.prefix, harness.rabbitmq_url
    ) as participants:
        yield participants


async def exported(
    service: OrchestratorService, exporter: InMemorySpanExporter
) -> list[ReadableSpan]:
    """The spans exported once the last batch is answered (its spans and samples are made
    right after its commit, which the store may show first) and the drain has run."""
    await service.orchestrator.drained()
    if service.spans is not None:
        await service.spans.flush()
    return list(exporter.get_finished_spans())


def samples(service: OrchestratorService, saga_name: str) -> Counter[tuple[str, str, str]]:
    """Latency samples by (step, direction, outcome)."""
    found: Counter[tuple[str, str, str]] = Counter()
    for family in service.metrics.registry.collect():
        if family.name != "saga_step_duration_seconds":
            continue
        for sample in family.samples:
            labels = sample.labels
            if sample.name.endswith("_count") and labels["saga_name"] == saga_name:
                key = (labels["step"], labels["direction"], labels["outcome"])
                found[key] += int(sample.value)
    return found


def _ns(entry: HistoryEntry) -> int:
    return int(entry.at.timestamp() * 1e9)


def check_every_attempt(
    final: SagaState, history: list[HistoryEntry], spans: list[ReadableSpan]
) -> dict[str, str]:
    """One attempt span per command sent, each a child of the saga span, starting when its
    command was sent and ending with the entry that decided it, and no other; returns each
    span's outcome by message id."""
    assert final.trace is not None
    _, trace_hex, saga_hex, _ = final.trace["traceparent"].split("-")
    attempts = [
        s
        for s in spans
        if s.name.startswith(("step ", "compensate "))
        and s.context is not None
        and f"{s.context.trace_id:032x}" == trace_hex
    ]
    by_id: dict[int, list[ReadableSpan]] = {}
    for span in attempts:
        assert span.context is not None
        by_id.setdefault(span.context.span_id, []).append(span)
    sent = [h for h in history if h.kind is HistoryKind.COMMAND_SENT]
    decided = {_ns(h) for h in history if h.kind is not HistoryKind.COMMAND_SENT}
    outcomes: dict[str, str] = {}
    for entry in sent:
        assert entry.message_id is not None and entry.step is not None
        found = by_id.pop(span_id_for(entry.message_id), [])
        what = f"{entry.step} {entry.direction} attempt {entry.attempt}"
        assert len(found) == 1, f"{what}: {len(found)} spans"
        [span] = found
        verb = "step" if entry.direction is Direction.ACTION else "compensate"
        assert span.name == f"{verb} {entry.step}"
        assert span.context is not None and span.parent is not None
        assert f"{span.context.trace_id:032x}" == trace_hex
        assert f"{span.parent.span_id:016x}" == saga_hex, f"{what} is not the saga's child"
        attributes = span.attributes or {}
        assert attributes["saga.step"] == entry.step
        assert attributes["saga.attempt"] == entry.attempt
        assert attributes["messaging.message.id"] == str(entry.message_id)
        assert span.start_time == _ns(entry), f"{what} starts when its command was sent"
        assert span.end_time is not None and span.end_time > span.start_time
        assert span.end_time in decided, f"{what} ends when an event was decided"
        outcomes[str(entry.message_id)] = str(attributes["saga.outcome"])
    assert by_id == {}, "attempt spans of no command sent"
    return outcomes


def by_step(history: list[HistoryEntry], outcomes: dict[str, str]) -> Counter[tuple[str, str, str]]:
    """(step, direction, outcome) of each attempt span, the metric's labels."""
    found: Counter[tuple[str, str, str]] = Counter()
    for h in history:
        if h.kind is HistoryKind.COMMAND_SENT:
            assert h.step is not None and h.direction is not None
            found[(h.step, h.direction.value, outcomes[str(h.message_id)])] += 1
    return found


async def test_each_member_that_answers_has_its_span_and_sample(
    harness: Harness, stack: Participants, traced: tuple[Tracing, InMemorySpanExporter]
) -> None:
    service, script = harness.service, stack.script
    script.hold("beta.book")  # the mirrored flight answers only after the hotel
    started = await service.start_saga("tour", {})
    saga_id = started.saga_id
    await wait_state(
        service, saga_id, lambda s: s.step("hotel").status is StepStatus.SUCCEEDED, "hotel done"
    )
    script.release("beta.book")
    [final] = await wait_terminal(service, [saga_id])
    assert final.status is SagaStatus.COMPLETED

    history = await service.orchestrator.history(saga_id)
    outcomes = check_every_attempt(final, history, await exported(service, traced[1]))
    assert by_step(history, outcomes) == Counter(
        {
            ("reserve", "action", "succeeded"): 1,
            ("flight", "action", "succeeded"): 1,
            ("hotel", "action", "succeeded"): 1,
            ("confirm", "action", "succeeded"): 1,
        }
    )
    assert samples(service, "tour") == by_step(history, outcomes)


async def test_a_member_failing_while_its_sibling_waits_ends_only_its_own_attempts(
    harness: Harness, stack: Participants, traced: tuple[Tracing, InMemorySpanExporter]
) -> None:
    service, script = harness.service, stack.script
    script.hold("beta.book")
    script.transient.add("gamma.book")  # three retryable failures: the group fails
    started = await service.start_saga("tour", {})
    saga_id = started.saga_id
    await wait_state(
        service, saga_id, lambda s: s.status is SagaStatus.COMPENSATING, "the hotel gave up"
    )
    script.release("beta.book")  # awaited before anything is compensated
    [final] = await wait_terminal(service, [saga_id])
    assert final.status is SagaStatus.COMPENSATED

    history = await service.orchestrator.history(saga_id)
    outcomes = check_every_attempt(final, history, await exported(service, traced[1]))
    expected = Counter(
        {
            ("reserve", "action", "succeeded"): 1,
            ("hotel", "action", "failed"): 3,
            ("flight", "action", "succeeded"): 1,
            ("flight", "compensation", "succeeded"): 1,
            ("reserve", "compensation", "succeeded"): 1,
        }
    )
    assert by_step(history, outcomes) == expected
    assert samples(service, "tour") == expected


async def test_members_that_time_out_or_are_aborted_have_their_spans_and_samples(
    harness: Harness, stack: Participants, traced: tuple[Tracing, InMemorySpanExporter]
) -> None:
    service, script = harness.service, stack.script
    script.hold("gamma.book")  # the hotel times out (1.5 s, no retry); the flight answers
    timing_out = await service.start_saga("tour-timeout", {})
    await wait_state(
        service,
        timing_out.saga_id,
        lambda s: s.step("flight").status is StepStatus.SUCCEEDED,
        "the flight answered",
    )
    script.hold("beta.book")  # now both members of the next saga stay in flight
    aborted = await service.start_saga("tour", {})
    await wait_state(service, aborted.saga_id, lambda s: len(s.lanes) == 2, "both in flight")
    await wait_state(
        service,
        timing_out.saga_id,
        lambda s: s.status is SagaStatus.COMPENSATING,
        "the hotel timed out",
    )
    result = await service.orchestrator.abort(aborted.saga_id, actor="ops", reason="cancelled")
    assert result.state.lanes == ()
    script.release("beta.book", "gamma.book")
    finals = await wait_terminal(service, [timing_out.saga_id, aborted.saga_id])
    assert [f.status for f in finals] == [SagaStatus.COMPENSATED] * 2

    spans = await exported(service, traced[1])
    history = await service.orchestrator.history(timing_out.saga_id)
    outcomes = check_every_attempt(finals[0], history, spans)
    expected = Counter(
        {
            ("reserve", "action", "succeeded"): 1,
            ("flight", "action", "succeeded"): 1,
            ("hotel", "action", "timed_out"): 1,
            ("hotel", "compensation", "succeeded"): 1,
            ("flight", "compensation", "succeeded"): 1,
            ("reserve", "compensation", "succeeded"): 1,
        }
    )
    assert by_step(history, outcomes) == expected
    assert samples(service, "tour-timeout") == expected

    history = await service.orchestrator.history(aborted.saga_id)
    outcomes = check_every_attempt(finals[1], history, spans)
    expected = Counter(
        {
            ("reserve", "action", "succeeded"): 1,
            ("flight", "action", "operator"): 1,
            ("hotel", "action", "operator"): 1,
            ("hotel", "compensation", "succeeded"): 1,
            ("flight", "compensation", "succeeded"): 1,
            ("reserve", "compensation", "succeeded"): 1,
        }
    )
    assert by_step(history, outcomes) == expected
    assert samples(service, "tour") == expected
