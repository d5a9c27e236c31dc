"""The lean receive path (saga.transport.frames): every frame decodes to what pamqp's own
decoder gives for the bytes pamqp's encoder wrote, and a delivery skips its channel's queue only
when nothing of that channel is waiting there; anything else reaches aiormq's path unchanged and
in order."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any, cast

import aiormq
import pytest
from aiormq.abc import DeliveredMessage
from aiormq.exceptions import AMQPConnectionError, InvalidFrameError, ProtocolSyntaxError
from hypothesis import given, settings
from hypothesis import strategies as st
from pamqp import commands, frame
from pamqp.body import ContentBody
from pamqp.header import ContentHeader
from pamqp.heartbeat import Heartbeat

from saga.transport import frames
from saga.transport.broker import AmqpBroker
from saga.transport.frames import FastFrameReceiver, decode_frame
from tests.conftest import require_rabbitmq
from tests.transport.helpers import every_property

Basic = commands.Basic
FRAME_MAX = 131072
BODY_MAX = FRAME_MAX - 8  # what aiormq's _split_body puts in one body frame


def wire(*frames_: tuple[int, Any]) -> bytes:
    return b"".join(frame.marshal(f, channel) for channel, f in frames_)


def split(data: bytes) -> tuple[bytes, bytes]:
    return data[:7], data[7:]


def fields(value: Any) -> dict[str, Any]:
    return dict(iter(value))


def same(ours: Any, theirs: Any) -> None:
    """The same frame: type, attributes, and for a header its properties too."""
    assert type(ours) is type(theirs)
    if isinstance(theirs, ContentHeader):
        assert (ours.class_id, ours.weight, ours.body_size) == (
            theirs.class_id,
            theirs.weight,
            theirs.body_size,
        )
        assert fields(ours.properties) == fields(theirs.properties)
    elif isinstance(theirs, ContentBody):
        assert ours.value == theirs.value
    elif not isinstance(theirs, Heartbeat):
        assert fields(ours) == fields(theirs)


def decoded(channel: int, value: Any) -> Any:
    """``value`` as pamqp decodes it off the wire (a header's class id is set only then)."""
    return frame.unmarshal(frame.marshal(value, channel))[2]


def check(data: bytes) -> None:
    """Our decoding of one marshalled frame against pamqp's."""
    weight, channel, ours = decode_frame(*split(data))
    their_weight, their_channel, theirs = frame.unmarshal(data)
    assert (weight, channel) == (their_weight, their_channel)
    same(ours, theirs)


# --- the decoder against pamqp's encoder ---------------------------------------------------

short = st.text(max_size=40)
leaf = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.text(max_size=30),
    st.floats(width=32, allow_nan=False, allow_infinity=False),
    st.none(),
    st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2100, 1, 1)).map(
        lambda d: d.replace(microsecond=0, tzinfo=UTC)
    ),
    st.decimals(places=2, min_value=-1000, max_value=1000, allow_nan=False),
)
table_keys = st.text(min_size=1, max_size=20)
values = st.recursive(
    leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(table_keys, inner, max_size=4),
    max_leaves=12,
)
properties = st.builds(
    Basic.Properties,
    content_type=st.none() | short,
    content_encoding=st.none() | short,
    headers=st.none() | st.dictionaries(table_keys, values, max_size=6),
    delivery_mode=st.none() | st.sampled_from([1, 2]),
    priority=st.none() | st.integers(0, 255),
    correlation_id=st.none() | short,
    reply_to=st.none() | short,
    expiration=st.none() | st.integers(0, 10**9).map(str),
    message_id=st.none() | short,
    timestamp=st.none()
    | st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1)).map(
        lambda d: d.replace(microsecond=0, tzinfo=UTC)
    ),
    message_type=st.none() | short,
    user_id=st.none() | short,
    app_id=st.none() | short,
)


@settings(max_examples=300, deadline=None)
@given(properties=properties, body_size=st.integers(0, 2**40), channel=st.integers(1, 65535))
def test_content_headers_decode_as_pamqp_decodes_them(
    properties: Any, body_size: int, channel: int
) -> None:
    check(frame.marshal(ContentHeader(body_size=body_size, properties=properties), channel))


