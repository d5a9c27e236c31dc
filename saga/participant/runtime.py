"""The participant runtime: consume commands, run each handler once, reply through an outbox.

A handler is registered for one command type of the participant's own, with its own types::

    flights = Participant("flights", ParticipantSettings(), business=metadata)

    @flights.handler("flights.book")
    async def book(conn: AsyncConnection, payload: BookFlight, command: CommandEnvelope) -> Booked:
        ...

The payload model (the second parameter's annotation, a pydantic model) validates every
command's payload before the handler runs; a payload annotated ``dict[str, JsonValue]`` comes
as plain JSON. The return annotation says what the success reply carries: a pydantic model, a
plain JSON object, or ``None`` for nothing. ``payload=`` and ``reply=`` on :meth:`handler` say the
same explicitly.

For each command, ONE transaction of the participant's database holds the handler's effect, the
ledger row that records its final answer under the command's idempotency key, and the reply in
the outbox; the relay publishes the outbox with confirms. So a redelivered message gets its
first reply again, a retry (same key, new message id) gets the same final answer, and a late
action whose compensation already ran is refused (a tombstone), all without running the handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import types
import typing
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple, TypeVar, cast

import sqlalchemy as sa
import structlog
from opentelemetry import context as otel_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from pydantic import BaseModel, JsonValue, TypeAdapter
from pydantic import ValidationError as PydanticValidationError
from sqlalchemy.ext.asyncio import AsyncConnection

from saga.core.definition import NAME
from saga.core.errors import ConfigError, MessageError
from saga.core.ids import idempotency_key, reply_id
from saga.faults import crash_point
from saga.messaging.group import GroupCommit
from saga.messaging.pipeline import Pipeline
from saga.messaging.poison import PoisonGuard
from saga.participant.errors import BusinessError, TransientError
from saga.participant.faults import (
    INJECTED_REFUSAL,
    INJECTED_TRANSIENT,
    FaultPlan,
    load_fault_plan,
)
from saga.participant.ledger import Ledger, now
from saga.participant.ledger_sql import Statements, statements
from saga.participant.settings import ParticipantSettings, load_participant_settings
from saga.ports import OutboxMessage
from saga.process import Budget, fail, launch, serve, starting
from saga.protocol.envelope import CommandEnvelope, ReplyEnvelope, parse_data
from saga.protocol.types import CommonFailure, ContractError
from saga.relay import Relay, SpanRelay, span_interval
from saga.secrets import redact_url
from saga.store.faults import database_reachable
from saga.telemetry import Metrics, MetricsServer, Tracing
from saga.transport.broker import Broker, BrokerSlot, Consumer, IncomingMessage
from saga.transport.topology import Topology

__all__ = ["ALREADY_COMPENSATED", "Handler", "Participant"]

log = structlog.get_logger("saga.participant")

P = TypeVar("P")
R = TypeVar("R")

#: ``handler(conn, payload, command) -> reply data``: ``conn`` is the participant's open
#: transaction (the ledger and the reply outbox are written in it too)
Handler = Callable[[AsyncConnection, P, CommandEnvelope], Awaitable[R]]
Seed = Callable[[AsyncConnection], Awaitable[None]]

#: the reason a late action is refused with when its compensation ran first
ALREADY_COMPENSATED = CommonFailure.ALREADY_COMPENSATED.value

_PROPAGATOR = TraceContextTextMapPropagator()
_JSON_OBJECT: TypeAdapter[dict[str, JsonValue]] = TypeAdapter(dict[str, JsonValue])


class _Infer:
    """Marker: take the model from the handler's annotations."""


_INFER = _Infer()


@dataclass(frozen=True, slots=True)
class _Registered:
    """One command type this participant serves: its payload and reply shapes, its handler."""

    command_type: str
    payload: type[BaseModel] | None  # None: the payload as a plain JSON object
    reply: type[BaseModel] | type[dict[str, JsonValue]] | None  # None: no data
    fn: Handler[Any, Any]


@dataclass(slots=True)
class _Work:
    """A command for the group commit, with the trace context it was received in; ``outcome``
    is what came of it once committed (``success``, ..., ``duplicate``)."""

    command: CommandEnvelope
    trace: otel_context.Context
    outcome: str = ""


class _Final(NamedTuple):
    """A final outcome recorded in the ledger: repeated to every later attempt."""

    outcome: str
    reason: str | None
    detail: str | None
    data: dict[str, Any]


