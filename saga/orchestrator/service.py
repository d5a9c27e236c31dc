"""The orchestrator service: the runtime wired to a broker (RabbitMQ) and the SQL store.

On start it checks the schema, takes the single-instance lock on a SQLite file, declares the
topology, and resumes: the relay publishes whatever the outbox still holds and the timer loop
fires every deadline that passed while it was down. Messages are acked only after the
transaction that applied them committed; SIGTERM stops consuming, lets in-flight messages finish,
flushes the outbox once more and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import importlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, TypeVar

import structlog
from opentelemetry import trace

from contracts.common import ContractError
from contracts.envelope import ReplyEnvelope, StartSaga, parse
from saga.core.definition import Registry
from saga.core.errors import ConfigError, MessageError, UnknownSagaError
from saga.core.state import JSON, SagaState
from saga.faults import crash_point
from saga.messaging.poison import PoisonGuard, delivery_key
from saga.orchestrator.runtime import Orchestrator, Outcome
from saga.ports import Clock
from saga.relay import Relay
from saga.settings import Settings
from saga.store.faults import describe_error
from saga.store.schema import HEAD
from saga.store.sql import SqlStore
from saga.telemetry import Metrics, MetricsServer, Tracing, trace_ids
from saga.transport.broker import AmqpBroker, Broker, Consumer, IncomingMessage
from saga.transport.topology import Topology

__all__ = ["OrchestratorService", "load_registry"]

log = structlog.get_logger("saga.orchestrator.service")

_M = TypeVar("_M", ReplyEnvelope, StartSaga)


def load_registry(path: str) -> Registry:
    """Import ``module:attribute``; the attribute is a Registry or a callable returning one."""
    if ":" not in path:
        raise ConfigError(
            f"SAGA_DEFINITIONS={path!r}: expected module:attribute, e.g. myapp.sagas:registry"
        )
    module_name, attr = path.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"SAGA_DEFINITIONS: cannot import {module_name!r}: {exc}") from exc
    target = getattr(module, attr, None)
    if target is None:
        raise ConfigError(f"SAGA_DEFINITIONS: {module_name!r} has no attribute {attr!r}")
    registry = target() if callable(target) and not isinstance(target, Registry) else target
    if not isinstance(registry, Registry):
        raise ConfigError(f"SAGA_DEFINITIONS: {path} is not a saga.Registry")
    return registry


class _SqliteLock:
    """One orchestrator per SQLite file: a second one would race the first for timers and
    outbox rows, which SQLite cannot arbitrate. PostgreSQL is for several instances."""

    def __init__(self, database_url: str):
        db = database_url.split(":///", 1)[1] if ":///" in database_url else ""
        self.path = Path(f"{db}.lock") if db and db != ":memory:" else None
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a+")
        except OSError as exc:
            raise ConfigError(
                f"cannot use the SQLite database at {self.path.with_suffix('')}: {exc}; "
                "check SAGA_DATABASE_URL points at a writable path"
            ) from None
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "unknown"
            self._file.close()
            self._file = None
            raise ConfigError(
                f"another orchestrator (pid {holder}) is using this SQLite database "
                f"({self.path.with_suffix('')}); SQLite supports one orchestrator. Stop it, or "
                "use PostgreSQL (SAGA_DATABASE_URL=postgresql+asyncpg://...) for several."
            ) from None
        self._file.truncate(0)
        self._file.write(str(os.getpid()))
        self._file.flush()

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


class OrchestratorService:
    """The orchestrator on a broker: RabbitMQ at ``settings.rabbitmq_url`` unless ``broker``
    (or the ``broker`` attribute, set before :meth:`start`) gives another. A broker given
    belongs to the caller, who closes it; the one :meth:`start` connects, :meth:`stop` closes."""

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        *,
        clock: Clock | None = None,
        broker: Broker | None = None,
        tracing: Tracing | None = None,
    ):
        self.settings = settings
        self.registry = registry
        self.topology = Topology(prefix=settings.prefix, quorum=settings.quorum_queues)
        self.store = SqlStore(settings.database_url, sqlite_synchronous=settings.sqlite_synchronous)
        self.tracing = tracing if tracing is not None else Tracing()
        self.metrics = Metrics()
        self._lock = _SqliteLock(settings.database_url) if settings.is_sqlite else None
        self.relay: Relay | None = None
        self.orchestrator = Orchestrator(
            registry,
            self.store,
            clock=clock,
            reply_to=self.topology.reply_queue,
            commands_exchange=self.topology.commands_exchange,
            max_batch=settings.max_batch,
            on_commit=self._on_commit,
            tracing=self.tracing,
            metrics=self.metrics,
            database_system=self.store.dialect,
        )
        self.broker: Broker | None = broker
        self._own_broker: Broker | None = None  # made by start(), closed by stop()
        self._consumers: list[Consumer] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._in_flight: set[asyncio.Task[Any]] = set()
        self._stopped = asyncio.Event()
        self._poison = PoisonGuard(settings.max_deliveries, self._database_up)
        self.dead_lettered = 0
        self._admin: Any = None  # saga.admin.server.AdminServer when SAGA_ADMIN_PORT is set
        self._metrics_server: MetricsServer | None = None

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        if self._lock is not None:
            self._lock.acquire()
        try:
            if self.settings.auto_migrate:
                await self.store.migrate()
            await self.store.setup()
            if self.broker is None:
                self.broker = self._own_broker = await AmqpBroker.connect(
                    self.settings.rabbitmq_url, tls=self.settings.tls
                )
            broker = self.broker
            self.metrics.watch_broker(broker.stats)
            participants = {s.participant for d in self.registry.all() for s in d.steps}
            if self.registry.participants is not None:
                participants |= set(self.registry.participants)
            await broker.declare(self.topology, participants)
            self.relay = Relay(
                self.store,
                broker.publish,
                batch=self.settings.relay_batch,
                max_in_flight=self.settings.relay_in_flight,
                poll_interval=self.settings.relay_poll_interval,
                tracing=self.tracing,
                metrics=self.metrics,
            )
            self._tasks = [asyncio.create_task(self.relay.run(), name="saga-relay")]
            for queue_name, handler in (
                (self.topology.reply_queue, self._on_reply),
                (self.topology.start_queue, self._on_start),
            ):
                consumer = await broker.consume(
                    queue_name,
                    self._tracked(handler, queue_name),
                    prefetch=self.settings.prefetch,
                )
                self._consumers.append(consumer)
            # Timers start last and after a grace period: replies that arrived while we were
            # down are already queued, and applying them beats timing their commands out.
            self._tasks.append(asyncio.create_task(self._timer_loop(), name="saga-timers"))
            self._tasks.append(asyncio.create_task(self._housekeeping(), name="saga-housekeeping"))
            if self.settings.metrics_port:
                self._metrics_server = MetricsServer(self.metrics.registry)
                self._metrics_server.start(self.settings.metrics_host, self.settings.metrics_port)
                self._tasks.append(
                    asyncio.create_task(self._outbox_gauges(), name="saga-outbox-gauges")
                )
            if self.settings.admin_port:
                from saga.admin.server import AdminServer  # noqa: PLC0415 (FastAPI only when used)

                self._admin = AdminServer(self)
                await self._admin.start()
        except BaseException:
            await self._close()
            raise
        log.info(
            "orchestrator_started",
            sagas=[f"{d.name}@v{d.version}" for d in self.registry.all()],
            database=self.store.safe_url,
            prefix=self.settings.prefix,
        )

    async def serve(self) -> None:
        """Run until SIGTERM or SIGINT, then shut down gracefully."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopped.set)
        await self.start()
        await self._stopped.wait()
        await self.stop()

    async def stop(self) -> None:
        log.info("orchestrator_stopping", in_flight=len(self._in_flight))
        await self._cancel_consumers()
        for task in self._tasks:  # no new timer events while the last ones drain
            if task.get_name() == "saga-timers":
                task.cancel()
        if self._in_flight:
            await asyncio.wait(self._in_flight, timeout=self.settings.shutdown_timeout)
        await self.orchestrator.drained()
        if self.relay is not None:
            self.relay.stop()
            relay_tasks = [t for t in self._tasks if t.get_name() == "saga-relay"]
            if relay_tasks:
                await asyncio.wait(relay_tasks, timeout=self.settings.shutdown_timeout)
            with contextlib.suppress(Exception):
                await self.relay.flush()
        await self._close()
        log.info("orchestrator_stopped")

    async def _cancel_consumers(self) -> None:
        for consumer in self._consumers:
            with contextlib.suppress(Exception):
                await consumer.cancel()
        self._consumers.clear()

    async def _close(self) -> None:
        if self._metrics_server is not None:
            self._metrics_server.stop()
            self._metrics_server = None
        if self._admin is not None:
            with contextlib.suppress(Exception):
                await self._admin.stop()
            self._admin = None
        await self._cancel_consumers()  # a failed start may leave some
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        if self._own_broker is not None:
            with contextlib.suppress(Exception):
                await self._own_broker.close()
            if self.broker is self._own_broker:
                self.broker = None
            self._own_broker = None
        await self.store.close()
        if self._lock is not None:
            self._lock.release()

    async def readiness(self) -> dict[str, str | None]:
        """Each readiness check and why it fails (None when it passes), for ``/readyz``."""
        checks: dict[str, str | None] = {}
        try:
            async with asyncio.timeout(2.0):  # a hung database is a failed check, not a hang
                version = await self.store.current_version()
            checks["database"] = None
            checks["migrations"] = (
                None if version == HEAD else f"schema at {version}, code needs {HEAD}"
            )
        except TimeoutError:
            checks["database"] = "no answer within 2 s"
            checks["migrations"] = "unknown: the database does not answer"
        except Exception as exc:
            checks["database"] = f"unreachable: {describe_error(exc)}"
            checks["migrations"] = "unknown: the database is unreachable"
        connected = self.broker is not None and self.broker.is_connected()
        checks["broker"] = None if connected else "no connection to RabbitMQ"
        checks["consumers"] = (
            None if len(self._consumers) == 2 else f"{len(self._consumers)} of 2 consumers running"
        )
        return checks

    def _on_commit(self) -> None:
        crash_point("after_commit_before_publish")
        if self.relay is not None:
            self.relay.wake()

    async def start_saga(
        self, name: str, input: Mapping[str, JSON], *, key: str | None = None
    ) -> SagaState:
        """Start a saga in-process; idempotent by ``key``."""
        return await self.orchestrator.start(name, input, key=key)

    # --- consumers -----------------------------------------------------------------------

    def _tracked(
        self, handler: Callable[[IncomingMessage, str], Awaitable[None]], queue: str
    ) -> Callable[[IncomingMessage], Awaitable[None]]:
        async def run(message: IncomingMessage) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._in_flight.add(task)
            try:
                await handler(message, queue)
            finally:
                self._in_flight.discard(task)

        return run

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
            await self._retry_later(message, exc)
            return
        self.dead_lettered += 1
        self.metrics.dead_lettered.labels(queue, reason).inc()
        self.metrics.messages.labels(queue, "dead_lettered").inc()
        await message.ack()
        self._poison.settled(delivery_key(message.message_id, message.body))

    async def _parse_or_dead_letter(
        self, message: IncomingMessage, queue: str, model: type[_M]
    ) -> _M | None:
        if len(message.body) > self.settings.max_message_bytes:
            await self._dead_letter(
                message,
                queue,
                "too_large",
                f"{len(message.body)} bytes > limit {self.settings.max_message_bytes}",
            )
            return None
        if message.content_type not in (None, "application/json"):
            await self._dead_letter(
                message, queue, "wrong_content_type", f"content type {message.content_type!r}"
            )
            return None
        try:
            return parse(model, message.body, max_bytes=self.settings.max_message_bytes)
        except ContractError as exc:
            await self._dead_letter(message, queue, exc.reason, exc.detail)
            return None

    async def _on_reply(self, message: IncomingMessage, queue: str) -> None:
        with (
            self.tracing.process(queue, message.headers, message.message_id, len(message.body)),
            structlog.contextvars.bound_contextvars(**trace_ids()),
        ):
            await self._apply_reply(message, queue)

    async def _apply_reply(self, message: IncomingMessage, queue: str) -> None:
        reply = await self._parse_or_dead_letter(message, queue, ReplyEnvelope)
        if reply is None:
            return
        span = trace.get_current_span()
        span.set_attributes(
            {
                "messaging.message.conversation_id": str(reply.saga_id),
                "saga.id": str(reply.saga_id),
                "saga.participant": reply.participant,
                "saga.causation_id": str(reply.causation_id),
            }
        )
        try:
            result = await self.orchestrator.handle_reply(reply)
        except MessageError as exc:
            await self._dead_letter(message, queue, exc.reason, exc.detail)
            return
        except Exception as exc:
            await self._failed(message, queue, exc)
            return
        crash_point("after_reply_commit_before_ack")
        await message.ack()
        self._poison.settled(delivery_key(message.message_id, message.body))
        self.metrics.messages.labels(queue, result.outcome.value).inc()
        span.set_attributes({"saga.name": result.state.name, "saga.outcome": result.outcome.value})
        if result.outcome is Outcome.IGNORED and result.transition is not None:
            state = result.state
            log.info(
                "reply_ignored",
                saga_id=str(reply.saga_id),
                saga_name=state.name,
                step=state.steps[state.current].name if state.current < len(state.steps) else None,
                attempt=state.attempt,
                message_id=str(reply.message_id),
                causation_id=str(reply.causation_id),
                reason="; ".join(h.detail for h in result.transition.history),
            )
        elif log.is_enabled_for(logging.DEBUG):
            history = result.transition.history if result.transition is not None else ()
            answered = next((h for h in history if h.step), None)
            log.debug(
                "reply_applied",
                saga_id=str(reply.saga_id),
                saga_name=result.state.name,
                step=None if answered is None else answered.step,
                attempt=None if answered is None else answered.attempt,
                message_id=str(reply.message_id),
                causation_id=str(reply.causation_id),
                outcome=result.outcome.value,
            )

    async def _on_start(self, message: IncomingMessage, queue: str) -> None:
        with (
            self.tracing.process(queue, message.headers, message.message_id, len(message.body)),
            structlog.contextvars.bound_contextvars(**trace_ids()),
        ):
            await self._apply_start(message, queue)

    async def _apply_start(self, message: IncomingMessage, queue: str) -> None:
        request = await self._parse_or_dead_letter(message, queue, StartSaga)
        if request is None:
            return
        try:
            # The saga's span is a child of this process span, which continues the requester's
            # trace when the start message carried one.
            await self.orchestrator.start(
                request.saga_name,
                dict(request.input),
                key=request.key,
                inbox_id=request.message_id,
            )
        except UnknownSagaError as exc:
            await self._dead_letter(message, queue, "unknown_saga_name", str(exc))
            return
        except Exception as exc:
            await self._failed(message, queue, exc)
            return
        await message.ack()
        self._poison.settled(delivery_key(message.message_id, message.body))
        self.metrics.messages.labels(queue, "applied").inc()

    async def _failed(self, message: IncomingMessage, queue: str, exc: Exception) -> None:
        """Applying ``message`` raised. Hand it back, unless it has now failed
        ``max_deliveries`` times while the database was up: then it is poison, and dead-lettered
        so it cannot hold up its queue forever (see :mod:`saga.messaging.poison`)."""
        failures = await self._poison.failed(delivery_key(message.message_id, message.body), exc)
        if self._poison.exhausted(failures):
            detail = f"failed {failures} deliveries; last error: {describe_error(exc)}"
            await self._dead_letter(message, queue, "poison", detail)
            return
        await self._retry_later(message, exc)

    async def _database_up(self) -> bool:
        return await self.store.ping()

    async def _retry_later(self, message: IncomingMessage, exc: Exception) -> None:
        """The store failed: nothing was committed, so hand the message back, after a pause
        so a database outage does not turn into a redelivery storm."""
        log.warning("apply_failed_will_retry", error=repr(exc), message_id=message.message_id)
        await asyncio.sleep(1.0)
        with contextlib.suppress(Exception):
            await message.nack(requeue=True)

    async def _housekeeping(self) -> None:
        """Forget inbox ids older than the retention window, hourly; redeliveries are long over."""
        retention = timedelta(hours=self.settings.inbox_retention_hours)
        while True:
            try:
                pruned = await self.store.prune_inbox(datetime.now(UTC) - retention)
                if pruned:
                    log.info("inbox_pruned", rows=pruned)
            except Exception as exc:
                log.warning("housekeeping_failed", error=repr(exc))
            await asyncio.sleep(3600)

    async def _outbox_gauges(self) -> None:
        """Outbox size and the age of its oldest row, for /metrics: a stuck relay shows here."""
        while True:
            try:
                size, age = await self.store.outbox_stats(datetime.now(UTC))
                self.metrics.outbox_size.set(size)
                self.metrics.outbox_age.set(age)
            except Exception as exc:
                log.warning("outbox_stats_failed", error=repr(exc))
            await asyncio.sleep(5.0)

    async def _timer_loop(self) -> None:
        """Fire due timers, but not while replies are held up somewhere we cannot see.

        A step's timeout measures its participant's silence. So timers never fire while our
        broker connection is down (no reply can arrive, no retry can leave); after an outage
        they wait as long again as it lasted, for the participants' held-up replies; and while
        replies wait in the reply queue not yet delivered to us (a backlog after a restart or
        a burst), they wait for those to be applied first. Each wait is capped by
        SAGA_TIMER_OUTAGE_CREDIT_MAX, so a silent participant is always timed out in the end.
        Without this, every held-up reply arrives after its step timed out, every timeout adds
        a retry to the backlog, and the retry budgets run out on steps that had answered."""
        loop = asyncio.get_running_loop()
        cap = self.settings.timer_outage_credit_max
        await asyncio.sleep(self.settings.timer_grace)
        down_since: float | None = None
        backlog_since: float | None = None
        while True:
            if self.broker is not None and not self.broker.is_connected():
                if down_since is None:
                    down_since = loop.time()
                    log.warning("timers_paused", why="broker connection down")
                await asyncio.sleep(self.settings.timer_interval)
                continue
            if down_since is not None:
                outage = loop.time() - down_since
                wait = min(max(outage, self.settings.timer_grace), cap)
                log.info("timers_resume", outage_s=round(outage, 2), after_s=round(wait, 2))
                down_since = None
                await asyncio.sleep(wait)
                continue  # down again meanwhile? check before firing
            if await self._replies_waiting():
                if backlog_since is None:
                    backlog_since = loop.time()
                if loop.time() - backlog_since < cap:
                    await asyncio.sleep(self.settings.timer_interval)
                    continue
            else:
                backlog_since = None
            try:
                await self.orchestrator.fire_due_timers()
            except Exception as exc:
                log.warning("timer_loop_failed", error=repr(exc))
            await asyncio.sleep(self.settings.timer_interval)

    async def _replies_waiting(self) -> bool:
        if self.broker is None:
            return False
        ready = await self.broker.ready_count(self.topology.reply_queue)
        return bool(ready)
