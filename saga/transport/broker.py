"""The broker as the orchestrator and the participants see it, and its RabbitMQ implementation.

:class:`Broker` is the whole surface they use: declare the topology, publish (with confirms),
dead-letter a message with a reason, consume a queue with manual acks and a prefetch bound, and
close. :class:`AmqpBroker` is RabbitMQ through aio-pika (durable, confirmed, persistent);
:class:`saga.transport.memory.MemoryBroker` is an in-process stand-in for demos and tests that
keeps nothing across a restart.

Consumers, with either broker:

* every delivery runs its callback in a task of its own, at most ``prefetch`` unsettled at once;
* the callback settles the message with ``ack()`` or ``nack(requeue=...)``; a requeued message
  comes back with ``redelivered`` set, one rejected without requeue goes to the queue's
  dead-letter queue;
* :meth:`Consumer.cancel` stops new deliveries at once; callbacks already running may still
  settle theirs, and whatever is left unsettled once they have returned goes back to the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol, cast

import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
)

from saga.ports import BrokerStats, OutboxMessage
from saga.transport.amqp import Outgoing, Publisher, PublishRefusedError, TlsFiles, connect, declare
from saga.transport.link import Link, LinkDownError, note, own_cancellation, quietly
from saga.transport.topology import (
    DEAD_LETTER_DETAIL,
    DEAD_LETTER_QUEUE,
    DEAD_LETTER_REASON,
    Topology,
)
from saga.work import WorkCounts

__all__ = [
    "AmqpBroker",
    "Broker",
    "BrokerBase",
    "BrokerSlot",
    "Callback",
    "Consumer",
    "IncomingMessage",
    "PublishRefusedError",
    "dead_letter_headers",
]


class IncomingMessage(Protocol):
    """A delivered message, to be settled once with ``ack()`` or ``nack(requeue=...)``.

    aio-pika's ``AbstractIncomingMessage`` satisfies it as it is.
    """

    @property
    def body(self) -> bytes: ...
    @property
    def content_type(self) -> str | None: ...
    @property
    def message_id(self) -> str | None: ...
    @property
    def correlation_id(self) -> str | None: ...
    @property
    def type(self) -> str | None: ...
    @property
    def headers(self) -> Mapping[str, Any]: ...
    @property
    def redelivered(self) -> bool | None: ...

    async def ack(self) -> None: ...

    async def nack(self, *, requeue: bool = True) -> None: ...


Callback = Callable[[IncomingMessage], Awaitable[None]]


class Consumer(Protocol):
    async def cancel(self) -> None:
        """Stop delivering; unsettled messages go back to the queue once running callbacks
        returned. Idempotent."""


class Broker(Protocol):
    #: the work done through this broker (saga.work)
    counts: WorkCounts

    async def declare(self, topology: Topology, participants: Iterable[str]) -> None:
        """Declare every exchange, queue and binding of ``topology``; idempotent."""

    async def publish(self, message: OutboxMessage) -> None:
        """Return once the message is in a queue; PublishRefusedError when it is in none."""

    async def publish_many(self, messages: Sequence[OutboxMessage]) -> list[Exception | None]:
        """Publish ``messages`` and wait for them all: per message None once it is in a queue,
        else the error (PublishRefusedError when it is in none)."""

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
    ) -> None: ...

    async def dead_letter(
        self,
        message: IncomingMessage,
        *,
        queue: str,
        topology: Topology,
        reason: str,
        detail: str,
    ) -> None:
        """Copy ``message`` to ``queue``'s dead-letter queue with the reason in its headers.

        Returns once the copy is in place; the caller acks the original after that, so the
        message is never in neither place."""

    async def consume(self, queue: str, callback: Callback, *, prefetch: int) -> Consumer:
        """Deliver ``queue``'s messages to ``callback``, at most ``prefetch`` unsettled."""

    def is_connected(self) -> bool:
        """False while the connection is down (and being re-established)."""

    def address(self) -> tuple[str, int] | None:
        """Host and port of the broker node in use (``server.*`` span attributes); None when
        there is no network peer."""

    def stats(self) -> BrokerStats:
        """Connected or not, and how often the connection and its consumers were recovered."""

    async def ready_count(self, queue: str) -> int | None:
        """Messages waiting in ``queue`` not yet delivered to anyone; None if unknown."""

    async def close(self) -> None: ...


