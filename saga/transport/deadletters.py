"""Reading and settling RabbitMQ dead-letter queues without losing a message or its place.

AMQP has no way to read a queue in place, so a dead-letter queue is read by *holding* it: on a
channel of its own, ``basic.get`` without auto-ack takes its messages one by one, at most as
many as were ready when the hold began (so a message dead-lettered meanwhile, a replayed one
that failed again included, waits for the next hold instead of being read twice), and at most
``scan_limit``. Each held message is then left alone, or acked: discarded, or replayed once its
copy in the original queue is confirmed. When the hold ends, every message not acked is handed
back (``nack`` with requeue, then the channel closes); RabbitMQ puts a requeued message back at
its own position, so the queue keeps its order. If the process or the connection dies during a
hold, the broker hands the messages back the same way.

Holds of one queue are taken one at a time in this process: two operators never see a queue
that the other one has half taken. Several orchestrator instances each hold their own; a
listing made on one while another holds the same queue misses what that one holds for the
fraction of a second its hold lasts.

Replay is at-least-once: the copy is published to the original queue with a confirm, then the
dead-lettered message is acked. A crash (or a lost connection) between the two leaves the
message in both places; the orchestrator's inbox and the participants' ledgers dedupe by message
id, so applying it twice is harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, cast
from uuid import UUID

import aiormq

from saga.transport.amqp import PublishRefusedError
from saga.transport.link import Link, quietly
from saga.transport.topology import DEAD_LETTER_DETAIL, DEAD_LETTER_QUEUE, DEAD_LETTER_REASON

__all__ = [
    "REPLAYS_HEADER",
    "DeadLetter",
    "DeadLetterError",
    "DeadLetterQueues",
    "Hold",
    "read_dead_letter",
    "replay_headers",
]

#: how often a message was replayed, carried along if it is dead-lettered again
REPLAYS_HEADER = "x-saga-replays"
#: headers that say why and when a message was dead-lettered: not sent along with a replay
_DEAD_LETTER_PREFIXES = ("x-saga-dead-letter-", "x-death", "x-first-death-", "x-last-death-")
#: bodies larger than this are not parsed for a saga id
_PARSE_LIMIT = 1024 * 1024
#: seconds one broker call of a hold may take
_CALL_TIMEOUT = 5.0


class DeadLetterError(Exception):
    """The broker could not be read or written now (connection lost, call timed out, a publish
    refused); nothing was acked that was not settled."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One dead-lettered message as read from its dead-letter queue."""

    dead_letter_queue: str
    #: the message id, or a digest of the body when it has none: copies with the same id are
    #: the same message to every receiver (they dedupe by it)
    id: str
    message_id: str | None
    #: the queue it was dead-lettered from, where a replay sends it
    queue: str
    reason: str
    detail: str
    saga_id: str | None
    message_type: str | None
    correlation_id: str | None
    content_type: str | None
    dead_lettered_at: datetime | None
    replays: int
    headers: dict[str, Any]
    body: bytes = field(repr=False)
    delivery_tag: int = 0

    def age_s(self, now: datetime) -> float | None:
        if self.dead_lettered_at is None:
            return None
        return max((now - self.dead_lettered_at).total_seconds(), 0.0)


def _plain(value: Any) -> Any:
    """An AMQP header value as JSON: bytes as text, times as ISO strings, tables and arrays
    walked."""
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, datetime):
        return _aware(value).isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _aware(when: datetime) -> datetime:
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def _uuid(value: Any) -> str | None:
    try:
        return str(UUID(str(value)))
    except (ValueError, TypeError):
        return None


def _saga_id(body: bytes, correlation_id: str | None) -> str | None:
    """The saga a message belongs to: the envelope's ``saga_id``, else its correlation id (the
    relay sets it to the saga id), when either is a UUID."""
    if len(body) <= _PARSE_LIMIT:
        try:
            parsed = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            parsed = None
        if isinstance(parsed, dict) and (found := _uuid(parsed.get("saga_id"))):
            return found
    return _uuid(correlation_id) if correlation_id else None


