"""What only the in-memory broker promises (or refuses) beyond the shared contract."""

from __future__ import annotations

import asyncio

import pytest

from saga.core.errors import ConfigError
from saga.transport.broker import IncomingMessage, PublishRefusedError
from saga.transport.memory import MemoryBroker
from saga.transport.topology import Topology
from tests.transport.helpers import PARTICIPANTS, Inbox

TOPOLOGY = Topology(prefix="mem")


async def broker(topology: Topology = TOPOLOGY) -> MemoryBroker:
    b = MemoryBroker()
    await b.declare(topology, PARTICIPANTS)
    return b


def test_it_says_it_is_not_durable() -> None:
    assert MemoryBroker.durable is False
    assert "NOT DURABLE" in (MemoryBroker.__doc__ or "")


async def test_publishers_and_consumers_share_nothing() -> None:
    b = await broker()
    headers = {"k": "v"}
    body = bytearray(b"abc")
    await b.publish_raw(
        exchange="",
        routing_key=TOPOLOGY.start_queue,
        body=bytes(body),
        message_id="1",
        headers=headers,
    )
    headers["k"] = "changed"
    body[0] = ord("X")
    seen: list[IncomingMessage] = []

    async def tamper(message: IncomingMessage) -> None:
        seen.append(message)
        if len(seen) == 1:
            message.headers["k"] = "tampered"  # type: ignore[index]
            await message.nack(requeue=True)
        else:
            await message.ack()

    await b.consume(TOPOLOGY.start_queue, tamper, prefetch=1)
    while len(seen) < 2:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    assert seen[1].body == b"abc"
    assert seen[1].headers == {"k": "v"}
    assert seen[0] is not seen[1]
    await b.close()


async def test_a_quorum_delivery_limit_dead_letters() -> None:
    topology = Topology(prefix="memq", quorum=True, delivery_limit=2)
    b = await broker(topology)
    attempts: list[IncomingMessage] = []

    async def refuse(message: IncomingMessage) -> None:
        attempts.append(message)
        await message.nack(requeue=True)

    dead = Inbox()
    await b.consume(topology.reply_queue, refuse, prefetch=1)
    await b.consume(topology.dead_letter_queue(topology.reply_queue), dead, prefetch=1)
    await b.publish_raw(exchange="", routing_key=topology.reply_queue, body=b"x", message_id="m")
    [copy] = await dead.wait_for(1)
    assert len(attempts) == 3  # the first delivery and two redeliveries
    assert copy.headers["x-first-death-reason"] == "delivery_limit"
    assert b.dead_lettered == 1
    await b.close()


async def test_refusals() -> None:
    b = await broker()
    with pytest.raises(PublishRefusedError, match="no exchange"):
        await b.publish_raw(exchange="nope", routing_key="x", body=b"", message_id=None)
    with pytest.raises(ConfigError, match="declare it first"):
        await b.consume("nope", Inbox(), prefetch=1)
    with pytest.raises(ConfigError, match="PRECONDITION_FAILED"):
        await b.declare(Topology(prefix="mem", quorum=True), PARTICIPANTS)
    await b.close()
    with pytest.raises(PublishRefusedError, match="closed"):
        await b.publish_raw(
            exchange="", routing_key=TOPOLOGY.start_queue, body=b"", message_id=None
        )


async def test_settling_twice_fails() -> None:
    b = await broker()
    inbox = Inbox()
    await b.consume(TOPOLOGY.start_queue, inbox, prefetch=1)
    await b.publish_raw(exchange="", routing_key=TOPOLOGY.start_queue, body=b"", message_id="1")
    [m] = await inbox.wait_for(1)
    with pytest.raises(RuntimeError, match="already settled"):
        await m.ack()
    await b.close()


async def test_a_failing_callback_leaves_its_message_unsettled_until_cancel() -> None:
    b = await broker()
    calls: list[IncomingMessage] = []

    async def boom(message: IncomingMessage) -> None:
        calls.append(message)
        raise ValueError("handler bug")

    consumer = await b.consume(TOPOLOGY.start_queue, boom, prefetch=1)
    await b.publish_raw(exchange="", routing_key=TOPOLOGY.start_queue, body=b"", message_id="1")
    await asyncio.sleep(0.05)
    assert len(calls) == 1
    assert b.depth(TOPOLOGY.start_queue) == (0, 1)
    await consumer.cancel()
    assert b.depth(TOPOLOGY.start_queue) == (1, 0)
    inbox = Inbox()
    await b.consume(TOPOLOGY.start_queue, inbox, prefetch=1)
    [m] = await inbox.wait_for(1)
    assert m.redelivered
    await b.close()


async def test_close_stops_running_callbacks() -> None:
    b = await broker()
    started = asyncio.Event()
    cancelled: list[bool] = []

    async def forever(message: IncomingMessage) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    await b.consume(TOPOLOGY.start_queue, forever, prefetch=1)
    await b.publish_raw(exchange="", routing_key=TOPOLOGY.start_queue, body=b"", message_id="1")
    await started.wait()
    await b.close()
    await b.close()  # idempotent
    assert cancelled == [True]
