"""A broker per test (in memory, or RabbitMQ under a prefix of its own) and a recording
consumer callback."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import aio_pika
import pytest

from saga.transport.broker import AmqpBroker, Broker, IncomingMessage
from saga.transport.memory import MemoryBroker
from saga.transport.topology import Topology
from tests.conftest import require_rabbitmq

PARTICIPANTS = ("payment", "inventory")


@dataclass
class World:
    kind: str
    broker: Broker
    topology: Topology

    async def send(self, queue: str, body: bytes = b"{}", **fields: Any) -> str:
        """Publish ``body`` straight into ``queue`` through the default exchange."""
        message_id = str(fields.pop("message_id", uuid.uuid4()))
        await self.broker.publish_raw(
            exchange="", routing_key=queue, body=body, message_id=message_id, **fields
        )
        return message_id


@asynccontextmanager
async def world(kind: str, unique: str) -> AsyncIterator[World]:
    topology = Topology(prefix=f"bt-{unique}")
    broker: Broker
    url = ""
    if kind == "memory":
        broker = MemoryBroker()
    else:
        url = require_rabbitmq()
        broker = await AmqpBroker.connect(url)
    try:
        await broker.declare(topology, PARTICIPANTS)
        yield World(kind, broker, topology)
    finally:
        await broker.close()
        if kind == "amqp":
            await delete_topology(url, topology)


async def delete_topology(url: str, topology: Topology) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        for queue in topology.queues(PARTICIPANTS):
            channel = await connection.channel()  # a failed delete closes its channel
            with contextlib.suppress(Exception):
                await channel.queue_delete(queue.name)
        for exchange in topology.exchanges():
            channel = await connection.channel()
            with contextlib.suppress(Exception):
                await channel.exchange_delete(exchange.name)


class Inbox:
    """A consumer callback that records every delivery; acks at once when ``ack`` is set."""

    def __init__(self, *, ack: bool = True):
        self.ack = ack
        self.messages: list[IncomingMessage] = []

    async def __call__(self, message: IncomingMessage) -> None:
        self.messages.append(message)
        if self.ack:
            await message.ack()

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[IncomingMessage]:  # noqa: ASYNC109
        deadline = time.monotonic() + timeout
        while len(self.messages) < count:
            assert time.monotonic() < deadline, f"{len(self.messages)} of {count} delivered"
            await asyncio.sleep(0.01)
        return self.messages

    async def quiet(self, count: int, seconds: float = 0.5) -> None:
        """Nothing beyond ``count`` deliveries arrives within ``seconds``."""
        await asyncio.sleep(seconds)
        assert len(self.messages) == count, [m.message_id for m in self.messages]


class IdInbox:
    """The message ids a consumer received (and how many deliveries); acks every one."""

    def __init__(self) -> None:
        self.ids: set[str] = set()
        self.deliveries = 0

    async def __call__(self, message: IncomingMessage) -> None:
        self.deliveries += 1
        if message.message_id is not None:
            self.ids.add(message.message_id)
        await message.ack()

    async def wait_for(self, ids: set[str], within: float) -> None:
        deadline = time.monotonic() + within
        while not ids <= self.ids:
            if time.monotonic() > deadline:
                pytest.fail(f"{len(ids - self.ids)} of {len(ids)} messages never consumed")
            await asyncio.sleep(0.05)


async def publish_ids(
    broker: Broker, topology: Topology, participant: str, ids: list[str], within: float
) -> None:
    """Publish ``ids`` to ``participant``'s command queue, each retried until confirmed (as a
    relay retries: while the connection is down, or the queue is missing or has no leader)."""
    deadline = time.monotonic() + within
    for message_id in ids:
        while True:
            try:
                await broker.publish_raw(
                    exchange=topology.commands_exchange,
                    routing_key=participant,
                    body=b"{}",
                    message_id=message_id,
                )
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)


def text(headers: Any) -> dict[str, str]:
    return {
        str(k): v.decode() if isinstance(v, bytes) else str(v) for k, v in (headers or {}).items()
    }


def every_property() -> dict[str, Any]:
    """A value for every property of a message (fresh ids each call), for the encoders' and
    decoders' checks against pamqp."""
    return {
        "content_type": "application/json",
        "content_encoding": "utf-8",
        "headers": {"nested": {"list": [1, "two", {"x": Decimal("1.50")}], "flag": True}},
        "delivery_mode": 2,
        "priority": 9,
        "correlation_id": str(uuid.uuid4()),
        "reply_to": "replies",
        "expiration": "60000",
        "message_id": str(uuid.uuid4()),
        "timestamp": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        "message_type": "saga.reply",
        "user_id": "guest",
        "app_id": "saga",
    }
