"""The frames of one publish (``Basic.Publish``, its content header, its body), encoded here.

aiormq marshals a publish through pamqp's generic codec: a ``Basic.Publish`` object validated
on creation, a ``ContentHeader`` whose properties are encoded attribute by attribute through a
type-name lookup, ``ContentBody`` objects, and a ``BytesIO`` to put them together. That costs
about four times the CPU per command of :func:`publish_frames`, which writes the same bytes
straight from the values (``python -m saga_tools.bench.publish_frames``), for the values our
messages carry: strings, ``delivery_mode`` and ``priority`` octets, a ``datetime`` timestamp,
a ``headers`` dict. A table of string values (trace context, the usual case) is encoded here;
any other table by pamqp's ``field_table``, which is what pamqp would use for it anyway.

Anything else (a property of another type, a value pamqp refuses, an exchange name pamqp's
``Basic.Publish`` would refuse, ``cluster_id``, a connection without a frame size) returns None,
and the caller marshals that message with pamqp as before: pamqp then encodes it, or raises the
error it always raised. The bytes are pinned against pamqp's own marshalling in
``tests/transport/test_publish_frames.py``.
"""

from __future__ import annotations

import operator
import struct
from datetime import UTC, datetime
from typing import cast

from pamqp import encode
from pamqp.commands import Basic
from pamqp.constants import DOMAIN_REGEX

__all__ = ["publish_frames"]

_HEAD = struct.Struct(">BHI")  # frame type, channel, payload size
#: a content header frame up to its property flags: frame head, class id, weight, body size
_CONTENT = struct.Struct(">BHIHHQH")
_TIMESTAMP = struct.Struct(">Q")
_LONG = struct.Struct(">I")
_END = b"\xce"
_FRAME_METHOD, _FRAME_HEADER, _FRAME_BODY = 1, 2, 3
_BASIC = 60
#: ``Basic.Publish``'s method index and its (deprecated, always 0) ticket
_PUBLISH = b"\x00\x3c\x00\x28\x00\x00"
_EXCHANGE_NAME = DOMAIN_REGEX["exchange-name"]
_TIMESTAMP_MAX = 2**64 - 1
#: a short string's length byte, by length
_LENGTH = tuple(bytes((n,)) for n in range(256))

#: encodings kept across messages, each emptied when it reaches _KEPT entries: method frames by
#: (channel, exchange, routing key, mandatory), property values that repeat (content and
#: message types, reply queues) and header names; a process sends to few destinations, with
#: few of each
_methods: dict[tuple[int, str, str, bool], bytes] = {}
_repeated: dict[str, bytes] = {}
_names: dict[str, bytes] = {}
_KEPT = 1024


def _short(value: object) -> bytes | None:
    """A short string (length byte, UTF-8), or None for anything else or too long."""
    if type(value) is not str:
        return None
    try:
        data = value.encode()
    except UnicodeEncodeError:
        return None
    if len(data) > 255:
        return None
    return _LENGTH[len(data)] + data


def _repeated_short(value: object) -> bytes | None:
    """:func:`_short` of a value that repeats from message to message, kept."""
    if type(value) is not str:
        return None
    encoded = _repeated.get(value)
    if encoded is None:
        encoded = _short(value)
        if encoded is not None:
            if len(_repeated) >= _KEPT:
                _repeated.clear()
            _repeated[value] = encoded
    return encoded


def _method_frame(channel: int, exchange: str, routing_key: str, mandatory: bool) -> bytes | None:
    if type(exchange) is not str or type(routing_key) is not str or type(mandatory) is not bool:
        return None
    key = (channel, exchange, routing_key, mandatory)
    frame = _methods.get(key)
    if frame is not None:
        return frame
    # what Basic.Publish's validation accepts; pamqp raises for anything else
    if len(exchange) > 127 or not _EXCHANGE_NAME.fullmatch(exchange):
        return None
    encoded_exchange = _short(exchange)
    encoded_key = _short(routing_key)
    if encoded_exchange is None or encoded_key is None:
        return None
    payload = _PUBLISH + encoded_exchange + encoded_key + (b"\x01" if mandatory else b"\x00")
    frame = _HEAD.pack(_FRAME_METHOD, channel, len(payload)) + payload + _END
    if len(_methods) >= _KEPT:
        _methods.clear()
    _methods[key] = frame
    return frame


def _table_name(key: object) -> bytes | None:
    """A header's name as a short string followed by the long string's type tag, kept."""
    if type(key) is not str:
        return None
    name = _names.get(key)
    if name is None:
        encoded = _short(key)
        if encoded is None or len(encoded) > 129:  # pamqp truncates a name, and logs it
            return None
        name = encoded + b"S"
        if len(_names) >= _KEPT:
            _names.clear()
        _names[key] = name
    return name


def _string_table(table: dict[str, object]) -> bytes | None:
    """A field table of string values, as pamqp's ``field_table`` encodes it (keys sorted, each
    value a long string); None for any other table, which pamqp then encodes."""
    parts: list[bytes] = []
    try:
        keys = sorted(table)
    except TypeError:
        return None
    for key in keys:
        name = _table_name(key)
        value = table[key]
        if name is None or type(value) is not str:
            return None
        try:
            data = value.encode()
        except UnicodeEncodeError:
            return None
        parts += (name, _LONG.pack(len(data)), data)
    output = b"".join(parts)
    return _LONG.pack(len(output)) + output


