"""The participant runtime: consume commands, run handlers exactly once, reply via the outbox."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, NamedTuple, cast

import sqlalchemy as sa
import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from pydantic import JsonValue
from sqlalchemy.ext.asyncio import AsyncConnection

from contracts.catalog import CATALOG, CommandContract
from contracts.common import Contract, ContractError
from contracts.envelope import CommandEnvelope, ReplyEnvelope, dump_data, parse, parse_data
from saga.faults import crash_point
from saga.messaging.poison import PoisonGuard, delivery_key
from saga.participant.errors import BusinessError, TransientError
from saga.participant.faults import INJECTED_REFUSAL, INJECTED_TRANSIENT, load_fault_plan
from saga.participant.group import GroupCommit
from saga.participant.ledger import Ledger, now, outbox, processed, replies
from saga.participant.settings import ServiceSettings
from saga.ports import OutboxMessage
from saga.relay import Relay
from saga.secrets import redact_url
from saga.store.faults import database_reachable, describe_error
from saga.telemetry import Metrics, MetricsServer, Tracing, trace_ids
from saga.transport.broker import AmqpBroker, Broker, Consumer, IncomingMessage
from saga.transport.topology import Topology

__all__ = ["Handler", "Participant"]

log = structlog.get_logger("saga.participant")

Handler = Callable[[AsyncConnection, Any, CommandEnvelope], Awaitable[Contract]]
Seed = Callable[[AsyncConnection], Awaitable[None]]
_PROPAGATOR = TraceContextTextMapPropagator()


class _Work(NamedTuple):
    """A command for the group commit, with the trace context it was received in."""

    command: CommandEnvelope
    trace: otel_context.Context


class Participant:
    """A participant service on a broker: RabbitMQ at ``settings.rabbitmq_url`` unless
    ``broker`` (or the ``broker`` attribute, set before :meth:`start`) gives another. A broker
    given belongs to the caller, who closes it; the one :meth:`start` connects, :meth:`stop`
    closes."""

    def __init__(
        self,
        name: str,
        settings: ServiceSettings,
        *,
        business: sa.MetaData | None = None,
        seed: Seed | None = None,
        broker: Broker | None = None,
        tracing: Tracing | None = None,
        metrics: Metrics | None = None,
    ):
        self.name = name
        self.settings = settings
        self.topology = Topology(prefix=settings.prefix, quorum=settings.quorum_queues)
        url, schema = settings.database_url(name)
        if url.startswith("sqlite"):
            settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger(
            url, schema=schema, business=business, sqlite_synchronous=settings.sqlite_synchronous
        )
        self.seed = seed
        #: failures to give on purpose, by (saga id, command type): SAGA_FAULT_PLAN's, and the
        #: demo's stuck refund
        self.faults = load_fault_plan(settings.fault_plan)
        self._handlers: dict[str, tuple[CommandContract, Handler]] = {}
        self.broker: Broker | None = broker
        self._own_broker: Broker | None = None  # made by start(), closed by stop()
        self._consumer: Consumer | None = None
        self._started = False
        self._relay: Relay | None = None
        self._relay_task: asyncio.Task[None] | None = None
        self._in_flight: set[asyncio.Task[Any]] = set()
        self._group: GroupCommit[_Work, ReplyEnvelope] = GroupCommit(self._apply)
        self.tracing = tracing if tracing is not None else Tracing()
        #: shared by every participant of a ``saga-service all`` process (one /metrics port)
        self.metrics = metrics if metrics is not None else Metrics()
        self._database_system = "sqlite" if self.ledger.is_sqlite else "postgresql"
        self._poison = PoisonGuard(settings.max_deliveries, self._database_up)
        self.handled = 0
        self.duplicates = 0
        self.dead_lettered = 0

    def handler(self, command_type: str) -> Callable[[Handler], Handler]:
        """Register the handler of ``command_type`` (a command of this participant's)."""
        contract = CATALOG.get(command_type)
        if contract is None or contract.participant != self.name:
            raise ValueError(f"{command_type!r} is not a command of participant {self.name!r}")

        def register(fn: Handler) -> Handler:
            self._handlers[command_type] = (contract, fn)
            return fn

        return register

    # --- lifecycle -----------------------------------------------------------------------

    async def setup_database(self) -> None:
        await self.ledger.setup()
        if self.seed is not None:
            async with self.ledger.engine.begin() as conn:
                await self.seed(conn)

    async def start(self) -> None:
        await self.setup_database()
        if self.broker is None:
            self.broker = self._own_broker = await AmqpBroker.connect(
                self.settings.rabbitmq_url, tls=self.settings.tls
            )
        self.metrics.watch_broker(self.broker.stats)
        await self.broker.declare(self.topology, [self.name])
        self._relay = Relay(
            self.ledger,
            self.broker.publish,
            poll_interval=self.settings.relay_poll_interval,
            tracing=self.tracing,
            metrics=self.metrics,
        )
        self._relay_task = asyncio.create_task(self._relay.run(), name=f"{self.name}-relay")
        self._started = True
        await self.resume()
        log.info("participant_started", participant=self.name, database=redact_url(self.ledger.url))

    async def pause(self) -> None:
        """Stop taking commands (they wait in the queue), as if the service were down."""
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            await consumer.cancel()

    async def resume(self) -> None:
        if self._consumer is None and self._started and self.broker is not None:
            self._consumer = await self.broker.consume(
                self.topology.command_queue(self.name),
                self._on_message,
                prefetch=self.settings.prefetch,
            )

    async def stop(self) -> None:
        self._started = False
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            with contextlib.suppress(Exception):
                await consumer.cancel()
        if self._in_flight:
            await asyncio.wait(self._in_flight, timeout=10)
        if self._relay is not None and self._relay_task is not None:
            self._relay.stop()
            await asyncio.wait([self._relay_task], timeout=10)
            with contextlib.suppress(Exception):
                await self._relay.flush()
        if self._own_broker is not None:
            with contextlib.suppress(Exception):
                await self._own_broker.close()
            if self.broker is self._own_broker:
                self.broker = None
            self._own_broker = None
        await self.ledger.close()

    async def serve(self) -> None:
        stopped = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopped.set)
        server = MetricsServer(self.metrics.registry)
        if self.settings.metrics_port:
            server.start(self.settings.metrics_host, self.settings.metrics_port)
        try:
            await self.start()
            await stopped.wait()
            await self.stop()
        finally:
            server.stop()

    # --- handling ------------------------------------------------------------------------

    async def _on_message(self, message: IncomingMessage) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._in_flight.add(task)
        queue = self.topology.command_queue(self.name)
        try:
            with (
                self.tracing.process(queue, message.headers, message.message_id, len(message.body)),
                structlog.contextvars.bound_contextvars(**trace_ids()),
            ):
                await self._consume(message, queue)
        finally:
            self._in_flight.discard(task)

    async def _consume(self, message: IncomingMessage, queue: str) -> None:
        if message.content_type not in (None, "application/json"):
            await self._dead_letter(message, queue, "wrong_content_type", str(message.content_type))
            return
        try:
            command = parse(
                CommandEnvelope, message.body, max_bytes=self.settings.max_message_bytes
            )
        except ContractError as exc:
            await self._dead_letter(message, queue, exc.reason, exc.detail)
            return
        if command.participant != self.name or command.command_type not in self._handlers:
            await self._dead_letter(
                message,
                queue,
                "unknown_command",
                f"{self.name} does not handle {command.command_type!r} "
                f"(addressed to {command.participant!r})",
            )
            return
        if command.reply_to != self.topology.reply_queue:  # no reply could ever be delivered
            await self._dead_letter(
                message,
                queue,
                "unknown_reply_to",
                f"reply_to {command.reply_to!r} is not this deployment's reply queue "
                f"{self.topology.reply_queue!r}",
            )
            return
        key = delivery_key(message.message_id, message.body)
        trace.get_current_span().set_attributes(
            {
                "messaging.message.conversation_id": str(command.saga_id),
                "saga.id": str(command.saga_id),
                "saga.name": command.saga_name,
                "saga.step": command.step,
                "saga.direction": command.direction,
                "saga.attempt": command.attempt,
                "saga.command_type": command.command_type,
            }
        )
        with structlog.contextvars.bound_contextvars(
            saga_id=str(command.saga_id),
            saga_name=command.saga_name,
            step=command.step,
            direction=command.direction,
            attempt=command.attempt,
            message_id=str(command.message_id),
        ):
            await self._handle_delivery(message, queue, command, key)

    async def _handle_delivery(
        self, message: IncomingMessage, queue: str, command: CommandEnvelope, key: str
    ) -> None:
        try:
            reply = await self.handle(command)
        except Exception as exc:  # nothing committed: try again later, unless it is poison
            failures = await self._poison.failed(key, exc)
            if self._poison.exhausted(failures):
                detail = f"failed {failures} deliveries; last error: {describe_error(exc)}"
                await self._dead_letter(message, queue, "poison", detail)
                return
            log.warning("command_failed_will_retry", error=repr(exc), message_id=message.message_id)
            await asyncio.sleep(1.0)
            with contextlib.suppress(Exception):
                await message.nack(requeue=True)
            return
        crash_point("participant_after_commit_before_reply")
        if self._relay is not None:
            self._relay.wake()
        await message.ack()
        self._poison.settled(key)
        log.debug("command_answered", outcome=reply.outcome, reason=reply.reason)

    async def _database_up(self) -> bool:
        return await database_reachable(self.ledger.reader)

    async def handle(self, command: CommandEnvelope) -> ReplyEnvelope:
        """Apply ``command`` once and queue its reply; returns the reply once committed.

        Commands that arrive while a transaction is in flight share the next one (group
        commit, :mod:`saga.participant.group`); each is still applied exactly once."""
        return await self._group.submit(_Work(command, otel_context.get_current()))

    async def _apply(self, work: Sequence[_Work]) -> list[ReplyEnvelope]:
        """Apply the commands in order in ONE transaction; each sees what those before it did.
        The same transaction deletes the replies the relay has sent since the last one."""
        began = time.time_ns()
        try:
            results = await self._apply_batch(work)
        except BaseException:
            self.ledger.deletes_done(committed=False)
            raise
        self.ledger.deletes_done(committed=True)
        ended = time.time_ns()
        for each in work:
            self.tracing.database(self._database_system, each.trace, began, ended, len(work))
        return results

    async def _apply_batch(self, work: Sequence[_Work]) -> list[ReplyEnvelope]:
        commands = [w.command for w in work]
        at = now()
        reply_ids = [uuid.uuid5(c.message_id, "reply") for c in commands]
        keys = [c.idempotency_key for c in commands]
        results: list[ReplyEnvelope] = []
        processed_rows: list[dict[str, Any]] = []
        reply_rows: list[dict[str, Any]] = []
        outbox_rows: list[dict[str, Any]] = []
        handled = duplicates = 0
        counted: list[tuple[str, str]] = []
        async with self.ledger.engine.begin() as conn:
            sent = self.ledger.take_deletes()
            if sent is not None:
                await conn.execute(sent)
            # The same message again (a redelivery): its first reply, whatever it was. Running
            # the handler anew could turn an answered transient failure into an unseen success.
            given = {
                row.message_id: ReplyEnvelope.model_validate_json(bytes(row.body))
                for row in await conn.execute(
                    sa.select(replies.c.message_id, replies.c.body).where(
                        replies.c.message_id.in_(reply_ids)
                    )
                )
            }
            finals = {
                row.idempotency_key: _Final(row.outcome, row.reason, row.detail, dict(row.data))
                for row in await conn.execute(
                    sa.select(processed).where(processed.c.idempotency_key.in_(keys))
                )
            }
            for (command, received_in), reply_id in zip(work, reply_ids, strict=True):
                reply = given.get(reply_id)
                outcome = "duplicate"
                if reply is not None:
                    duplicates += 1
                    body = reply.model_dump_json().encode()
                else:
                    handled += 1
                    prior = finals.get(command.idempotency_key)
                    if prior is not None:
                        duplicates += 1
                        reply = _reply(command, reply_id, *prior[:3], False, prior.data)
                    else:
                        contract, fn = self._handlers[command.command_type]
                        reply, final = await self._run(conn, contract, fn, command, reply_id)
                        outcome = reply.outcome if final else "retryable_failure"
                        if final:
                            data = dict(reply.data)
                            finals[command.idempotency_key] = _Final(
                                reply.outcome, reply.reason, reply.detail, data
                            )
                            processed_rows.append(
                                {
                                    "idempotency_key": command.idempotency_key,
                                    "message_id": command.message_id,
                                    "saga_id": command.saga_id,
                                    "command_type": command.command_type,
                                    "direction": command.direction,
                                    "outcome": reply.outcome,
                                    "reason": reply.reason,
                                    "detail": reply.detail,
                                    "data": data,
                                    "processed_at": at,
                                }
                            )
                    given[reply_id] = reply
                    body = reply.model_dump_json().encode()
                    reply_rows.append(
                        {
                            "message_id": reply.message_id,
                            "command_message_id": command.message_id,
                            "body": body,
                            "created_at": at,
                        }
                    )
                outbox_rows.append(_outbox_row(command, reply, body, received_in, at))
                counted.append((command.command_type, outcome))
                results.append(reply)
            if processed_rows:
                await conn.execute(processed.insert(), processed_rows)
            if reply_rows:
                await conn.execute(replies.insert(), reply_rows)
            await conn.execute(self.ledger.insert_ignore(outbox), outbox_rows)
        self.ledger.wrote(OutboxMessage(exchange="", **row) for row in outbox_rows)
        for command_type, outcome in counted:
            self.metrics.commands.labels(self.name, command_type, outcome).inc()
        self.handled += handled
        self.duplicates += duplicates
        return results

    async def _run(
        self,
        conn: AsyncConnection,
        contract: CommandContract,
        fn: Handler,
        command: CommandEnvelope,
        reply_id: uuid.UUID,
    ) -> tuple[ReplyEnvelope, bool]:
        """Run the handler in a savepoint; (reply, whether the outcome is final)."""
        try:
            payload = parse_data(contract.payload, command.payload)
        except ContractError as exc:
            return _reply(command, reply_id, "failure", "invalid_payload", exc.detail, False), True
        fault = self.faults.get((command.saga_id, command.command_type))
        if fault is not None:
            if fault.mode == "refuse":
                detail = "refused by the fault plan"
                return _reply(command, reply_id, "failure", INJECTED_REFUSAL, detail, False), True
            if command.attempt <= fault.times:
                detail = f"attempt {command.attempt} of the {fault.times} the fault plan fails"
                return _reply(command, reply_id, "failure", INJECTED_TRANSIENT, detail, True), False
        savepoint = await conn.begin_nested()
        try:
            result = await fn(conn, payload, command)
        except BusinessError as exc:
            await savepoint.rollback()
            return _reply(command, reply_id, "failure", exc.reason, exc.detail, False), True
        except TransientError as exc:
            await savepoint.rollback()
            return _reply(command, reply_id, "failure", exc.reason, exc.detail, True), False
        except Exception as exc:
            await savepoint.rollback()
            log.exception("handler_error", command_type=command.command_type)
            detail = f"{type(exc).__name__}: {exc}"[:1000]
            return _reply(command, reply_id, "failure", "handler_error", detail, True), False
        if not isinstance(result, contract.reply):  # a handler bug: undo, and let it be retried
            await savepoint.rollback()
            detail = f"handler returned {type(result).__name__}, not {contract.reply.__name__}"
            log.error("handler_error", command_type=command.command_type, detail=detail)
            return _reply(command, reply_id, "failure", "handler_error", detail, True), False
        await savepoint.commit()
        return _reply(command, reply_id, "success", None, None, False, dump_data(result)), True

    async def _dead_letter(
        self, message: IncomingMessage, queue: str, reason: str, detail: str
    ) -> None:
        assert self.broker is not None
        log.warning(
            "message_dead_lettered",
            queue=queue,
            reason=reason,
            detail=detail,
            message_id=message.message_id,
        )
        try:
            await self.broker.dead_letter(
                message, queue=queue, topology=self.topology, reason=reason, detail=detail
            )
        except Exception as exc:  # not copied: keep the original, or it would be lost
            log.warning("dead_letter_failed_will_retry", error=repr(exc))
            await asyncio.sleep(1.0)
            with contextlib.suppress(Exception):
                await message.nack(requeue=True)
            return
        self.dead_lettered += 1
        self.metrics.dead_lettered.labels(queue, reason).inc()
        await message.ack()
        self._poison.settled(delivery_key(message.message_id, message.body))


