"""An in-process broker for demos and tests: the :class:`~saga.transport.broker.Broker` protocol
on asyncio, with no RabbitMQ.

    ***************************************************************************************
    *  NOT DURABLE. Every queue and every message lives in this process's memory and is   *
    *  gone when the process stops or crashes, including commands and replies the        *
    *  outboxes already handed over (the outbox deletes a row once the broker took it).   *
    *  Only what the SQL stores hold survives. Nothing here is shared between processes.  *
    *  Use it for the demo and for tests; use RabbitMQ (AmqpBroker) for anything real.    *
    ***************************************************************************************

What it does model, the way RabbitMQ does for the topology this project declares:

* direct exchanges and the bindings of a :class:`~saga.transport.topology.Topology`; the
  default exchange (``""``) routes by queue name; a message that reaches no queue raises
  :class:`~saga.transport.amqp.PublishRefusedError` (like ``mandatory`` with returns);
* manual acks: ``nack(requeue=True)`` puts the message back at the head of its queue and it is
  redelivered with ``redelivered=True``; ``nack(requeue=False)`` routes it through the queue's
  ``x-dead-letter-exchange`` / ``x-dead-letter-routing-key`` (adding ``x-first-death-*``
  headers), and so does passing ``x-delivery-limit`` on a quorum-style queue;
* a prefetch bound per consumer (0: unbounded), consumers served round-robin, every delivery's
  callback in a task of its own;
* a cancelled consumer gets nothing more; what it left unsettled once its running callbacks
  returned goes back to the queue.

Every publish stores its own copy of the body and headers and every delivery gets its own copy
again, so neither a publisher nor a consumer can change what another one sees.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import structlog

from saga.core.errors import ConfigError
from saga.transport.broker import (
    BrokerBase,
    Callback,
    Consumer,
    PublishRefusedError,
)
from saga.transport.topology import Topology
from saga.work import WorkCounts

__all__ = ["MemoryBroker", "MemoryMessage"]

log = structlog.get_logger("saga.transport.memory")

FIRST_DEATH_REASON = "x-first-death-reason"
FIRST_DEATH_QUEUE = "x-first-death-queue"
FIRST_DEATH_EXCHANGE = "x-first-death-exchange"


@dataclass(frozen=True, slots=True)
class _Stored:
    """A published message; immutable, so queues may hold the same one."""

    exchange: str
    routing_key: str
    body: bytes
    message_id: str | None
    correlation_id: str | None
    type: str | None
    content_type: str | None
    headers: tuple[tuple[str, Any], ...]
    timestamp: datetime


@dataclass(slots=True)
class _Entry:
    """A message in one queue, with its delivery history there."""

    stored: _Stored
    redelivered: bool = False
    returned: int = 0  # how often a consumer handed it back (x-delivery-limit counts these)


@dataclass(slots=True)
class _Queue:
    name: str
    arguments: dict[str, str | int]
    ready: deque[_Entry] = field(default_factory=deque)
    consumers: list[MemoryConsumer] = field(default_factory=list)
    turn: int = 0  # round-robin position among consumers


class MemoryMessage:
    """One delivery: its own copy of the message, settled once with ack() or nack()."""

    def __init__(self, consumer: MemoryConsumer, delivery_tag: int, entry: _Entry):
        stored = entry.stored
        self._consumer = consumer
        self.delivery_tag = delivery_tag
        self.body: bytes = bytes(stored.body)
        self.content_type: str | None = stored.content_type
        self.message_id: str | None = stored.message_id
        self.correlation_id: str | None = stored.correlation_id
        self.type: str | None = stored.type
        self.headers: dict[str, Any] = dict(stored.headers)
        self.redelivered: bool = entry.redelivered
        self.exchange: str = stored.exchange
        self.routing_key: str = stored.routing_key
        self.timestamp: datetime = stored.timestamp

    async def ack(self) -> None:
        self._consumer.settle(self.delivery_tag, ack=True, requeue=False)

    async def nack(self, *, requeue: bool = True) -> None:
        self._consumer.settle(self.delivery_tag, ack=False, requeue=requeue)

    def __repr__(self) -> str:
        return (
            f"<MemoryMessage {self.message_id} from {self.exchange!r}/{self.routing_key!r}"
            f"{' redelivered' if self.redelivered else ''}>"
        )


class MemoryConsumer:
    def __init__(self, broker: MemoryBroker, queue: _Queue, callback: Callback, prefetch: int):
        self._broker = broker
        self._queue = queue
        self._callback = callback
        self.prefetch = prefetch
        self.unacked: dict[int, _Entry] = {}
        self.cancelled = False
        self._running = 0
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def queue(self) -> _Queue:
        return self._queue

    @property
    def finished(self) -> bool:
        """Cancelled, and nothing of its is left running or unsettled."""
        return self.cancelled and self._running == 0 and not self.unacked

    @property
    def has_room(self) -> bool:
        return not self.cancelled and (self.prefetch == 0 or len(self.unacked) < self.prefetch)

    def deliver(self, entry: _Entry, tag: int) -> None:
        self.unacked[tag] = entry
        message = MemoryMessage(self, tag, entry)
        self._running += 1
        task = asyncio.create_task(self._run(message), name=f"memory-deliver-{self._queue.name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, message: MemoryMessage) -> None:
        try:
            await self._callback(message)
        except Exception:
            log.exception("consumer_callback_failed", queue=self._queue.name)
        finally:
            self._running -= 1
            if self.cancelled and self._running == 0:
                self._release()

    def settle(self, tag: int, *, ack: bool, requeue: bool) -> None:
        self._broker.check_open()
        entry = self.unacked.pop(tag, None)
        if entry is None:
            raise RuntimeError(f"delivery {tag} on {self._queue.name!r} is already settled")
        if not ack:
            if requeue:
                self._broker.requeue(self._queue, [entry])
            else:
                self._broker.reject(self._queue, entry, "rejected")
        self._broker.dispatch(self._queue)

    def _release(self) -> None:
        """Hand back what this consumer left unsettled (as a closed channel does)."""
        if self.unacked:
            left = [self.unacked[tag] for tag in sorted(self.unacked)]
            self.unacked.clear()
            self._broker.requeue(self._queue, left)
            self._broker.dispatch(self._queue)

    async def cancel(self) -> None:
        if self.cancelled:
            return
        self.cancelled = True
        if self in self._queue.consumers:
            self._queue.consumers.remove(self)
        if self._running == 0:
            self._release()
        await asyncio.sleep(0)

    async def abort(self) -> None:
        """The broker is closing: stop the callbacks still running."""
        self.cancelled = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class MemoryBroker(BrokerBase):
    """RabbitMQ's routing, acks, prefetch and dead-lettering for one process, in memory.

    NOT DURABLE: see the module docstring. Every queue and message is lost with the process.
    """

    durable = False

    def __init__(self) -> None:
        self._exchanges: dict[str, dict[str, list[str]]] = {}  # exchange -> key -> queues
        self._queues: dict[str, _Queue] = {}
        self._consumers: list[MemoryConsumer] = []  # every consumer still holding deliveries
        self._tags = itertools.count(1)
        self._closed = False
        self.published = 0
        self.dead_lettered = 0  # routed through a dead-letter exchange by the broker itself
        self.counts = WorkCounts()  # nothing is counted in memory

    # --- the Broker protocol -----------------------------------------------------------

    async def declare(self, topology: Topology, participants: Iterable[str]) -> None:
        self.check_open()
        names = list(participants)
        for spec in topology.exchanges():
            if spec.kind != "direct":
                raise ConfigError(f"the in-memory broker has direct exchanges only: {spec}")
            self._exchanges.setdefault(spec.name, {})
        for q in topology.queues(names):
            existing = self._queues.get(q.name)
            if existing is None:
                self._queues[q.name] = _Queue(q.name, dict(q.arguments))
            elif existing.arguments != q.arguments:
                raise ConfigError(
                    f"queue {q.name!r} exists with arguments {existing.arguments}, "
                    f"not {dict(q.arguments)} (RabbitMQ refuses this too: PRECONDITION_FAILED)"
                )
        for b in topology.bindings(names):
            bound = self._exchanges[b.exchange].setdefault(b.routing_key, [])
            if b.queue not in bound:
                bound.append(b.queue)
        await asyncio.sleep(0)

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
        if self._closed:
            raise PublishRefusedError("the in-memory broker is closed")
        targets = self._route(exchange, routing_key)
        if not targets:
            raise PublishRefusedError(
                f"unroutable: no queue is bound to exchange {exchange!r} "
                f"with routing key {routing_key!r}"
            )
        stored = _Stored(
            exchange=exchange,
            routing_key=routing_key,
            body=bytes(body),
            message_id=message_id,
            correlation_id=correlation_id,
            type=message_type,
            content_type=content_type,
            headers=tuple((str(k), v) for k, v in (headers or {}).items()),
            timestamp=timestamp or datetime.now(UTC),
        )
        for queue in targets:
            queue.ready.append(_Entry(stored))
            self.dispatch(queue)
        self.published += 1
        await asyncio.sleep(0)  # a publish is a suspension point, as over a network

    async def consume(self, queue: str, callback: Callback, *, prefetch: int) -> Consumer:
        self.check_open()
        target = self._queues.get(queue)
        if target is None:
            raise ConfigError(f"no queue {queue!r} in the in-memory broker: declare it first")
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, not {prefetch}")
        consumer = MemoryConsumer(self, target, callback, prefetch)
        self._consumers = [c for c in self._consumers if not c.finished]
        self._consumers.append(consumer)
        target.consumers.append(consumer)
        self.dispatch(target)
        await asyncio.sleep(0)
        return consumer

    async def close(self) -> None:
        """Stop every consumer (cancelling callbacks still running) and drop every message."""
        if self._closed:
            return
        self._closed = True
        for q in self._queues.values():
            q.consumers.clear()
        await asyncio.gather(*(c.abort() for c in self._consumers))
        self._consumers.clear()
        self._queues.clear()
        self._exchanges.clear()

    # --- inspection, for tests and the demo ----------------------------------------------

    def queues(self) -> list[str]:
        return sorted(self._queues)

    async def ready_count(self, queue: str) -> int | None:
        q = self._queues.get(queue)
        return None if q is None else len(q.ready)

    def depth(self, queue: str) -> tuple[int, int]:
        """(ready, delivered but unsettled) messages of ``queue``."""
        q = self._queues[queue]
        return len(q.ready), sum(len(c.unacked) for c in self._consumers if c.queue is q)

    # --- internals -----------------------------------------------------------------------

    def check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the in-memory broker is closed")

    def _route(self, exchange: str, routing_key: str) -> list[_Queue]:
        if exchange == "":
            queue = self._queues.get(routing_key)
            return [] if queue is None else [queue]
        bindings = self._exchanges.get(exchange)
        if bindings is None:
            raise PublishRefusedError(f"no exchange {exchange!r}: declare the topology first")
        return [self._queues[name] for name in bindings.get(routing_key, [])]

    def dispatch(self, queue: _Queue) -> None:
        """Hand ready messages to consumers with room, round-robin."""
        while queue.ready and queue.consumers:
            n = len(queue.consumers)
            for i in range(n):
                candidate = queue.consumers[(queue.turn + i) % n]
                if candidate.has_room:
                    queue.turn = (queue.turn + i + 1) % n
                    candidate.deliver(queue.ready.popleft(), next(self._tags))
                    break
            else:
                return  # every consumer is at its prefetch bound

    def requeue(self, queue: _Queue, entries: list[_Entry]) -> None:
        """Back to the head of ``queue``, in their order, marked redelivered."""
        limit = queue.arguments.get("x-delivery-limit")
        back: list[_Entry] = []
        for entry in entries:
            entry.redelivered = True
            entry.returned += 1
            if isinstance(limit, int) and entry.returned > limit:
                self.reject(queue, entry, "delivery_limit")
            else:
                back.append(entry)
        queue.ready.extendleft(reversed(back))

    def reject(self, queue: _Queue, entry: _Entry, reason: str) -> None:
        """Route through the queue's dead-letter exchange, or drop (as RabbitMQ does)."""
        exchange = queue.arguments.get("x-dead-letter-exchange")
        if not isinstance(exchange, str):
            log.warning("message_dropped", queue=queue.name, reason=reason)
            return
        routing_key = str(
            queue.arguments.get("x-dead-letter-routing-key", entry.stored.routing_key)
        )
        headers = dict(entry.stored.headers)
        headers.setdefault(FIRST_DEATH_REASON, reason)
        headers.setdefault(FIRST_DEATH_QUEUE, queue.name)
        headers.setdefault(FIRST_DEATH_EXCHANGE, entry.stored.exchange)
        stored = replace(
            entry.stored,
            exchange=exchange,
            routing_key=routing_key,
            headers=tuple(headers.items()),
        )
        try:
            targets = self._route(exchange, routing_key)
        except PublishRefusedError:
            targets = []
        if not targets:
            log.warning("message_dropped", queue=queue.name, reason=reason, dead_letter=exchange)
            return
        self.dead_lettered += 1
        for target in targets:
            target.ready.append(_Entry(stored))
            self.dispatch(target)