def _table(value: object) -> bytes | None:
    if type(value) is not dict:
        return None
    if not value:
        return b"\x00\x00\x00\x00"
    table = _string_table(value)
    if table is None:
        try:
            table = encode.field_table(value)
        except Exception:
            return None  # pamqp's own path raises it again, as it always did
    return table


def _octet(value: object) -> bytes | None:
    return _LENGTH[value] if type(value) is int and 0 <= value <= 255 else None


def _timestamp(value: object) -> bytes | None:
    if type(value) is not datetime or value.tzinfo is not UTC:
        if not isinstance(value, datetime):
            return None  # a struct_time: pamqp's
        if value.tzinfo is None or value.utcoffset() is None:
            value = value.replace(tzinfo=UTC)  # as pamqp: a naive time is UTC
    stamp = int(value.timestamp())
    return _TIMESTAMP.pack(stamp) if 0 <= stamp <= _TIMESTAMP_MAX else None


#: the Basic.Properties attributes, in wire order
_property_values = operator.attrgetter(
    "content_type",
    "content_encoding",
    "headers",
    "delivery_mode",
    "priority",
    "correlation_id",
    "reply_to",
    "expiration",
    "message_id",
    "timestamp",
    "message_type",
    "user_id",
    "app_id",
    "cluster_id",
)


def _properties(p: Basic.Properties) -> tuple[int, bytes] | None:
    """The property flags and the encoded properties, in pamqp's order and with its rule (a
    property is sent unless it is None or ``''``); None for anything unusual.

    Written out property by property: a loop over a table of them costs a third more."""
    (
        content_type,
        content_encoding,
        headers,
        delivery_mode,
        priority,
        correlation_id,
        reply_to,
        expiration,
        message_id,
        timestamp,
        message_type,
        user_id,
        app_id,
        cluster_id,
    ) = _property_values(p)
    flags = 0
    parts: list[bytes | None] = []  # a None: a value encoded by pamqp's path
    if content_type is not None and content_type != "":
        flags |= 0x8000
        parts.append(_repeated_short(content_type))
    if content_encoding is not None and content_encoding != "":
        flags |= 0x4000
        parts.append(_repeated_short(content_encoding))
    if headers is not None and headers != "":
        flags |= 0x2000
        parts.append(_table(headers))
    if delivery_mode is not None and delivery_mode != "":
        flags |= 0x1000
        parts.append(_octet(delivery_mode))
    if priority is not None and priority != "":
        flags |= 0x0800
        parts.append(_octet(priority))
    if correlation_id is not None and correlation_id != "":
        flags |= 0x0400
        parts.append(_short(correlation_id))
    if reply_to is not None and reply_to != "":
        flags |= 0x0200
        parts.append(_repeated_short(reply_to))
    if expiration is not None and expiration != "":
        flags |= 0x0100
        parts.append(_repeated_short(expiration))
    if message_id is not None and message_id != "":
        flags |= 0x0080
        parts.append(_short(message_id))
    if timestamp is not None and timestamp != "":
        flags |= 0x0040
        parts.append(_timestamp(timestamp))
    if message_type is not None and message_type != "":
        flags |= 0x0020
        parts.append(_repeated_short(message_type))
    if user_id is not None and user_id != "":
        flags |= 0x0010
        parts.append(_repeated_short(user_id))
    if app_id is not None and app_id != "":
        flags |= 0x0008
        parts.append(_repeated_short(app_id))
    if (cluster_id is not None and cluster_id != "") or None in parts:
        return None  # cluster_id is deprecated, and refused by pamqp's validation
    return flags, b"".join(cast(list[bytes], parts))


def publish_frames(
    channel: int,
    exchange: str,
    routing_key: str,
    mandatory: bool,
    properties: Basic.Properties,
    body: bytes,
    body_max: int,
) -> bytes | None:
    """The frames aiormq's ``ChannelFrame.marshall`` writes for this publish: the method frame,
    the content header, and the body in frames of at most ``body_max`` bytes (the channel's
    ``max_content_size``, frame_max - 8). None when the message is unusual (see the module
    docstring): then pamqp marshals it."""
    if type(body) is not bytes or type(properties) is not Basic.Properties:
        return None
    method = _method_frame(channel, exchange, routing_key, mandatory)
    if method is None or body_max <= 0:
        return None
    encoded = _properties(properties)
    if encoded is None:
        return None
    flags, props = encoded
    size = len(body)
    frames: list[bytes | memoryview] = [
        method,
        _CONTENT.pack(_FRAME_HEADER, channel, 14 + len(props), _BASIC, 0, size, flags),
        props,
        _END,
    ]
    if size <= body_max:
        if size:
            frames += (_HEAD.pack(_FRAME_BODY, channel, size), body, _END)
    else:
        view = memoryview(body)
        for at in range(0, size, body_max):
            chunk = view[at : at + body_max]
            frames += (_HEAD.pack(_FRAME_BODY, channel, len(chunk)), chunk, _END)
    return b"".join(frames)