@dataclass(slots=True)
class _Tally:
    """What one transaction handled, counted once it committed."""

    handled: int = 0
    duplicates: int = 0
    outcomes: list[tuple[str, str]] = field(default_factory=list)


@dataclass(slots=True)
class _Known:
    """What the ledger holds for a batch's keys: final answers, and tombstoned action keys."""

    finals: dict[uuid.UUID, _Final]
    closed: set[uuid.UUID]


class Participant:
    """A participant service on a broker: RabbitMQ at ``settings.rabbitmq_url`` unless
    ``broker`` (or the ``broker`` attribute, set before :meth:`start`) gives another. A broker
    given belongs to the caller, who closes it; the one :meth:`start` connects, :meth:`stop`
    closes.

    ``business`` is the metadata of the service's own tables, created beside the ledger in the
    same database; ``seed`` runs once at start in a transaction of its own.
    """

    def __init__(
        self,
        name: str,
        settings: ParticipantSettings | None = None,
        *,
        business: sa.MetaData | None = None,
        seed: Seed | None = None,
        broker: Broker | None = None,
        tracing: Tracing | None = None,
        metrics: Metrics | None = None,
    ):
        self.name = name
        #: read from ``SAGA_*`` when first needed, so that a module may build its participant
        #: at import and a bad setting still ends ``run()`` with one line (exit status 2)
        self._settings = settings
        self.business = business
        self.seed = seed
        self._ledger: Ledger | None = None
        self._faults: FaultPlan | None = None
        self._handlers: dict[str, _Registered] = {}
        self._broker = BrokerSlot(broker)  # given: the caller's; else made by start()
        self._consumer: Consumer | None = None
        self._pipeline: Pipeline[CommandEnvelope] | None = None
        self._started = False
        self._relay: Relay | None = None
        #: exports the spans committed with the commands' answers (while spans are exported)
        self._spans: SpanRelay | None = None
        self._spans_task: asyncio.Task[None] | None = None
        self._relay_task: asyncio.Task[None] | None = None
        self._group: GroupCommit[_Work, ReplyEnvelope] = GroupCommit(self._apply)
        #: what came of each command handled, until its ack (by message id: a redelivery
        #: overwrites its own entry, so one that was never acked leaves nothing behind for long)
        self._outcomes: dict[uuid.UUID, str] = {}
        self.tracing = tracing if tracing is not None else Tracing()
        #: shared by every participant of a ``saga-service all`` process (one /metrics port)
        self.metrics = metrics if metrics is not None else Metrics()
        self.handled = 0
        self.duplicates = 0

    @property
    def settings(self) -> ParticipantSettings:
        if self._settings is None:
            self._settings = load_participant_settings()  # ConfigError names each bad one
        return self._settings

    @functools.cached_property
    def topology(self) -> Topology:
        return Topology(prefix=self.settings.prefix, quorum=self.settings.quorum_queues)

    @property
    def ledger(self) -> Ledger:
        """The participant's database: its ledger, reply outbox and business tables."""
        if self._ledger is None:
            settings = self.settings
            url, schema = settings.database_url(self.name)
            if url.startswith("sqlite"):
                settings.data_dir.mkdir(parents=True, exist_ok=True)
            self._ledger = Ledger(
                url,
                schema=schema,
                business=self.business,
                sqlite_synchronous=settings.sqlite_synchronous,
            )
        return self._ledger

    @ledger.setter
    def ledger(self, ledger: Ledger) -> None:
        self._ledger = ledger

    @property
    def faults(self) -> FaultPlan:
        """Failures to give on purpose, by (saga id, command type): SAGA_FAULT_PLAN's, and the
        demo's stuck refund."""
        if self._faults is None:
            self._faults = load_fault_plan(self.settings.fault_plan)
        return self._faults

    @property
    def broker(self) -> Broker | None:
        """The broker in use: the one given, or the one :meth:`start` connected."""
        return self._broker.broker

    @broker.setter
    def broker(self, broker: Broker | None) -> None:
        self._broker.broker = broker

    @property
    def command_types(self) -> tuple[str, ...]:
        """The command types this participant serves, in registration order."""
        return tuple(self._handlers)

    @property
    def dead_lettered(self) -> int:
        return 0 if self._pipeline is None else self._pipeline.dead_lettered

    def handler(
        self,
        command_type: str,
        *,
        payload: type[BaseModel] | type[dict[str, JsonValue]] | _Infer = _INFER,
        reply: type[BaseModel] | type[dict[str, JsonValue]] | _Infer | None = _INFER,
    ) -> Callable[[Handler[P, R]], Handler[P, R]]:
        """Register the handler of ``command_type``; the payload and reply models come from
        its annotations unless given here. Raises ValueError at once for a command type that is
        not a valid name, is registered twice, or a handler whose types cannot be read."""
        if not _is_name(command_type):
            raise ValueError(
                f"command type {command_type!r} must match [a-z][a-z0-9_.-]* (at most 64 "
                "characters): it goes on the wire"
            )
        if command_type in self._handlers:
            raise ValueError(f"{self.name} already has a handler for {command_type!r}")

        def register(fn: Handler[P, R]) -> Handler[P, R]:
            payload_model, reply_model = _shapes(fn, command_type, payload, reply)
            self._handlers[command_type] = _Registered(command_type, payload_model, reply_model, fn)
            return fn

        return register

    # --- lifecycle -----------------------------------------------------------------------

    async def setup_database(self) -> None:
        await self.ledger.setup()
        if self.seed is not None:
            async with self.ledger.begin() as conn:
                await self.seed(conn)

    async def start(self) -> None:
        """Connect, declare and consume. A start that fails (or is cancelled) half way closes
        what it opened before the error goes on up, so a caller that does not go through
        :meth:`serve` is not left with a broker connection reconnecting in the background."""
        if not self._handlers:
            raise ValueError(f"participant {self.name!r} has no handler: register one first")
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        starting(f"setting up {self.name}'s database")
        await self.setup_database()
        starting(f"connecting to RabbitMQ at {redact_url(self.settings.rabbitmq_url)}")
        broker = await self._broker.connect(self.settings.rabbitmq_url, tls=self.settings.tls)
        self.metrics.watch_broker(broker.stats)
        self.tracing.server = broker.address
        self.metrics.watch_work(lambda: self.ledger.counts + broker.counts)
        starting(f"declaring {self.name}'s queues on RabbitMQ", lambda: broker.stats().last_failure)
        await broker.declare(self.topology, [self.name])
        self._relay = Relay(
            self.ledger,
            broker.publish_many,
            poll_interval=self.settings.relay_poll_interval,
            tracing=self.tracing,
            metrics=self.metrics,
        )
        self._relay_task = asyncio.create_task(self._relay.run(), name=f"{self.name}-relay")
        durable = self.tracing.durable
        if durable is not None:  # what a killed process committed and never exported leaves now
            self._spans = SpanRelay(self.ledger, durable, interval=span_interval())
            self._spans_task = asyncio.create_task(self._spans.run(), name=f"{self.name}-spans")
        poison = PoisonGuard(self.settings.max_deliveries, self._database_up)
        self._pipeline = Pipeline(
            self.topology.command_queue(self.name),
            CommandEnvelope,
            self._on_command,
            broker=broker,
            topology=self.topology,
            tracing=self.tracing,
            metrics=self.metrics,
            poison=poison,
            max_bytes=self.settings.max_message_bytes,
            span_attributes=_span_attributes,
            log_fields=_log_fields,
            settled=self._settled,
        )
        self._started = True
        starting(
            f"consuming {self.topology.command_queue(self.name)}",
            lambda: broker.stats().last_failure,
        )
        await self.resume()
        log.info("participant_started", participant=self.name, database=redact_url(self.ledger.url))

    async def pause(self) -> None:
        """Stop taking commands (they wait in the queue), as if the service were down."""
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            await consumer.cancel()

    async def resume(self) -> None:
        if self._consumer is None and self._started and self.broker is not None:
            assert self._pipeline is not None
            self._consumer = await self.broker.consume(
                self._pipeline.queue, self._pipeline, prefetch=self.settings.prefetch
            )

    async def stop(self) -> None:
        self._started = False
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            with contextlib.suppress(Exception):
                await consumer.cancel()
        budget = Budget(self.settings.shutdown_timeout)
        if self._pipeline is not None and self._pipeline.in_flight:
            await asyncio.wait(self._pipeline.in_flight, timeout=budget.share(0.5))
        if self._relay is not None:
            await self._relay.shutdown(self._relay_task, budget.share(0.6))
        if self._spans is not None:
            await self._spans.shutdown(self._spans_task, budget.share(0.6))
            self._spans = self._spans_task = None
        await self._broker.release()
        await self.ledger.close()

    async def serve(self) -> None:
        """Run until SIGTERM or SIGINT, then stop: finish the commands in hand, flush the
        replies, close the broker and the database."""
        server = MetricsServer(self.metrics.registry)
        if self.settings.metrics_port:
            server.start(self.settings.metrics_host, self.settings.metrics_port)
        try:
            await serve(
                self.start,
                self.stop,
                start_timeout=self.settings.start_timeout,
                stop_timeout=self.settings.shutdown_timeout,
            )
        finally:
            server.stop()

    def run(self) -> None:
        """Serve this participant as the process's main program: logging and tracing set up
        from ``SAGA_*`` and ``OTEL_*``, a bad setting or an unreachable broker ends it with one
        line and exit status 2."""
        try:
            settings = self.settings
        except ConfigError as exc:
            fail(exc, 2)
        launch(f"saga-{self.name}", self.serve, log_level=settings.log_level)

    # --- handling ------------------------------------------------------------------------

    async def _on_command(self, command: CommandEnvelope, message: IncomingMessage) -> str:
        """The pipeline's handler: refuse what cannot be answered, else apply and reply."""
        if command.participant != self.name or command.command_type not in self._handlers:
            raise MessageError(
                "unknown_command",
                f"{self.name} does not handle {command.command_type!r} "
                f"(addressed to {command.participant!r})",
            )
        if command.reply_to != self.topology.reply_queue:  # no reply could ever be delivered
            raise MessageError(
                "unknown_reply_to",
                f"reply_to {command.reply_to!r} is not this deployment's reply queue "
                f"{self.topology.reply_queue!r}",
            )
        work = _Work(command, otel_context.get_current())
        reply = await self._handle(work)
        log.debug("command_answered", outcome=reply.outcome, reason=reply.reason)
        self._outcomes[command.message_id] = work.outcome
        # saga_messages_consumed_total: a command answered from the ledger (redelivered, or
        # retried under the same key) changed nothing, as a duplicate start does not
        return "duplicate" if work.outcome == "duplicate" else "applied"

    def _settled(self, command: CommandEnvelope, _outcome: str, seconds: float) -> None:
        """A command acked: its handling time, and the one line per command an operator reads
        (``command_handled``)."""
        outcome = self._outcomes.pop(command.message_id, "")
        self.metrics.handling.labels(self.name, command.command_type).observe(seconds)
        log.info(
            "command_handled",
            participant=self.name,
            saga_id=str(command.saga_id),
            saga_name=command.saga_name,
            step=command.step,
            direction=command.direction,
            attempt=command.attempt,
            command_type=command.command_type,
            message_id=str(command.message_id),
            outcome=outcome,
            duration_ms=round(seconds * 1000, 3),
        )

    async def _database_up(self) -> bool:
        return await database_reachable(self.ledger.reader)

    async def handle(self, command: CommandEnvelope) -> ReplyEnvelope:
        """Apply ``command`` once and queue its reply; returns the reply once committed.

        Commands that arrive while a transaction is in flight share the next one (group
        commit, :mod:`saga.messaging.group`); each is still applied exactly once."""
        return await self._group.submit(_Work(command, otel_context.get_current()))

    async def _handle(self, work: _Work) -> ReplyEnvelope:
        return await self._group.submit(work)

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
        for _ in work:  # counted per command, as the fault plans count them
            crash_point("participant_after_commit_before_reply")
        if self._relay is not None:
            self._relay.wake()
            # one turn of the loop for the relay to put the replies on the wire before this
            # batch's spans, acks, metrics and log lines: a lone saga waits on the replies
            await asyncio.sleep(0)
        for each in work:
            system = "sqlite" if self.ledger.is_sqlite else "postgresql"
            self.tracing.database(system, each.trace, began, ended, len(work))
        return results

    async def _apply_batch(self, work: Sequence[_Work]) -> list[ReplyEnvelope]:
        commands = [w.command for w in work]
        rows = _Rows(now())
        reply_ids = [reply_id(c.message_id) for c in commands]
        #: the action each compensation undoes: a compensation that finds it unanswered leaves a
        #: tombstone under the action's key, so the action, should it arrive late, is refused
        undone = {
            c.idempotency_key: idempotency_key(c.saga_id, c.step, "action")
            for c in commands
            if c.direction == "compensation"
        }
        results: list[ReplyEnvelope] = []
        tally = _Tally()
        durable = self.tracing.durable
        committed: list[int] = []  # live process spans whose record this transaction writes
        async with self.ledger.begin() as conn:
            ledger = await statements(conn, self.ledger)
            sent = self.ledger.take_deletes()
            if sent:
                await ledger.delete_sent(sent)
            # The same message again (a redelivery): its first reply, whatever it was. Running
            # the handler anew could turn an answered transient failure into an unseen success.
            given = {
                message_id: ReplyEnvelope.model_validate_json(body)
                for message_id, body in (await ledger.given(reply_ids)).items()
            }
            keys = [c.idempotency_key for c in commands]
            known = _Known({}, set())
            for row in await ledger.recorded([*keys, *undone.values()]):
                if row.tombstone:
                    known.closed.add(row.key)
                else:
                    assert row.outcome is not None
                    known.finals[row.key] = _Final(
                        row.outcome, row.reason, row.detail, row.data or {}
                    )
            for each, answer_id in zip(work, reply_ids, strict=True):
                command, received_in = each.command, each.trace
                reply = given.get(answer_id)
                if reply is not None:
                    tally.duplicates += 1
                    body = reply.model_dump_json().encode()
                    outcome = "duplicate"
                else:
                    tally.handled += 1
                    reply, outcome = await self._answer(
                        conn, ledger, command, answer_id, known, undone, rows
                    )
                    tally.duplicates += outcome == "duplicate"
                    given[answer_id] = reply
                    body = reply.model_dump_json().encode()
                    rows.reply(command, reply, body)
                rows.outbox(command, reply, body, received_in)
                tally.outcomes.append((command.command_type, outcome))
                each.outcome = outcome
                results.append(reply)
            if durable is not None:
                committed = self._span_rows(work, rows)
            await ledger.write(rows)
        if durable is not None:
            for span_id in committed:
                durable.committed(span_id)
        # counted once committed: a batch that failed is tried again and counted then
        self.ledger.wrote(OutboxMessage(exchange="", **row) for row in rows.outbox_rows)
        for command_type, outcome in tally.outcomes:
            self.metrics.commands.labels(self.name, command_type, outcome).inc()
        self.handled += tally.handled
        self.duplicates += tally.duplicates
        return results

    def _span_rows(self, work: Sequence[_Work], rows: _Rows) -> list[int]:
        """The process spans of ``work``, as a row the transaction that answers it writes (a
        crash cannot lose them then); returns their span ids, for the live spans to be left
        out of the batch once it committed."""
        records = []
        committed = []
        for each in work:
            found = self.tracing.process_record(each.trace, time.time_ns(), {})
            if found is not None:
                records.append(found[0])
                committed.append(found[1])
        if records:
            rows.span_rows.append({"records": records})
        return committed

    async def _answer(
        self,
        conn: AsyncConnection,
        ledger: Statements,
        command: CommandEnvelope,
        answer_id: uuid.UUID,
        known: _Known,
        undone: Mapping[uuid.UUID, uuid.UUID],
        rows: _Rows,
    ) -> tuple[ReplyEnvelope, str]:
        """The reply to a command not answered before, and its outcome for the metrics: the
        final answer already recorded under its key, a tombstone's refusal, or the handler's."""
        key = command.idempotency_key
        prior = known.finals.get(key)
        if prior is not None:
            return _reply(command, answer_id, *prior[:3], False, prior.data), "duplicate"
        if command.direction == "action" and key in known.closed:
            detail = (
                f"step {command.step} of saga {command.saga_id} was compensated before this "
                "action arrived; it is refused so that no effect is left without its compensation"
            )
            reply, final = _reply(command, answer_id, "failure", ALREADY_COMPENSATED, detail), True
        else:
            registered = self._handlers[command.command_type]
            reply, final = await self._run(conn, ledger, registered, command, answer_id)
        if not final:
            return reply, "retryable_failure"
        data = dict(reply.data)
        known.finals[key] = _Final(reply.outcome, reply.reason, reply.detail, data)
        rows.processed(command, reply, data)
        action_key = undone.get(key)
        if action_key is not None and not (
            action_key in known.finals or action_key in known.closed
        ):
            known.closed.add(action_key)
            rows.tombstone(command, action_key)
        return reply, reply.outcome

    async def _run(
        self,
        conn: AsyncConnection,
        ledger: Statements,
        registered: _Registered,
        command: CommandEnvelope,
        answer_id: uuid.UUID,
    ) -> tuple[ReplyEnvelope, bool]:
        """Run the handler in a savepoint; (reply, whether the outcome is final)."""
        try:
            payload = _payload(registered, command)
        except ContractError as exc:
            return _reply(command, answer_id, "failure", "invalid_payload", exc.detail, False), True
        fault = self.faults.get((command.saga_id, command.command_type))
        if fault is not None:
            if fault.mode == "refuse":
                detail = "refused by the fault plan"
                return _reply(command, answer_id, "failure", INJECTED_REFUSAL, detail, False), True
            if command.attempt <= fault.times:
                detail = f"attempt {command.attempt} of the {fault.times} the fault plan fails"
                return _reply(
                    command, answer_id, "failure", INJECTED_TRANSIENT, detail, True
                ), False
        savepoint = await ledger.savepoint()
        try:
            result = await registered.fn(conn, payload, command)
        except BusinessError as exc:
            await savepoint.rollback()
            return _reply(command, answer_id, "failure", exc.reason, exc.detail, False), True
        except TransientError as exc:
            await savepoint.rollback()
            return _reply(command, answer_id, "failure", exc.reason, exc.detail, True), False
        except Exception as exc:
            await savepoint.rollback()
            log.exception("handler_error", command_type=command.command_type)
            detail = f"{type(exc).__name__}: {exc}"[:1000]
            return _reply(command, answer_id, "failure", "handler_error", detail, True), False
        try:
            data = _reply_data(registered, result)
        except (TypeError, ValueError) as exc:  # a handler bug: undo, and let it be retried
            await savepoint.rollback()
            detail = str(exc)[:1000]
            log.error("handler_error", command_type=command.command_type, detail=detail)
            return _reply(command, answer_id, "failure", "handler_error", detail, True), False
        await savepoint.commit()
        return _reply(command, answer_id, "success", None, None, False, data), True


