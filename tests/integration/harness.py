"""An in-process orchestrator and scripted participant on the real broker, and helpers to
inspect what happened: sagas' history, the commands each saga sent, dead-letter queues."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from saga import Registry
from saga.core.state import HistoryEntry, HistoryKind, SagaState
from saga.orchestrator.service import OrchestratorService
from saga.protocol.envelope import ReplyEnvelope
from saga.settings import Settings, load_settings
from saga.store.sql import SqlStore
from saga.telemetry import Tracing
from saga.transport.topology import DEAD_LETTER_REASON, Topology
from tests.support.responder import Responder
from tests.support.sagas import PARTICIPANTS, registry


@dataclass(frozen=True)
class DeadLetter:
    body: bytes
    message_id: str | None
    headers: dict[str, str]

    @property
    def reason(self) -> str | None:
        return self.headers.get(DEAD_LETTER_REASON)


@dataclass
class Harness:
    """One test's world: its own broker prefix and its own database (file or schema)."""

    prefix: str
    rabbitmq_url: str
    database_url: str
    schema: str | None  # PostgreSQL: the schema the store lives in
    log: Path
    services: list[OrchestratorService] = field(default_factory=list)
    responder: Responder | None = None
    _connection: AbstractRobustConnection | None = None
    _channel: AbstractChannel | None = None

    @property
    def service(self) -> OrchestratorService:
        """The service started last."""
        return self.services[-1]

    @property
    def participant(self) -> Responder:
        assert self.responder is not None, "start_responder() first"
        return self.responder

    @property
    def topology(self) -> Topology:
        return Topology(prefix=self.prefix)

    def settings(self, **overrides: object) -> Settings:
        values: dict[str, object] = {
            "database_url": self.database_url,
            "rabbitmq_url": self.rabbitmq_url,
            "prefix": self.prefix,
            "auto_migrate": True,
            "timer_interval": 0.05,
            "relay_poll_interval": 0.2,
            "shutdown_timeout": 5.0,
        }
        values.update(overrides)
        return load_settings(**values)

    def new_store(self) -> SqlStore:
        return SqlStore(self.database_url, schema=self.schema)

    async def start_service(
        self,
        *,
        tracing: Tracing | None = None,
        definitions: Registry | None = None,
        **overrides: object,
    ) -> OrchestratorService:
        """The orchestrator with ``definitions`` (the trip saga unless given)."""
        service = OrchestratorService(
            self.settings(**overrides),
            definitions if definitions is not None else registry(),
            tracing=tracing,
        )
        if self.schema is not None:
            store = self.new_store()
            service.store = store
            service.orchestrator.store = store
        await service.start()
        self.services.append(service)
        return service

    async def stop_service(self, service: OrchestratorService) -> None:
        self.services.remove(service)
        await service.stop()

    async def start_responder(self, *, late_after: float = 2.5) -> Responder:
        assert self.responder is None
        responder = Responder(self.rabbitmq_url, self.prefix, self.log, late_after=late_after)
        await responder.start()
        self.responder = responder
        return responder

    # --- raw broker access ---------------------------------------------------------------

    async def channel(self) -> AbstractChannel:
        if self._connection is None:
            self._connection = await aio_pika.connect_robust(self.rabbitmq_url)
        if self._channel is None or self._channel.is_closed:
            self._channel = await self._connection.channel()
        return self._channel

    async def publish(
        self,
        queue: str,
        body: bytes,
        *,
        content_type: str | None = "application/json",
        message_id: str | None = None,
    ) -> str:
        """Put ``body`` straight into ``queue`` through the default exchange."""
        message_id = message_id or str(uuid.uuid4())
        channel = await self.channel()
        await channel.default_exchange.publish(
            aio_pika.Message(body, content_type=content_type, message_id=message_id),
            routing_key=queue,
        )
        return message_id

    async def dead_letters(
        self,
        queue: str,
        count: int,
        *,
        timeout: float = 10.0,  # noqa: ASYNC109
    ) -> list[DeadLetter]:
        """Take ``count`` messages off ``queue``'s dead-letter queue (fail if they do not come),
        then make sure no more arrive."""
        channel = await self.channel()
        dlq = await channel.get_queue(self.topology.dead_letter_queue(queue))
        found: list[DeadLetter] = []
        deadline = time.monotonic() + timeout
        while len(found) < count and time.monotonic() < deadline:
            message = await dlq.get(no_ack=True, fail=False)
            if message is None:
                await asyncio.sleep(0.05)
                continue
            found.append(
                DeadLetter(message.body, message.message_id, _text_headers(message.headers))
            )
        if len(found) < count:
            pytest.fail(f"{dlq.name}: expected {count} dead letters, got {found}")
        await asyncio.sleep(0.2)
        extra = await dlq.get(no_ack=True, fail=False)
        assert extra is None, f"unexpected extra dead letter: {extra.body!r} {extra.headers}"
        return found

    async def cleanup(self) -> None:
        """Stop everything, then delete every queue and exchange of this prefix."""
        if self.responder is not None:
            with contextlib.suppress(Exception):
                await self.responder.stop()
            self.responder = None
        for service in reversed(self.services):
            with contextlib.suppress(Exception):
                await service.stop()
        self.services.clear()
        try:
            channel = await self.channel()
            for queue in self.topology.queues(PARTICIPANTS):
                channel = await self.channel()
                with contextlib.suppress(Exception):
                    await channel.queue_delete(queue.name)
            for exchange in self.topology.exchanges():
                channel = await self.channel()
                with contextlib.suppress(Exception):
                    await channel.exchange_delete(exchange.name)
        finally:
            if self._connection is not None:
                await self._connection.close()
            self._connection = None
            self._channel = None
        if self.schema is not None:
            store = self.new_store()
            try:
                await store.drop_schema()
            finally:
                await store.close()


