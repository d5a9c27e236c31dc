"""Observability of the real processes: one trace per saga across the orchestrator, the four
services and an orchestrator restart; log lines bound to the saga; /metrics that agree with the
store and the ledgers.

The processes export spans with the OTLP/HTTP exporter, exactly as they would to Jaeger, to a
small OTLP receiver this test runs and keeps in memory.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
from prometheus_client.parser import text_string_to_metric_families

from saga.core.state import Phase, SagaStatus
from saga.participant.ledger import processed
from saga_demo import inventory
from saga_tools.chaos.node import free_port
from tests.crash.helpers import Proc
from tests.e2e.otlp import OtlpReceiver, Span
from tests.e2e.stack import SERVICES, TOKYO, Stack, checkout, submit


def telemetry_env(receiver: OtlpReceiver, instance: str) -> dict[str, str]:
    return {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_RESOURCE_ATTRIBUTES": f"service.instance.id={instance}",
        "SAGA_LOG_LEVEL": "DEBUG",
    }


def spawn_orchestrator(stack: Stack, receiver: OtlpReceiver, instance: str, **extra: str) -> Proc:
    env = stack.orchestrator_env(**{**telemetry_env(receiver, instance), **extra})
    return stack.processes.spawn(instance, ["saga", "run", "--migrate"], env)


def spawn_service(stack: Stack, receiver: OtlpReceiver, service: str, **extra: str) -> Proc:
    env = stack.service_env(None, **{**telemetry_env(receiver, service), **extra})
    return stack.processes.spawn(service, ["saga-service", service], env)


async def wait_for(predicate: Any, within: float, what: str, stack: Stack) -> None:
    deadline = time.monotonic() + within
    while not await predicate():
        if time.monotonic() > deadline:
            stack.fail(f"{what} did not happen within {within:g}s")
        await asyncio.sleep(0.2)


def json_lines(proc: Proc) -> list[dict[str, Any]]:
    lines = []
    for line in Path(proc.stderr).read_text().splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


async def test_a_compensated_saga_is_one_trace_across_all_services_and_a_restart(
    stack: Stack, receiver: OtlpReceiver
) -> None:
    stack.data_dir.mkdir(parents=True, exist_ok=True)
    first = spawn_orchestrator(stack, receiver, "orchestrator-1")
    services = {s: spawn_service(stack, receiver, s) for s in ("order", "payment", "inventory")}
    await stack.started([first, *services.values()])

    # Tokyo is not served: the last step fails and the three before it are compensated. The
    # shipping service is down, so the saga waits at that step while the orchestrator restarts.
    (sid,) = await submit(stack, [checkout("alice", [(inventory.BOOK, 1)], TOKYO)])

    async def at_shipping() -> bool:
        state = (await stack.states([sid])).get(sid)
        return state is not None and state.current == 3 and state.phase is Phase.AWAITING_REPLY

    await wait_for(at_shipping, 30, "the saga reaching its shipping step", stack)
    first.popen.terminate()
    assert await stack.wait_exit(first, within=20) == 0, first.describe()
    services["shipping"] = spawn_service(stack, receiver, "shipping")
    second = spawn_orchestrator(stack, receiver, "orchestrator-2")
    await stack.started([services["shipping"], second])
    (state,) = (await stack.wait_terminal([sid], within=60)).values()
    assert state.status is SagaStatus.COMPENSATED, state

    stack.processes.stop_all()  # SIGTERM: each exports the spans it still holds
    assert state.trace is not None
    trace_id = state.trace["traceparent"].split("-")[1]
    spans = [s for s in receiver.spans if s.trace_id == trace_id]
    assert {s.trace_id for s in receiver.spans if s.attributes.get("saga.id") == str(sid)} == {
        trace_id
    }, "every span about the saga is in its one trace"
    # the saga's span is sent when it starts (provisional: RUNNING) and again, with the same
    # ids, when it ends; the last one sent is the final one
    (provisional, root) = [s for s in spans if s.name == "saga checkout"]
    assert provisional.span_id == root.span_id
    assert provisional.attributes["saga.status"] == "RUNNING"
    assert provisional.instance == "orchestrator-1"
    spans = [s for s in spans if s is not provisional]
    by_id = {s.span_id: s for s in spans}
    start = by_id[root.parent_id]  # consuming the start request began the trace
    assert start.name == f"process {stack.prefix}.start" and start.parent_id == ""
    assert start.instance == "orchestrator-1"
    assert root.instance == "orchestrator-2", "the saga's span is exported when it ends"
    assert root.attributes["saga.status"] == "COMPENSATED"

    attempts = sorted(
        (s for s in spans if s.name.split(" ")[0] in ("step", "compensate")),
        key=lambda s: s.start,
    )
    order = [s.name for s in attempts if s.attributes["saga.outcome"] != "timed_out"]
    assert order[0] == "step create_order"
    # the charge and the reservation are sent in one transition: their spans start together
    assert sorted(order[1:3]) == ["step charge_payment", "step reserve_inventory"]
    assert order[3:] == [
        "step schedule_shipping",
        "compensate reserve_inventory",
        "compensate charge_payment",
        "compensate create_order",
    ]
    assert all(s.parent_id == root.span_id for s in attempts)
    assert all(s.service == "saga-orchestrator" for s in attempts)

    # Under each attempt: the orchestrator's publish and the participant's process (the
    # command's creation context is the attempt), with under the latter its database commit,
    # the publish of its reply and the orchestrator's process of the reply.
    children: dict[str, list[Span]] = {}
    for s in spans:
        children.setdefault(s.parent_id, []).append(s)
    for attempt in attempts:
        (publish,) = [c for c in children.get(attempt.span_id, []) if c.name.startswith("publish")]
        assert publish.attributes["messaging.system"] == "rabbitmq"
        assert (
            publish.attributes["messaging.message.id"] == attempt.attributes["messaging.message.id"]
        )
        assert publish.attributes["messaging.message.conversation_id"] == str(sid)
        participant = attempt.attributes["saga.step"]
        consumed = [c for c in children.get(attempt.span_id, []) if c.name.startswith("process")]
        assert consumed, f"no participant processed {attempt.name}"
        for process in consumed:
            assert process.service.startswith("saga-"), process
            assert process.attributes["saga.step"] == participant
            below = children.get(process.span_id, [])
            assert any(c.name == "COMMIT sqlite" for c in below), (attempt.name, below)
            replies = [c for c in below if c.name == "publish"]
            assert replies, f"{process.service} published no reply to {attempt.name}"
            handled = [h for h in below if h.name.startswith("process")]
            assert any(
                h.name == f"process {stack.prefix}.replies" and h.service == "saga-orchestrator"
                for h in handled
            ), f"the orchestrator never processed the reply to {attempt.name}"

    # The restart is inside the trace: the shipping command was published by the first
    # orchestrator and its attempt ended (was exported) by the second.
    shipping = next(s for s in attempts if s.name == "step schedule_shipping")
    (publish,) = [c for c in children[shipping.span_id] if c.name.startswith("publish")]
    first_attempt = min(
        (s for s in attempts if s.name == "step schedule_shipping"), key=lambda s: s.start
    )
    assert first_attempt.instance == "orchestrator-2"
    assert {
        c.instance for c in children[first_attempt.span_id] if c.name.startswith("publish")
    } == {"orchestrator-1"}
    assert {s.service for s in spans} >= {f"saga-{s}" for s in SERVICES} | {"saga-orchestrator"}

    # Log lines about the saga carry its ids and its trace, in every process.
    for proc in stack.processes.started:
        about = [e for e in json_lines(proc) if e.get("saga_id") == str(sid)]
        assert about, f"{proc.name} logged nothing about the saga"
        for entry in about:
            assert entry["trace_id"] == trace_id, (proc.name, entry)
            assert len(entry["span_id"]) == 16, (proc.name, entry)
            assert entry["saga_name"] == "checkout", (proc.name, entry)
        stepwise = [e for e in about if e.get("step")]
        assert stepwise, proc.name
        for entry in stepwise:
            assert entry["attempt"] >= 1 and UUID(entry["message_id"]), (proc.name, entry)


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(port: int) -> Samples:
    async with httpx.AsyncClient(timeout=5) as client:
        text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def total(samples: Samples, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


async def test_metrics_after_a_run_agree_with_the_store_and_the_ledgers(stack: Stack) -> None:
    ports = {name: free_port() for name in ("orchestrator", *SERVICES)}
    stack.data_dir.mkdir(parents=True, exist_ok=True)
    procs = [
        stack.processes.spawn(
            "orchestrator",
            ["saga", "run", "--migrate"],
            stack.orchestrator_env(SAGA_METRICS_PORT=str(ports["orchestrator"])),
        ),
        *(
            stack.processes.spawn(
                s, ["saga-service", s], stack.service_env(SAGA_METRICS_PORT=str(ports[s]))
            )
            for s in SERVICES
        ),
    ]
    await stack.started(procs)
    mix = [
        checkout("alice", [(inventory.BOOK, 1)]),
        checkout("alice", [(inventory.LAMP, 1)]),
        checkout("carol", [(inventory.BOOK, 2)]),
        checkout("alice", [(inventory.BOOK, 1)], TOKYO),  # compensated at the last step
        checkout("dave", [(inventory.LAMP, 1)], TOKYO),
    ]
    ids = list(await submit(stack, mix))
    states = await stack.wait_terminal(ids, within=60)
    by_status = Counter(s.status.value.lower() for s in states.values())
    assert by_status["compensated"] >= 2

    async def outbox_drained() -> bool:
        return total(await scrape(ports["orchestrator"]), "saga_outbox_messages") == 0

    await wait_for(outbox_drained, 15, "the outbox gauge reaching 0", stack)
    orchestrator = await scrape(ports["orchestrator"])
    assert total(orchestrator, "saga_started_total", saga_name="checkout") == len(ids)
    for status in ("completed", "compensated", "failed"):
        assert total(orchestrator, "saga_finished_total", status=status) == by_status[status]
        assert (
            total(orchestrator, "saga_duration_seconds_count", status=status) == by_status[status]
        )
    histories = await stack.histories(ids)
    sent = sum(1 for h in histories.values() for e in h if e.kind.value == "command_sent")
    assert total(orchestrator, "saga_step_duration_seconds_count") == sent
    assert total(orchestrator, "saga_relay_published_total") >= sent  # at least once
    assert total(orchestrator, "saga_messages_consumed_total", outcome="applied") >= sent
    # the broker connection: up, and nothing had to be recovered in a quiet run
    assert total(orchestrator, "saga_broker_connected") == 1
    assert total(orchestrator, "saga_broker_reconnects_total") == 0
    assert total(orchestrator, "saga_broker_consumer_repairs_total") == 0

    for service in SERVICES:
        samples = await scrape(ports[service])
        rows = await stack.rows(service, processed)
        final = Counter(r["outcome"] for r in rows)
        for outcome in ("success", "failure"):
            assert (
                total(samples, "saga_participant_commands_total", outcome=outcome) == final[outcome]
            ), service
        assert total(samples, "saga_relay_published_total") >= len(rows), service
        assert total(samples, "saga_broker_connected") == 1, service
        assert total(samples, "saga_broker_reconnects_total") == 0, service
