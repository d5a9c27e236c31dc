"""The broker's connection recovers within bounds, whatever part of it the broker takes away.

Against the shared RabbitMQ (connected to, never stopped), through a TCP proxy where a test
drops the connection. Each case is one way a consumer can be lost while the process goes on:

* the connection drops and the restore on the new one never answers (what a ``basic.consume``
  on a quorum queue can do during a leader election): the attempt is given up after
  ``RESTORE_TIMEOUT`` and the next one restores everything;
* the broker cancels the consumer (its queue was deleted): it is attached again, and when the
  queue is gone for good the connection is rebuilt, which declares the queue again;
* the broker closes the consumer's channel (a protocol error): a new channel, the same consumer.

Every message published must then be consumed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection

from saga.ports import BrokerStats
from saga.transport.broker import AmqpBroker, IncomingMessage
from saga.transport.topology import Topology
from saga_tools.chaos.proxy import TcpProxy
from tests.conftest import RABBITMQ_URL, require_rabbitmq
from tests.e2e.stack import delete_topology
from tests.transport.helpers import IdInbox, publish_ids

pytestmark = pytest.mark.rabbitmq

PARTICIPANT = "order"


@pytest.fixture
async def proxy() -> AsyncIterator[TcpProxy]:
    require_rabbitmq()
    upstream = urlsplit(RABBITMQ_URL)
    async with TcpProxy(upstream.hostname or "127.0.0.1", upstream.port or 5672) as value:
        yield value


@pytest.fixture
async def topology(unique: str) -> AsyncIterator[Topology]:
    value = Topology(prefix=f"link-{unique}")
    try:
        yield value
    finally:
        await delete_topology(RABBITMQ_URL, value.prefix)


@pytest.fixture
async def broker(proxy: TcpProxy, topology: Topology) -> AsyncIterator[AmqpBroker]:
    value = await AmqpBroker.connect(proxy.url(RABBITMQ_URL))
    await value.declare(topology, [PARTICIPANT])
    try:
        yield value
    finally:
        await value.close()


async def publish(broker: AmqpBroker, topology: Topology, ids: list[str]) -> None:
    await publish_ids(broker, topology, PARTICIPANT, ids, within=30)


async def test_a_restore_that_never_answers_is_given_up_and_done_again(
    broker: AmqpBroker, proxy: TcpProxy, topology: Topology, monkeypatch: pytest.MonkeyPatch
) -> None:
    link = broker.link
    monkeypatch.setattr(link, "RESTORE_TIMEOUT", 1.0)
    inbox = IdInbox()
    await broker.consume(topology.command_queue(PARTICIPANT), inbox, prefetch=10)
    await publish(broker, topology, ["before"])
    await inbox.wait_for({"before"}, 10)

    restore = link._restore
    assert restore is not None
    calls: list[int] = []

    async def hangs_once(connection: AbstractConnection, generation: int) -> None:
        calls.append(generation)
        if len(calls) == 1:
            await asyncio.Event().wait()  # the broker never answers this time
        await restore(connection, generation)

    link.on_restore(hangs_once)
    assert proxy.drop_connections() >= 1
    after = [f"after-{n}" for n in range(20)]
    await publish(broker, topology, after)
    await inbox.wait_for({"before", *after}, 20)
    assert len(calls) == 2 and link.reconnects == 1, (calls, link.reconnects)
    assert broker.stats() == BrokerStats(connected=True, reconnects=1, consumer_repairs=0)


async def test_a_consumer_the_broker_cancels_is_attached_again(
    broker: AmqpBroker, topology: Topology
) -> None:
    inbox = IdInbox()
    queue = topology.command_queue(PARTICIPANT)
    consumer = await broker.consume(queue, inbox, prefetch=10)
    await publish(broker, topology, ["before"])
    await inbox.wait_for({"before"}, 10)

    async with await aio_pika.connect(RABBITMQ_URL) as admin:
        channel = await admin.channel()
        await channel.queue_delete(queue)  # cancels our consumer
    # nobody declares the queue again: a re-attach finds no queue, the link rebuilds the
    # connection, and its restore declares the topology, queue included
    after = [f"after-{n}" for n in range(20)]
    await publish(broker, topology, after)
    await inbox.wait_for({"before", *after}, 30)
    assert broker.link.reconnects == 1
    assert getattr(consumer, "repairs", None) == 0


async def test_a_consumer_whose_channel_the_broker_closes_gets_a_new_one(
    broker: AmqpBroker, topology: Topology
) -> None:
    inbox = IdInbox()
    broke: list[str] = []

    async def breaks_once(message: IncomingMessage) -> None:
        if not broke and message.message_id == "poison":
            broke.append("once")
            # acking a delivery tag the broker never sent is a channel error (406): the broker
            # closes the channel, and with it the consumer
            channel = message.channel  # type: ignore[attr-defined]
            await channel.basic_ack(delivery_tag=999_999)
            return
        await inbox(message)

    consumer = await broker.consume(topology.command_queue(PARTICIPANT), breaks_once, prefetch=1)
    await publish(broker, topology, ["poison"])
    after = [f"after-{n}" for n in range(20)]
    await publish(broker, topology, after)
    # "poison" comes again (it was never acked), now acked like the rest
    await inbox.wait_for({"poison", *after}, 20)
    assert broke == ["once"]
    assert getattr(consumer, "repairs", None) == 1
    assert broker.stats() == BrokerStats(connected=True, reconnects=0, consumer_repairs=1)


class BrokenLog:
    """A logger whose every call fails, as one writing to a closed pipe would."""

    def __getattr__(self, _name: str) -> object:
        def fail(*_args: object, **_kwargs: object) -> None:
            raise ValueError("I/O operation on closed file")

        return fail


async def test_recovery_goes_on_when_the_log_sink_is_broken(
    broker: AmqpBroker, proxy: TcpProxy, topology: Topology, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("saga.transport.link.log", BrokenLog())
    inbox = IdInbox()
    await broker.consume(topology.command_queue(PARTICIPANT), inbox, prefetch=10)
    assert proxy.drop_connections() >= 1
    after = [f"after-{n}" for n in range(20)]
    await publish(broker, topology, after)
    await inbox.wait_for(set(after), 20)
    assert broker.link.reconnects == 1


async def test_a_repair_lets_the_deliveries_running_on_the_old_channel_finish(
    broker: AmqpBroker, topology: Topology
) -> None:
    inbox = IdInbox()
    started, finished = asyncio.Event(), asyncio.Event()
    interrupted: list[BaseException] = []

    async def slow_then_ack(message: IncomingMessage) -> None:
        if message.message_id != "slow":
            await inbox(message)
            return
        started.set()
        try:
            await asyncio.sleep(2.5)  # past the repair, which comes after one second
        except BaseException as exc:
            interrupted.append(exc)
            raise
        finished.set()
        await message.ack()

    queue = topology.command_queue(PARTICIPANT)
    consumer = await broker.consume(queue, slow_then_ack, prefetch=10)
    await publish(broker, topology, ["slow"])
    await asyncio.wait_for(started.wait(), 10)
    async with await aio_pika.connect(RABBITMQ_URL) as admin:
        channel = await admin.channel()
        await channel.queue_delete(queue)  # the broker cancels our consumer
    await broker.declare(topology, [PARTICIPANT])  # and the queue is back at once
    await asyncio.wait_for(finished.wait(), 10)
    assert not interrupted
    after = [f"after-{n}" for n in range(20)]
    await publish(broker, topology, after)
    await inbox.wait_for(set(after), 20)
    assert getattr(consumer, "repairs", None) == 1 and broker.link.reconnects == 0