def dead_letter_headers(
    message: IncomingMessage, *, queue: str, reason: str, detail: str
) -> dict[str, str]:
    """``message``'s headers as text, plus why and from where it was dead-lettered."""
    headers = {str(k): str(v) for k, v in (message.headers or {}).items()}
    headers.update(
        {
            DEAD_LETTER_REASON: reason,
            DEAD_LETTER_DETAIL: detail[:1000],
            DEAD_LETTER_QUEUE: queue,
        }
    )
    return headers


def outbox_fields(message: OutboxMessage) -> dict[str, Any]:
    """The ``publish_raw`` keywords of an outbox row."""
    return {
        "exchange": message.exchange,
        "routing_key": message.routing_key,
        "body": message.body,
        "message_id": str(message.message_id),
        "correlation_id": str(message.saga_id),
        "message_type": message.message_type,
        "headers": message.headers,
        "timestamp": message.created_at,
    }


class BrokerBase:
    """What every broker derives from ``publish_raw``: outbox publishing and dead-lettering."""

    def is_connected(self) -> bool:
        return True

    def address(self) -> tuple[str, int] | None:
        return None

    def stats(self) -> BrokerStats:
        return BrokerStats(connected=self.is_connected())

    async def ready_count(self, queue: str) -> int | None:
        return None

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
        raise NotImplementedError

    async def publish(self, message: OutboxMessage) -> None:
        """Return once the broker holds ``message``; raise PublishRefusedError if it does not."""
        await self.publish_raw(**outbox_fields(message))

    async def publish_many(self, messages: Sequence[OutboxMessage]) -> list[Exception | None]:
        results = await asyncio.gather(*map(self.publish, messages), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, Exception):
                raise r  # a cancellation is not a refusal
        return cast(list[Exception | None], results)

    async def dead_letter(
        self,
        message: IncomingMessage,
        *,
        queue: str,
        topology: Topology,
        reason: str,
        detail: str,
    ) -> None:
        """Copy ``message`` to ``queue``'s dead-letter queue with the reason in its headers.

        The caller acks the original only after this returns (the copy is confirmed), so the
        message is never in neither place.
        """
        await self.publish_raw(
            exchange=topology.dead_letter_exchange,
            routing_key=topology.dead_letter_queue(queue),
            body=message.body,
            message_id=message.message_id,
            correlation_id=message.correlation_id,
            message_type=message.type,
            headers=dead_letter_headers(message, queue=queue, reason=reason, detail=detail),
            content_type=message.content_type,
        )


class BrokerSlot:
    """Whose broker a service uses: one the caller gave (the caller closes it), or one the
    service connects at start and closes at stop. The orchestrator and the participants hold
    their broker in one of these."""

    def __init__(self, given: Broker | None = None):
        self.broker: Broker | None = given
        self._own: Broker | None = None

    async def connect(self, url: str, *, tls: TlsFiles | None = None) -> Broker:
        """The broker given, or a connection to RabbitMQ at ``url`` made now."""
        if self.broker is None:
            self.broker = self._own = await AmqpBroker.connect(url, tls=tls)
        return self.broker

    async def release(self) -> None:
        """Close the broker if this slot connected it; leave a given one alone."""
        if self._own is None:
            return
        with contextlib.suppress(Exception):
            await self._own.close()
        if self.broker is self._own:
            self.broker = None
        self._own = None


_OPEN, _ACKED, _NACKING = 0, 1, 2


