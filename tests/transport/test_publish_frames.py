"""The send path's own encoding (saga.transport.publish_frames): the bytes of every publish are
the ones aiormq's pamqp marshalling writes, and whatever it does not take is marshalled by pamqp
as before, so a message is never sent differently, nor refused differently."""

from __future__ import annotations

import asyncio
import struct
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, cast

import aio_pika
import aiormq
import pytest
from aiormq.abc import ChannelFrame
from hypothesis import given, settings
from hypothesis import strategies as st
from pamqp import commands, frame
from pamqp.header import ContentHeader

from saga.transport import publish_frames as module
from saga.transport import wire
from saga.transport.amqp import Outgoing, Publisher, connect
from saga.transport.publish_frames import publish_frames
from saga.transport.wire import BatchingWriter
from tests.conftest import require_rabbitmq
from tests.transport.helpers import every_property

Basic = commands.Basic
FRAME_MAX = 131072
BODY_MAX = FRAME_MAX - 8  # aiormq's max_content_size


class _Sizes:
    """What ``aiormq.Channel._split_body`` reads of its channel."""

    def __init__(self, body_max: int) -> None:
        self.max_content_size = body_max


def by_pamqp(
    channel: int,
    exchange: str,
    routing_key: str,
    properties: Any,
    body: bytes,
    body_max: int = BODY_MAX,
    mandatory: bool = True,
) -> bytes:
    """The frames as ``Publisher._send`` marshalled them before: aiormq's own way."""
    frames: list[Any] = [
        Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=mandatory),
        ContentHeader(properties=properties, body_size=len(body)),
        *aiormq.Channel._split_body(_Sizes(body_max), body),  # type: ignore[arg-type]
    ]
    return ChannelFrame.marshall(channel_number=channel, frames=frames).payload


def ours(
    channel: int,
    exchange: str,
    routing_key: str,
    properties: Any,
    body: bytes,
    body_max: int = BODY_MAX,
    mandatory: bool = True,
) -> bytes | None:
    return publish_frames(channel, exchange, routing_key, mandatory, properties, body, body_max)


def same_bytes(*args: Any, **kwargs: Any) -> bytes:
    """Ours, which must take the message, equal to pamqp's."""
    got = ours(*args, **kwargs)
    assert got is not None, "the encoder gave the message to pamqp"
    assert got == by_pamqp(*args, **kwargs)
    return got


def command_properties(**changes: Any) -> Any:
    values: dict[str, Any] = {
        "content_type": "application/json",
        "headers": {"traceparent": f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01"},
        "delivery_mode": 2,
        "correlation_id": str(uuid.uuid4()),
        "message_id": str(uuid.uuid4()),
        "timestamp": datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC),
        "message_type": "payment.charge",
    }
    values.update(changes)
    return Basic.Properties(**values)


# --- bytes against pamqp's marshalling -----------------------------------------------------

short = st.text(max_size=40)
leaf = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.text(max_size=30),
    st.floats(width=32, allow_nan=False, allow_infinity=False),
    st.none(),
    st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2100, 1, 1)),
    st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2100, 1, 1)).map(
        lambda d: d.replace(tzinfo=UTC)
    ),
    st.decimals(places=2, min_value=-1000, max_value=1000, allow_nan=False),
    st.binary(max_size=10).map(bytearray),
)
table_keys = st.text(min_size=1, max_size=20)
values = st.recursive(
    leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(table_keys, inner, max_size=4),
    max_leaves=12,
)
string_headers = st.dictionaries(table_keys, st.text(max_size=60), max_size=6)
timestamps = st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(2200, 1, 1))
properties = st.builds(
    Basic.Properties,
    content_type=st.none() | short,
    content_encoding=st.none() | short,
    headers=st.none() | string_headers | st.dictionaries(table_keys, values, max_size=6),
    delivery_mode=st.none() | st.sampled_from([1, 2]),
    priority=st.none() | st.integers(0, 255),
    correlation_id=st.none() | short,
    reply_to=st.none() | short,
    expiration=st.none() | st.integers(0, 10**9).map(str),
    message_id=st.none() | short,
    timestamp=st.none()
    | timestamps
    | timestamps.map(lambda d: d.replace(tzinfo=UTC))
    | timestamps.map(lambda d: d.replace(tzinfo=timezone(timedelta(hours=-3)))),
    message_type=st.none() | short,
    user_id=st.none() | short,
    app_id=st.none() | short,
)
#: what pamqp's Basic.Publish accepts as an exchange name
exchanges = st.from_regex(r"[a-zA-Z0-9_.:@#,/+ -]{0,127}", fullmatch=True)
routing_keys = st.text(max_size=255).filter(lambda k: len(k.encode()) <= 255)