@settings(max_examples=200, deadline=None)
@given(
    consumer_tag=short,
    delivery_tag=st.integers(0, 2**63 - 1),
    redelivered=st.booleans(),
    exchange=st.from_regex(r"[a-zA-Z0-9_.:-]{0,20}", fullmatch=True),
    routing_key=short,
)
def test_deliveries_decode_as_pamqp_decodes_them(
    consumer_tag: str, delivery_tag: int, redelivered: bool, exchange: str, routing_key: str
) -> None:
    deliver = Basic.Deliver(consumer_tag, delivery_tag, redelivered, exchange, routing_key)
    check(frame.marshal(deliver, 7))


def test_every_single_property_and_none_decode_as_pamqp_decodes_them() -> None:
    every = every_property()
    check(frame.marshal(ContentHeader(body_size=3), 1))  # no property at all
    for name, value in every.items():
        alone = Basic.Properties(**{name: value})  # type: ignore[arg-type]
        check(frame.marshal(ContentHeader(body_size=3, properties=alone), 1))
    full = Basic.Properties(**every)  # type: ignore[arg-type]
    check(frame.marshal(ContentHeader(body_size=3, properties=full), 1))


def test_bodies_acks_and_everything_else_decode_as_pamqp_decodes_them() -> None:
    for data in (
        frame.marshal(ContentBody(b"x" * BODY_MAX), 3),
        frame.marshal(Basic.Ack(delivery_tag=12, multiple=True), 2),
        frame.marshal(Basic.Ack(delivery_tag=2**63 - 1), 2),
        frame.marshal(Basic.Nack(delivery_tag=5, requeue=False), 2),
        frame.marshal(Basic.Return(312, "NO_ROUTE", "x", "y"), 2),
        frame.marshal(Basic.ConsumeOk("ctag"), 4),
        frame.marshal(Basic.Cancel("ctag"), 4),
        frame.marshal(commands.Channel.Close(406, "PRECONDITION_FAILED", 60, 40), 4),
        frame.marshal(commands.Connection.Close(320, "CONNECTION_FORCED", 0, 0), 0),
        frame.marshal(commands.Connection.Blocked("low on memory"), 0),
        Heartbeat.value,
    ):
        check(data)


def test_a_frame_without_its_end_byte_or_an_empty_body_frame_is_invalid() -> None:
    data = frame.marshal(ContentBody(b"abc"), 1)
    with pytest.raises(InvalidFrameError):
        decode_frame(*split(data[:-1] + b"\x00"))
    with pytest.raises(InvalidFrameError):  # pamqp refuses a frame of size 0 but a heartbeat
        decode_frame(*split(frame.marshal(ContentBody(b""), 1)))


def test_a_malformed_hot_frame_goes_to_pamqp_which_names_the_fault() -> None:
    deliver = bytearray(frame.marshal(Basic.Deliver("ctag", 1, False, "", "rk"), 1))
    deliver[11] = 200  # the consumer tag's length runs past the frame
    with pytest.raises(InvalidFrameError):
        decode_frame(*split(bytes(deliver)))
    # continued property flags are pamqp's to decode
    header = bytearray(frame.marshal(ContentHeader(body_size=1), 1))
    header[20] |= 1
    with pytest.raises(InvalidFrameError):
        decode_frame(*split(bytes(header)))


# --- the receiver --------------------------------------------------------------------------


