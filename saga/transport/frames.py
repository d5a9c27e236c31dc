"""A lean receive path for the AMQP connections the link opens.

aiormq 7.2 reads each frame under an ``asyncio.Lock`` into a ``BytesIO`` with three
``readexactly`` awaits, decodes it with pamqp's generic (attribute-by-attribute, type-name
dispatched) codec, and hands it to its channel through a bounded ``asyncio.Queue`` read by the
channel's own task, which puts a delivery's three frames (``Basic.Deliver``, content header,
body) together again. That is most of the client's CPU per delivered message.
:class:`FastFrameReceiver` replaces aiormq's ``FrameReceiver`` on our connections only:

* a frame is one ``readexactly`` of its 7-byte header and one of its payload and end byte;
* the hot frames (``Basic.Deliver``, ``Basic.Ack``, content headers, bodies) are decoded
  straight into pamqp's own classes, with the values pamqp would give; every other frame, and
  any hot frame that does not decode cleanly, goes through ``pamqp.frame.unmarshal`` as before;
* a ``Basic.Deliver`` whose channel is idle (its frame queue empty and its reader task waiting
  on it: every earlier frame of that channel has been handled) is read together with its header
  and body frames and given to the channel's consumer here, as the channel's reader would have
  (``consumer(message)`` in a task of the channel). Anything else, or anything unexpected while
  reading the content (a frame of another channel, a channel no longer idle), is handed on
  frame by frame in the order it arrived, to aiormq's own path. The connection's reader then
  gets a heartbeat in place of the three frames, so its stuck-connection clock still advances.

The frame order of every channel, its queue's back-pressure, heartbeats, close handling,
broker-side cancels, returns and confirms are aiormq's, unchanged. aiormq creates its receiver
inside ``Connection.connect``; :func:`install` replaces that one name in ``aiormq.connection``
with a class that builds ours for the readers :func:`claim` was given (the link's transport
factory) and aiormq's own for every other reader. This relies on aiormq's internals (the
``FrameReceiver`` name, ``Channel.frames``, ``consumers``, ``create_task``): aiormq is pinned
to 7.2.x in ``pyproject.toml`` for this and ``saga.transport.amqp``'s publishing.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import struct
import weakref
from collections.abc import Coroutine, Mapping
from datetime import UTC, datetime
from typing import Any, cast

import aiormq
import aiormq.connection
from aiormq.abc import AbstractChannel, DeliveredMessage
from aiormq.exceptions import AMQPConnectionError, InvalidFrameError, ProtocolSyntaxError
from pamqp import commands, decode
from pamqp.body import ContentBody
from pamqp.exceptions import PAMQPException
from pamqp.frame import unmarshal
from pamqp.header import ContentHeader
from pamqp.heartbeat import Heartbeat

__all__ = ["FastFrameReceiver", "claim", "decode_frame", "install"]

#: aiormq's channel logger: a failing consumer is logged as aiormq's channel reader logs it
log = logging.getLogger("aiormq.channel")

Received = tuple[int, int, Any]  # aiormq's ReceivedFrame: bytes read, channel, frame

_FRAME_METHOD, _FRAME_HEADER, _FRAME_BODY = 1, 2, 3
_FRAME_END = 0xCE
_HEAD = struct.Struct(">BHI")
_LONGLONG = struct.Struct(">q")
_TIMESTAMP = struct.Struct(">Q")
_CONTENT = struct.Struct(">HHQH")  # class id, weight, body size, first property flags
_DELIVER = b"\x00\x3c\x00\x3c"
_ACK = b"\x00\x3c\x00\x50"

_Deliver = commands.Basic.Deliver
_Ack = commands.Basic.Ack
_Properties = commands.Basic.Properties

_SHORT, _OCTET, _TABLE, _STAMP = 0, 1, 2, 3
#: Basic.Properties in wire order: flag bit, attribute, type
_PROPERTY_LAYOUT = (
    (0x8000, "content_type", _SHORT),
    (0x4000, "content_encoding", _SHORT),
    (0x2000, "headers", _TABLE),
    (0x1000, "delivery_mode", _OCTET),
    (0x0800, "priority", _OCTET),
    (0x0400, "correlation_id", _SHORT),
    (0x0200, "reply_to", _SHORT),
    (0x0100, "expiration", _SHORT),
    (0x0080, "message_id", _SHORT),
    (0x0040, "timestamp", _STAMP),
    (0x0020, "message_type", _SHORT),
    (0x0010, "user_id", _SHORT),
    (0x0008, "app_id", _SHORT),
    (0x0004, "cluster_id", _SHORT),
)

#: what the connection's reader gets for a delivery handled here (it ignores heartbeats)
_BEAT: Received = (8, 0, Heartbeat())


def _short(data: bytes, at: int) -> tuple[str, int]:
    end = at + 1 + data[at]
    if end > len(data):
        raise ValueError("short string past the end of the frame")
    return data[at + 1 : end].decode("utf-8"), end


def _deliver(payload: bytes) -> Any:
    consumer_tag, at = _short(payload, 4)
    (delivery_tag,) = _LONGLONG.unpack_from(payload, at)
    redelivered = bool(payload[at + 8] & 1)
    exchange, at = _short(payload, at + 9)
    routing_key, _ = _short(payload, at)
    frame = _Deliver.__new__(_Deliver)  # as pamqp's unmarshal: no validation of what came in
    frame.consumer_tag = consumer_tag
    frame.delivery_tag = delivery_tag
    frame.redelivered = redelivered
    frame.exchange = exchange
    frame.routing_key = routing_key
    return frame


def _ack(payload: bytes) -> Any:
    if len(payload) != 13:
        raise ValueError("Basic.Ack of unexpected size")
    frame = _Ack.__new__(_Ack)
    frame.delivery_tag = _LONGLONG.unpack_from(payload, 4)[0]
    frame.multiple = bool(payload[12] & 1)
    return frame


def _content_header(payload: bytes) -> ContentHeader:
    class_id, weight, body_size, flags = _CONTENT.unpack_from(payload, 0)
    if flags & 1:
        raise ValueError("continued property flags")  # none defined: pamqp decides
    properties = _Properties()
    at = 14
    for bit, name, kind in _PROPERTY_LAYOUT:
        if not flags & bit:
            continue
        value: Any
        if kind == _SHORT:
            value, at = _short(payload, at)
        elif kind == _TABLE:
            used, value = decode.field_table(payload[at:])
            at += used
        elif kind == _OCTET:
            value = payload[at]
            at += 1
        else:
            (stamp,) = _TIMESTAMP.unpack_from(payload, at)
            # as pamqp: a value past the year 2106 is taken to be in milliseconds
            value = datetime.fromtimestamp(stamp / 1000.0 if stamp > 0xFFFFFFFF else stamp, UTC)
            at += 8
        setattr(properties, name, value)
    if at > len(payload):
        raise ValueError("properties past the end of the frame")
    header = ContentHeader.__new__(ContentHeader)
    header.class_id = class_id
    header.weight = weight
    header.body_size = body_size
    header.properties = properties
    return header


def decode_frame(head: bytes, rest: bytes) -> Received:
    """One frame from its 7-byte header and the payload and end byte after it, as aiormq's
    receiver returns it: (bytes read, channel, frame). The hot frames are decoded here; the rest,
    and whatever does not decode here, by pamqp (whose errors become InvalidFrameError)."""
    frame_type, channel, size = _HEAD.unpack(head)
    weight = size + 8
    if size and len(rest) == size + 1 and rest[size] == _FRAME_END:  # pamqp refuses size 0
        try:
            if frame_type == _FRAME_BODY:
                return weight, channel, ContentBody(rest[:size])
            if frame_type == _FRAME_HEADER:
                return weight, channel, _content_header(rest[:size])
            if frame_type == _FRAME_METHOD:
                method = rest[:4]
                if method == _DELIVER:
                    return weight, channel, _deliver(rest[:size])
                if method == _ACK:
                    return weight, channel, _ack(rest[:size])
        except (ValueError, IndexError, struct.error, UnicodeDecodeError):
            pass  # pamqp decodes it, or says what is wrong with it
    try:
        return cast(Received, unmarshal(head + rest))
    except PAMQPException as e:
        raise InvalidFrameError(str(e)) from e


def _idle(channel: AbstractChannel) -> bool:
    """Whether the channel's reader has handled every frame given to it and waits for the next:
    only then may a delivery skip its queue without overtaking one of its frames."""
    frames = channel.frames
    getters = getattr(frames, "_getters", None)
    return frames.empty() and getters is not None and bool(getters) and not getters[-1].done()


class FastFrameReceiver(aiormq.connection.FrameReceiver):
    """aiormq's frame receiver, leaner; see the module docstring."""

    def __init__(self, reader: asyncio.StreamReader):
        super().__init__(reader)
        #: the connection's channels, once :meth:`serve` was called; deliveries go through the
        #: channels' queues until then
        self.channels: Mapping[int, AbstractChannel | None] | None = None
        self._pending: collections.deque[Received] = collections.deque()
        self._failing: set[asyncio.Task[Any]] = set()
        #: deliveries given to their consumer here, and ones handed on to aiormq's path
        self.assembled = 0
        self.handed_on = 0

    def serve(self, channels: Mapping[int, AbstractChannel | None]) -> None:
        """Give the deliveries of idle ``channels`` (the connection's) to their consumers."""
        self.channels = channels

    async def _read(self) -> Received:
        reader = self.reader
        if reader.at_eof():
            del self.reader
            raise StopAsyncIteration
        try:
            head = await reader.readexactly(7)
            if not self.started:
                if head.startswith(b"AMQP"):
                    raise ProtocolSyntaxError("Unexpected AMQP protocol header")
                self.started = True
            rest = await reader.readexactly(_HEAD.unpack(head)[2] + 1)
        except asyncio.IncompleteReadError as e:
            raise AMQPConnectionError(
                "Server connection unexpectedly closed. "
                f"Read {len(e.partial)} bytes but {e.expected} bytes expected",
            ) from e
        except ConnectionRefusedError as e:
            raise AMQPConnectionError(f"Server connection refused: {e!r}") from e
        except ConnectionResetError as e:
            raise AMQPConnectionError(f"Server connection reset: {e!r}") from e
        except ConnectionError as e:
            raise AMQPConnectionError(f"Server connection error: {e!r}") from e
        except OSError as e:
            raise AMQPConnectionError(f"Server communication error: {e!r}") from e
        return decode_frame(head, rest)

    async def get_frame(self) -> Received:
        if self._pending:
            return self._pending.popleft()
        received = await self._read()
        number = received[1]
        if number and self.channels is not None and type(received[2]) is _Deliver:
            channel = self.channels.get(number)
            if channel is not None and _idle(channel):
                return await self._assemble(channel, number, received)
        return received

    async def _assemble(self, channel: AbstractChannel, number: int, first: Received) -> Received:
        """Read the content of the delivery ``first`` and give it to its consumer; or, when it
        is not what was expected, hand every frame read on, in order."""
        frames = [first]
        received = await self._read()
        frames.append(received)
        header = received[2]
        if received[1] != number or type(header) is not ContentHeader:
            return self._hand_on(frames)
        size = header.body_size
        parts: list[bytes] = []
        got = 0
        while got < size:
            received = await self._read()
            frames.append(received)
            body = received[2]
            if received[1] != number or type(body) is not ContentBody or not body.value:
                return self._hand_on(frames)  # aiormq's reader decides what it means
            parts.append(body.value)
            got += len(body.value)
        delivery = first[2]
        tag = delivery.consumer_tag
        if tag is None or self.channels is None or self.channels.get(number) is not channel:
            return self._hand_on(frames)
        if not _idle(channel):  # closed, or given a frame, while the content was read
            return self._hand_on(frames)
        self.assembled += 1
        consumer = cast(aiormq.Channel, channel).consumers.get(tag)
        if consumer is None:
            return _BEAT  # cancelled: aiormq drops it too (the broker requeues it)
        message = DeliveredMessage(
            delivery=delivery,
            header=header,
            body=parts[0] if len(parts) == 1 else b"".join(parts),
            channel=channel,
        )
        try:
            work = consumer(message)
        except Exception as exc:
            # aiormq's channel reader would have died of it and closed the channel
            log.exception("Consumer callback failed")
            task = asyncio.ensure_future(channel.close(exc))
            self._failing.add(task)
            task.add_done_callback(self._failing.discard)
            return _BEAT
        started = channel.create_task(cast(Coroutine[Any, None, Any], work))
        started.add_done_callback(aiormq.Channel._on_consumer_done)
        return _BEAT

    def _hand_on(self, frames: list[Received]) -> Received:
        self.handed_on += 1
        self._pending.extend(frames[1:])
        return frames[0]


_ORIGINAL = aiormq.connection.FrameReceiver
_claimed: weakref.WeakKeyDictionary[asyncio.StreamReader, FastFrameReceiver] = (
    weakref.WeakKeyDictionary()
)


class _ChosenReceiver(_ORIGINAL):
    """What ``aiormq.connection.FrameReceiver`` names once installed: ours for a claimed
    reader, aiormq's own for any other."""

    def __new__(cls, reader: asyncio.StreamReader) -> Any:
        ours = _claimed.pop(reader, None)
        return ours if ours is not None else _ORIGINAL(reader)


def install() -> None:
    """Let aiormq build a :class:`FastFrameReceiver` for every claimed reader; idempotent."""
    if aiormq.connection.FrameReceiver is not _ChosenReceiver:
        aiormq.connection.FrameReceiver = _ChosenReceiver  # type: ignore[misc]


def claim(reader: asyncio.StreamReader) -> FastFrameReceiver:
    """The receiver aiormq will read ``reader`` with (after :func:`install`)."""
    install()
    receiver = FastFrameReceiver(reader)
    _claimed[reader] = receiver
    return receiver
