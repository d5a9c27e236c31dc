"""Start sagas from your own program, by message.

:class:`SagaClient` publishes ``StartSaga`` requests to the deployment's start queue: each one
persistent, mandatory and confirmed by the broker before :meth:`SagaClient.start` returns, so a
start that returned is durable, and one that raised may be sent again (the key makes it the same
saga). The orchestrator validates the input against the saga's input model and dead-letters an
invalid one (``invalid_input``); to get that answer at once, start in-process or through the
admin API instead.

::

    async with await SagaClient.connect("amqp://guest:guest@127.0.0.1/", prefix="saga") as c:
        saga_id = await c.start("trip", {"traveller": "ann", ...}, key="ann-2027-05-01")
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Self, cast

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection
from pydantic import JsonValue

from saga.core.errors import ConfigError
from saga.core.ids import saga_id_for_key
from saga.protocol.envelope import StartSaga
from saga.telemetry import Tracing
from saga.transport.amqp import connect_once
from saga.transport.topology import Topology

__all__ = ["SagaClient", "StartRefusedError"]


class StartRefusedError(OSError):
    """The broker did not take a start request (no queue, or not confirmed): send it again."""


class SagaClient:
    """A connection to the broker that starts sagas; build it with :meth:`connect`."""

    def __init__(
        self,
        connection: AbstractConnection,
        channel: AbstractChannel,
        prefix: str,
        tracing: Tracing | None = None,
    ):
        self._connection = connection
        self._channel = channel
        self.queue = Topology(prefix=prefix).start_queue
        self._tracing = tracing if tracing is not None else Tracing()
        url = getattr(connection, "url", None)  # aio-pika's connections know their URL
        if url is not None and url.host:
            address = (str(url.host), int(url.port or 5672))
            self._tracing.server = lambda: address

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        prefix: str = "saga",
        wait: float = 30.0,
        connect_timeout: float = 10.0,
        tracing: Tracing | None = None,
    ) -> SagaClient:
        """Connect to the broker at ``url`` and wait up to ``wait`` seconds for the
        orchestrator to have declared its start queue (a client may start first); ConfigError
        when the broker cannot be reached or the queue never appears."""
        connection = await connect_once(url, connect_timeout=connect_timeout)
        try:
            queue = Topology(prefix=prefix).start_queue
            await _wait_for_queue(connection, queue, wait, prefix)
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        except BaseException:
            await connection.close()
            raise
        return cls(connection, channel, prefix, tracing)

    async def start(
        self, name: str, input: Mapping[str, Any], *, key: str, message_id: uuid.UUID | None = None
    ) -> uuid.UUID:
        """Ask for saga ``name`` with ``input``, idempotent by ``key``; returns the saga's id
        once the broker confirmed the request."""
        request = StartSaga(
            schema_version=1,
            message_id=message_id or uuid.uuid4(),
            saga_name=name,
            key=key,
            input=cast(dict[str, JsonValue], dict(input)),
        )
        await self.publish([request])
        return saga_id_for_key(name, key)

    async def publish(self, requests: Sequence[StartSaga]) -> None:
        """Publish ``requests`` concurrently; StartRefusedError if any was not confirmed."""
        outcomes = await asyncio.gather(
            *(self._publish(r) for r in requests), return_exceptions=True
        )
        refused = [o for o in outcomes if not isinstance(o, aiormq.spec.Basic.Ack)]
        if refused:
            raise StartRefusedError(
                f"{len(refused)} of {len(requests)} start requests not confirmed: {refused[0]!r}"
            )

    async def _publish(self, request: StartSaga) -> Any:
        # The client's publish span begins the saga's trace: the orchestrator continues it.
        saga_id = saga_id_for_key(request.saga_name, request.key)
        span, headers = self._tracing.publish("", self.queue, request.message_id, saga_id, {})
        try:
            return await self._channel.default_exchange.publish(
                aio_pika.Message(
                    request.model_dump_json().encode(),
                    message_id=str(request.message_id),
                    correlation_id=str(saga_id),
                    type="saga.start",
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    headers=headers,
                ),
                routing_key=self.queue,
                mandatory=True,
            )
        finally:
            span.end()

    async def close(self) -> None:
        await self._connection.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()


async def _wait_for_queue(
    connection: AbstractConnection, queue: str, wait: float, prefix: str
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while True:
        probe = await connection.channel()
        try:
            await probe.declare_queue(queue, passive=True)
            return
        except aiormq.exceptions.ChannelNotFoundEntity:
            if loop.time() >= deadline:
                raise ConfigError(
                    f"queue {queue!r} does not exist after {wait:g}s: is the orchestrator "
                    f"running with SAGA_PREFIX={prefix}?"
                ) from None
            await asyncio.sleep(0.5)
        finally:
            if not probe.is_closed:
                await probe.close()