@settings(max_examples=400, deadline=None)
@given(
    properties=properties,
    body=st.binary(max_size=300),
    channel=st.integers(1, 65535),
    exchange=exchanges,
    routing_key=routing_keys,
    mandatory=st.booleans(),
)
def test_every_publish_is_the_bytes_pamqp_marshals(
    properties: Any, body: bytes, channel: int, exchange: str, routing_key: str, mandatory: bool
) -> None:
    same_bytes(channel, exchange, routing_key, properties, body, mandatory=mandatory)


@settings(max_examples=200, deadline=None)
@given(body_max=st.integers(1, 64), size=st.integers(0, 400))
def test_bodies_split_as_aiormq_splits_them(body_max: int, size: int) -> None:
    body = bytes(n % 251 for n in range(size))
    same_bytes(3, "saga.commands", "payment", command_properties(), body, body_max)


def test_bodies_at_the_frame_size_boundaries() -> None:
    def body_frames(data: bytes) -> list[int]:
        sizes, at = [], 0
        while at < len(data):
            kind, _, size = frame.frame_parts(data[at:])
            if kind == 3:
                sizes.append(size)
            at += 8 + (size or 0)
        return sizes

    cases = {
        0: [],
        1: [1],
        BODY_MAX - 1: [BODY_MAX - 1],
        BODY_MAX: [BODY_MAX],  # exactly frame_max - 8: one frame
        BODY_MAX + 1: [BODY_MAX, 1],  # frame_max - 7: two
        3 * BODY_MAX: [BODY_MAX] * 3,
        3 * BODY_MAX + 17: [BODY_MAX] * 3 + [17],
    }
    for size, frames in cases.items():
        data = same_bytes(1, "saga.commands", "payment", command_properties(), b"b" * size)
        assert body_frames(data) == frames, size


def test_every_single_property_and_none_are_the_bytes_pamqp_marshals() -> None:
    every: dict[str, Any] = every_property()
    same_bytes(1, "", "q", Basic.Properties(), b"")
    for name, value in every.items():
        same_bytes(1, "", "q", Basic.Properties(**{name: value}), b"{}")
        # pamqp leaves out an empty string, and sends an empty table and a zero octet
        empty: Any = {"headers": {}, "delivery_mode": 0, "priority": 0}.get(name, "")
        if name != "timestamp":
            properties = Basic.Properties()
            setattr(properties, name, empty)  # past Basic.Properties' own validation
            same_bytes(1, "", "q", properties, b"{}")
    same_bytes(1, "", "q", Basic.Properties(**every), b"{}")
    odd = Basic.Properties()
    odd.delivery_mode = 7  # refused when created, but marshalled as it is
    same_bytes(1, "", "q", odd, b"{}")


def test_headers_of_every_field_type_are_the_bytes_pamqp_marshals() -> None:
    headers: dict[str, Any] = {
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "tracestate": "congo=t61rcWkgMzE",
        "nested": {"inner": {"deeper": [1, 2, {"x": None}]}, "empty": {}},
        "array": [True, False, None, "s", 1.5, Decimal("-12.345"), [], [[1]]],
        "decimal": Decimal("3.14"),
        "big decimal": Decimal("1E+3"),
        "timestamp": datetime(2026, 5, 6, 7, 8, 9, tzinfo=UTC),
        "naive timestamp": datetime(2026, 5, 6, 7, 8, 9),
        "struct time": time.gmtime(1_700_000_000),
        "bools": [True, False],
        "none": None,
        "ints": [0, -1, 127, 128, -129, 32767, 32768, 65535, 65536, 2**31, 2**32, -(2**63)],
        "float": 0.25,
        "bytes": bytearray(b"\x00\xff"),
        "unicode ключ": "значение ✓",
        "": "an empty name",
        "k" * 128: "a name of 128 bytes",
        "é" * 65: "a name pamqp cuts to 128 bytes (and logs it)",
    }
    same_bytes(1, "saga.commands", "payment", command_properties(headers=headers), b"{}")
    # one header at a time, so each type takes its own path (strings only: ours; else pamqp's)
    for name, value in headers.items():
        same_bytes(1, "saga.commands", "payment", command_properties(headers={name: value}), b"")