def _text_headers(headers: dict[str, Any] | None) -> dict[str, str]:
    return {
        str(k): v.decode() if isinstance(v, bytes) else str(v) for k, v in (headers or {}).items()
    }


# --- inspecting sagas -----------------------------------------------------------------------


async def wait_terminal(
    service: OrchestratorService,
    saga_ids: Iterable[UUID],
    timeout: float = 20.0,  # noqa: ASYNC109
) -> list[SagaState]:
    """Poll until every saga is COMPLETED, COMPENSATED or FAILED; fail with the history of the
    ones that are not."""
    ids = list(saga_ids)
    deadline = time.monotonic() + timeout
    while True:
        found = await service.store.load_many(ids)
        states = [found.get(saga_id) for saga_id in ids]
        done = [s for s in states if s is not None and s.status.is_terminal]
        if len(done) == len(ids):
            return done
        if time.monotonic() > deadline:
            report = []
            for saga_id, s in zip(ids, states, strict=True):
                if s is None:
                    report.append(f"saga {saga_id} does not exist")
                elif not s.status.is_terminal:
                    history = await service.orchestrator.history(saga_id)
                    lines = "\n    ".join(describe(h) for h in history)
                    report.append(f"saga {saga_id} still {s.status.value}:\n    {lines}")
            pytest.fail(f"not terminal after {timeout} s:\n" + "\n".join(report))
        await asyncio.sleep(0.05)


async def wait_history(
    service: OrchestratorService,
    saga_id: UUID,
    kind: HistoryKind,
    count: int,
    *,
    timeout: float = 10.0,  # noqa: ASYNC109
) -> list[HistoryEntry]:
    """Wait until ``saga_id`` has ``count`` history entries of ``kind`` and no more arrive."""
    deadline = time.monotonic() + timeout
    while True:
        history = await service.orchestrator.history(saga_id)
        found = [h for h in history if h.kind is kind]
        if len(found) >= count:
            break
        if time.monotonic() > deadline:
            lines = "\n    ".join(describe(h) for h in history)
            pytest.fail(f"expected {count} {kind.value} entries, got {len(found)}:\n    {lines}")
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)  # anything still on its way would show up now
    history = await service.orchestrator.history(saga_id)
    return [h for h in history if h.kind is kind]


async def wait_until(
    condition: Callable[[], bool],
    what: str,
    *,
    timeout: float = 10.0,  # noqa: ASYNC109
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for: {what}")
        await asyncio.sleep(0.05)


def describe(h: HistoryEntry) -> str:
    where = f" {h.step} {h.direction} #{h.attempt}" if h.step else ""
    return f"{h.kind.value}{where}: {h.detail}"


def kinds(history: Sequence[HistoryEntry]) -> list[str]:
    return [h.kind.value for h in history]


def commands(responder: Responder, saga_id: UUID) -> list[tuple[str, int]]:
    """Every delivery the participant received for ``saga_id``, in order: (type, attempt)."""
    found = []
    for r in responder.received:
        if r["saga_id"] != str(saga_id):
            continue
        found.append(
            (f"{r['step']}.{'do' if r['direction'] == 'action' else 'undo'}", r["attempt"])
        )
    return found


def command_types(responder: Responder, saga_id: UUID) -> list[str]:
    return [kind for kind, _ in commands(responder, saga_id)]


def reply_body(saga_id: UUID) -> bytes:
    """A valid reply envelope (as a participant would send) for ``saga_id``."""
    reply = ReplyEnvelope(
        schema_version=1,
        message_id=uuid.uuid4(),
        causation_id=uuid.uuid4(),
        saga_id=saga_id,
        participant="alpha",
        command_type="alpha.do",
        outcome="success",
    )
    return reply.model_dump_json().encode()