# --- handler shapes ------------------------------------------------------------------------


def _is_name(value: str) -> bool:
    return NAME.fullmatch(value) is not None


def _shapes(
    fn: Callable[..., Any],
    command_type: str,
    payload: type[BaseModel] | type[dict[str, JsonValue]] | _Infer,
    reply: type[BaseModel] | type[dict[str, JsonValue]] | _Infer | None,
) -> tuple[type[BaseModel] | None, type[BaseModel] | type[dict[str, JsonValue]] | None]:
    """(payload model or None for plain JSON, reply model, dict or None) of a handler."""
    where = f"handler of {command_type!r} ({getattr(fn, '__qualname__', fn)!r})"
    hints: dict[str, Any] = {}
    if isinstance(payload, _Infer) or isinstance(reply, _Infer):
        try:
            hints = typing.get_type_hints(fn)
        except Exception as exc:
            raise ValueError(f"{where}: cannot read its annotations: {exc}") from None
    if isinstance(payload, _Infer):
        params = [p for p in hints if p != "return"]
        if len(params) < 2:
            raise ValueError(
                f"{where}: annotate its payload parameter (fn(conn, payload: Model, command)) "
                "with a pydantic model, or dict[str, JsonValue] for plain JSON, or pass payload="
            )
        payload = hints[params[1]]
    if isinstance(reply, _Infer):
        if "return" not in hints:
            raise ValueError(
                f"{where}: annotate what it returns (a pydantic model, dict[str, JsonValue] or "
                "None), or pass reply="
            )
        reply = hints["return"]
    return _payload_shape(payload, where), _reply_shape(reply, where)


