"""aio-pika plumbing: connect, declare the topology, publish with confirms, dead-letter.

Publishing channels are opened with ``publisher_confirms=True`` and ``on_return_raises=True``:
aio-pika's default is to treat a returned (unroutable) ``mandatory`` message as delivered, which
would let the relay mark a command sent that no queue ever received.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractRobustConnection,
)

from saga.errors import ConfigError
from saga.secrets import redact_url
from saga.transport.topology import Topology

__all__ = ["PublishRefusedError", "Publisher", "TlsFiles", "connect", "declare", "safe_url"]


#: seconds between reconnect attempts, unless the URL says (``?reconnect_interval=...``)
RECONNECT_INTERVAL = 1.0


class PublishRefusedError(Exception):
    """The broker returned or nacked a message: it is not in any queue."""


def safe_url(url: str) -> str:
    """The URL with its password hidden, for error messages and logs."""
    return redact_url(url)


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


async def connect(
    url: str, *, connect_timeout: float = 10.0, tls: TlsFiles | None = None
) -> AbstractRobustConnection:
    """A robust connection (reconnects and re-declares by itself), or a clear ConfigError.

    ``amqps://`` URLs use TLS with ``tls``'s files (or the system's CAs)."""
    options: dict[str, Any] = {}
    if "reconnect_interval=" not in url:
        # aio-pika waits 5 s before each reconnect attempt; a blip of the network or a broker
        # restart would then hold every command and reply back longer than a step's timeout
        options["reconnect_interval"] = RECONNECT_INTERVAL
    if url.startswith("amqps://"):
        try:
            options["ssl_context"] = (tls or TlsFiles()).context()
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the TLS files for {safe_url(url)}: {exc}") from exc
    try:
        connection: AbstractRobustConnection = await aio_pika.connect_robust(
            url, timeout=connect_timeout, **options
        )
        return connection
    except (OSError, TimeoutError, aiormq.exceptions.AMQPError) as exc:
        raise ConfigError(
            f"cannot reach RabbitMQ at {safe_url(url)}: {exc!r}. Is it running? "
            "Set SAGA_RABBITMQ_URL to its amqp:// address."
        ) from exc


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
        queues[q.name] = await channel.declare_queue(
            q.name, durable=True, arguments=dict[str, Any](q.arguments)
        )
    for b in topology.bindings(names):
        await queues[b.queue].bind(exchanges[b.exchange], routing_key=b.routing_key)


#: a publish not confirmed by then is given up (and retried by the relay on a new channel)
CONFIRM_TIMEOUT = 10.0


class Publisher:
    """Persistent messages on a confirm channel; each publish returns after its confirm."""

    def __init__(self, connection: AbstractRobustConnection):
        self._connection = connection
        self._channel: AbstractChannel | None = None
        self._exchanges: dict[str, AbstractExchange] = {}
        self._lock = asyncio.Lock()

    async def _exchange(self, name: str) -> AbstractExchange:
        async with self._lock:
            if self._channel is None or self._channel.is_closed:
                self._channel = await self._connection.channel(
                    publisher_confirms=True, on_return_raises=True
                )
                self._exchanges.clear()
            if name not in self._exchanges:
                self._exchanges[name] = (
                    self._channel.default_exchange
                    if name == ""
                    else await self._channel.get_exchange(name, ensure=False)
                )
            return self._exchanges[name]

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
        target = await self._exchange(exchange)
        msg = aio_pika.Message(
            body,
            message_id=message_id,
            correlation_id=correlation_id,
            type=message_type,
            headers=dict(headers or {}),
            content_type=content_type,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            timestamp=timestamp or datetime.now(UTC),
        )
        channel = self._channel
        try:
            confirmation = await asyncio.wait_for(
                target.publish(msg, routing_key=routing_key, mandatory=True), CONFIRM_TIMEOUT
            )
        except aio_pika.exceptions.DeliveryError as exc:
            raise PublishRefusedError(f"broker returned the message: {exc}") from exc
        except (TimeoutError, aiormq.exceptions.AMQPError) as exc:
            # A channel that lost its transport in a reconnect can stay broken, and a publish on
            # it never confirmed: the caller (the relay) retries, on a fresh channel.
            await self._renew(channel)
            raise PublishRefusedError(f"no confirm ({type(exc).__name__}): {exc}") from exc
        if not isinstance(confirmation, aiormq.spec.Basic.Ack):
            raise PublishRefusedError(f"broker did not confirm the message: {confirmation!r}")

    async def _renew(self, failed: AbstractChannel | None) -> None:
        """Drop ``failed`` (unless another publish has replaced it already); the next publish
        opens a new channel."""
        async with self._lock:
            if failed is None or self._channel is not failed:
                return
            self._channel = None
            self._exchanges.clear()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(failed.close(), 5)

    async def close(self) -> None:
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()