class _Acks:
    """The acks of one consumer channel, sent at the end of the loop's turn in as few frames as
    possible: one ``basic.ack`` with ``multiple=True`` for the longest run of acked deliveries
    at the front, and one each for acked deliveries behind one still being handled.

    A group commit settles a batch of deliveries together, so a batch costs the broker one ack
    frame instead of one per message. A multiple ack settles every outstanding delivery up to
    its tag, so a delivery being nacked holds the run back until its nack is queued (frames
    leave in the order they are queued)."""

    def __init__(self, channel: aiormq.Channel, counts: WorkCounts):
        self.channel = channel
        self._counts = counts
        self._open: dict[int, int] = {}  # delivery tag -> state, in delivery order
        self._scheduled: asyncio.Handle | None = None
        self._sending: set[asyncio.Task[None]] = set()

    def received(self, tag: int) -> None:
        self._open[tag] = _OPEN

    def ack(self, tag: int) -> None:
        self._open[tag] = _ACKED
        if self._scheduled is None:
            self._scheduled = asyncio.get_running_loop().call_soon(self._send_soon)

    async def nack(self, tag: int, requeue: bool) -> None:
        self._open[tag] = _NACKING
        try:
            await self.channel.basic_nack(tag, requeue=requeue, wait=False)
        except BaseException:
            # not queued (cancelled while the write queue was full, or the channel is gone):
            # the delivery stays unsettled and keeps every later multiple ack short of it, so
            # the broker hands it back when the channel closes
            self._open[tag] = _OPEN
            raise
        self._open.pop(tag, None)

    def _send_soon(self) -> None:
        self._scheduled = None
        task = asyncio.ensure_future(self.flush())
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def flush(self) -> None:
        """Queue the acks taken so far. A channel that is gone loses them: its unacked
        deliveries go back to the queue, and every handler takes a redelivery."""
        last, run = 0, 0
        for tag, state in self._open.items():
            if state != _ACKED:
                break
            last, run = tag, run + 1
        for tag in list(self._open)[:run]:
            del self._open[tag]
        alone = [tag for tag, state in self._open.items() if state == _ACKED]
        for tag in alone:
            del self._open[tag]
        try:
            if run:
                self._counts.ack_frames += 1
                await self.channel.basic_ack(last, multiple=run > 1, wait=False)
            for tag in alone:
                self._counts.ack_frames += 1
                await self.channel.basic_ack(tag, wait=False)
        except asyncio.CancelledError:
            if own_cancellation():
                raise
        except Exception:
            pass

    async def drain(self) -> None:
        """Send what is pending now and wait until it is queued (before the channel closes)."""
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None
        await self.flush()
        await asyncio.gather(*self._sending, return_exceptions=True)


class _Delivery:
    """A delivery as :class:`IncomingMessage`, read straight from aiormq's frame: aio-pika's
    ``IncomingMessage`` decodes and copies every property of every message, most of which
    nothing here reads. Acks are sent together at the end of the loop's turn (:class:`_Acks`),
    without waiting for the socket to drain: an ack that never reaches the broker only means a
    redelivery, which every handler takes."""

    __slots__ = (
        "_acks",
        "_counts",
        "_settled",
        "body",
        "delivery_tag",
        "properties",
        "redelivered",
    )

    def __init__(self, message: aiormq.abc.DeliveredMessage, acks: _Acks, counts: WorkCounts):
        self.body: bytes = message.body
        self.properties = message.header.properties
        delivery = cast(aiormq.spec.Basic.Deliver, message.delivery)
        self.delivery_tag = int(delivery.delivery_tag or 0)
        self.redelivered = bool(delivery.redelivered)
        self._acks = acks
        self._counts = counts
        self._settled = False
        acks.received(self.delivery_tag)

    @property
    def channel(self) -> aiormq.Channel:
        """The aiormq channel it came on (as aio-pika's ``IncomingMessage.channel``)."""
        return self._acks.channel

    @property
    def content_type(self) -> str | None:
        return self.properties.content_type

    @property
    def message_id(self) -> str | None:
        return self.properties.message_id

    @property
    def correlation_id(self) -> str | None:
        return self.properties.correlation_id

    @property
    def type(self) -> str | None:
        return self.properties.message_type

    @property
    def headers(self) -> Mapping[str, Any]:
        return self.properties.headers or {}

    async def ack(self) -> None:
        if self._settled:
            raise RuntimeError("the message was settled already")
        self._settled = True
        self._counts.settles += 1
        self._acks.ack(self.delivery_tag)

    async def nack(self, *, requeue: bool = True) -> None:
        if self._settled:
            raise RuntimeError("the message was settled already")
        self._settled = True
        self._counts.settles += 1
        await self._acks.nack(self.delivery_tag, requeue)