def reader_of(data: bytes, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


async def test_the_receiver_yields_every_frame_in_order_as_pamqp_decodes_it() -> None:
    stream = [
        (0, commands.Connection.Blocked("disk")),
        (1, Basic.Deliver("ctag", 1, False, "ex", "rk")),
        (1, ContentHeader(body_size=BODY_MAX + 5, properties=Basic.Properties(message_id="m"))),
        (1, ContentBody(b"a" * BODY_MAX)),
        (1, ContentBody(b"b" * 5)),
        (2, Basic.Ack(delivery_tag=4, multiple=True)),
        (0, Heartbeat()),
    ]
    receiver = FastFrameReceiver(reader_of(wire(*stream)))
    for channel, expected in stream:
        weight, number, got = await receiver.get_frame()
        assert number == channel
        same(got, decoded(channel, expected))
        assert weight == len(frame.marshal(cast(Any, expected), channel))
    with pytest.raises(StopAsyncIteration):
        await receiver.get_frame()


async def test_the_receiver_refuses_a_protocol_header_and_a_cut_connection() -> None:
    with pytest.raises(ProtocolSyntaxError):
        await FastFrameReceiver(reader_of(b"AMQP\x00\x00\x09\x01")).get_frame()
    data = frame.marshal(ContentBody(b"abcdef"), 1)
    with pytest.raises(AMQPConnectionError):
        await FastFrameReceiver(reader_of(data[:-3])).get_frame()
    with pytest.raises(StopAsyncIteration):
        await FastFrameReceiver(reader_of(b"")).get_frame()


class FakeChannel:
    """What the receiver uses of an aiormq channel: its frame queue (read by a task, as
    aiormq's channel reader does), consumers, create_task and close."""

    def __init__(self, reading: bool = True) -> None:
        self.frames: asyncio.Queue[Any] = asyncio.Queue(10)
        self.consumers: dict[str, Any] = {}
        self.tasks: list[asyncio.Task[Any]] = []
        self.closed_with: BaseException | None = None
        self.queued: list[Any] = []
        self._reader = asyncio.create_task(self._read()) if reading else None

    async def _read(self) -> None:
        while True:
            _, got = await self.frames.get()
            self.queued.append(got)

    def create_task(self, coro: Any) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self.tasks.append(task)
        return task

    async def close(self, exc: BaseException | None = None) -> None:
        self.closed_with = exc

    def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()


async def connection_reader(receiver: FastFrameReceiver, channels: dict[int, Any]) -> list[Any]:
    """aiormq's connection reader, in short: every frame to its channel's queue; what reached
    channel 0 is returned."""
    on_zero: list[Any] = []
    while True:
        try:
            _, number, got = await receiver.get_frame()
        except StopAsyncIteration:
            return on_zero
        if number == 0:
            on_zero.append(got)
        else:
            await channels[number].frames.put((0, got))


def delivery(channel: int, tag: str, body: bytes, delivery_tag: int = 1) -> list[tuple[int, Any]]:
    parts = [body[i : i + BODY_MAX] for i in range(0, len(body), BODY_MAX)]
    return [
        (channel, Basic.Deliver(tag, delivery_tag, False, "ex", "rk")),
        (
            channel,
            ContentHeader(
                body_size=len(body),
                properties=Basic.Properties(message_id=f"m{delivery_tag}", headers={"h": 1}),
            ),
        ),
        *((channel, ContentBody(p)) for p in parts),
    ]


def recording(into: list[DeliveredMessage]) -> Any:
    def consumer(message: DeliveredMessage) -> Any:
        into.append(message)  # the synchronous part runs at once, in frame order
        return asyncio.sleep(0)

    return consumer


@pytest.mark.parametrize(
    "body",
    [b"", b"{}", b"x" * BODY_MAX, b"y" * (BODY_MAX + 1), b"z" * (3 * BODY_MAX + 17)],
    ids=["empty", "small", "one-full-frame", "one-byte-over", "four-frames"],
)
async def test_a_delivery_on_an_idle_channel_goes_straight_to_its_consumer(body: bytes) -> None:
    channel = FakeChannel()
    got: list[DeliveredMessage] = []
    channel.consumers["ctag"] = recording(got)
    await asyncio.sleep(0)  # the channel's reader waits on its queue
    stream = delivery(1, "ctag", body, 1) + delivery(1, "ctag", body[::-1], 2)
    receiver = FastFrameReceiver(reader_of(wire(*stream)))
    receiver.serve({1: channel})  # type: ignore[dict-item]
    beats = await connection_reader(receiver, {1: channel})
    await asyncio.gather(*channel.tasks)
    assert [m.body for m in got] == [body, body[::-1]]
    assert [m.delivery.delivery_tag for m in got] == [1, 2]  # type: ignore[union-attr]
    assert got[0].header.properties.headers == {"h": 1}
    assert got[0].channel is cast(Any, channel)
    assert channel.queued == []  # nothing went through the queue
    assert len(beats) == 2 and all(isinstance(b, Heartbeat) for b in beats)
    assert (receiver.assembled, receiver.handed_on) == (2, 0)
    channel.stop()


async def test_a_busy_channel_gets_every_frame_through_its_queue() -> None:
    channel = FakeChannel(reading=False)  # its reader is handling something else
    channel.consumers["ctag"] = recording([])
    stream = delivery(1, "ctag", b"body")
    receiver = FastFrameReceiver(reader_of(wire(*stream)))
    receiver.serve({1: channel})  # type: ignore[dict-item]
    await connection_reader(receiver, {1: channel})
    queued = [channel.frames.get_nowait()[1] for _ in range(channel.frames.qsize())]
    assert len(queued) == 3
    for (number, expected), ours in zip(stream, queued, strict=True):
        same(ours, decoded(number, expected))
    assert receiver.assembled == 0


async def test_a_channel_with_frames_still_queued_is_not_overtaken() -> None:
    channel = FakeChannel()
    channel.consumers["ctag"] = recording([])
    await asyncio.sleep(0)  # its reader waits on the queue ...
    channel.frames.put_nowait((0, Basic.Cancel("other")))  # ... and is woken, not yet run
    receiver = FastFrameReceiver(reader_of(wire(*delivery(1, "ctag", b"body"))))
    receiver.serve({1: channel})  # type: ignore[dict-item]
    _, _, first = await receiver.get_frame()
    assert isinstance(first, Basic.Deliver) and receiver.assembled == 0
    channel.stop()


async def test_a_frame_of_another_channel_inside_the_content_hands_everything_on_in_order() -> None:
    one, two = FakeChannel(), FakeChannel()
    got: list[DeliveredMessage] = []
    one.consumers["ctag"] = recording(got)
    await asyncio.sleep(0)
    first = delivery(1, "ctag", b"abc")
    stream = [first[0], first[1], (2, Basic.Ack(delivery_tag=1)), first[2]]
    receiver = FastFrameReceiver(reader_of(wire(*stream)))
    receiver.serve({1: one, 2: two})  # type: ignore[dict-item]
    order: list[tuple[int, Any]] = []
    while True:
        try:
            _, number, frame_ = await receiver.get_frame()
        except StopAsyncIteration:
            break
        order.append((number, frame_))
    assert [n for n, _ in order] == [1, 1, 2, 1]
    for (number, expected), (_, ours) in zip(stream, order, strict=True):
        same(ours, decoded(number, expected))
    assert got == [] and (receiver.assembled, receiver.handed_on) == (0, 1)
    one.stop()
    two.stop()


async def test_unserved_or_unknown_channels_and_untagged_deliveries_take_aiormq_path() -> None:
    stream = delivery(1, "ctag", b"abc")
    unserved = FastFrameReceiver(reader_of(wire(*stream)))
    assert isinstance((await unserved.get_frame())[2], Basic.Deliver)
    unknown = FastFrameReceiver(reader_of(wire(*stream)))
    unknown.serve({})
    assert isinstance((await unknown.get_frame())[2], Basic.Deliver)


async def test_a_delivery_for_a_cancelled_consumer_is_dropped_as_aiormq_drops_it() -> None:
    channel = FakeChannel()
    await asyncio.sleep(0)
    receiver = FastFrameReceiver(reader_of(wire(*delivery(1, "gone", b"abc"))))
    receiver.serve({1: channel})  # type: ignore[dict-item]
    _, number, beat = await receiver.get_frame()
    assert number == 0 and isinstance(beat, Heartbeat)
    assert channel.tasks == [] and channel.queued == []
    channel.stop()


async def test_a_consumer_that_raises_closes_its_channel_as_aiormq_s_reader_would() -> None:
    channel = FakeChannel()
    failure = RuntimeError("boom")

    def broken(_: DeliveredMessage) -> Any:
        raise failure

    channel.consumers["ctag"] = broken
    await asyncio.sleep(0)
    receiver = FastFrameReceiver(reader_of(wire(*delivery(1, "ctag", b"abc"))))
    receiver.serve({1: channel})  # type: ignore[dict-item]
    await receiver.get_frame()
    await asyncio.sleep(0)
    assert channel.closed_with is failure
    channel.stop()


async def test_installed_aiormq_builds_ours_only_for_claimed_readers() -> None:
    frames.install()
    ours_reader, other_reader = asyncio.StreamReader(), asyncio.StreamReader()
    claimed = frames.claim(ours_reader)
    assert aiormq.connection.FrameReceiver(ours_reader) is claimed
    other = aiormq.connection.FrameReceiver(other_reader)
    assert type(other) is frames._ORIGINAL
    # a reader is claimed for one connection only
    assert type(aiormq.connection.FrameReceiver(ours_reader)) is frames._ORIGINAL


# --- on RabbitMQ ---------------------------------------------------------------------------


@pytest.mark.rabbitmq
async def test_deliveries_on_rabbitmq_take_the_lean_path_intact() -> None:
    url = require_rabbitmq()
    broker = await AmqpBroker.connect(url)
    queue = f"frames-{uuid.uuid4().hex}"
    sizes = [0, 1, BODY_MAX - 1, BODY_MAX, BODY_MAX + 1, 2 * BODY_MAX + 3, *range(100, 4000, 100)]
    try:
        connection, _ = await broker.link.wait(5)
        setup = await connection.channel()
        await setup.declare_queue(queue, auto_delete=True)
        got: list[tuple[bytes, str | None, dict[str, Any]]] = []
        done = asyncio.Event()

        async def callback(message: Any) -> None:
            got.append((message.body, message.message_id, dict(message.headers)))
            await message.ack()
            if len(got) == len(sizes):
                done.set()

        consumer = await broker.consume(queue, callback, prefetch=20)
        for i, size in enumerate(sizes):
            await broker.publish_raw(
                exchange="",
                routing_key=queue,
                body=bytes([i % 251]) * size,
                message_id=f"m{i}",
                headers={"n": str(i)},
            )
        await asyncio.wait_for(done.wait(), 30)
        assert sorted(got, key=lambda g: int(g[1][1:])) == [  # type: ignore[index]
            (bytes([i % 251]) * size, f"m{i}", {"n": str(i)}) for i, size in enumerate(sizes)
        ]
        factory = connection.transport.connection._transport_factory  # type: ignore[union-attr]
        receiver = factory.receiver
        assert receiver is not None and receiver.assembled > 0
        assert broker.counts.deliveries == broker.counts.settles == len(sizes)
        await consumer.cancel()
    finally:
        await broker.close()


@pytest.mark.rabbitmq
async def test_a_delivery_takes_its_place_among_the_acks_when_its_frames_are_handled() -> None:
    """The consumer is registered as it is, not wrapped in a coroutine function: a delivery
    through the channel's queue and one given straight to it take their places among the
    channel's acks in frame order, so a multiple ack never covers one not yet seen."""
    url = require_rabbitmq()
    broker = await AmqpBroker.connect(url)
    queue = f"frames-{uuid.uuid4().hex}"
    try:
        connection, _ = await broker.link.wait(5)
        setup = await connection.channel()
        await setup.declare_queue(queue, auto_delete=True)

        async def callback(message: Any) -> None:
            await message.ack()

        consumer = cast(Any, await broker.consume(queue, callback, prefetch=5))
        underlay, tag, acks = consumer._underlay, consumer._tag, consumer._acks
        message = DeliveredMessage(
            delivery=Basic.Deliver(tag, 99, False, "", queue),
            header=ContentHeader(properties=Basic.Properties(message_id="m")),
            body=b"{}",
            channel=underlay,
        )
        work = underlay.consumers[tag](message)
        assert list(acks._open) == [99] and broker.counts.deliveries == 1  # before any await
        work.close()
        await consumer.cancel()
    finally:
        await broker.close()