def test_names_and_routing_keys_at_their_limits() -> None:
    for routing_key in ("", "payment", "é" * 127, "€" * 85, "ab" + "😀" * 63, "x" * 255):
        assert len(routing_key.encode()) <= 255
        same_bytes(2, "saga.commands", routing_key, command_properties(), b"{}")
    for exchange in ("", "amq.direct", "a" * 127, "saga-bt.x:y@z#1,2/3+4 5"):
        same_bytes(2, exchange, "payment", command_properties(), b"{}")
    for value in ("é" * 127, "x" * 255, "ab" + "😀" * 63):
        same_bytes(2, "", "q", command_properties(message_id=value, app_id=value), b"{}")


def test_the_encodings_kept_are_bounded_and_still_right(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(module, "_KEPT", 4)
    for n in range(20):
        properties = command_properties(message_type=f"t{n}", headers={f"h{n}": "v"})
        same_bytes(1 + n % 3, "saga.commands", f"p{n}", properties, b"{}")
    assert len(module._methods) <= 4
    assert len(module._repeated) <= 4
    assert len(module._names) <= 4


# --- what goes to pamqp's path ---------------------------------------------------------------


def unusual() -> list[tuple[str, Callable[[], tuple[str, str, Any, Any]]]]:
    """Publishes the encoder leaves to pamqp: (what, lambda -> (exchange, key, properties,
    body)). Built late: Basic.Properties validates what it is given."""

    def with_value(name: str, value: Any) -> Any:
        properties = command_properties()
        setattr(properties, name, value)  # past Basic.Properties' own validation
        return properties

    class Headers(dict[str, Any]):
        pass

    return [
        ("a struct_time timestamp", lambda: ("", "q", with_value("timestamp", time.gmtime()), b"")),
        ("a bool octet", lambda: ("", "q", with_value("priority", True), b"")),
        ("a dict subclass", lambda: ("", "q", with_value("headers", Headers(a="b")), b"")),
        ("cluster_id", lambda: ("", "q", with_value("cluster_id", "c"), b"")),
        ("a bytearray body", lambda: ("", "q", command_properties(), bytearray(b"{}"))),
    ]


def test_what_it_does_not_take_goes_to_pamqp_which_marshals_it() -> None:
    for what, build in unusual():
        exchange, routing_key, properties, body = build()
        assert ours(1, exchange, routing_key, properties, body) is None, what
        by_pamqp(1, exchange, routing_key, properties, body)  # and pamqp marshals it


def test_what_pamqp_refuses_goes_to_pamqp_which_refuses_it() -> None:
    def with_value(name: str, value: Any) -> Any:
        properties = command_properties()
        setattr(properties, name, value)
        return properties

    refused: list[tuple[str, str, Any, Any]] = [
        ("ünïcode", "q", command_properties(), b""),  # Basic.Publish refuses the exchange
        ("x" * 128, "q", command_properties(), b""),
        ("bad\n", "q", command_properties(), b""),
        ("", "é" * 128, command_properties(), b""),  # 256 bytes
        ("", "q", with_value("message_id", "x" * 256), b""),
        ("", "q", with_value("message_id", "é" * 128), b""),
        ("", "q", with_value("message_id", 12), b""),
        ("", "q", with_value("message_id", "\ud800"), b""),  # a lone surrogate
        ("", "q", with_value("priority", 256), b""),
        ("", "q", with_value("priority", -1), b""),
        ("", "q", with_value("timestamp", datetime(1960, 1, 1, tzinfo=UTC)), b""),
        ("", "q", with_value("timestamp", "2026-01-01"), b""),
        ("", "q", with_value("headers", {"k": object()}), b""),
        ("", "q", with_value("headers", {"k": 2**64}), b""),
        ("", "q", with_value("headers", {1: "v", "k": "v"}), b""),
        ("", "q", with_value("headers", {"k": "\ud800"}), b""),
        ("", "q", with_value("headers", ["not", "a", "table"]), b""),
        ("", "q", with_value("content_type", b"bytes"), b""),
    ]
    for exchange, routing_key, properties, body in refused:
        assert ours(1, exchange, routing_key, properties, body) is None
        with pytest.raises((ValueError, TypeError, struct.error)):
            by_pamqp(1, exchange, routing_key, properties, body)


# --- the publisher ---------------------------------------------------------------------------


class FakeConnection:
    """An aiormq connection, as far as a writer is looked up by it."""


class FakeUnderlay:
    """What ``Publisher._send`` uses of an aiormq channel."""

    def __init__(self, number: int = 5, body_max: int = BODY_MAX) -> None:
        self.number = number
        self.max_content_size = body_max
        self.is_closed = False
        self.lock = asyncio.Lock()
        self.delivery_tag = 0
        self.confirmations: dict[int, Any] = {}
        self.message_id_delivery_tag: dict[str, int] = {}
        self.write_queue: asyncio.Queue[ChannelFrame] = asyncio.Queue()
        self.connection = FakeConnection()  # not one the link opened: no writer of its own

    def _split_body(self, body: bytes) -> list[Any]:
        return aiormq.Channel._split_body(self, body)  # type: ignore[arg-type]

    def create_future(self) -> asyncio.Future[Any]:
        return asyncio.get_running_loop().create_future()


async def test_a_batch_is_written_as_pamqp_marshalled_it_unusual_messages_by_pamqp() -> None:
    def with_value(name: str, value: Any) -> Any:
        properties = command_properties()
        setattr(properties, name, value)
        return properties

    batch = [
        Outgoing("saga.commands", "payment", b"{}", command_properties()),
        Outgoing("", "q", b"x" * 70, with_value("timestamp", time.gmtime())),  # pamqp's
        Outgoing("saga.commands", "inventory", b"y" * 130, command_properties(priority=3)),
    ]
    underlay = FakeUnderlay(number=9, body_max=64)
    publisher = Publisher.__new__(Publisher)
    publisher.encoded = publisher.marshalled = publisher.sent_now = 0
    await publisher._send(underlay, batch)  # type: ignore[arg-type]
    written = underlay.write_queue.get_nowait()
    assert written.payload == b"".join(
        by_pamqp(9, m.exchange, m.routing_key, m.properties, m.body, 64) for m in batch
    )
    assert (publisher.encoded, publisher.marshalled) == (2, 1)
    assert underlay.delivery_tag == 3


async def test_frames_skip_an_empty_write_queue_and_wait_behind_a_full_one() -> None:
    """On a connection the link opened the frames go to its writer at once, unless frames
    are queued ahead of them: then they queue too, so the order on the wire stays."""
    under = FakeSocket()
    writer = BatchingWriter(cast(Any, under))
    underlay = FakeUnderlay(number=3)
    wire.adopt_writer(underlay.connection, writer)
    publisher = Publisher.__new__(Publisher)
    publisher.encoded = publisher.marshalled = publisher.sent_now = 0
    first = [Outgoing("saga.commands", "payment", b"{}", command_properties())]
    await publisher._send(underlay, first)  # type: ignore[arg-type]
    assert under.sent == [by_pamqp(3, "saga.commands", "payment", first[0].properties, b"{}")]
    assert underlay.write_queue.empty() and publisher.sent_now == 1

    underlay.write_queue.put_nowait(ChannelFrame(payload=b"queued-ahead", should_close=False))
    second = [Outgoing("saga.commands", "inventory", b"[]", command_properties())]
    await publisher._send(underlay, second)  # type: ignore[arg-type]
    assert len(under.sent) == 1 and publisher.sent_now == 1
    assert underlay.write_queue.get_nowait().payload == b"queued-ahead"
    assert underlay.write_queue.get_nowait().payload == by_pamqp(
        3, "saga.commands", "inventory", second[0].properties, b"[]"
    )


class FakeSocket:
    """The StreamWriter under a BatchingWriter: records each write."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.sent.append(data)

    def is_closing(self) -> bool:
        return False


async def test_a_message_pamqp_refuses_fails_the_batch_before_anything_is_written() -> None:
    publisher = Publisher.__new__(Publisher)
    publisher.encoded = publisher.marshalled = publisher.sent_now = 0
    underlay = FakeUnderlay()
    batch = [
        Outgoing("saga.commands", "payment", b"{}", command_properties()),
        Outgoing("ünïcode", "q", b"{}", command_properties()),
    ]
    with pytest.raises(ValueError, match="exchange"):
        await publisher._send(underlay, batch)  # type: ignore[arg-type]
    assert underlay.write_queue.empty()
    assert underlay.delivery_tag == 0


@pytest.mark.rabbitmq
async def test_published_through_the_publisher_read_back_with_aio_pika(unique: str) -> None:
    """Every property and header arrives as sent, through our encoder (counted), on RabbitMQ;
    a message with a value it leaves to pamqp arrives too."""
    url = require_rabbitmq()
    link = await connect(url)
    publisher = Publisher(link)
    connection, _ = await link.wait(5)
    setup = await connection.channel()
    name = f"frames-{unique}"
    stamp = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    headers: dict[str, Any] = {
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "nested": {"list": [1, "two", {"x": Decimal("1.50")}], "flag": True, "none": None},
        "when": stamp,
        "unicode ключ": "значение ✓",
    }
    full = Basic.Properties(
        content_type="application/json",
        content_encoding="utf-8",
        headers=headers,
        delivery_mode=2,
        priority=7,
        correlation_id=str(uuid.uuid4()),
        reply_to="saga.replies",
        expiration="600000",
        message_id=uuid.uuid4().hex,
        timestamp=stamp,
        message_type="payment.charge",
        user_id="guest",
        app_id="saga",
    )
    plain = command_properties(message_id=uuid.uuid4().hex)
    odd = command_properties(message_id=uuid.uuid4().hex)
    odd.timestamp = stamp.timetuple()  # a struct_time: pamqp's path
    large = command_properties(message_id=uuid.uuid4().hex)
    body_max = 0
    try:
        queue = await setup.declare_queue(name, arguments={"x-max-priority": 9})
        _, underlay = await publisher._open()
        body_max = underlay.max_content_size
        batch = [
            Outgoing("", name, b'{"full": true}', full),
            Outgoing("", name, b"", plain),
            Outgoing("", name, b"{}", odd),
            Outgoing("", name, bytes(range(256)) * (2 * body_max // 256 + 3), large),
        ]
        assert await publisher.publish_many(batch) == [None] * 4
        assert (publisher.encoded, publisher.marshalled) == (3, 1)
        assert publisher.sent_now == 1  # straight to the link's writer, its queue being empty

        got = [await queue.get(timeout=5) for _ in batch]
        assert [m.body for m in got] == [m.body for m in batch]
        first = got[0]
        assert first.content_type == "application/json"
        assert first.content_encoding == "utf-8"
        assert first.headers == headers
        assert first.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert first.priority == 7
        assert first.correlation_id == full.correlation_id
        assert first.reply_to == "saga.replies"
        assert first.expiration == 600.0  # aio-pika gives seconds
        assert first.message_id == full.message_id
        assert first.timestamp == stamp
        assert first.type == "payment.charge"
        assert first.user_id == "guest"
        assert first.app_id == "saga"
        for message, sent in zip(got[1:], batch[1:], strict=True):
            assert message.message_id == sent.properties.message_id
            assert message.headers == sent.properties.headers
            assert message.timestamp == stamp
            assert message.type == "payment.charge"
    finally:
        await setup.queue_delete(name)
        await publisher.close()
        await link.close()
