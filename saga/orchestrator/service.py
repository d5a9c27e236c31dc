"""The orchestrator service: the runtime wired to a broker (RabbitMQ) and the SQL store.

This module only assembles the parts and runs their life cycle; each part has one job:

* :class:`~saga.orchestrator.runtime.Orchestrator`: load, decide, commit (group commit);
* :class:`~saga.messaging.pipeline.Pipeline` with :class:`~saga.orchestrator.inbound.Inbound`:
  consume the reply and start queues (parse, dead-letter, ack after commit);
* :class:`~saga.relay.Relay`: publish the outbox with confirms;
* :class:`~saga.orchestrator.timers.TimerLoop`: fire deadlines, never for our own backlog;
* :mod:`~saga.orchestrator.upkeep`: prune the inbox, report the outbox on /metrics;
* :class:`~saga.orchestrator.lock.SqliteLock`: one orchestrator per SQLite file.

On start it checks the schema, takes the lock, declares the topology and resumes: the relay
publishes whatever the outbox still holds and the timer loop fires every deadline that passed
while it was down. SIGTERM stops consuming, lets in-flight messages finish, flushes the outbox
once more and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import structlog

from saga.core.definition import Registry
from saga.core.state import JSON, SagaState
from saga.faults import crash_point
from saga.messaging.pipeline import Pipeline
from saga.messaging.poison import PoisonGuard
from saga.orchestrator.admission import Admission
from saga.orchestrator.inbound import Inbound, reply_attributes, start_attributes
from saga.orchestrator.lock import SqliteLock
from saga.orchestrator.runtime import Orchestrator
from saga.orchestrator.timers import TimerLoop
from saga.orchestrator.upkeep import (
    adopt_in_flight,
    outbox_gauges,
    prune_inbox,
    queue_gauges,
    reconcile_admission,
    saga_gauges,
)
from saga.ports import Clock
from saga.process import Budget, serve, starting
from saga.protocol.envelope import ReplyEnvelope, StartSaga
from saga.relay import Relay, SpanRelay, span_interval
from saga.secrets import redact_url
from saga.settings import Settings
from saga.store.faults import describe_error
from saga.store.schema import HEAD
from saga.store.sql import SqlStore
from saga.telemetry import Metrics, MetricsServer, Tracing
from saga.transport.broker import Broker, BrokerSlot, Consumer
from saga.transport.topology import Topology

__all__ = ["OrchestratorService"]

log = structlog.get_logger("saga.orchestrator")


class OrchestratorService:
    """The orchestrator on a broker: RabbitMQ at ``settings.rabbitmq_url`` unless ``broker``
    (or the ``broker`` attribute, set before :meth:`start`) gives another. A broker given
    belongs to the caller, who closes it; the one :meth:`start` connects, :meth:`stop` closes."""

    #: seconds between two readings of the store and the queues for the /metrics gauges
    GAUGE_INTERVAL = 5.0

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
        # a deadline waits for its saga's unsent commands as long as for any other backlog
        self.store.unsent_hold = timedelta(seconds=settings.timer_outage_credit_max)
        self.tracing = tracing if tracing is not None else Tracing()
        self.metrics = Metrics()
        self._lock = SqliteLock(settings.database_url) if settings.is_sqlite else None
        self.relay: Relay | None = None
        #: exports the spans committed with the sagas' work (only while spans are exported)
        self.spans: SpanRelay | None = None
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
            admission=Admission(settings.max_in_flight),
        )
        self._broker = BrokerSlot(broker)  # given: the caller's; else made by start()
        self._pipelines: list[Pipeline[Any]] = []
        self._consumers: list[Consumer] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._poison = PoisonGuard(settings.max_deliveries, self.store.ping)
        self._admin: Any = None  # saga.admin.server.AdminServer when SAGA_ADMIN_PORT is set
        self._started = False  # start() finished: stop() logs that it stops
        self._metrics_server: MetricsServer | None = None

    @property
    def broker(self) -> Broker | None:
        """The broker in use: the one given, or the one :meth:`start` connected."""
        return self._broker.broker

    @broker.setter
    def broker(self, broker: Broker | None) -> None:
        self._broker.broker = broker

    @property
    def dead_lettered(self) -> int:
        """Messages this service moved to a dead-letter queue since it started."""
        return sum(p.dead_lettered for p in self._pipelines)

    @property
    def participants(self) -> set[str]:
        """Every participant the registered sagas send commands to."""
        found = {s.participant for d in self.registry.all() for s in d.steps}
        return found | set(self.registry.participants or ())

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        if self._lock is not None:
            self._lock.acquire()
        try:
            starting(f"opening the database {self.store.safe_url}")
            if self.settings.auto_migrate:
                await self.store.migrate()
            await self.store.setup()
            await self.store.join()  # PostgreSQL: claims of a killed instance free at once
            durable = self.tracing.durable
            if durable is not None:  # first: spans a killed process committed leave now
                self.spans = SpanRelay(self.store, durable, interval=span_interval())
                self._tasks.append(asyncio.create_task(self.spans.run(), name="saga-spans"))
            assert self.orchestrator.admission is not None
            recovered = await adopt_in_flight(self.store, self.orchestrator.admission)
            starting(f"connecting to RabbitMQ at {redact_url(self.settings.rabbitmq_url)}")
            broker = await self._broker.connect(self.settings.rabbitmq_url, tls=self.settings.tls)
            self.metrics.watch_broker(broker.stats)
            self.tracing.server = broker.address
            self.metrics.watch_work(lambda: self.store.counts + broker.counts)
            starting("declaring the topology on RabbitMQ", lambda: broker.stats().last_failure)
            await broker.declare(self.topology, self.participants)
            self.relay = Relay(
                self.store,
                broker.publish_many,
                batch=self.settings.relay_batch,
                max_in_flight=self.settings.relay_in_flight,
                poll_interval=self.settings.relay_poll_interval,
                tracing=self.tracing,
                metrics=self.metrics,
            )
            self._tasks.append(asyncio.create_task(self.relay.run(), name="saga-relay"))
            starting("consuming the reply and start queues", lambda: broker.stats().last_failure)
            await self._consume(broker)
            # Timers start last and after a grace period: replies that arrived while we were
            # down are already queued, and applying them beats timing their commands out.
            timers = TimerLoop(
                self.orchestrator,
                lambda: self.broker,
                self._replies_waiting,
                interval=self.settings.timer_interval,
                grace=self.settings.timer_grace,
                credit_max=self.settings.timer_outage_credit_max,
                backlogged=self._backlogged_participants,
            )
            retention = timedelta(hours=self.settings.inbox_retention_hours)
            self._tasks.append(asyncio.create_task(timers.run(), name="saga-timers"))
            self._tasks.append(
                asyncio.create_task(prune_inbox(self.store, retention), name="saga-housekeeping")
            )
            self._tasks.append(
                asyncio.create_task(
                    reconcile_admission(self.store, self.orchestrator.admission),
                    name="saga-admission",
                )
            )
            if self.settings.metrics_port:
                self._metrics_server = MetricsServer(self.metrics.registry)
                self._metrics_server.start(self.settings.metrics_host, self.settings.metrics_port)
                self.metrics.watch_sagas([d.name for d in self.registry.all()])
                queues = [q.name for q in self.topology.queues(self.participants)]
                self._tasks += [
                    asyncio.create_task(
                        outbox_gauges(self.store, self.metrics, self.GAUGE_INTERVAL),
                        name="saga-outbox-gauges",
                    ),
                    asyncio.create_task(
                        saga_gauges(self.store, self.metrics, self.GAUGE_INTERVAL),
                        name="saga-saga-gauges",
                    ),
                    asyncio.create_task(
                        queue_gauges(
                            lambda: self.broker, queues, self.metrics, self.GAUGE_INTERVAL
                        ),
                        name="saga-queue-gauges",
                    ),
                ]
            if self.settings.admin_port:
                from saga.admin.server import AdminServer  # noqa: PLC0415 (FastAPI only when used)

                starting(f"starting the admin API on port {self.settings.admin_port}")
                self._admin = AdminServer(self)
                await self._admin.start()
        except BaseException:
            await self._close()
            raise
        self._started = True
        log.info(
            "orchestrator_started",
            sagas=[f"{d.name}@v{d.version}" for d in self.registry.all()],
            database=self.store.safe_url,
            prefix=self.settings.prefix,
            in_flight=recovered,
            max_in_flight=self.settings.max_in_flight,
        )

    async def _consume(self, broker: Broker) -> None:
        """Consume the reply queue and the start queue, each through the shared pipeline."""
        inbound = Inbound(self.orchestrator)
        common: dict[str, Any] = {
            "broker": broker,
            "topology": self.topology,
            "tracing": self.tracing,
            "metrics": self.metrics,
            "poison": self._poison,
            "max_bytes": self.settings.max_message_bytes,
        }
        replies = Pipeline(
            self.topology.reply_queue,
            ReplyEnvelope,
            inbound.reply,
            span_attributes=reply_attributes,
            **common,
        )
        starts = Pipeline(
            self.topology.start_queue,
            StartSaga,
            inbound.start,
            span_attributes=start_attributes,
            **common,
        )
        self._pipelines = [replies, starts]
        for pipeline in self._pipelines:
            consumer = await broker.consume(
                pipeline.queue, pipeline, prefetch=self.settings.prefetch
            )
            self._consumers.append(consumer)

    async def serve(self) -> None:
        """Run until SIGTERM or SIGINT, then shut down gracefully."""
        await serve(
            self.start,
            self.stop,
            start_timeout=self.settings.start_timeout,
            stop_timeout=self.settings.shutdown_timeout,
        )

    async def stop(self) -> None:
        # After a start that failed, the launcher's one error line says it all: no log lines
        # about stopping a service that never ran.
        started, self._started = self._started, False
        in_flight = [t for p in self._pipelines for t in p.in_flight]
        if started:
            log.info("orchestrator_stopping", in_flight=len(in_flight))
        await self._cancel_consumers()
        for task in self._tasks:  # no new timer events while the last ones drain
            if task.get_name() == "saga-timers":
                task.cancel()
        budget = Budget(self.settings.shutdown_timeout)
        if in_flight:
            await asyncio.wait(in_flight, timeout=budget.share(0.5))
        await self.orchestrator.drained()
        if self.relay is not None:
            relaying = [t for t in self._tasks if t.get_name() == "saga-relay"]
            await self.relay.shutdown(relaying[0] if relaying else None, budget.share(0.6))
        if self.spans is not None:
            draining = [t for t in self._tasks if t.get_name() == "saga-spans"]
            await self.spans.shutdown(draining[0] if draining else None, budget.share(0.6))
        await self._close()
        if started:
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
        await self._broker.release()
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
        """Start a saga in-process; idempotent by ``key``. The input is checked against the
        definition's input model first (:class:`~saga.core.errors.InvalidInputError`)."""
        return await self.orchestrator.start(name, input, key=key)

    async def _backlogged_participants(self) -> set[str]:
        """Participants whose command queue has commands no consumer has taken yet."""
        broker = self.broker
        if broker is None:
            return set()
        names = sorted(self.participants)
        counts = await asyncio.gather(
            *(broker.ready_count(self.topology.command_queue(n)) for n in names)
        )
        return {n for n, c in zip(names, counts, strict=True) if c}

    async def _replies_waiting(self) -> bool:
        if self.broker is None:
            return False
        return bool(await self.broker.ready_count(self.topology.reply_queue))
