"""Plumbing of the fault tests: worlds on the real broker, a participant played by hand, and
real ways to break a SQLite database.

The database faults are the real thing, not mocks: another process holding ``BEGIN IMMEDIATE``
(writers get "database is locked" once their busy timeout is over), ``PRAGMA max_page_count``
at the current size (writes that need a new page get "database or disk is full"), and a trigger
that rejects one row (a constraint error on every try of exactly one message).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID

import aio_pika
import pytest
import sqlalchemy as sa
from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from pydantic import JsonValue
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import saga.messaging.pipeline
import saga.orchestrator.inbound
import saga.orchestrator.service
import saga.participant.runtime
from saga import Registry, RetryPolicy, SagaDefinition, Step
from saga.core.ids import command_id, idempotency_key
from saga.orchestrator.service import OrchestratorService
from saga.participant import Participant, ParticipantSettings
from saga.ports import Clock
from saga.protocol.envelope import CommandEnvelope, ReplyEnvelope
from saga.store.sql import SqlStore
from saga.transport.topology import DEAD_LETTER_REASON, Topology
from saga_demo import payment
from saga_demo.contracts.payment import CHARGE, PARTICIPANT, REFUND
from tests.conftest import require_postgres, require_rabbitmq
from tests.integration.harness import DeadLetter, Harness
from tests.support.sagas import PARTICIPANTS

# --- sagas ----------------------------------------------------------------------------------

_RETRY = RetryPolicy(max_attempts=3, initial_backoff=timedelta(milliseconds=50), jitter=0.1)


def slow_trip(timeout: timedelta = timedelta(seconds=30), retry: RetryPolicy = _RETRY) -> Registry:
    """The integration tests' ``trip`` saga with long step timeouts: a fault that lasts a few
    seconds must not let a timeout race the replies it held up, or the outcome would depend on
    timing instead of on the product."""
    definition = SagaDefinition(
        "trip",
        1,
        [
            Step(
                name,
                participant=name,
                action=f"{name}.do",
                compensation=f"{name}.undo",
                timeout=timeout,
                retry=retry,
                compensation_retry=retry,
            )
            for name in PARTICIPANTS
        ],
    )
    return Registry([definition], participants=PARTICIPANTS)


# --- the orchestrator -----------------------------------------------------------------------


@asynccontextmanager
async def open_harness(
    tmp_path: Path, unique: str, backend: str = "sqlite"
) -> AsyncIterator[Harness]:
    """Like the integration tests' ``harness`` fixture: own prefix, own SQLite file or
    PostgreSQL schema (dropped afterwards)."""
    if backend == "postgres":
        database_url, schema = require_postgres(), f"saga_ft_{unique}"
    else:
        database_url, schema = f"sqlite+aiosqlite:///{tmp_path / 'saga.db'}", None
    world = Harness(
        prefix=f"f-{unique}",
        rabbitmq_url=require_rabbitmq(),
        database_url=database_url,
        schema=schema,
        log=tmp_path / "responder.jsonl",
    )
    try:
        yield world
    finally:
        await world.cleanup()


def sqlite_path(harness: Harness) -> Path:
    return Path(harness.database_url.split(":///", 1)[1])


async def start_orchestrator(
    harness: Harness,
    registry: Registry,
    *,
    clock: Clock | None = None,
    busy_timeout_ms: int | None = None,
    **overrides: object,
) -> OrchestratorService:
    """Start the orchestrator service with ``registry``; ``busy_timeout_ms`` swaps in a store
    with a shorter SQLite busy timeout (the same code, so a lock test need not last 10 s)."""
    service = OrchestratorService(
        harness.settings(timer_grace=0, **overrides), registry, clock=clock
    )
    if busy_timeout_ms is not None or harness.schema is not None:
        store = SqlStore(
            harness.database_url,
            schema=harness.schema,
            busy_timeout_ms=10_000 if busy_timeout_ms is None else busy_timeout_ms,
        )
        service.store = store
        service.orchestrator.store = store
    await service.start()
    harness.services.append(service)
    return service


# --- logs -----------------------------------------------------------------------------------


def record_logs(monkeypatch: Any, recorder: LogRecorder, *, of: str) -> None:
    """Route the log lines of the orchestrator's (``of="orchestrator"``) or a participant's
    modules, and of the consume pipeline they share, to ``recorder``."""
    own = (
        (saga.orchestrator.service, saga.orchestrator.inbound)
        if of == "orchestrator"
        else (saga.participant.runtime,)
    )
    for module in (*own, saga.messaging.pipeline):
        monkeypatch.setattr(module, "log", recorder)


class LogRecorder:
    """Stands in for a module's structlog logger (``monkeypatch.setattr(module, "log", ...)``)
    and keeps every line, whatever structlog's global configuration is."""

    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []

    def _log(self, level: str, event: str, **fields: Any) -> None:
        self.lines.append({"level": level, "event": event, **fields})

    def is_enabled_for(self, level: int) -> bool:
        return True

    def debug(self, event: str, **fields: Any) -> None:
        self._log("debug", event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log("info", event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log("warning", event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log("error", event, **fields)

    def exception(self, event: str, **fields: Any) -> None:
        self._log("exception", event, **fields)

    def named(self, event: str, **match: Any) -> list[dict[str, Any]]:
        """Lines of ``event`` whose fields equal ``match``."""
        return [
            line
            for line in self.lines
            if line["event"] == event and all(line.get(k) == v for k, v in match.items())
        ]


# --- playing the participants by hand -------------------------------------------------------


@dataclass
class CommandTap:
    """Takes commands off the participants' queues, so a test decides every reply itself."""

    harness: Harness
    participants: Iterable[str] = PARTICIPANTS
    received: list[CommandEnvelope] = field(default_factory=list)

    async def poll(self) -> None:
        channel = await self.harness.channel()
        for participant in self.participants:
            queue = await channel.get_queue(self.harness.topology.command_queue(participant))
            while (message := await queue.get(no_ack=True, fail=False)) is not None:
                self.received.append(CommandEnvelope.model_validate_json(message.body))

    def count(self, saga_id: UUID, step: str, direction: str = "action", attempt: int = 1) -> int:
        wanted = command_id(saga_id, step, direction, attempt)
        return sum(1 for c in self.received if c.message_id == wanted)

    async def expect(
        self,
        saga_id: UUID,
        step: str,
        direction: str = "action",
        attempt: int = 1,
        *,
        timeout: float = 10.0,  # noqa: ASYNC109
    ) -> CommandEnvelope:
        wanted = command_id(saga_id, step, direction, attempt)
        deadline = time.monotonic() + timeout
        while True:
            await self.poll()
            for command in self.received:
                if command.message_id == wanted:
                    return command
            if time.monotonic() > deadline:
                seen = [(c.step, c.direction, c.attempt) for c in self.received]
                pytest.fail(f"no {step} {direction} #{attempt} for {saga_id}; got {seen}")
            await asyncio.sleep(0.05)


def reply_json(command: CommandEnvelope, **changes: JsonValue) -> bytes:
    """A success reply to ``command`` with fields overridden (even into invalid values)."""
    body: dict[str, Any] = json.loads(ReplyEnvelope.success(command, {}).model_dump_json())
    body.update(changes)
    return json.dumps(body).encode()


# --- breaking SQLite for real ---------------------------------------------------------------

_HOLD_LOCK = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.readline()
conn.rollback()
conn.close()
"""


class WriteLock:
    """Another process holding ``BEGIN IMMEDIATE`` on a SQLite file until released."""

    def __init__(self, path: Path):
        self.path = path
        self._proc: asyncio.subprocess.Process | None = None

    async def acquire(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _HOLD_LOCK,
            str(self.path),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert self._proc.stdout is not None
        line = await asyncio.wait_for(self._proc.stdout.readline(), 30)
        assert line.strip() == b"locked", f"the lock holder said {line!r}"

    async def release(self) -> None:
        if self._proc is None:
            return
        proc, self._proc = self._proc, None
        assert proc.stdin is not None
        with contextlib.suppress(Exception):
            proc.stdin.write(b"\n")
            await proc.stdin.drain()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


class PageLimit:
    """``PRAGMA max_page_count`` on every connection ``engine`` hands out: while ``full``, the
    file may not grow, so every write that needs a new page fails with "database or disk is
    full", as on a full disk. The pragma is per connection, hence the checkout hook."""

    def __init__(self, engine: AsyncEngine):
        self.engine = engine
        self.full = False
        self._unlimited: int | None = None
        event.listen(engine.sync_engine, "checkout", self._on_checkout)

    def _on_checkout(self, dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            if self._unlimited is None:
                cursor.execute("PRAGMA max_page_count")
                self._unlimited = int(cursor.fetchone()[0])
            if self.full:
                cursor.execute("PRAGMA page_count")
                pages = int(cursor.fetchone()[0])
                cursor.execute(f"PRAGMA max_page_count = {pages}")
            else:
                cursor.execute(f"PRAGMA max_page_count = {self._unlimited}")
        finally:
            cursor.close()

    def remove(self) -> None:
        event.remove(self.engine.sync_engine, "checkout", self._on_checkout)


async def reject_inbox(harness: Harness, message_id: UUID, message: str) -> None:
    """Make every attempt to record ``message_id`` in the orchestrator's inbox fail, on SQLite
    or PostgreSQL (the database itself raises, every time, for that one message)."""
    if harness.schema is None:
        reject_rows(sqlite_path(harness), "saga_inbox", "message_id", message_id, message)
        return
    engine = create_async_engine(harness.database_url)
    schema = harness.schema
    try:
        async with engine.begin() as conn:
            await conn.execute(
                sa.text(
                    f'CREATE FUNCTION "{schema}".reject_{message_id.hex[:8]}() RETURNS trigger '
                    f"LANGUAGE plpgsql AS $$ BEGIN IF NEW.message_id = '{message_id}'::uuid "
                    f"THEN RAISE EXCEPTION '{message}'; END IF; RETURN NEW; END $$"
                )
            )
            await conn.execute(
                sa.text(
                    f'CREATE TRIGGER reject_{message_id.hex[:8]} BEFORE INSERT ON "{schema}".'
                    f'saga_inbox FOR EACH ROW EXECUTE FUNCTION "{schema}".'
                    f"reject_{message_id.hex[:8]}()"
                )
            )
    finally:
        await engine.dispose()


def reject_rows(path: Path, table: str, column: str, value: UUID, message: str) -> None:
    """A trigger that makes every insert of ``value`` into ``table`` fail (SQLite stores a
    UUID as its 32 hex digits)."""
    conn = sqlite3.connect(path, timeout=30)
    try:
        conn.execute(
            f"CREATE TRIGGER reject_{value.hex[:8]} BEFORE INSERT ON {table} "
            f"WHEN NEW.{column} = '{value.hex}' BEGIN SELECT RAISE(ABORT, '{message}'); END"
        )
        conn.commit()
    finally:
        conn.close()


# --- the broker -----------------------------------------------------------------------------


def _text_headers(headers: dict[str, Any] | None) -> dict[str, str]:
    return {
        str(k): v.decode() if isinstance(v, bytes) else str(v) for k, v in (headers or {}).items()
    }


async def take(
    channel: AbstractChannel,
    queue: str,
    count: int,
    *,
    timeout: float = 10.0,  # noqa: ASYNC109
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Take ``count`` messages off ``queue`` (fail if they do not come), then make sure no more
    are there."""
    target = await channel.get_queue(queue)
    found: list[aio_pika.abc.AbstractIncomingMessage] = []
    deadline = time.monotonic() + timeout
    while len(found) < count and time.monotonic() < deadline:
        message = await target.get(no_ack=True, fail=False)
        if message is None:
            await asyncio.sleep(0.05)
            continue
        found.append(message)
    if len(found) < count:
        pytest.fail(f"{queue}: expected {count} messages, got {[m.body for m in found]}")
    await asyncio.sleep(0.3)
    extra = await target.get(no_ack=True, fail=False)
    assert extra is None, f"{queue}: unexpected extra message {extra.body!r} {extra.headers}"
    return found


async def dead_letters(
    channel: AbstractChannel,
    queue: str,
    count: int,
    *,
    timeout: float = 10.0,  # noqa: ASYNC109
) -> list[DeadLetter]:
    messages = await take(channel, Topology.dead_letter_queue(queue), count, timeout=timeout)
    return [DeadLetter(m.body, m.message_id, _text_headers(m.headers)) for m in messages]


async def ready(channel: AbstractChannel, queue: str) -> int:
    """Messages ready in ``queue`` (not counting those delivered and not yet settled)."""
    declared = await channel.declare_queue(queue, passive=True)
    return int(declared.declaration_result.message_count or 0)


def reason_of(dead: DeadLetter) -> str | None:
    return dead.headers.get(DEAD_LETTER_REASON)


# --- a real participant (payment) on the real broker ----------------------------------------


@dataclass
class PaymentWorld:
    """The payment service in this process on its own SQLite file and queue prefix; the test
    plays the orchestrator: it publishes commands and reads the replies."""

    prefix: str
    rabbitmq_url: str
    service: Participant
    connection: AbstractRobustConnection
    channel: AbstractChannel

    @property
    def topology(self) -> Topology:
        return Topology(prefix=self.prefix)

    @property
    def queue(self) -> str:
        return self.topology.command_queue(PARTICIPANT)

    @property
    def database(self) -> Path:
        return Path(self.service.ledger.url.split(":///", 1)[1])

    def command(
        self,
        command_type: str,
        payload: dict[str, JsonValue],
        *,
        saga_id: UUID | None = None,
        participant: str = PARTICIPANT,
    ) -> CommandEnvelope:
        """A command as the orchestrator would send it, with any payload (even a bad one)."""
        saga_id = saga_id or uuid.uuid4()
        step, direction = "charge_payment", "action"
        if command_type == REFUND:
            direction = "compensation"
        return CommandEnvelope(
            schema_version=1,
            message_id=command_id(saga_id, step, direction, 1),
            idempotency_key=idempotency_key(saga_id, step, direction),
            saga_id=saga_id,
            saga_name="checkout",
            step=step,
            direction=direction,  # type: ignore[arg-type]
            attempt=1,
            participant=participant,
            command_type=command_type,
            reply_to=self.topology.reply_queue,
            deadline=datetime.now(UTC) + timedelta(minutes=5),
            payload=payload,
        )

    def charge(self, amount: str, *, saga_id: UUID | None = None) -> CommandEnvelope:
        saga_id = saga_id or uuid.uuid4()
        return self.command(
            CHARGE,
            {
                "order_ref": str(saga_id),
                "customer_id": str(payment.ALICE),
                "amount": amount,
                "currency": "EUR",
            },
            saga_id=saga_id,
        )

    async def send(
        self,
        body: bytes,
        *,
        message_id: str | None = None,
        content_type: str | None = "application/json",
    ) -> str:
        message_id = message_id or str(uuid.uuid4())
        await self.channel.default_exchange.publish(
            aio_pika.Message(body, content_type=content_type, message_id=message_id),
            routing_key=self.queue,
        )
        return message_id

    async def send_command(self, command: CommandEnvelope) -> str:
        body = command.model_dump_json().encode()
        return await self.send(body, message_id=str(command.message_id))

    async def replies(
        self,
        count: int,
        *,
        timeout: float = 15.0,  # noqa: ASYNC109
    ) -> dict[UUID, list[ReplyEnvelope]]:
        """Wait for replies to ``count`` distinct commands; every copy, by causation id (the
        relay may publish a reply twice when it could not mark it sent)."""
        target = await self.channel.get_queue(self.topology.reply_queue)
        found: dict[UUID, list[ReplyEnvelope]] = {}
        deadline = time.monotonic() + timeout
        while len(found) < count:
            message = await target.get(no_ack=True, fail=False)
            if message is None:
                if time.monotonic() > deadline:
                    pytest.fail(f"expected replies to {count} commands, got {found}")
                await asyncio.sleep(0.05)
                continue
            reply = ReplyEnvelope.model_validate_json(message.body)
            found.setdefault(reply.causation_id, []).append(reply)
        return found

    async def balance(self) -> Decimal:
        async with self.service.ledger.reader.connect() as conn:
            found = await conn.scalar(
                sa.select(payment.accounts.c.balance).where(
                    payment.accounts.c.customer_id == payment.ALICE
                )
            )
        assert isinstance(found, Decimal)
        return found

    async def charges(self) -> list[dict[str, Any]]:
        async with self.service.ledger.reader.connect() as conn:
            rows = await conn.execute(sa.select(payment.payments))
            return [dict(r._mapping) for r in rows]


@asynccontextmanager
async def payment_world(
    tmp_path: Path, unique: str, *, start: bool = True, **settings: Any
) -> AsyncIterator[PaymentWorld]:
    """The payment participant, started unless ``start`` is false (call ``service.start()``
    after tampering with it); everything is stopped and deleted afterwards."""
    url = require_rabbitmq()
    prefix = f"fp-{unique}"
    service = payment.build(
        ParticipantSettings(
            rabbitmq_url=url,
            prefix=prefix,
            data_dir=tmp_path,
            services_database_url=None,
            relay_poll_interval=0.2,
            **settings,
        )
    )
    connection = await aio_pika.connect_robust(url)
    channel = await connection.channel()
    world = PaymentWorld(prefix, url, service, connection, channel)
    try:
        if start:
            await service.start()
        yield world
    finally:
        with contextlib.suppress(Exception):
            await service.stop()
        topology = Topology(prefix=prefix)
        cleanup = await connection.channel()
        for queue in topology.queues([PARTICIPANT]):
            with contextlib.suppress(Exception):
                await cleanup.queue_delete(queue.name)
        for exchange in topology.exchanges():
            with contextlib.suppress(Exception):
                await cleanup.exchange_delete(exchange.name)
        await connection.close()
