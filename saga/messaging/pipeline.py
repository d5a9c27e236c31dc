"""The one way a message is consumed, by the orchestrator and by every participant.

::

    delivery -> span, log context -> size, content type, parse -> handle -> ack
                                        |                          |
                                        dead-letter (reason)       +- MessageError: dead-letter
                                                                   +- other error: poison count,
                                                                      requeue after a pause, or
                                                                      dead-letter "poison"

A message is acked only after ``handle`` returned, i.e. after whatever it committed is durable;
it is dead-lettered only after the broker confirmed the copy in the dead-letter queue, so it is
never in neither place. ``handle`` raises :class:`~saga.core.errors.MessageError` for a message
that can never be applied (it is dead-lettered with that reason); any other exception means
nothing was committed, and the message is handed back to be tried again, unless it has failed
``max_deliveries`` times with the database up (:mod:`saga.messaging.poison`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Generic, TypeVar

import structlog
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode
from pydantic import BaseModel

from saga.core.errors import MessageError
from saga.logs import bind_message, unbind_message
from saga.messaging.poison import PoisonGuard, delivery_key
from saga.protocol.envelope import parse
from saga.protocol.types import ContractError
from saga.store.faults import describe_error
from saga.telemetry import Metrics, Tracing
from saga.transport.broker import Broker, IncomingMessage
from saga.transport.topology import Topology

__all__ = ["Handle", "Pipeline", "acceptable_content_type"]

log = structlog.get_logger("saga.messaging")

M = TypeVar("M", bound=BaseModel)

#: what ``handle`` returns: the outcome label counted in ``saga_messages_consumed_total``
Handle = Callable[[M, IncomingMessage], Awaitable[str]]
Attributes = Callable[[M], Mapping[str, str | int]]
#: told of each message acked after ``handle``: the message, its outcome, seconds since delivery
Settled = Callable[[M, str, float], None]


def acceptable_content_type(content_type: str | None) -> bool:
    """JSON in UTF-8: no content type, or ``application/json`` with at most a UTF-8 charset
    parameter (``application/json; charset=utf-8``), in any letter case."""
    if content_type is None:
        return True
    media, *params = (part.strip().lower() for part in content_type.split(";"))
    if media != "application/json":
        return False
    for param in params:
        name, _, value = param.partition("=")
        if name.strip() != "charset" or value.strip().strip('"') not in ("utf-8", "utf8"):
            return False
    return True


class Pipeline(Generic[M]):
    """Consumes ``queue``: each delivery is parsed as ``model`` and given to ``handle``.

    ``span_attributes`` and ``log_fields`` describe a parsed message for its process span and
    for every log line written while it is handled.
    """

    def __init__(
        self,
        queue: str,
        model: type[M],
        handle: Handle[M],
        *,
        broker: Broker,
        topology: Topology,
        tracing: Tracing,
        metrics: Metrics,
        poison: PoisonGuard,
        max_bytes: int,
        span_attributes: Attributes[M] | None = None,
        log_fields: Attributes[M] | None = None,
        retry_pause: float = 1.0,
        settled: Settled[M] | None = None,
    ):
        self.queue = queue
        self.model = model
        self._handle = handle
        self._broker = broker
        self._topology = topology
        self._tracing = tracing
        self._metrics = metrics
        self._poison = poison
        self._max_bytes = max_bytes
        self._span_attributes = span_attributes
        self._log_fields = log_fields
        self._retry_pause = retry_pause
        self._settled = settled
        #: deliveries being handled, for a graceful stop to wait on
        self.in_flight: set[asyncio.Task[object]] = set()
        self.dead_lettered = 0

    async def __call__(self, message: IncomingMessage) -> None:
        began = time.perf_counter() if self._settled is not None else 0.0
        task = asyncio.current_task()
        if task is not None:
            self.in_flight.add(task)
        try:
            # log lines take their trace ids from the span current at the time (saga.logs)
            with self._tracing.process(
                self.queue,
                message.headers,
                message.message_id,
                len(message.body),
                getattr(message, "delivery_tag", None),
            ):
                await self._consume(message, began)
        finally:
            if task is not None:
                self.in_flight.discard(task)

    async def _consume(self, message: IncomingMessage, began: float) -> None:
        parsed = await self._parse(message)
        if parsed is None:
            return
        if self._span_attributes is not None and self._tracing.recording:
            trace.get_current_span().set_attributes(self._span_attributes(parsed))
        bound = None if self._log_fields is None else bind_message(self._log_fields, parsed)
        try:
            outcome = await self._handle(parsed, message)
        except MessageError as exc:
            await self.dead_letter(message, exc.reason, exc.detail)
            return
        except Exception as exc:
            await self._failed(message, exc)
            return
        finally:
            if bound is not None:
                unbind_message(bound)
        await message.ack()
        self._poison.settled(delivery_key(message.message_id, message.body))
        self._metrics.messages.labels(self.queue, outcome).inc()
        if self._settled is not None:
            self._settled(parsed, outcome, time.perf_counter() - began)

    async def _parse(self, message: IncomingMessage) -> M | None:
        """The message as ``model``, or None once it has been dead-lettered."""
        if len(message.body) > self._max_bytes:
            detail = f"message is {len(message.body)} bytes, the limit is {self._max_bytes}"
            await self.dead_letter(message, "too_large", detail)
            return None
        if not acceptable_content_type(message.content_type):
            detail = f"content type {message.content_type!r}; send application/json (UTF-8)"
            await self.dead_letter(message, "wrong_content_type", detail)
            return None
        try:
            return parse(self.model, message.body, max_bytes=self._max_bytes)
        except ContractError as exc:
            await self.dead_letter(message, exc.reason, exc.detail)
            return None

    async def dead_letter(self, message: IncomingMessage, reason: str, detail: str) -> None:
        """Copy ``message`` to its queue's dead-letter queue with ``reason``, then ack it."""
        log.warning(
            "message_dead_lettered",
            queue=self.queue,
            reason=reason,
            detail=detail,
            message_id=message.message_id,
        )
        span = trace.get_current_span()
        span.set_attribute("saga.dead_letter_reason", reason)
        span.set_attribute("error.type", reason)
        span.set_status(Status(StatusCode.ERROR, f"dead-lettered: {reason}"))
        try:
            await self._broker.dead_letter(
                message, queue=self.queue, topology=self._topology, reason=reason, detail=detail
            )
        except Exception as exc:  # not copied: keep the original, or it would be lost
            await self._hand_back(message, exc)
            return
        self.dead_lettered += 1
        self._metrics.dead_lettered.labels(self.queue, reason).inc()
        self._metrics.messages.labels(self.queue, "dead_lettered").inc()
        await message.ack()
        self._poison.settled(delivery_key(message.message_id, message.body))

    async def _failed(self, message: IncomingMessage, exc: Exception) -> None:
        """Handling raised: hand the message back, unless it has now failed ``max_deliveries``
        times while the database was up; then it is poison, and dead-lettered so it cannot hold
        up its queue forever."""
        failures = await self._poison.failed(delivery_key(message.message_id, message.body), exc)
        if self._poison.exhausted(failures):
            detail = f"failed {failures} deliveries; last error: {describe_error(exc)}"
            await self.dead_letter(message, "poison", detail)
            return
        await self._hand_back(message, exc)

    async def _hand_back(self, message: IncomingMessage, exc: Exception) -> None:
        """Nothing was committed: requeue the message after a pause, so an outage does not
        turn into a redelivery storm."""
        log.warning("apply_failed_will_retry", error=repr(exc), message_id=message.message_id)
        await asyncio.sleep(self._retry_pause)
        with contextlib.suppress(Exception):
            await message.nack(requeue=True)
