"""Traces as durable as the sagas: a kill -9 at a random moment, a restart, and every saga's
trace is still complete.

The processes run as separate programs exporting over OTLP/HTTP to a receiver in the test, with
the batch span processor's default 5 s delay in the process that is killed: what it held in
memory is gone, so whatever arrives was committed with the work it reports. Each start request
carries the ``traceparent`` of a caller span, so the link to the caller is checked too.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from uuid import UUID

import aio_pika
import aiormq
import pytest

from saga.core.state import HistoryEntry, HistoryKind, SagaState
from saga.protocol.envelope import StartSaga
from saga.telemetry import span_id_for
from saga.transport.topology import Topology
from saga_demo import inventory
from tests.crash.helpers import Proc
from tests.e2e.otlp import OtlpReceiver, Span
from tests.e2e.stack import SERVICES, TOKYO, Stack, checkout, saga_id, start_request
from tests.e2e.test_observability import json_lines, spawn_orchestrator, spawn_service

SAGAS = 40
NAMES = ("orchestrator", *SERVICES)
#: the deployment default: spans wait this long in memory before the batch processor sends them
BATCH_DELAY = {"OTEL_BSP_SCHEDULE_DELAY": "5000"}


@dataclass(frozen=True)
class Caller:
    """The span of the service that asked for a saga (it is not exported: the caller is this
    test), named in the start request's ``traceparent``."""

    trace_id: str
    span_id: str

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-01"


