"""The AMQP publisher's batches on RabbitMQ: each refusal is its own message's."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import aiormq
import pytest

from saga.transport.amqp import Outgoing, Publisher, PublishRefusedError, _Confirm, connect
from tests.conftest import require_rabbitmq

pytestmark = pytest.mark.rabbitmq


def outgoing(queue: str, n: int) -> Outgoing:
    properties = aiormq.spec.Basic.Properties(
        delivery_mode=2, message_id=uuid.uuid4().hex, timestamp=datetime.now(UTC)
    )
    return Outgoing("", queue, b"%d" % n, properties)


async def test_a_nack_and_a_return_in_a_batch_refuse_only_their_own_message(unique: str) -> None:
    """In one batch, a message to a full queue (nacked) and one to no queue (returned) are
    refused, each on its own; every other message is confirmed and queued in order, and the
    channel's confirm and return lookups keep nothing of the batch."""
    link = await connect(require_rabbitmq())
    publisher = Publisher(link)
    connection, _ = await link.wait(5)
    setup = await connection.channel()
    ok, full = f"pub-{unique}.ok", f"pub-{unique}.full"
    try:
        queue = await setup.declare_queue(ok)
        await setup.declare_queue(
            full, arguments={"x-max-length": 0, "x-overflow": "reject-publish"}
        )
        batch = [outgoing(ok, n) for n in range(300)]
        batch[100] = outgoing(full, 100)
        batch[200] = outgoing(f"pub-{unique}.nowhere", 200)
        _, underlay = await publisher._open()
        results = await publisher.publish_many(batch)

        assert [i for i, r in enumerate(results) if r is not None] == [100, 200]
        assert isinstance(results[100], PublishRefusedError)
        assert "did not confirm" in str(results[100])
        assert isinstance(results[200], PublishRefusedError)
        assert "returned" in str(results[200])
        assert underlay.message_id_delivery_tag == {}
        assert not [c for c in underlay.confirmations.values() if isinstance(c, _Confirm)]

        got = [await queue.get(timeout=5) for _ in range(298)]
        assert [m.body for m in got] == [m.body for i, m in enumerate(batch) if i not in (100, 200)]
        assert await queue.get(fail=False) is None

        # the nack retired the channel; the next batch goes out on a fresh one
        again = [outgoing(ok, n) for n in range(1000, 1010)]
        assert await publisher.publish_many(again) == [None] * 10
        _, fresh = await publisher._open()
        assert fresh is not underlay
    finally:
        await setup.queue_delete(ok)
        await setup.queue_delete(full)
        await publisher.close()
        await link.close()