def read_dead_letter(
    dead_letter_queue: str,
    source: str,
    body: bytes,
    *,
    message_id: str | None = None,
    correlation_id: str | None = None,
    message_type: str | None = None,
    content_type: str | None = None,
    timestamp: datetime | None = None,
    headers: Mapping[str, Any] | None = None,
    delivery_tag: int = 0,
) -> DeadLetter:
    """What a message in ``dead_letter_queue`` says about itself: dead-lettered by saga (the
    ``x-saga-dead-letter-*`` headers) or by RabbitMQ (``x-death``: a quorum queue's delivery
    limit, a reject); ``source`` is the queue to assume when neither names one."""
    plain = {str(k): _plain(v) for k, v in (headers or {}).items()}
    deaths = (headers or {}).get("x-death")
    first = deaths[0] if isinstance(deaths, list | tuple) and deaths else None
    raw_death: Mapping[str, Any] = first if isinstance(first, Mapping) else {}
    death = _plain(raw_death)
    when = _aware(timestamp) if timestamp is not None else None
    if DEAD_LETTER_REASON in plain:
        reason = str(plain[DEAD_LETTER_REASON])
        detail = str(plain.get(DEAD_LETTER_DETAIL, ""))
        queue = str(plain.get(DEAD_LETTER_QUEUE) or source)
    elif death:
        reason = str(death.get("reason") or "unknown")
        queue = str(death.get("queue") or source)
        detail = (
            f"dead-lettered by RabbitMQ ({reason}) from {queue}, {death.get('count', 1)} time(s)"
        )
        if isinstance(raw_death.get("time"), datetime):
            when = _aware(raw_death["time"])
    else:
        reason, detail, queue = "unknown", "no dead-letter headers", source
    try:
        replays = int(plain.get(REPLAYS_HEADER, 0))
    except (TypeError, ValueError):
        replays = 0
    return DeadLetter(
        dead_letter_queue=dead_letter_queue,
        id=message_id or "sha256:" + hashlib.sha256(body).hexdigest(),
        message_id=message_id,
        queue=queue,
        reason=reason,
        detail=detail,
        saga_id=_saga_id(body, correlation_id),
        message_type=message_type,
        correlation_id=correlation_id,
        content_type=content_type,
        dead_lettered_at=when,
        replays=replays,
        headers=plain,
        body=body,
        delivery_tag=delivery_tag,
    )


def replay_headers(letter: DeadLetter) -> dict[str, str]:
    """The headers a replayed copy carries: the original ones without the dead-letter ones, and
    how often it has been replayed (so a message that keeps coming back shows it)."""
    kept = {
        k: v if isinstance(v, str) else json.dumps(v)
        for k, v in letter.headers.items()
        if not k.startswith(_DEAD_LETTER_PREFIXES) and k != REPLAYS_HEADER
    }
    kept[REPLAYS_HEADER] = str(letter.replays + 1)
    return kept


