"""docs/protocol.md is the contract a participant in another language is written from: its
exchange and queue tables, declared literally on a real broker, must agree with what our own
code declares, in either order and with either queue type; otherwise RabbitMQ would close the
foreign client's channel with PRECONDITION_FAILED."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from saga.transport.broker import AmqpBroker
from saga.transport.topology import Topology
from tests.conftest import require_rabbitmq

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
PARTICIPANT = "flights"


@dataclass(frozen=True)
class Documented:
    exchanges: list[dict[str, Any]]
    queues: list[dict[str, Any]]


def _rows(section: str) -> list[list[str]]:
    text = DOC.read_text(encoding="utf-8")
    body = text.split(f"### {section}\n", 1)[1].split("\n#", 1)[0]
    rows = [line for line in body.splitlines() if line.startswith("| `")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]


def _name(cell: str, prefix: str) -> str:
    found = re.fullmatch(r"`([^`]+)`", cell)
    assert found, cell
    return found.group(1).format(prefix=prefix, participant=PARTICIPANT)


def _arguments(cell: str, prefix: str) -> dict[str, Any]:
    if cell == "none":
        return {}
    pairs = re.findall(r"`([^`=]+)=([^`]+)`", cell)
    assert pairs, cell
    return {
        key: int(value) if value.isdigit() else value.format(prefix=prefix, participant=PARTICIPANT)
        for key, value in pairs
    }


def documented(prefix: str, *, quorum: bool) -> Documented:
    exchanges = [
        {
            "name": _name(name, prefix),
            "type": kind,
            "durable": durable == "true",
            "auto_delete": auto_delete == "true",
            "internal": internal == "true",
            "arguments": _arguments(arguments, prefix),
        }
        for name, kind, durable, auto_delete, internal, arguments in _rows("Exchanges")
    ]
    queues = []
    for name, classic, quorum_args, bound in _rows("Queues"):
        binding = re.findall(r"`([^`]+)` with routing key `([^`]+)`", bound)
        queues.append(
            {
                "name": _name(name, prefix),
                "arguments": _arguments(quorum_args if quorum else classic, prefix),
                "bindings": [
                    (e.format(prefix=prefix), k.format(prefix=prefix, participant=PARTICIPANT))
                    for e, k in binding
                ],
            }
        )
    return Documented(exchanges, queues)


async def declare_as_documented(url: str, doc: Documented) -> None:
    """What a client in another language does with the tables: declare, literally."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        for e in doc.exchanges:
            await channel.declare_exchange(
                e["name"],
                aio_pika.ExchangeType(e["type"]),
                durable=e["durable"],
                auto_delete=e["auto_delete"],
                internal=e["internal"],
                arguments=e["arguments"] or None,
            )
        for q in doc.queues:
            queue = await channel.declare_queue(
                q["name"],
                durable=True,
                exclusive=False,
                auto_delete=False,
                arguments=q["arguments"] or None,
            )
            for exchange, key in q["bindings"]:
                await queue.bind(exchange, routing_key=key)


async def declare_as_we_do(url: str, prefix: str, *, quorum: bool) -> None:
    broker = await AmqpBroker.connect(url)
    try:
        await broker.declare(Topology(prefix=prefix, quorum=quorum), [PARTICIPANT])
    finally:
        await broker.close()


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    url = require_rabbitmq()
    name = f"doc-{uuid.uuid4().hex[:10]}"
    yield name
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        for q in documented(name, quorum=False).queues:
            await channel.queue_delete(q["name"])
        for e in documented(name, quorum=False).exchanges:
            await channel.exchange_delete(e["name"])


def test_the_tables_name_every_exchange_and_queue_our_code_declares() -> None:
    for quorum in (False, True):
        doc = documented("saga", quorum=quorum)
        topology = Topology(prefix="saga", quorum=quorum)
        assert {e["name"]: e["type"] for e in doc.exchanges} == {
            e.name: e.kind for e in topology.exchanges()
        }
        assert {q["name"]: q["arguments"] for q in doc.queues} == {
            q.name: dict(q.arguments) for q in topology.queues([PARTICIPANT])
        }
        assert sorted(b for q in doc.queues for b in q["bindings"]) == sorted(
            (b.exchange, b.routing_key) for b in topology.bindings([PARTICIPANT])
        )


@pytest.mark.parametrize("quorum", [False, True], ids=["classic", "quorum"])
@pytest.mark.parametrize("first", ["documented", "ours"])
async def test_a_client_that_declares_what_the_doc_says_agrees_with_us(
    prefix: str, quorum: bool, first: str
) -> None:
    url = require_rabbitmq()
    doc = documented(prefix, quorum=quorum)
    if first == "documented":
        await declare_as_documented(url, doc)
        await declare_as_we_do(url, prefix, quorum=quorum)
    else:
        await declare_as_we_do(url, prefix, quorum=quorum)
        await declare_as_documented(url, doc)
    # and a second, different declaration is refused: the check can fail
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed):
            await channel.declare_exchange(
                f"{prefix}.commands", aio_pika.ExchangeType.DIRECT, durable=False
            )