def _is_json_object(tp: Any) -> bool:
    return typing.get_origin(tp) in (dict, Mapping) or tp is dict


def _payload_shape(tp: Any, where: str) -> type[BaseModel] | None:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    if _is_json_object(tp):
        return None
    raise ValueError(
        f"{where}: its payload type {tp!r} is neither a pydantic model nor a JSON object "
        "(dict[str, JsonValue])"
    )


def _reply_shape(tp: Any, where: str) -> type[BaseModel] | type[dict[str, JsonValue]] | None:
    if tp is None or tp is type(None):
        return None
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    if _is_json_object(tp):
        return dict
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        raise ValueError(f"{where}: return one reply type, not {tp!r}")
    raise ValueError(
        f"{where}: its reply type {tp!r} is neither a pydantic model, a JSON object nor None"
    )


def _payload(registered: _Registered, command: CommandEnvelope) -> object:
    if registered.payload is None:
        return dict(command.payload)
    return parse_data(registered.payload, command.payload)


def _reply_data(registered: _Registered, result: object) -> dict[str, JsonValue]:
    """The success reply's data; TypeError or ValueError when the handler returned something
    else than it declared."""
    shape = registered.reply
    if shape is None:
        if result is not None:
            raise TypeError(f"handler returned {type(result).__name__}, not None")
        return {}
    if shape is dict:
        if not isinstance(result, Mapping):
            raise TypeError(f"handler returned {type(result).__name__}, not a JSON object")
        try:
            return _JSON_OBJECT.validate_python(dict(result))
        except PydanticValidationError as exc:
            raise ValueError(f"handler returned an object that is not JSON: {exc}") from None
    assert isinstance(shape, type) and issubclass(shape, BaseModel)
    if not isinstance(result, shape):
        raise TypeError(f"handler returned {type(result).__name__}, not {shape.__name__}")
    return cast(dict[str, JsonValue], result.model_dump(mode="json"))


