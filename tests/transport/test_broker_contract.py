"""The Broker protocol's contract, held by the in-memory broker and by RabbitMQ alike."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest

from saga.ports import OutboxMessage
from saga.transport.broker import IncomingMessage, PublishRefusedError
from saga.transport.topology import DEAD_LETTER_DETAIL, DEAD_LETTER_QUEUE, DEAD_LETTER_REASON
from tests.transport.helpers import Inbox, World, text, world


@pytest.fixture(params=["memory", pytest.param("amqp", marks=pytest.mark.rabbitmq)])
async def w(request: pytest.FixtureRequest, unique: str) -> AsyncIterator[World]:
    async with world(request.param, unique) as value:
        yield value


async def test_a_command_reaches_its_participant_queue_only(w: World) -> None:
    saga_id = uuid.uuid4()
    message = OutboxMessage(
        message_id=uuid.uuid4(),
        saga_id=saga_id,
        exchange=w.topology.commands_exchange,
        routing_key="payment",
        message_type="payment.charge",
        body=b'{"amount": 1}',
        headers={"x-trace": "abc"},
        created_at=datetime.now(UTC),
    )
    payment, inventory = Inbox(), Inbox()
    await w.broker.consume(w.topology.command_queue("payment"), payment, prefetch=10)
    await w.broker.consume(w.topology.command_queue("inventory"), inventory, prefetch=10)
    await w.broker.publish(message)
    [got] = await payment.wait_for(1)
    assert got.body == b'{"amount": 1}'
    assert got.message_id == str(message.message_id)
    assert got.correlation_id == str(saga_id)
    assert got.type == "payment.charge"
    assert got.content_type == "application/json"
    assert text(got.headers) == {"x-trace": "abc"}
    assert not got.redelivered
    await inventory.quiet(0, 0.2)


async def test_the_default_exchange_routes_by_queue_name(w: World) -> None:
    inbox = Inbox()
    await w.broker.consume(w.topology.reply_queue, inbox, prefetch=10)
    sent = await w.send(w.topology.reply_queue, b"reply", content_type="text/plain")
    [got] = await inbox.wait_for(1)
    assert (got.message_id, got.body, got.content_type) == (sent, b"reply", "text/plain")


async def test_an_unroutable_publish_raises(w: World) -> None:
    with pytest.raises(PublishRefusedError):
        await w.broker.publish_raw(
            exchange=w.topology.commands_exchange,
            routing_key="nobody",
            body=b"{}",
            message_id="m1",
        )
    with pytest.raises(PublishRefusedError):
        await w.send(f"{w.topology.prefix}.no-such-queue")
    # the broker still works after a refusal
    inbox = Inbox()
    await w.broker.consume(w.topology.start_queue, inbox, prefetch=1)
    await w.send(w.topology.start_queue)
    await inbox.wait_for(1)


async def test_an_acked_message_is_gone(w: World) -> None:
    first = Inbox()
    consumer = await w.broker.consume(w.topology.start_queue, first, prefetch=10)
    await w.send(w.topology.start_queue)
    await first.wait_for(1)
    await consumer.cancel()
    second = Inbox()
    await w.broker.consume(w.topology.start_queue, second, prefetch=10)
    await second.quiet(0)


async def test_a_requeued_message_comes_back_redelivered(w: World) -> None:
    seen: list[IncomingMessage] = []

    async def nack_first(message: IncomingMessage) -> None:
        seen.append(message)
        if len(seen) == 1:
            await message.nack(requeue=True)
        else:
            await message.ack()

    await w.broker.consume(w.topology.start_queue, nack_first, prefetch=10)
    sent = await w.send(w.topology.start_queue)
    for _ in range(500):
        if len(seen) >= 2:
            break
        await asyncio.sleep(0.01)
    first, again = seen
    assert first.message_id == again.message_id == sent
    assert not first.redelivered
    assert again.redelivered
    await asyncio.sleep(0.3)
    assert len(seen) == 2


async def test_prefetch_bounds_unsettled_deliveries(w: World) -> None:
    inbox = Inbox(ack=False)
    await w.broker.consume(w.topology.start_queue, inbox, prefetch=2)
    sent = [await w.send(w.topology.start_queue) for _ in range(5)]
    await inbox.wait_for(2)
    await inbox.quiet(2, 0.3)
    m = inbox.messages
    await m[0].ack()
    await inbox.wait_for(3)
    await inbox.quiet(3, 0.3)
    await m[1].nack(requeue=True)  # back to the head of the queue: it comes next
    await inbox.wait_for(4)
    await inbox.quiet(4, 0.3)
    assert m[3].message_id == m[1].message_id
    assert m[3].redelivered
    await m[2].ack()
    await m[3].ack()
    await inbox.wait_for(6)
    await inbox.quiet(6, 0.3)
    await m[4].ack()
    await m[5].ack()
    acked = [x.message_id for x in (m[0], m[2], m[3], m[4], m[5])]
    assert sorted(acked) == sorted(sent)
    assert [x.redelivered for x in m] == [False, False, False, True, False, False]


async def test_consumers_take_turns(w: World) -> None:
    a, b = Inbox(ack=False), Inbox(ack=False)
    await w.broker.consume(w.topology.start_queue, a, prefetch=1)
    await w.broker.consume(w.topology.start_queue, b, prefetch=1)
    ids = [await w.send(w.topology.start_queue) for _ in range(2)]
    await a.wait_for(1)
    await b.wait_for(1)
    assert {a.messages[0].message_id, b.messages[0].message_id} == set(ids)
    for m in a.messages + b.messages:
        await m.ack()


async def test_dead_letter_copies_to_the_dlq_with_the_reason(w: World) -> None:
    queue = w.topology.reply_queue
    inbox, dead = Inbox(ack=False), Inbox()
    await w.broker.consume(queue, inbox, prefetch=10)
    await w.broker.consume(w.topology.dead_letter_queue(queue), dead, prefetch=10)
    sent = await w.send(queue, b"garbage", headers={"x-trace": "t1"}, correlation_id="c1")
    [message] = await inbox.wait_for(1)
    await w.broker.dead_letter(
        message, queue=queue, topology=w.topology, reason="invalid_json", detail="x" * 2000
    )
    await message.ack()
    [copy] = await dead.wait_for(1)
    assert (copy.body, copy.message_id, copy.correlation_id) == (b"garbage", sent, "c1")
    headers = text(copy.headers)
    assert headers[DEAD_LETTER_REASON] == "invalid_json"
    assert headers[DEAD_LETTER_DETAIL] == "x" * 1000
    assert headers[DEAD_LETTER_QUEUE] == queue
    assert headers["x-trace"] == "t1"
    await inbox.quiet(1, 0.2)


async def test_a_rejected_message_goes_to_the_dlq(w: World) -> None:
    queue = w.topology.command_queue("inventory")
    dead = Inbox()

    async def reject(message: IncomingMessage) -> None:
        await message.nack(requeue=False)

    await w.broker.consume(queue, reject, prefetch=10)
    await w.broker.consume(w.topology.dead_letter_queue(queue), dead, prefetch=10)
    sent = await w.send(queue, b"no")
    [copy] = await dead.wait_for(1)
    assert (copy.body, copy.message_id) == (b"no", sent)
    assert text(copy.headers)["x-first-death-reason"] == "rejected"
    assert text(copy.headers)["x-first-death-queue"] == queue


async def test_cancel_stops_delivery(w: World) -> None:
    inbox = Inbox()
    consumer = await w.broker.consume(w.topology.start_queue, inbox, prefetch=10)
    await consumer.cancel()
    await consumer.cancel()  # idempotent
    sent = await w.send(w.topology.start_queue)
    await inbox.quiet(0)
    later = Inbox()
    await w.broker.consume(w.topology.start_queue, later, prefetch=10)
    [got] = await later.wait_for(1)
    assert got.message_id == sent
    assert not got.redelivered


async def test_a_running_callback_may_still_settle_after_cancel(w: World) -> None:
    go = asyncio.Event()
    done: list[IncomingMessage] = []

    async def slow(message: IncomingMessage) -> None:
        await go.wait()
        await message.ack()
        done.append(message)

    consumer = await w.broker.consume(w.topology.start_queue, slow, prefetch=10)
    await w.send(w.topology.start_queue)
    await asyncio.sleep(0.3)
    await consumer.cancel()
    go.set()
    for _ in range(500):
        if done:
            break
        await asyncio.sleep(0.01)
    assert done
    later = Inbox()
    await w.broker.consume(w.topology.start_queue, later, prefetch=10)
    await later.quiet(0)


async def test_what_a_cancelled_consumer_left_unsettled_goes_back(w: World) -> None:
    held = Inbox(ack=False)
    consumer = await w.broker.consume(w.topology.start_queue, held, prefetch=10)
    sent = await w.send(w.topology.start_queue)
    await held.wait_for(1)
    await consumer.cancel()
    later = Inbox()
    await w.broker.consume(w.topology.start_queue, later, prefetch=10)
    [got] = await later.wait_for(1)
    assert got.message_id == sent
    assert got.redelivered


async def test_acks_settled_together_leave_nothing_behind_and_a_nack_is_kept_apart(
    w: World,
) -> None:
    """Deliveries settled in one turn of the loop (as a group commit settles its batch): every
    acked one is gone, the one nacked between them comes back, and on RabbitMQ the acks went
    out as a few frames (a ``multiple`` ack for the run in front), not one per message."""
    count, held = 30, asyncio.Event()
    waiting: list[IncomingMessage] = []

    async def hold(message: IncomingMessage) -> None:
        waiting.append(message)
        if len(waiting) == count:
            held.set()
        await held.wait()

    consumer = await w.broker.consume(w.topology.start_queue, hold, prefetch=count)
    sent = [await w.send(w.topology.start_queue, message_id=f"m{n}") for n in range(count)]
    await asyncio.wait_for(held.wait(), 10)
    frames_before = w.broker.counts.ack_frames
    nacked = waiting[count // 2]
    for message in waiting:  # all in one turn, the nack in the middle
        if message is nacked:
            await message.nack(requeue=True)
        else:
            await message.ack()
    await asyncio.sleep(0.3)
    if w.kind == "amqp":
        frames = w.broker.counts.ack_frames - frames_before
        assert 1 <= frames <= 3, frames  # the run before the nack, the rest after it
    await consumer.cancel()
    again = Inbox()
    await w.broker.consume(w.topology.start_queue, again, prefetch=count)
    [back] = await again.wait_for(1)
    assert back.message_id == nacked.message_id and back.redelivered
    await again.quiet(1)
    assert set(sent) == {m.message_id for m in waiting}  # the nacked one may come twice


async def test_a_batch_is_delivered_in_order_and_refusals_are_its_own(w: World) -> None:
    """publish_many: every routable message of a batch arrives, in order, with its fields; an
    unroutable one in the middle is refused on its own; a batch to a missing exchange (which
    closes the channel on RabbitMQ) is refused as a whole and the next batch goes through."""

    def command(participant: str, n: int, exchange: str | None = None) -> OutboxMessage:
        return OutboxMessage(
            message_id=uuid.uuid4(),
            saga_id=uuid.uuid4(),
            exchange=exchange or w.topology.commands_exchange,
            routing_key=participant,
            message_type=f"{participant}.do",
            body=b'{"n": %d}' % n,
            headers={"x-n": str(n)},
            created_at=datetime.now(UTC),
        )

    inbox = Inbox()
    await w.broker.consume(w.topology.command_queue("payment"), inbox, prefetch=100)
    batch = [command("payment", n) for n in range(50)]
    batch[20] = command("nobody-consumes-this", 20)
    results = await w.broker.publish_many(batch)
    assert [i for i, r in enumerate(results) if r is not None] == [20]
    assert isinstance(results[20], PublishRefusedError)
    got = await inbox.wait_for(49)
    assert [g.body for g in got] == [m.body for i, m in enumerate(batch) if i != 20]
    assert [g.message_id for g in got] == [
        str(m.message_id) for i, m in enumerate(batch) if i != 20
    ]
    assert {g.type for g in got} == {"payment.do"}
    assert [text(g.headers) for g in got[:2]] == [{"x-n": "0"}, {"x-n": "1"}]

    lost = [command("payment", n, exchange=f"{w.topology.prefix}.missing") for n in range(3)]
    refused = await w.broker.publish_many(lost)
    assert all(isinstance(r, PublishRefusedError) for r in refused), refused
    again = [command("payment", n) for n in range(100, 103)]
    assert await w.broker.publish_many(again) == [None, None, None]
    later = await inbox.wait_for(52)
    assert [g.body for g in later[49:]] == [m.body for m in again]
    assert await w.broker.publish_many([]) == []
