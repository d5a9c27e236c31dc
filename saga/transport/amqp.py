"""aio-pika plumbing: connect, declare the topology, publish with confirms, dead-letter.

Publishing channels are opened with ``publisher_confirms=True`` and ``on_return_raises=True``:
aio-pika's default is to treat a returned (unroutable) ``mandatory`` message as delivered, which
would let the relay mark a command sent that no queue ever received.

The broker address may name several nodes of one cluster, comma-separated; the connection goes
to the first reachable one and, once lost, to the next node in turn
(:class:`~saga.transport.link.Link`).
"""

from __future__ import annotations

import asyncio
import re
import ssl
import uuid
from asyncio import Future
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
)
from aiormq.abc import ChannelFrame
from pamqp.header import ContentHeader
from yarl import URL

from saga.core.errors import ConfigError
from saga.secrets import redact_url
from saga.transport.link import (
    CONNECT_ERRORS,
    Link,
    LinkDownError,
    note,
    own_cancellation,
    quietly,
    reach_error,
)
from saga.transport.publish_frames import publish_frames
from saga.transport.topology import Topology
from saga.transport.wire import writer_of

__all__ = [
    "Outgoing",
    "PublishRefusedError",
    "Publisher",
    "TlsFiles",
    "broker_urls",
    "connect",
    "connect_once",
    "declare",
    "safe_url",
]


#: seconds between reconnect attempts, unless the URL says (``?reconnect_interval=...``)
RECONNECT_INTERVAL = 1.0


class PublishRefusedError(Exception):
    """The broker returned or nacked a message: it is not in any queue."""


def safe_url(url: str) -> str:
    """The URL (or comma-separated URLs) with every password hidden, for errors and logs."""
    return redact_url(url)


#: a comma that starts another URL; a comma anywhere else (a password's) is part of its URL
_NEXT_URL = re.compile(r",\s*(?=[a-z][a-z0-9+.-]*://)", re.I)


def broker_urls(value: str) -> list[str]:
    """The node URLs of a broker address: one ``amqp://`` URL, or several of one cluster
    separated by commas. ValueError naming the first bad one (password hidden) and why.

    A comma splits only where another ``scheme://`` follows, so a password may hold one; any
    other comma outside the user and password is an error (a forgotten ``amqp://``)."""
    urls = _NEXT_URL.split(value.strip())
    several = len(urls) > 1
    for n, url in enumerate(urls, 1):
        shown = safe_url(url) or "empty"
        where = f"entry {n} of {len(urls)} ({shown})" if several else shown
        if not url.startswith(("amqp://", "amqps://")):
            raise ValueError(
                f"{where}: use amqp://user:password@host:5672/vhost (amqps:// for TLS); "
                "several nodes of one cluster: separate their URLs by commas"
            )
        parts = urlsplit(url)
        after_user = url[len(parts.scheme) + 3 :].rpartition("@")[2]
        if "," in after_user:
            raise ValueError(
                f"{where}: a comma that does not start another amqp:// URL; "
                "write a comma in a vhost as %2C"
            )
        try:
            port = parts.port
        except ValueError:
            port = -1
        if not parts.hostname or port == -1:
            raise ValueError(
                f"{where}: needs a host, and a port (if any) from 1 to 65535: host:5672"
            )
    schemes = {urlsplit(url).scheme for url in urls}
    if len(schemes) > 1:
        raise ValueError(
            f"{safe_url(value)} mixes amqp:// and amqps://: every node of one cluster is "
            "reached the same way"
        )
    return urls


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files for ``amqps://``: the CA that signed the broker's certificate (the system's
    CAs when None) and, for mutual TLS, our own certificate and key."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    def context(self) -> ssl.SSLContext:
        """A verifying client context: hostname checked, TLS 1.2 at least."""
        ctx = ssl.create_default_context(
            cafile=str(self.ca_file) if self.ca_file is not None else None
        )
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert_file is not None:
            ctx.load_cert_chain(
                str(self.cert_file), str(self.key_file) if self.key_file is not None else None
            )
        return ctx


def _tls_context(url: str, tls: TlsFiles | None) -> ssl.SSLContext:
    try:
        return (tls or TlsFiles()).context()
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the TLS files for {safe_url(url)}: {exc}") from exc