# --- rows and replies ----------------------------------------------------------------------


def _span_attributes(command: CommandEnvelope) -> dict[str, str | int]:
    return {
        "messaging.message.conversation_id": str(command.saga_id),
        "saga.id": str(command.saga_id),
        "saga.name": command.saga_name,
        "saga.step": command.step,
        "saga.direction": command.direction,
        "saga.attempt": command.attempt,
        "saga.command_type": command.command_type,
    }


def _log_fields(command: CommandEnvelope) -> dict[str, str | int]:
    return {
        "saga_id": str(command.saga_id),
        "saga_name": command.saga_name,
        "step": command.step,
        "direction": command.direction,
        "attempt": command.attempt,
        "message_id": str(command.message_id),
    }


class _Rows:
    """The rows one transaction of a participant writes, each kind with one statement."""

    def __init__(self, at: datetime):
        self.at = at
        self.processed_rows: list[dict[str, Any]] = []
        self.tombstone_rows: list[dict[str, Any]] = []
        self.reply_rows: list[dict[str, Any]] = []
        self.outbox_rows: list[dict[str, Any]] = []
        self.span_rows: list[dict[str, Any]] = []

    def processed(self, command: CommandEnvelope, reply: ReplyEnvelope, data: Any) -> None:
        self.processed_rows.append(
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
                "processed_at": self.at,
            }
        )

    def tombstone(self, command: CommandEnvelope, action_key: uuid.UUID) -> None:
        self.tombstone_rows.append(
            {
                "idempotency_key": action_key,
                "saga_id": command.saga_id,
                "step": command.step,
                "compensation_message_id": command.message_id,
                "created_at": self.at,
            }
        )

    def reply(self, command: CommandEnvelope, reply: ReplyEnvelope, body: bytes) -> None:
        self.reply_rows.append(
            {
                "message_id": reply.message_id,
                "command_message_id": command.message_id,
                "body": body,
                "created_at": self.at,
            }
        )

    def outbox(
        self,
        command: CommandEnvelope,
        reply: ReplyEnvelope,
        body: bytes,
        received_in: otel_context.Context,
    ) -> None:
        headers: dict[str, str] = {}
        _PROPAGATOR.inject(headers, context=received_in)  # the reply continues the command's trace
        self.outbox_rows.append(
            {
                "message_id": reply.message_id,
                "saga_id": command.saga_id,
                "routing_key": command.reply_to,
                "message_type": f"{command.command_type}.reply",
                "body": body,
                "headers": headers,
                "created_at": self.at,
            }
        )


def _reply(
    command: CommandEnvelope,
    answer_id: uuid.UUID,
    outcome: str,
    reason: str | None,
    detail: str | None,
    retryable: bool = False,
    data: Mapping[str, Any] | None = None,
) -> ReplyEnvelope:
    if outcome == "success":
        return ReplyEnvelope.success(
            command, cast(dict[str, JsonValue], dict(data or {})), message_id=answer_id
        )
    assert reason is not None
    return ReplyEnvelope.failure(command, reason, detail, retryable=retryable, message_id=answer_id)