class _AmqpConsumer:
    """One consumer on a channel of its own (so its prefetch bound is its own), attached anew to
    every connection of the link, and repaired when the broker drops it on a live connection.

    Every call to the broker here has a time limit: an attach that the broker never answers is a
    failed attach, never a consumer that silently stopped."""

    #: seconds each step of an attach (channel, qos, passive declare, consume) may take
    ATTACH_TIMEOUT = 10.0
    #: re-attach attempts on the same connection before the whole connection is rebuilt
    REPAIR_ATTEMPTS = 3
    #: seconds a replaced channel stays open for the deliveries still running on it
    DRAIN_TIMEOUT = 30.0

    def __init__(self, link: Link, queue: str, callback: Callback, prefetch: int):
        self._link = link
        self.queue = queue
        self._callback = callback
        self._prefetch = prefetch
        self._channel: AbstractChannel | None = None
        self._underlay: aiormq.Channel | None = None
        self._acks: _Acks | None = None
        self._tag: str | None = None
        self._generation = 0
        self._attachments = 0
        self._running = 0
        self._running_on: Counter[int] = Counter()  # deliveries running, by attachment
        self._drained: dict[int, asyncio.Event] = {}  # set once a retired attachment is idle
        self._cancelled_tags: set[str] = set()
        self._cancelled = False
        self._closing: asyncio.Task[None] | None = None
        self._repair: asyncio.Task[None] | None = None
        self._repair_generation = 0
        self._retiring: set[asyncio.Task[None]] = set()
        #: times the broker dropped this consumer on a live connection and it was re-attached
        self.repairs = 0

    @property
    def closed(self) -> bool:
        return self._cancelled

    async def attach(self, connection: AbstractConnection, generation: int) -> None:
        """Consume on a new channel of ``connection``; raises (and leaves nothing open) when a
        step fails or times out."""
        if self._cancelled:
            return
        bound = self.ATTACH_TIMEOUT
        self._attachments += 1
        attachment = self._attachments
        tag = f"saga-{uuid.uuid4().hex}"  # ours before the broker can cancel it

        channel = await asyncio.wait_for(connection.channel(publisher_confirms=False), bound)
        try:
            await asyncio.wait_for(channel.set_qos(prefetch_count=self._prefetch), bound)
            # passive: the queue must exist (declared at start), and it needs no configure
            # permission
            await asyncio.wait_for(channel.declare_queue(self.queue, passive=True), bound)
            underlay = cast(aiormq.Channel, await channel.get_underlay_channel())
            acks = _Acks(underlay, self._link.counts)

            def deliver(message: aiormq.abc.DeliveredMessage) -> Coroutine[Any, Any, None]:
                # called in frame order (by the channel's reader, or by saga.transport.frames
                # for an idle channel); the task it returns runs the callback
                self._link.counts.deliveries += 1
                return self._deliver(_Delivery(message, acks, self._link.counts), attachment)

            underlay.on_consumer_cancel_callbacks.add(self._on_broker_cancel)
            # basic_consume's own steps, without its wrapping the callback in a coroutine
            # function: that would move the synchronous part (the delivery's place among the
            # channel's acks) into the task, where deliveries given to their consumer by the
            # frame receiver could overtake it
            underlay.consumers[tag] = deliver
            await asyncio.wait_for(
                underlay.rpc(aiormq.spec.Basic.Consume(queue=self.queue, consumer_tag=tag)),
                bound,
            )
        except BaseException:
            await quietly(channel.close(), 5)
            raise
        if self._cancelled:  # cancelled while attaching: nothing may consume from now on
            await quietly(channel.close(), 5)
            return
        old, old_attachment = self._channel, attachment - 1
        same_connection = self._generation == generation
        old_acks = self._acks
        self._channel, self._underlay, self._tag = channel, underlay, tag
        self._acks = acks
        self._generation = generation
        channel.close_callbacks.add(self._on_channel_close)
        if same_connection and old is not None and not old.is_closed:
            # a repair: the old channel's consumer is gone, but deliveries may still run on it
            self._retire(old, old_attachment, old_acks)
        if channel.is_closed or tag in self._cancelled_tags:
            self._repair_soon("lost while it was being attached")

    def _retire(self, channel: AbstractChannel, attachment: int, acks: _Acks | None) -> None:
        """Close ``channel`` once the deliveries running on it have returned (bounded):
        closing it at once would cancel them half-way."""

        drained = asyncio.Event()
        if self._running_on[attachment] <= 0:
            drained.set()
        else:
            self._drained[attachment] = drained

        async def drain() -> None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(drained.wait(), self.DRAIN_TIMEOUT)
            self._drained.pop(attachment, None)
            if acks is not None:
                await quietly(acks.drain(), 5)
            await quietly(channel.close(), 5)

        task = asyncio.create_task(drain())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    # --- losing the consumer on a live connection -------------------------------------------

    def _on_broker_cancel(self, frame: aiormq.spec.Basic.Cancel) -> None:
        if frame.consumer_tag is None:
            return
        self._cancelled_tags.add(frame.consumer_tag)
        if frame.consumer_tag == self._tag:
            self._repair_soon("the broker cancelled the consumer")

    def _on_channel_close(self, sender: Any, exc: BaseException | None = None) -> None:
        if sender is self._channel:
            self._repair_soon(f"the channel was closed: {exc!r}")

    def _repair_soon(self, why: str) -> None:
        """Attach again, unless the connection itself is gone (the link restores then).

        A repair still waiting from an older connection (its channel closed with that
        connection) is replaced: it would only give up, and must not hide this loss."""
        generation = self._generation
        if self._cancelled or self._link.generation != generation:
            return
        if self._repair is not None and not self._repair.done():
            if self._repair_generation == generation:
                return
            self._repair.cancel()
        self._repair_generation = generation
        self._repair = asyncio.create_task(self._repair_loop(why, generation))

    async def _repair_loop(self, why: str, lost_on: int) -> None:
        note("warning", "amqp_consumer_lost", queue=self.queue, reason=why)
        for _ in range(self.REPAIR_ATTEMPTS):
            await asyncio.sleep(self._link.reconnect_interval)
            if self._cancelled or self._link.generation != lost_on:
                return  # cancelled, or a new connection restores every consumer
            try:
                connection, generation = await self._link.wait(self.ATTACH_TIMEOUT)
                if generation != lost_on:
                    return
                await self.attach(connection, generation)
            except LinkDownError:
                return
            except (Exception, asyncio.CancelledError) as exc:
                if isinstance(exc, asyncio.CancelledError) and own_cancellation():
                    raise
                note("warning", "amqp_consumer_repair_failed", queue=self.queue, error=repr(exc))
                continue
            self.repairs += 1
            self._link.consumer_repairs += 1
            note("info", "amqp_consumer_restored", queue=self.queue)
            return
        await self._link.reset(f"the consumer of {self.queue} could not be attached again", lost_on)

    # --- deliveries and cancelling ------------------------------------------------------------

    async def _deliver(self, message: _Delivery, attachment: int) -> None:
        if self._cancelled:  # sent before the broker saw the cancel: it goes back to the queue
            return
        self._running += 1
        self._running_on[attachment] += 1
        try:
            await self._callback(message)
        finally:
            self._running -= 1
            self._running_on[attachment] -= 1
            if self._running_on[attachment] <= 0:
                del self._running_on[attachment]
                if attachment in self._drained:
                    self._drained[attachment].set()
            if self._cancelled and self._running == 0:
                # not awaited here: closing the channel cancels the tasks of its deliveries
                self._close_soon()

    def _close_soon(self) -> None:
        if self._closing is None:
            self._closing = asyncio.create_task(self._close_channel())

    async def _close_channel(self) -> None:
        """Closing the channel hands every unsettled delivery back to the queue.

        Best effort, and never a CancelledError: when the connection closes at the same moment,
        aiormq cancels the close RPC's future, and that must not reach whoever awaits this
        task (a service shutting down, which was not cancelled itself)."""
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        if self._channel is not None and not self._channel.is_closed:
            if self._acks is not None:  # the acks taken, before the rest goes back
                await quietly(self._acks.drain(), 5)
            await quietly(self._channel.close(), 5)

    def _stop_repairs(self) -> None:
        self._cancelled = True
        if self._repair is not None:
            self._repair.cancel()

    async def cancel(self) -> None:
        if self._cancelled:
            return
        self._stop_repairs()
        try:
            channel = self._channel
            if (
                self._underlay is not None
                and self._tag is not None
                and channel is not None
                and not channel.is_closed
            ):
                await quietly(self._underlay.basic_cancel(self._tag), 5)
        finally:
            if self._running == 0:
                self._close_soon()

    async def close(self) -> None:
        self._stop_repairs()
        self._close_soon()
        assert self._closing is not None
        await self._closing


