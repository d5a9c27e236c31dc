"""The log lines written while the pipeline handles a message carry that message's fields and
the ids of the span current at the time; lines written after it carry neither."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
import structlog
from pydantic import BaseModel

from saga.logs import configure_logging
from saga.messaging.pipeline import Pipeline
from saga.messaging.poison import PoisonGuard
from saga.telemetry import Metrics, Tracing
from saga.transport.broker import IncomingMessage
from saga.transport.memory import MemoryBroker
from saga.transport.topology import Topology


class Note(BaseModel):
    saga_id: str
    step: str


async def _up() -> bool:
    return True


async def test_lines_logged_while_a_message_is_handled_carry_its_fields_and_trace_ids(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("INFO")
    log = structlog.get_logger("test")
    handled = asyncio.Event()

    async def handle(note: Note, _message: IncomingMessage) -> str:
        log.info("handling", step="own value wins")

        async def later() -> None:  # a task started by the handler inherits the fields
            log.info("from_a_task")

        await asyncio.create_task(later())
        handled.set()
        return "applied"

    topology = Topology(prefix=f"logs-{uuid.uuid4().hex[:8]}")
    broker = MemoryBroker()
    try:
        await broker.declare(topology, ["alpha"])
        pipeline = Pipeline(
            topology.command_queue("alpha"),
            Note,
            handle,
            broker=broker,
            topology=topology,
            tracing=Tracing(),
            metrics=Metrics(),
            poison=PoisonGuard(3, _up),
            max_bytes=10_000,
            log_fields=lambda n: {"saga_id": n.saga_id, "step": n.step},
        )
        await broker.consume(topology.command_queue("alpha"), pipeline, prefetch=1)
        await broker.publish_raw(
            exchange="",
            routing_key=topology.command_queue("alpha"),
            body=b'{"saga_id": "s-1", "step": "reserve"}',
            message_id="m-1",
        )
        await asyncio.wait_for(handled.wait(), 5)
        log.info("afterwards")
    finally:
        await broker.close()
        structlog.reset_defaults()
    lines = {
        line["event"]: line
        for line in map(json.loads, capsys.readouterr().err.splitlines())
        if line.get("logger") is None and line["event"] in ("handling", "from_a_task", "afterwards")
    }
    assert lines["handling"]["saga_id"] == "s-1"
    assert lines["handling"]["step"] == "own value wins"
    assert lines["from_a_task"]["step"] == "reserve"
    assert len(lines["handling"]["trace_id"]) == 32 and len(lines["handling"]["span_id"]) == 16
    assert lines["from_a_task"]["trace_id"] == lines["handling"]["trace_id"]
    assert "saga_id" not in lines["afterwards"] and "trace_id" not in lines["afterwards"]
