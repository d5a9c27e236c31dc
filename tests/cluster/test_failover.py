"""The broker connection over several addresses: first reachable one, then any after a loss.

Two set-ups. Fast: two TCP proxies in front of the shared broker stand for two nodes, and one
of them goes away (the shared broker itself is only connected to, never stopped). Real: the
private 3-node cluster with quorum queues, whose first node is SIGKILLed while a consumer on it
is busy. Either way :class:`~saga.transport.broker.AmqpBroker` must end up on another address
with its consumer back, and every message published before, during and after the loss must be
consumed (at least once: a delivery unacked at the loss comes again). Also: the publisher
answers a negative confirm with a new channel.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest

from saga.transport.amqp import Publisher, PublishRefusedError, connect
from saga.transport.broker import AmqpBroker
from saga.transport.topology import Topology
from saga_tools.chaos.cluster import RabbitCluster
from saga_tools.chaos.node import free_port
from saga_tools.chaos.proxy import TcpProxy
from tests.conftest import RABBITMQ_URL, require_rabbitmq
from tests.e2e.stack import delete_topology
from tests.transport.helpers import IdInbox, publish_ids

pytestmark = pytest.mark.rabbitmq

PARTICIPANT = "order"  # a real participant name, so delete_topology cleans its queue


async def publish(
    broker: AmqpBroker, topology: Topology, ids: list[str], within: float = 60
) -> None:
    await publish_ids(broker, topology, PARTICIPANT, ids, within)


def node_port(broker: AmqpBroker) -> int | None:
    """The AMQP port of the address ``broker`` is connected to (or tries next)."""
    return broker.link.port


async def wait_connected(broker: AmqpBroker, away_from: int, within: float) -> float:
    """Seconds until ``broker`` is connected again, on another port than ``away_from``."""
    began = time.monotonic()
    while not (broker.is_connected() and node_port(broker) != away_from):
        if time.monotonic() - began > within:
            pytest.fail(f"not reconnected elsewhere than port {away_from} within {within:g}s")
        await asyncio.sleep(0.05)
    return time.monotonic() - began


# --- two proxies in front of the shared broker --------------------------------------------


@pytest.fixture
async def proxies() -> AsyncIterator[tuple[TcpProxy, TcpProxy]]:
    require_rabbitmq()
    upstream = urlsplit(RABBITMQ_URL)
    pair = tuple(TcpProxy(upstream.hostname or "127.0.0.1", upstream.port or 5672) for _ in "ab")
    for proxy in pair:
        await proxy.start()
    try:
        yield pair[0], pair[1]
    finally:
        for proxy in pair:
            await proxy.close()


@pytest.fixture
async def shared_topology(unique: str) -> AsyncIterator[Topology]:
    topology = Topology(prefix=f"failover-{unique}")
    try:
        yield topology
    finally:
        await delete_topology(RABBITMQ_URL, topology.prefix)


async def test_the_first_reachable_address_is_used(proxies: tuple[TcpProxy, TcpProxy]) -> None:
    _, b = proxies
    nothing = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    broker = await AmqpBroker.connect(f"{nothing},{b.url(RABBITMQ_URL)}", connect_timeout=5)
    try:
        assert node_port(broker) == b.port
        assert broker.link.node == f"amqp://guest:***@127.0.0.1:{b.port}/"
    finally:
        await broker.close()


async def test_a_lost_address_fails_over_to_the_next_with_its_consumer(
    proxies: tuple[TcpProxy, TcpProxy], shared_topology: Topology
) -> None:
    a, b = proxies
    topology = shared_topology
    broker = await AmqpBroker.connect(f"{a.url(RABBITMQ_URL)},{b.url(RABBITMQ_URL)}")
    try:
        assert node_port(broker) == a.port
        await broker.declare(topology, [PARTICIPANT])
        inbox = IdInbox()
        await broker.consume(topology.command_queue(PARTICIPANT), inbox, prefetch=10)
        before = [f"before-{n}" for n in range(20)]
        await publish(broker, topology, before)
        await inbox.wait_for(set(before), 10)

        await a.close()  # the address is gone for good: a reconnect to it would be refused
        took = await wait_connected(broker, a.port, within=10)
        after = [f"after-{n}" for n in range(20)]
        await publish(broker, topology, after)
        await inbox.wait_for(set(before + after), 10)
        assert b.active >= 1 and node_port(broker) == b.port
        print(f"\nreconnected through the second address {took:.2f}s after the first went away")
    finally:
        await broker.close()


async def test_a_nack_renews_the_publishing_channel(unique: str) -> None:
    """A nacked publish is refused and the next one goes out on a fresh channel (after a
    failover, RabbitMQ 3.10 can leave a channel nacking a quorum queue for good)."""
    url = require_rabbitmq()
    queue = f"failover-{unique}.full"
    link = await connect(url)
    publisher = Publisher(link)
    connection, _ = await link.wait(5)
    setup = await connection.channel()
    try:
        await setup.declare_queue(  # full at once: every publish to it is nacked
            queue, arguments={"x-max-length": 0, "x-overflow": "reject-publish"}
        )
        first, _ = await publisher._open()
        with pytest.raises(PublishRefusedError, match="did not confirm"):
            await publisher.publish_raw(exchange="", routing_key=queue, body=b"", message_id="m")
        second, _ = await publisher._open()
        assert second is not first and not second.is_closed
    finally:
        await setup.queue_delete(queue)
        await publisher.close()
        await link.close()
    assert first.is_closed  # the retired channel is closed by close(), not left behind


# --- the private cluster ----------------------------------------------------------------


async def test_a_killed_node_fails_over_to_another_with_quorum_queues(
    healthy_cluster: RabbitCluster, unique: str
) -> None:
    cluster = healthy_cluster
    topology = Topology(prefix=f"failover-{unique}", quorum=True)
    first = cluster.nodes[0]
    broker = await AmqpBroker.connect(cluster.urls)
    try:
        assert node_port(broker) == first.port
        await broker.declare(topology, [PARTICIPANT])
        inbox = IdInbox()
        await broker.consume(topology.command_queue(PARTICIPANT), inbox, prefetch=10)
        before = [f"before-{n}" for n in range(100)]
        await publish(broker, topology, before)
        await inbox.wait_for(set(before), 30)

        killed_at = time.monotonic()
        await asyncio.to_thread(cluster.kill, 0)
        await wait_connected(broker, first.port, within=30)
        reconnected = time.monotonic() - killed_at
        during = [f"during-{n}" for n in range(100)]
        await publish(broker, topology, during)
        await inbox.wait_for(set(before + during), 60)
        served = time.monotonic() - killed_at

        await asyncio.to_thread(cluster.restart, 0)
        after = [f"after-{n}" for n in range(100)]
        await publish(broker, topology, after)
        await inbox.wait_for(set(before + during + after), 60)
        assert node_port(broker) in {n.port for n in cluster.nodes[1:]}
        print(
            f"\nnode 1 killed: reconnected to port {node_port(broker)} after "
            f"{reconnected:.2f}s, 100 messages published and consumed through it "
            f"{served:.2f}s after the kill; {inbox.deliveries} deliveries of 300 messages"
        )
    finally:
        await broker.close()