class AmqpBroker(BrokerBase):
    """RabbitMQ: durable queues, persistent messages, publisher confirms, mandatory publishing
    (an unroutable message raises :class:`PublishRefusedError`), a channel with its own prefetch
    per consumer, and a :class:`~saga.transport.link.Link` that reconnects (to the next node of
    a cluster) and then declares the topology and attaches every consumer again."""

    #: seconds :meth:`declare` and :meth:`consume` wait for a connection being re-established
    WAIT_CONNECTED = 30.0
    #: seconds the whole topology may take to declare
    DECLARE_TIMEOUT = 30.0

    def __init__(self, link: Link):
        self.link = link
        #: publishes, deliveries, settles and socket writes (saga.work)
        self.counts = link.counts
        self._publisher = Publisher(link)
        self._declared: list[tuple[Topology, tuple[str, ...]]] = []
        self._consumers: list[_AmqpConsumer] = []
        self._probe: AbstractChannel | None = None  # passive declares for ready_count
        self._probe_generation = 0
        link.on_restore(self._restore)

    @classmethod
    async def connect(
        cls, url: str, *, connect_timeout: float = 10.0, tls: TlsFiles | None = None
    ) -> AmqpBroker:
        """Connect to ``url`` (one node, or the nodes of a cluster, comma-separated: see
        :func:`saga.transport.amqp.connect`); ConfigError when RabbitMQ cannot be reached."""
        return cls(await connect(url, connect_timeout=connect_timeout, tls=tls))

    def is_connected(self) -> bool:
        return self.link.is_connected()

    def address(self) -> tuple[str, int] | None:
        return self.link.address()

    def stats(self) -> BrokerStats:
        return BrokerStats(
            connected=self.is_connected(),
            reconnects=self.link.reconnects,
            consumer_repairs=self.link.consumer_repairs,
            last_failure=self.link.last_failure,
        )

    async def _restore(self, connection: AbstractConnection, generation: int) -> None:
        """On a new connection: the topology declared so far, then every consumer."""
        if self._declared:
            await self._declare_on(connection, self._declared)
        for consumer in list(self._consumers):
            if not consumer.closed:
                await consumer.attach(connection, generation)

    async def ready_count(self, queue: str) -> int | None:
        """Messages ready in ``queue`` (a passive declare), or None when it cannot be known now."""
        if not self.is_connected():
            return None
        try:
            connection, generation = await self.link.wait(1.0)
            if self._probe is None or self._probe.is_closed or self._probe_generation != generation:
                self._probe = await asyncio.wait_for(
                    connection.channel(publisher_confirms=False), 3
                )
                self._probe_generation = generation
            channel = await self._probe.get_underlay_channel()
            ok = await channel.queue_declare(queue, passive=True, timeout=3)
        except asyncio.CancelledError:
            if own_cancellation():
                raise
            return None  # the connection died under the call
        except (aiormq.exceptions.AMQPError, RuntimeError, OSError, TimeoutError):
            return None
        return int(ok.message_count or 0)

    async def declare(self, topology: Topology, participants: Iterable[str]) -> None:
        names = tuple(participants)

        async def declare_on(connection: AbstractConnection, _generation: int) -> None:
            await self._declare_on(connection, [(topology, names)])

        await self._on_live_connection(f"declaring the topology of {topology.prefix}", declare_on)
        if (topology, names) not in self._declared:
            self._declared.append((topology, names))

    async def _on_live_connection(
        self, what: str, step: Callable[[AbstractConnection, int], Awaitable[None]]
    ) -> None:
        """Run ``step`` on the live connection; when that connection is lost under it, again on
        the next one, until WAIT_CONNECTED passes without a connection. A start-up step is then
        never failed by a connection the link replaces a moment later (a reset right after the
        handshake); an error on a connection that is still up (a refused declare, a timeout)
        goes on up."""
        while True:
            connection, generation = await self.link.wait(self.WAIT_CONNECTED)
            try:
                await step(connection, generation)
                return
            except (Exception, asyncio.CancelledError) as exc:
                if isinstance(exc, asyncio.CancelledError) and own_cancellation():
                    raise
                await asyncio.sleep(0)  # the connection's close callbacks run first
                if self.link.generation == generation and self.link.is_connected():
                    if isinstance(exc, asyncio.CancelledError):
                        raise ConnectionError(f"{what}: cancelled by the connection") from exc
                    raise
                note("warning", "amqp_connection_lost_during", step=what, error=repr(exc))
                self.link.last_failure = f"the connection was lost {what}: {exc!r}"
                await self.link.next_generation(generation, self.WAIT_CONNECTED)

    async def _declare_on(
        self, connection: AbstractConnection, topologies: list[tuple[Topology, tuple[str, ...]]]
    ) -> None:
        """Declare ``topologies`` on a channel of their own, within DECLARE_TIMEOUT: a broker
        that never answers (a quorum queue without a leader) is an error, never a hang."""
        channel = await asyncio.wait_for(connection.channel(publisher_confirms=False), 10)
        try:
            for topology, names in topologies:
                await asyncio.wait_for(declare(channel, topology, names), self.DECLARE_TIMEOUT)
        finally:
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
        await self._publisher.publish_raw(
            exchange=exchange,
            routing_key=routing_key,
            body=body,
            message_id=message_id,
            correlation_id=correlation_id,
            message_type=message_type,
            headers=headers,
            timestamp=timestamp,
            content_type=content_type,
        )

    async def publish_many(self, messages: Sequence[OutboxMessage]) -> list[Exception | None]:
        outgoing = [
            Outgoing(
                m.exchange,
                m.routing_key,
                m.body,
                aiormq.spec.Basic.Properties(
                    content_type="application/json",
                    headers=dict(m.headers),
                    delivery_mode=2,  # persistent
                    correlation_id=str(m.saga_id),
                    message_id=str(m.message_id),
                    timestamp=m.created_at,
                    message_type=m.message_type,
                ),
            )
            for m in messages
        ]
        return list(await self._publisher.publish_many(outgoing))

    async def consume(self, queue: str, callback: Callback, *, prefetch: int) -> Consumer:
        consumer = _AmqpConsumer(self.link, queue, callback, prefetch)
        try:
            await self._on_live_connection(f"consuming {queue}", consumer.attach)
        except BaseException:
            await consumer.close()
            raise
        self._consumers = [c for c in self._consumers if not c.closed]
        self._consumers.append(consumer)
        return consumer

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._publisher.close()
        for consumer in self._consumers:  # no repairs from here on
            consumer._stop_repairs()
        with contextlib.suppress(Exception):
            await self.link.close()
        for consumer in self._consumers:  # closed with the connection; reap the closing tasks
            with contextlib.suppress(Exception):
                await consumer.close()
        self._consumers.clear()