def _outbox_row(
    command: CommandEnvelope,
    reply: ReplyEnvelope,
    body: bytes,
    received_in: otel_context.Context,
    at: datetime,
) -> dict[str, Any]:
    headers: dict[str, str] = {}
    _PROPAGATOR.inject(headers, context=received_in)  # the reply continues the command's trace
    return {
        "message_id": reply.message_id,
        "saga_id": command.saga_id,
        "routing_key": command.reply_to,
        "message_type": f"{command.command_type}.reply",
        "body": body,
        "headers": headers,
        "created_at": at,
    }


class _Final(NamedTuple):
    """A final outcome recorded in the ledger: repeated to every later attempt."""

    outcome: str
    reason: str | None
    detail: str | None
    data: dict[str, Any]


def _reply(
    command: CommandEnvelope,
    reply_id: uuid.UUID,
    outcome: str,
    reason: str | None,
    detail: str | None,
    retryable: bool,
    data: dict[str, Any] | None = None,
) -> ReplyEnvelope:
    if outcome == "success":
        return ReplyEnvelope.success(
            command, cast(dict[str, JsonValue], data or {}), message_id=reply_id
        )
    assert reason is not None
    return ReplyEnvelope.failure(command, reason, detail, retryable=retryable, message_id=reply_id)
