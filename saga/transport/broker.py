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
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import datetime
from typing import Any, Protocol

import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)

from saga.ports import OutboxMessage
from saga.transport.amqp import Publisher, PublishRefusedError, TlsFiles, connect, declare
from saga.transport.topology import (
    DEAD_LETTER_DETAIL,
    DEAD_LETTER_QUEUE,
    DEAD_LETTER_REASON,
    Topology,
)

__all__ = [
    "AmqpBroker",
    "Broker",
    "BrokerBase",
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
    async def declare(self, topology: Topology, participants: Iterable[str]) -> None:
        """Declare every exchange, queue and binding of ``topology``; idempotent."""

    async def publish(self, message: OutboxMessage) -> None:
        """Return once the message is in a queue; PublishRefusedError when it is in none."""

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


class _AmqpConsumer:
    """One consumer on a channel of its own, so its prefetch bound is its own."""

    def __init__(self, channel: AbstractChannel, callback: Callback):
        self._channel = channel
        self._callback = callback
        self._queue: AbstractQueue | None = None
        self._tag: str | None = None
        self._running = 0
        self._cancelled = False
        self._closing: asyncio.Task[None] | None = None

    @property
    def closed(self) -> bool:
        return self._closing is not None

    async def start(self, queue: str, prefetch: int) -> None:
        await self._channel.set_qos(prefetch_count=prefetch)
        # A passive declare, not get_queue(ensure=False): only a queue declared through the
        # robust channel is registered with it, and only those get their consumers back after
        # a reconnect. Passive: the queue must exist, and it needs no configure permission.
        self._queue = await self._channel.declare_queue(queue, passive=True)
        self._tag = await self._queue.consume(self._deliver)

    async def _deliver(self, message: AbstractIncomingMessage) -> None:
        if self._cancelled:  # sent before the broker saw the cancel: it goes back to the queue
            return
        self._running += 1
        try:
            await self._callback(message)
        finally:
            self._running -= 1
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
        with contextlib.suppress(Exception, asyncio.CancelledError):
            if not self._channel.is_closed:
                await self._channel.close()

    async def cancel(self) -> None:
        if self._cancelled:
            return
        self._cancelled = True
        try:
            if self._queue is not None and self._tag is not None:
                await self._queue.cancel(self._tag)
        finally:
            if self._running == 0:
                self._close_soon()

    async def close(self) -> None:
        self._cancelled = True
        self._close_soon()
        assert self._closing is not None
        await self._closing


class AmqpBroker(BrokerBase):
    """RabbitMQ: durable queues, persistent messages, publisher confirms, mandatory publishing
    (an unroutable message raises :class:`PublishRefusedError`), a robust connection that
    reconnects and re-declares by itself, and a channel with its own prefetch per consumer."""

    def __init__(self, connection: AbstractRobustConnection):
        self.connection = connection
        self._publisher = Publisher(connection)
        self._declared: AbstractChannel | None = None  # kept open: it re-declares on reconnect
        self._consumers: list[_AmqpConsumer] = []

    @classmethod
    async def connect(
        cls, url: str, *, connect_timeout: float = 10.0, tls: TlsFiles | None = None
    ) -> AmqpBroker:
        """Connect to ``url``; ConfigError when RabbitMQ cannot be reached."""
        return cls(await connect(url, connect_timeout=connect_timeout, tls=tls))

    def is_connected(self) -> bool:
        return self.connection.connected.is_set() and not self.connection.is_closed

    async def ready_count(self, queue: str) -> int | None:
        """A passive declare on the raw channel underneath (not registered for re-declaring
        on reconnect, unlike one through the robust channel)."""
        if self._declared is None or self._declared.is_closed or not self.is_connected():
            return None
        try:
            channel = await self._declared.get_underlay_channel()
            ok = await channel.queue_declare(queue, passive=True)
        except (aiormq.exceptions.AMQPError, RuntimeError, OSError):
            return None
        return int(ok.message_count or 0)

    async def declare(self, topology: Topology, participants: Iterable[str]) -> None:
        if self._declared is None or self._declared.is_closed:
            self._declared = await self.connection.channel()
        await declare(self._declared, topology, participants)

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

    async def consume(self, queue: str, callback: Callback, *, prefetch: int) -> Consumer:
        consumer = _AmqpConsumer(await self.connection.channel(), callback)
        try:
            await consumer.start(queue, prefetch)
        except BaseException:
            await consumer.close()
            raise
        self._consumers = [c for c in self._consumers if not c.closed]
        self._consumers.append(consumer)
        return consumer

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._publisher.close()
        with contextlib.suppress(Exception):
            await self.connection.close()
        for consumer in self._consumers:  # closed with the connection; reap the closing tasks
            with contextlib.suppress(Exception):
                await consumer.close()
        self._consumers.clear()