def _urls_or_config_error(url: str) -> list[str]:
    try:
        return broker_urls(url)
    except ValueError as exc:
        raise ConfigError(f"SAGA_RABBITMQ_URL: {exc}") from None


def _interval(url: str) -> tuple[str, float]:
    """``url`` without its ``reconnect_interval`` query parameter, and that interval."""
    parsed = URL(url)
    if "reconnect_interval" not in parsed.query:
        return url, RECONNECT_INTERVAL
    try:
        interval = float(parsed.query["reconnect_interval"])
    except ValueError:
        raise ConfigError(
            f"SAGA_RABBITMQ_URL: reconnect_interval in {safe_url(url)} is not a number of seconds"
        ) from None
    return str(parsed.without_query_params("reconnect_interval")), interval


async def connect(url: str, *, connect_timeout: float = 10.0, tls: TlsFiles | None = None) -> Link:
    """An open :class:`~saga.transport.link.Link` (it reconnects by itself), or a clear
    ConfigError.

    ``url`` is one node or several of one cluster, comma-separated: the first reachable one is
    used, and after a loss the next one, round the list. ``amqps://`` URLs use TLS with
    ``tls``'s files (or the system's CAs). ``?reconnect_interval=`` on the first URL sets the
    seconds between attempts (1 by default)."""
    urls = _urls_or_config_error(url)
    context = _tls_context(url, tls) if urls[0].startswith("amqps://") else None
    nodes = [_interval(u) for u in urls]
    link = Link(
        [node for node, _ in nodes],
        connect_timeout=connect_timeout,
        # aio-pika's own default is 5 s: a blip of the network or a broker restart would then
        # hold every command and reply back longer than a step's timeout
        reconnect_interval=nodes[0][1],
        ssl_context=context,
    )
    await link.open()
    return link


async def connect_once(
    url: str, *, connect_timeout: float = 10.0, tls: TlsFiles | None = None
) -> AbstractConnection:
    """A plain connection (no reconnecting) to the first reachable node of ``url``, for short
    tools; ConfigError when none answers. Without ``tls``, ``amqps://`` is aio-pika's own
    (the system's CAs, or the URL's ``cafile=``)."""
    urls = _urls_or_config_error(url)
    context = _tls_context(url, tls) if urls[0].startswith("amqps://") and tls else None
    failures: list[str] = []
    errors: list[BaseException] = []
    for node in urls:
        try:
            return await aio_pika.connect(node, timeout=connect_timeout, ssl_context=context)
        except CONNECT_ERRORS as exc:
            failures.append(f"{safe_url(node)}: {exc!r}" if len(urls) > 1 else repr(exc))
            errors.append(exc)
    raise reach_error(url, failures, errors)


async def declare(
    channel: AbstractChannel, topology: Topology, participants: Iterable[str]
) -> None:
    """Declare every exchange, queue and binding; idempotent."""
    names = list(participants)
    exchanges: dict[str, AbstractExchange] = {}
    for spec in topology.exchanges():
        exchanges[spec.name] = await channel.declare_exchange(
            spec.name, aio_pika.ExchangeType(spec.kind), durable=True
        )
    queues = {}
    for q in topology.queues(names):
        try:
            queues[q.name] = await channel.declare_queue(
                q.name, durable=True, arguments=dict[str, Any](q.arguments)
            )
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            # the orchestrator and the participants declare the shared queues alike; a
            # queue of the other type means their SAGA_QUORUM_QUEUES differ
            raise ConfigError(
                f"queue {q.name!r} exists with other arguments than {dict(q.arguments)} "
                f"({exc.args[0] if exc.args else exc}). The orchestrator and every participant "
                "must run with the same SAGA_QUORUM_QUEUES; a queue's type cannot change "
                "once declared (delete the queue, or keep the setting it was declared with)"
            ) from exc
    for b in topology.bindings(names):
        await queues[b.queue].bind(exchanges[b.exchange], routing_key=b.routing_key)