async def publish_traced(stack: Stack, starts: Sequence[tuple[StartSaga, Caller]]) -> None:
    """Publish start requests, each with its caller's ``traceparent``; confirmed."""
    queue = Topology(prefix=stack.prefix).start_queue
    connection = await aio_pika.connect(stack.rabbitmq_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        confirms = await asyncio.gather(
            *(
                channel.default_exchange.publish(
                    aio_pika.Message(
                        s.model_dump_json().encode(),
                        message_id=str(s.message_id),
                        content_type="application/json",
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        headers={"traceparent": caller.traceparent},
                    ),
                    routing_key=queue,
                    mandatory=True,
                )
                for s, caller in starts
            )
        )
    for confirm in confirms:
        assert isinstance(confirm, aiormq.spec.Basic.Ack), f"start not confirmed: {confirm}"


async def submit_traced(stack: Stack, n: int, first: int = 0) -> dict[UUID, Caller]:
    """``n`` checkouts (every fifth one compensated: Tokyo is not served), each started by a
    caller span of its own; saga id -> caller."""
    starts: list[tuple[StartSaga, Caller]] = []
    for i in range(first, first + n):
        lines = [(inventory.BOOK, 1)]
        order = checkout("alice", lines) if i % 5 else checkout("alice", lines, TOKYO)
        caller = Caller(f"{random.getrandbits(128):032x}", f"{random.getrandbits(64) or 1:016x}")
        starts.append((start_request(f"{stack.prefix}-{i}", order), caller))
    await publish_traced(stack, starts)
    return {saga_id(s.key or ""): c for s, c in starts}


async def kill_at_random(
    stack: Stack,
    proc: Proc,
    ids: Iterable[UUID],
    seed: int,
    then: Callable[[], Awaitable[dict[UUID, Caller]]],
) -> tuple[int, dict[UUID, Caller]]:
    """SIGKILL ``proc`` once a random number (from ``seed``) of the sagas ``ids`` have ended;
    ``then`` starts more, confirmed just before the kill, so the kill always finds sagas in
    flight however fast the first ones ran. Returns how many had ended, and ``then``'s."""
    ids = list(ids)
    wanted = random.Random(seed).randint(3, len(ids) - 1)
    for _ in range(600):
        states = await stack.states(ids)
        ended = sum(1 for s in states.values() if s.status.is_terminal)
        if ended >= wanted:
            break
        await asyncio.sleep(0.05)
    else:
        stack.fail(f"{wanted} sagas did not end in time")
    late = await then()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.popen.wait(timeout=10)
    return ended, late


def check_traces(
    stack: Stack,
    receiver: OtlpReceiver,
    states: Mapping[UUID, SagaState],
    histories: Mapping[UUID, list[HistoryEntry]],
    callers: Mapping[UUID, Caller],
) -> dict[str, int]:
    """Every saga's trace complete: its root under the caller's span, an attempt span for
    every command sent, and no span whose parent never arrived. Returns counts."""
    received: dict[str, Span] = {}
    for s in receiver.spans:
        # a span sent twice (a re-export, the saga span provisional then final) is one span;
        # the last one sent is the one kept
        received[s.span_id] = s
    upstream = {c.span_id for c in callers.values()}
    counts = {"sagas": 0, "spans": 0, "attempts": 0, "orphans": 0}
    problems: list[str] = []
    for sid, state in states.items():
        assert state.trace is not None
        trace_id = state.trace["traceparent"].split("-")[1]
        spans = [s for s in received.values() if s.trace_id == trace_id]
        counts["sagas"] += 1
        counts["spans"] += len(spans)
        orphans = [s for s in spans if s.parent_id and s.parent_id not in received]
        orphans = [s for s in orphans if s.parent_id not in upstream]
        counts["orphans"] += len(orphans)
        problems += [f"{sid}: {s.name} ({s.service}) has no parent {s.parent_id}" for s in orphans]
        roots = [s for s in spans if s.name == "saga checkout"]
        if len(roots) != 1 or roots[0].attributes.get("saga.status") != state.status.value:
            problems.append(f"{sid}: saga span {[r.attributes for r in roots]}")
            continue
        start = received.get(roots[0].parent_id)
        if start is None or start.name != f"process {stack.prefix}.start":
            problems.append(f"{sid}: the saga span's parent is {start}")
        elif start.parent_id != callers[sid].span_id:
            problems.append(f"{sid}: the start's parent is {start.parent_id}, not the caller")
        sent = [h.message_id for h in histories[sid] if h.kind is HistoryKind.COMMAND_SENT]
        for message_id in sent:
            assert message_id is not None
            attempt = received.get(f"{span_id_for(message_id):016x}")
            if attempt is None or attempt.attributes.get("messaging.message.id") != str(message_id):
                problems.append(f"{sid}: no span for the attempt of command {message_id}")
            else:
                counts["attempts"] += 1
                if attempt.parent_id != roots[0].span_id:
                    problems.append(f"{sid}: {attempt.name} is not under the saga span")
    assert not problems, f"{len(problems)} problems ({counts}):\n" + "\n".join(problems[:40])
    return counts


def check_log_lines(proc: Proc, receiver: OtlpReceiver, ids: Iterable[UUID]) -> int:
    """Every history line the process logged about the sagas leads to a span that arrived;
    returns how many lines were checked."""
    kinds = {k.value for k in HistoryKind}
    arrived = {s.span_id for s in receiver.spans}
    wanted = {str(i) for i in ids}
    lines = [
        e
        for e in json_lines(proc)
        if e.get("saga_id") in wanted and e.get("event") in kinds and "span_id" in e
    ]
    missing = [e for e in lines if e["span_id"] not in arrived]
    assert not missing, f"{len(missing)} of {len(lines)} lines name spans that never arrived"
    return len(lines)


@pytest.mark.parametrize("victim", ["orchestrator", "payment"])
async def test_a_kill_9_loses_no_span_of_committed_work(
    stack: Stack, receiver: OtlpReceiver, victim: str
) -> None:
    """Kill -9 the orchestrator, or (separately) a participant, at a random moment of a
    load; restart it; every saga ends and every saga's trace is complete."""
    seed = random.randrange(1_000_000)
    stack.data_dir.mkdir(parents=True, exist_ok=True)

    def spawn(name: str, instance: str, **extra: str) -> Proc:
        if name == "orchestrator":
            return spawn_orchestrator(stack, receiver, instance, **extra)
        return spawn_service(stack, receiver, name, **extra)

    procs = {n: spawn(n, f"{n}-1", **(BATCH_DELAY if n == victim else {})) for n in NAMES}
    await stack.started(procs.values())

    callers = await submit_traced(stack, SAGAS // 2)
    ended, late = await kill_at_random(
        stack,
        procs[victim],
        callers,
        seed,
        lambda: submit_traced(stack, SAGAS - SAGAS // 2, first=SAGAS // 2),
    )
    callers |= late

    again = spawn(victim, f"{victim}-2")
    await stack.started([again])
    states = await stack.wait_terminal(list(callers), within=120)
    histories = await stack.histories(list(callers))
    stack.processes.stop_all()  # SIGTERM: the survivors export what they hold

    counts = check_traces(stack, receiver, states, histories, callers)
    assert counts["sagas"] == SAGAS and counts["orphans"] == 0, (seed, ended, counts)
    sent = sum(1 for h in histories.values() for e in h if e.kind is HistoryKind.COMMAND_SENT)
    assert counts["attempts"] == sent, (seed, ended, counts)
    if victim == "orchestrator":
        assert check_log_lines(procs[victim], receiver, callers) > 0