class Hold:
    """The messages of one dead-letter queue taken on a channel of its own (see the module)."""

    def __init__(self, channel: aiormq.Channel, dead_letter_queue: str, source: str, depth: int):
        self._channel = channel
        self.dead_letter_queue = dead_letter_queue
        self.source = source
        #: messages ready when the hold began: the most it reads
        self.depth = depth
        self.scanned = 0

    @property
    def complete(self) -> bool:
        """Every message that was ready when the hold began has been read."""
        return self.scanned >= self.depth

    async def scan(self, limit: int) -> AsyncIterator[DeadLetter]:
        """The queue's messages in order, at most ``limit`` (and at most ``depth``)."""
        while self.scanned < min(self.depth, limit):
            try:
                message = await self._channel.basic_get(
                    self.dead_letter_queue, no_ack=False, timeout=_CALL_TIMEOUT
                )
            except (aiormq.exceptions.AMQPError, TimeoutError, ConnectionError) as exc:
                raise DeadLetterError(f"reading {self.dead_letter_queue}: {exc!r}") from exc
            if not isinstance(message.delivery, aiormq.spec.Basic.GetOk):
                self.depth = self.scanned  # taken by someone else meanwhile
                return
            self.scanned += 1
            props = message.header.properties
            yield read_dead_letter(
                self.dead_letter_queue,
                self.source,
                message.body,
                message_id=props.message_id,
                correlation_id=props.correlation_id,
                message_type=props.message_type,
                content_type=props.content_type,
                timestamp=props.timestamp,
                headers=props.headers,
                delivery_tag=int(message.delivery.delivery_tag or 0),
            )

    async def ack(self, letter: DeadLetter) -> None:
        """Remove ``letter`` from its dead-letter queue for good."""
        try:
            await self._channel.basic_ack(letter.delivery_tag)
        except (aiormq.exceptions.AMQPError, ConnectionError) as exc:
            raise DeadLetterError(
                f"could not remove {letter.id} from {self.dead_letter_queue} ({exc!r}); it "
                "stays there"
            ) from exc

    async def release(self) -> None:
        """Hand back every message not acked, each to its own position. (Closing the channel
        would too; the nack says so explicitly, and first.)"""
        if self.scanned == 0 or self._channel.is_closed:
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                self._channel.basic_nack(0, multiple=True, requeue=True), _CALL_TIMEOUT
            )


class DeadLetterQueues:
    """Holds on the dead-letter queues of one broker connection, one at a time per queue."""

    def __init__(self, link: Link, publish: Any):
        self._link = link
        #: ``publish_raw`` of the broker: confirmed, mandatory (an unroutable copy raises)
        self._publish = publish
        self._locks: dict[str, asyncio.Lock] = {}

    @contextlib.asynccontextmanager
    async def hold(self, dead_letter_queue: str, source: str) -> AsyncIterator[Hold]:
        """A hold on ``dead_letter_queue`` (whose messages came from ``source``); released,
        whatever happens, when the block ends."""
        lock = self._locks.setdefault(dead_letter_queue, asyncio.Lock())
        async with lock:
            try:
                connection, _ = await self._link.wait(_CALL_TIMEOUT)
                robust = await asyncio.wait_for(
                    connection.channel(publisher_confirms=False), _CALL_TIMEOUT
                )
                channel = cast(aiormq.Channel, await robust.get_underlay_channel())
            except Exception as exc:  # LinkDownError, a timeout, a closed connection
                raise DeadLetterError(f"no channel to RabbitMQ: {exc!r}") from exc
            try:
                try:
                    ok = await channel.queue_declare(
                        dead_letter_queue, passive=True, timeout=_CALL_TIMEOUT
                    )
                except (aiormq.exceptions.AMQPError, TimeoutError, ConnectionError) as exc:
                    raise DeadLetterError(f"cannot read {dead_letter_queue}: {exc!r}") from exc
                hold = Hold(channel, dead_letter_queue, source, int(ok.message_count or 0))
                try:
                    yield hold
                finally:
                    await hold.release()
            finally:
                await quietly(robust.close(), _CALL_TIMEOUT)

    async def replay(self, hold: Hold, letter: DeadLetter) -> None:
        """Publish ``letter`` to its original queue (confirmed), then remove it from the hold's
        queue. At-least-once: see the module."""
        try:
            await self._publish(
                exchange="",
                routing_key=letter.queue,
                body=letter.body,
                message_id=letter.message_id,
                correlation_id=letter.correlation_id,
                message_type=letter.message_type,
                headers=replay_headers(letter),
                content_type=letter.content_type,
            )
        except PublishRefusedError as exc:
            raise DeadLetterError(
                f"{letter.queue} did not take the copy of {letter.id} ({exc}); it stays in "
                f"{hold.dead_letter_queue}"
            ) from exc
        await hold.ack(letter)