#: a publish not confirmed by then is given up (and retried by the relay on a new channel)
CONFIRM_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message for :meth:`Publisher.publish_many`: where to, the body, its properties."""

    exchange: str
    routing_key: str
    body: bytes
    properties: aiormq.spec.Basic.Properties


def _refused(why: str, cause: BaseException) -> PublishRefusedError:
    error = PublishRefusedError(why)
    error.__cause__ = cause
    return error


class _Confirm:
    """One message's entry in aiormq's confirm bookkeeping (``Channel.confirmations``).

    aiormq's ack, nack and return handlers settle an entry through the few methods of a future
    they call (``done``, ``cancelled``, ``set_result``, ``set_exception``); a ``multiple`` ack
    settles each tag of its range. This entry records its own outcome, so a nack or a return
    stays that message's, and counts down its batch's one waiter: a real future per message
    would cost its creation, a future-store entry and four done callbacks, each a loop turn.
    """

    __slots__ = ("_batch", "_message_id", "_tag", "cancelled_", "done_", "exception_", "result_")

    def __init__(self, batch: _Batch, tag: int, message_id: str):
        self._batch, self._tag, self._message_id = batch, tag, message_id
        self.result_: Any = None
        self.exception_: BaseException | None = None
        self.done_ = self.cancelled_ = False

    def done(self) -> bool:
        return self.done_

    def cancelled(self) -> bool:
        return self.cancelled_

    def set_result(self, result: Any) -> None:
        if not self.done():
            self.result_ = result
            self._settled()

    def set_exception(self, exc: BaseException) -> None:
        if not self.done():
            self.exception_ = exc
            self._settled()

    def cancel(self) -> None:
        """Given up: a late confirm finds it done (and aiormq ignores it)."""
        if not self.done():
            self.cancelled_ = True
            self._settled()

    def _settled(self) -> None:
        self.done_ = True
        # drop the id from the channel's return lookup, as ``basic_publish`` does (unless a
        # later publish reused the id)
        lookup = self._batch.underlay.message_id_delivery_tag
        if lookup.get(self._message_id) == self._tag:
            del lookup[self._message_id]
        self._batch.settled()


class _Batch:
    """The messages of one :meth:`Publisher.publish_many` call: their confirm entries and the
    waiter set once the last is settled. The waiter is a future of the channel's own store, so
    a channel or connection that closes fails it (and wakes the publish) at once."""

    __slots__ = ("confirms", "pending", "underlay", "waiter")

    def __init__(self, underlay: aiormq.Channel, count: int):
        self.underlay = underlay
        self.waiter: Future[None] = underlay.create_future()
        self.pending = count
        self.confirms: list[_Confirm] = []

    def settled(self) -> None:
        self.pending -= 1
        if self.pending == 0 and not self.waiter.done():
            self.waiter.set_result(None)


class Publisher:
    """Persistent messages on a confirm channel; each publish returns after its confirm.

    The channel belongs to one connection of the :class:`Link`: a publish after a reconnect
    opens a new one. A nack retires the channel too: RabbitMQ 3.10 lets a channel opened while
    a quorum queue elects a new leader (right after a failover) keep the dead leader and nack
    every later publish to that queue, for as long as the channel lives, while a new channel is
    served at once; the caller retries a nacked message anyway.
    """

    #: seconds a retired channel stays open, so the confirms already on their way arrive
    RETIRE_AFTER = CONFIRM_TIMEOUT + 1

    def __init__(self, link: Link):
        self._link = link
        self._channel: AbstractChannel | None = None
        self._underlay: aiormq.Channel | None = None
        self._generation = 0
        self._lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()
        #: messages whose frames were encoded by publish_frames, and by pamqp's path
        self.encoded = 0
        self.marshalled = 0
        #: batches handed straight to the link's writer (the rest went through aiormq's write
        #: queue): sent at once on a quiet connection, with the next window on a busy one
        self.sent_now = 0

    async def _open(self) -> tuple[AbstractChannel, aiormq.Channel]:
        """The confirm channel of the current connection (opened if need be), and the aiormq
        channel under it, on which messages are published."""
        async with self._lock:
            try:
                connection, generation = await self._link.wait(CONFIRM_TIMEOUT)
            except LinkDownError as exc:
                raise PublishRefusedError(str(exc)) from exc
            if (
                self._channel is None
                or self._underlay is None
                or self._channel.is_closed
                or self._generation != generation
            ):
                try:
                    channel = await asyncio.wait_for(
                        connection.channel(publisher_confirms=True, on_return_raises=True),
                        CONFIRM_TIMEOUT,
                    )
                    self._underlay = cast(aiormq.Channel, await channel.get_underlay_channel())
                except asyncio.CancelledError as exc:
                    if own_cancellation():
                        raise
                    raise PublishRefusedError("the connection died opening a channel") from exc
                except Exception as exc:
                    raise PublishRefusedError(f"cannot open a channel: {exc!r}") from exc
                self._channel, self._generation = channel, generation
            return self._channel, self._underlay

    def _retire(self, channel: AbstractChannel, why: str) -> None:
        """Publish on a new channel from now on; close ``channel`` a little later."""
        if self._channel is not channel:
            return  # retired already
        self._channel = self._underlay = None
        note("warning", "amqp_publish_channel_renewed", reason=why)
        task = asyncio.create_task(self._close_later(channel))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _close_later(self, channel: AbstractChannel) -> None:
        try:
            await asyncio.sleep(self.RETIRE_AFTER)
        finally:
            if not channel.is_closed:
                await quietly(channel.close(), 5)

    async def publish_raw(
        self,
        *,
        exchange: str,
        routing_key: str,
        body: bytes,
        message_id: str | None,
        correlation_id: str | None = None,
        message_type: str | None = None,
        headers: Mapping[str, str] | None = None,
        timestamp: datetime | None = None,
        content_type: str | None = "application/json",
    ) -> None:
        properties = aiormq.spec.Basic.Properties(
            content_type=content_type,
            headers=dict(headers) if headers else {},
            delivery_mode=2,  # persistent
            correlation_id=correlation_id,
            message_id=message_id or uuid.uuid4().hex,
            timestamp=timestamp or datetime.now(UTC),
            message_type=message_type,
        )
        (error,) = await self.publish_many([Outgoing(exchange, routing_key, body, properties)])
        if error is not None:
            raise error

    async def publish_many(self, messages: Sequence[Outgoing]) -> list[PublishRefusedError | None]:
        """Publish ``messages`` in order and wait for their confirms: one entry per message,
        None when the broker confirmed it, the error when it did not (the caller retries).

        All their frames go out as one write under the channel's publish lock, with a delivery
        tag and a confirm entry each where aiormq's ``basic_publish`` keeps a future per
        message (so its confirm, nack and return handling applies unchanged, see
        :class:`_Confirm`); one waiter covers the whole batch. Per message, ``basic_publish``
        would take the lock, a timeout scope, a queue hand-off and a write of its own: more CPU
        than the frames themselves.
        """
        if not messages:
            return []
        channel, underlay = await self._open()
        self._link.counts.publishes += len(messages)
        try:
            async with asyncio.timeout(CONFIRM_TIMEOUT):  # a writer that never takes them
                batch = await self._send(underlay, messages)
        except asyncio.CancelledError as exc:
            if own_cancellation():
                raise
            self._retire(channel, "CancelledError")
            return [_refused("the connection was lost publishing", exc)] * len(messages)
        except Exception as exc:
            self._retire(channel, type(exc).__name__)
            return [_refused(f"no confirm ({type(exc).__name__}): {exc}", exc)] * len(messages)
        await asyncio.wait((batch.waiter,), timeout=CONFIRM_TIMEOUT)
        return [self._outcome(channel, batch.waiter, confirm) for confirm in batch.confirms]

    async def _send(self, underlay: aiormq.Channel, messages: Sequence[Outgoing]) -> _Batch:
        """Queue the frames of ``messages`` for the connection's writer; their batch.

        The frames are encoded by :func:`~saga.transport.publish_frames.publish_frames`, or
        by aiormq's pamqp path for a message it does not take (which encodes it, or raises
        what it always raised). The delivery tags are taken under the channel's publish lock,
        in the order of the frames, and registered where aiormq's confirm and return handlers
        look them up.
        """
        if underlay.is_closed:
            raise ConnectionError("the publishing channel is closed")
        number, body_max = underlay.number, underlay.max_content_size
        parts: list[bytes] = []
        for m in messages:
            if len(m.routing_key) > 255:
                raise ValueError(f"routing key longer than 255 bytes: {m.routing_key[:40]!r}...")
            data = publish_frames(
                number, m.exchange, m.routing_key, True, m.properties, m.body, body_max
            )
            if data is None:
                data = self._marshalled(underlay, m)
            else:
                self.encoded += 1
            parts.append(data)
        payload = ChannelFrame(payload=b"".join(parts), should_close=False)
        batch = _Batch(underlay, len(messages))
        # entries of our own where aiormq keeps futures: they answer what its handlers ask
        confirmations = cast(dict[int, Any], underlay.confirmations)
        lookup = underlay.message_id_delivery_tag
        async with underlay.lock:
            first = underlay.delivery_tag
            for tag, m in enumerate(messages, start=first + 1):
                message_id = m.properties.message_id or ""  # set by every caller
                confirm = _Confirm(batch, tag, message_id)
                confirmations[tag] = confirm
                lookup[message_id] = tag
                batch.confirms.append(confirm)
            underlay.delivery_tag = first + len(messages)
            writer = writer_of(underlay.connection)
            try:
                if writer is not None and underlay.write_queue.empty():
                    # nothing queued ahead of these frames: to the writer now, not after the
                    # connection's writer task has taken them from its queue, a turn later;
                    # on a quiet connection they leave at once (BatchingWriter.send_now)
                    writer.send_now(payload.payload)
                    self.sent_now += 1
                else:
                    await underlay.write_queue.put(payload)
            except BaseException:
                # nothing reached the broker: give the tags back while the lock is held
                underlay.delivery_tag = first
                for confirm in batch.confirms:
                    confirmations.pop(confirm._tag, None)
                    confirm.cancel()
                raise
        return batch

    def _marshalled(self, underlay: aiormq.Channel, m: Outgoing) -> bytes:
        """The frames of ``m`` as aiormq's ``basic_publish`` marshals them."""
        self.marshalled += 1
        frames: list[Any] = [
            aiormq.spec.Basic.Publish(
                exchange=m.exchange, routing_key=m.routing_key, mandatory=True
            ),
            ContentHeader(properties=m.properties, body_size=len(m.body)),
            *underlay._split_body(m.body),
        ]
        return ChannelFrame.marshall(channel_number=underlay.number, frames=frames).payload

    def _outcome(
        self, channel: AbstractChannel, waiter: Future[None], confirm: _Confirm
    ) -> PublishRefusedError | None:
        """The error of one message of a batch, or None when the broker confirmed it."""
        if not confirm.done():
            # the waiter was not set by this batch's confirms: a timeout, or a lost channel
            timed_out = not waiter.done()
            confirm.cancel()  # a late confirm finds it done and is ignored
            if timed_out:
                self._retire(channel, "TimeoutError")
                return PublishRefusedError(f"no confirm within {CONFIRM_TIMEOUT:.0f} s")
            if waiter.cancelled():
                # the connection or the channel was lost under the publish: the relay
                # retries, on a fresh channel
                self._retire(channel, "CancelledError")
                return PublishRefusedError("no confirm: the channel was closed")
            lost = waiter.exception()
            self._retire(channel, type(lost).__name__)
            return PublishRefusedError(f"no confirm ({type(lost).__name__}): {lost}")
        if confirm.cancelled():
            self._retire(channel, "CancelledError")
            return PublishRefusedError("no confirm: the channel was closed")
        exc = confirm.exception_
        if isinstance(exc, aiormq.exceptions.DeliveryError):
            if isinstance(exc.frame, aiormq.spec.Basic.Nack):
                self._retire(channel, "nack")
                return PublishRefusedError(f"broker did not confirm the message: {exc}")
            return PublishRefusedError(f"broker returned the message: {exc}")
        if exc is not None:
            self._retire(channel, type(exc).__name__)
            return PublishRefusedError(f"no confirm ({type(exc).__name__}): {exc}")
        if not isinstance(confirm.result_, aiormq.spec.Basic.Ack):
            self._retire(channel, type(confirm.result_).__name__)
            return PublishRefusedError(f"broker did not confirm the message: {confirm.result_!r}")
        return None

    async def close(self) -> None:
        for task in list(self._retiring):
            task.cancel()  # closes its channel now
        await asyncio.gather(*self._retiring, return_exceptions=True)
        channel, self._channel = self._channel, None
        if channel is not None and not channel.is_closed:
            await quietly(channel.close(), 5)
