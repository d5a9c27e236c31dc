"""Run a chaos soak: the real stack on a private RabbitMQ node, a nemesis, then the checker.

Every process (the orchestrator and the four services) is a real OS process reaching the broker
through a TCP proxy the nemesis controls; the broker itself is a private node the soak starts
on its own port and data directory, so killing it never touches anybody else's. Starts are
published straight to the node (not through the proxy), confirmed, and republished after a
broker kill until confirmed: a start is idempotent by its key.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import secrets
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

import aio_pika
import aiormq
import sqlalchemy as sa
import structlog
from aio_pika.abc import AbstractConnection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from saga.core.state import SagaStatus
from saga.participant.ledger import Ledger, outbox, replies
from saga.participant.settings import ParticipantSettings
from saga.protocol.envelope import StartSaga
from saga.store.faults import rolled_back
from saga.store.schema import sagas as sagas_table
from saga.store.sql import SqlStore, sqlite_engine
from saga.transport.topology import DEAD_LETTER_REASON, Topology
from saga_demo import inventory, order, payment, shipping
from saga_demo.checkout import CHECKOUT
from saga_tools.bench.stack import temporary_database
from saga_tools.chaos.checker import DeadLetter, Evidence, Report, check
from saga_tools.chaos.cluster import RabbitCluster
from saga_tools.chaos.netfilter import PartitionError, Partitions
from saga_tools.chaos.node import NodeError, RabbitNode
from saga_tools.chaos.plan import SERVICES, START_STAGES, ChaosPlan, Nemesis
from saga_tools.chaos.proxy import StageFault, TcpProxy

__all__ = ["SoakError", "run_soak", "until"]

log = structlog.get_logger("saga_tools.chaos")

BUSINESS = {
    "order": order.metadata,
    "payment": payment.metadata,
    "inventory": inventory.metadata,
    "shipping": shipping.metadata,
}
FORGED_HEADER = "x-chaos-id"
STARTUP_TIMEOUT = 60.0
#: seconds a process may take to stop on SIGTERM (its SAGA_SHUTDOWN_TIMEOUT is 10)
STOP_BOUND = 15.0
#: a cluster's Erlang net tick (RabbitMQ's default is 60 s): a partition longer than about this
#: is seen by both sides, and the minority node pauses (``pause_minority``). Until then the
#: processes on the cut-off node are stalled, so it must be well below what the checkout's
#: steps allow (3 s timeouts, three attempts), or a partition times steps out for good
NET_TICKTIME = 4
#: seconds to wait for the confirms of a chunk of starts before trying again elsewhere
PUBLISH_TIMEOUT = 15.0
#: the PostgreSQL server whose temporary database the orchestrators use with backend postgresql
DEFAULT_POSTGRES = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"


class SoakError(RuntimeError):
    """The soak could not run (not: the system under test misbehaved; that is the report)."""


# --- processes ---------------------------------------------------------------------------


@dataclass
class Process:
    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None
    starts: int = 0
    _log: IO[bytes] | None = None

    def start(self) -> None:
        self._log = self.log_path.open("ab")
        self._log.write(f"\n--- start {self.starts + 1} ---\n".encode())
        self._log.flush()
        self.popen = subprocess.Popen(
            self.argv,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.starts += 1

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def started(self) -> bool:
        """Whether its latest start got as far as logging that it started."""
        text = self.log_path.read_text(errors="replace")
        latest = text.rpartition(f"--- start {self.starts} ---")[2]
        return "_started" in latest

    def kill(self) -> None:
        if self.popen is not None and self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()

    def stop(self, timeout: float = 15.0) -> None:
        if self.popen is not None and self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        if self._log is not None:
            self._log.close()
            self._log = None

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Stack:
    """The orchestrator and the four services of one soak."""

    directory: Path
    prefix: str
    amqp_url: str  # through the proxy
    processes: dict[str, Process] = field(default_factory=dict)
    max_in_flight: int | None = None  # the orchestrator's SAGA_MAX_IN_FLIGHT
    orchestrators: tuple[str, ...] = ("orchestrator",)
    #: the orchestrators' database on PostgreSQL (None: a SQLite file in the data directory)
    postgres_url: str | None = None
    quorum: bool = False  # SAGA_QUORUM_QUEUES of every process
    #: a process's own SAGA_RABBITMQ_URL (a cluster: its proxies, its own node first)
    urls: dict[str, str] = field(default_factory=dict)

    @property
    def data_dir(self) -> Path:
        return self.directory / "data"

    @property
    def database_url(self) -> str:
        if self.postgres_url is not None:
            return self.postgres_url
        return f"sqlite+aiosqlite:///{self.data_dir / 'saga.db'}"

    def engine(self) -> AsyncEngine:
        """An engine reading the orchestrators' database (dispose of it after use)."""
        if self.postgres_url is not None:
            return create_async_engine(self.postgres_url, poolclass=NullPool)
        return sqlite_engine(self.database_url, immediate=False)

    @property
    def fault_plan(self) -> Path:
        return self.directory / "fault-plan.json"

    def service_settings(self) -> ParticipantSettings:
        return ParticipantSettings(
            rabbitmq_url=self.amqp_url, prefix=self.prefix, data_dir=self.data_dir
        )

    def sqlite_file(self, name: str) -> Path:
        return self.data_dir / ("saga.db" if name in self.orchestrators else f"{name}.db")

    def build(self) -> None:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("SAGA_", "OTEL_"))}
        base.update(
            PYTHONUNBUFFERED="1",
            SAGA_RABBITMQ_URL=self.amqp_url,
            SAGA_PREFIX=self.prefix,
            SAGA_RELAY_POLL_INTERVAL="0.2",
        )
        if self.quorum:
            base["SAGA_QUORUM_QUEUES"] = "true"
        logs = self.directory / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        for name in self.orchestrators:
            self.processes[name] = Process(
                name,
                [sys.executable, "-m", "saga", "run", "--migrate"],
                {
                    **base,
                    "SAGA_RABBITMQ_URL": self.urls.get(name, self.amqp_url),
                    "SAGA_DATABASE_URL": self.database_url,
                    "SAGA_DEFINITIONS": (
                        "saga_tools.chaos.definitions:cluster_registry"
                        if self.quorum
                        else "saga_demo.checkout:registry"
                    ),
                    "SAGA_TIMER_INTERVAL": "0.05",
                    "SAGA_TIMER_GRACE": "0.5",
                    **(
                        {"SAGA_MAX_IN_FLIGHT": str(self.max_in_flight)}
                        if self.max_in_flight is not None
                        else {}
                    ),
                },
                logs / f"{name}.log",
            )
        for name in SERVICES:
            self.processes[name] = Process(
                name,
                [sys.executable, "-m", "saga_demo", name],
                {
                    **base,
                    "SAGA_RABBITMQ_URL": self.urls.get(name, self.amqp_url),
                    "SAGA_DATA_DIR": str(self.data_dir),
                    "SAGA_FAULT_PLAN": str(self.fault_plan),
                },
                logs / f"{name}.log",
            )

    async def wait_started(self, name: str, within: float = STARTUP_TIMEOUT) -> None:
        proc = self.processes[name]
        needle = "orchestrator_started" if name in self.orchestrators else "participant_started"
        deadline = time.monotonic() + within
        while True:
            text = proc.log_path.read_text(errors="replace")
            if text.count(needle) >= proc.starts:
                return
            if not proc.alive():
                raise SoakError(f"{name} exited while starting:\n{proc.tail()}")
            if time.monotonic() > deadline:
                raise SoakError(f"{name} did not start within {within:g}s:\n{proc.tail()}")
            await asyncio.sleep(0.1)

    def stop_all(self) -> None:
        for proc in self.processes.values():
            proc.stop()

    def died(self) -> list[str]:
        """Processes that exited by themselves (a kill by the nemesis is followed by a start)."""
        return [p.name for p in self.processes.values() if p.popen is not None and not p.alive()]


# --- the broker ------------------------------------------------------------------------------


@dataclass
class Broker:
    """The soak's RabbitMQ: one private node, or a private cluster, and the proxies the
    processes reach it through.

    With one node every process shares one proxy. With a cluster each process has a proxy of
    its own to each node, and its URL lists them with "its" node first (processes spread over
    the nodes), so a partition between one process and its node is one proxy blackholed.
    """

    nodes: tuple[RabbitNode, ...]
    proxies: dict[str, list[TcpProxy]]  # by process, in the order of its URL
    cluster: RabbitCluster | None = None
    partitions: Partitions | None = None

    @classmethod
    async def start(cls, plan: ChaosPlan, processes: Sequence[str]) -> Broker:
        # unique per run: a node left running by a run that was killed (its Erlang name
        # still registered) must not keep the next run's node of the same seed from starting
        name = f"chaos-{plan.seed}-{secrets.token_hex(3)}"
        if plan.nodes == 1:
            node = RabbitNode(name)
            await asyncio.to_thread(node.start)
            broker = cls((node,), {})
            try:
                proxy = TcpProxy("127.0.0.1", node.port)
                await proxy.start()
            except BaseException:
                await broker.close()
                raise
            broker.proxies = {p: [proxy] for p in processes}
            return broker
        cluster = RabbitCluster(
            name,
            size=plan.nodes,
            partitionable=True,
            net_ticktime=NET_TICKTIME,
            extra_config="cluster_partition_handling = pause_minority\n",
        )
        await asyncio.to_thread(cluster.start)
        broker = cls(cluster.nodes, {}, cluster)
        try:
            broker.partitions = Partitions(cluster, name)
            for index, process in enumerate(processes):
                order = [cluster.nodes[(index + k) % plan.nodes] for k in range(plan.nodes)]
                broker.proxies[process] = []
                for node in order:
                    proxy = TcpProxy("127.0.0.1", node.port)
                    await proxy.start()
                    broker.proxies[process].append(proxy)
        except BaseException:
            await broker.close()
            raise
        return broker

    def url(self, process: str) -> str:
        return ",".join(f"amqp://guest:guest@127.0.0.1:{p.port}/" for p in self.proxies[process])

    def all_proxies(self) -> list[TcpProxy]:
        return list({id(p): p for ps in self.proxies.values() for p in ps}.values())

    def node(self, target: str) -> RabbitNode:
        """The node a fault names (``node-2``); the only node when there is one."""
        if not target:
            return self.nodes[0]
        return self.nodes[int(target.rpartition("-")[2]) - 1]

    async def connect(self) -> AbstractConnection:
        """A direct connection (no proxy) to the first node that takes one."""
        failure: BaseException | None = None
        for node in self.nodes:
            try:
                return await aio_pika.connect(node.url, timeout=10)
            except (OSError, TimeoutError, aiormq.exceptions.AMQPError) as exc:
                failure = exc
        raise SoakError(f"no RabbitMQ node takes a connection: {failure!r}")

    async def heal(self) -> None:
        """Every node running and joined, no partition, no latency or blackhole."""
        for proxy in self.all_proxies():
            proxy.latency = 0.0
            proxy.blackhole = False
        if self.partitions is not None and self.partitions.isolated:
            await asyncio.to_thread(self.partitions.heal)
        for node in self.nodes:
            if not await asyncio.to_thread(node.running):
                await asyncio.to_thread(node.start)

    async def close(self) -> None:
        for proxy in self.all_proxies():
            with contextlib.suppress(Exception):
                await proxy.close()
        if self.partitions is not None:
            await asyncio.to_thread(self.partitions.close)
        if self.cluster is not None:
            await asyncio.to_thread(self.cluster.close)
        else:
            for node in self.nodes:
                await asyncio.to_thread(node.close)


# --- the nemesis ---------------------------------------------------------------------------


@dataclass
class Nemeses:
    """Carries out the plan's schedule against one stack."""

    stack: Stack
    broker: Broker
    rng: random.Random
    injected: Counter[str] = field(default_factory=Counter)
    forged: list[str] = field(default_factory=list)
    duplicates: int = 0
    notes: list[str] = field(default_factory=list)
    held: set[str] = field(default_factory=set)  # killed by the nemesis, restarted by it
    restarts: Counter[str] = field(default_factory=Counter)  # by the supervisor

    async def run(self, schedule: Sequence[Nemesis], t0: float) -> None:
        for fault in schedule:
            delay = t0 + fault.at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                await self.inflict(fault)
            except Exception as exc:  # the nemesis itself may hit a broker it just killed
                self.notes.append(f"{fault.kind} at {fault.at}s: {exc!r}")
                log.warning("nemesis_fault_failed", kind=fault.kind, error=repr(exc))

    async def inflict(self, fault: Nemesis) -> None:
        log.info("nemesis", kind=fault.kind, target=fault.target, duration=fault.duration)
        self.injected[fault.kind] += 1
        proxies = self.broker.all_proxies()
        if fault.kind == "kill_orchestrator":
            await self._kill_and_restart(fault.target or "orchestrator", fault.duration)
        elif fault.kind == "kill_service":
            await self._kill_and_restart(fault.target, fault.duration)
        elif fault.kind == "kill_broker":
            node = self.broker.node(fault.target)
            await asyncio.to_thread(node.kill)
            await asyncio.sleep(fault.duration)
            await asyncio.to_thread(node.start)
        elif fault.kind == "drop_connections":
            for proxy in proxies:
                proxy.drop_connections()
        elif fault.kind == "latency":
            for proxy in proxies:
                proxy.latency = fault.amount
            await asyncio.sleep(fault.duration)
            for proxy in proxies:
                proxy.latency = 0.0
        elif fault.kind == "duplicate_commands":
            self.duplicates += await self._duplicate_commands(int(fault.amount))
        elif fault.kind == "duplicate_replies":
            self.duplicates += await self._duplicate_replies(int(fault.amount))
        elif fault.kind == "malformed":
            await self._forge(int(fault.amount))
        elif fault.kind == "db_lock":
            if fault.target in self.stack.orchestrators and self.stack.postgres_url:
                await _hold_table_locks(self.stack.postgres_url, fault.duration)
            else:
                await asyncio.to_thread(
                    _hold_lock, self.stack.sqlite_file(fault.target), fault.duration
                )
        elif fault.kind in ("partition", "partition_nodes"):
            await self._partition(fault)
        elif fault.kind == "sigterm":
            await self._term_and_restart(fault.target, fault.duration)
        elif fault.kind == "startup_cut":
            stage = START_STAGES[int(fault.amount) % len(START_STAGES)]
            await self._restart_with_a_cut(fault.target, stage, fault.duration)
        else:
            raise SoakError(f"unknown fault {fault.kind}")

    async def _partition(self, fault: Nemesis) -> None:
        if fault.kind == "partition":
            # a cluster: the process and the node it is on now; one node: everyone and it
            cut = self._current(fault.target) if fault.target else self.broker.all_proxies()
            for proxy in cut:
                proxy.blackhole = True
            try:
                await asyncio.sleep(fault.duration)
            finally:
                for proxy in cut:
                    proxy.blackhole = False
            return
        partitions = self.broker.partitions
        if partitions is None:
            raise SoakError("partition_nodes needs a cluster (nodes 3)")
        index = self.broker.nodes.index(self.broker.node(fault.target))
        await asyncio.to_thread(partitions.isolate, index)
        try:
            await asyncio.sleep(fault.duration)
        finally:
            await asyncio.to_thread(partitions.heal)

    async def _kill_and_restart(self, name: str, down: float) -> None:
        proc = self.stack.processes[name]
        self.held.add(name)
        try:
            proc.kill()
            await asyncio.sleep(down)
            proc.start()
        finally:
            self.held.discard(name)

    async def _term_and_restart(self, name: str, down: float) -> None:
        """SIGTERM under load: the process must stop by itself, with status 0, within
        STOP_BOUND seconds; anything else is a note in the report."""
        proc = self.stack.processes[name]
        self.held.add(name)
        try:
            if proc.popen is not None and proc.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.popen.pid, signal.SIGTERM)
                started = proc.started()
                await until(lambda: not proc.alive(), STOP_BOUND)
                code = proc.popen.returncode
                if proc.alive():
                    self.notes.append(f"{name} still ran {STOP_BOUND:g}s after SIGTERM")
                    proc.kill()
                elif code != 0 and (started or code != -signal.SIGTERM):
                    # killed by the signal itself only counts before it had started: still
                    # importing, it had opened nothing to close
                    self.notes.append(f"{name} exited {code} on SIGTERM")
            await asyncio.sleep(down)
            proc.start()
        finally:
            self.held.discard(name)

    async def _restart_with_a_cut(self, name: str, stage: str, down: float) -> None:
        """Kill ``name`` and cut the next connection made through the proxy at ``stage`` (its
        restart's, most likely): it must start anyway, or exit for the supervisor to restart."""
        proc = self.stack.processes[name]
        self.held.add(name)
        cut = StageFault(stage, "reset", times=1)
        proxies = self.broker.proxies[name]  # shared by all with one node: its next connection
        try:
            proc.kill()
            await asyncio.sleep(down)
            for proxy in proxies:
                proxy.stage = cut
            proc.start()
            await until(lambda: bool(cut.reached) or not proc.alive(), 10)
        finally:
            for proxy in proxies:
                if proxy.stage is cut:
                    proxy.stage = None
            self.held.discard(name)

    def _current(self, name: str) -> list[TcpProxy]:
        """The proxy (so, the node) ``name`` is connected through now; its first if none."""
        proxies = self.broker.proxies[name]
        return [next((p for p in proxies if p.active), proxies[0])]

    async def supervise(self) -> None:
        """Restart a process that exited by itself, as a supervisor would (the compose file's
        ``restart: unless-stopped``): e.g. a service that started while the broker was down
        exits with "cannot reach RabbitMQ"."""
        while True:
            await asyncio.sleep(0.5)
            for proc in self.stack.processes.values():
                if proc.name not in self.held and proc.popen is not None and not proc.alive():
                    log.info("supervisor_restart", process=proc.name, code=proc.popen.returncode)
                    self.restarts[proc.name] += 1
                    proc.start()

    async def heal(self) -> None:
        """Everything back up: the broker, the proxies, every process."""
        await self.broker.heal()
        for proc in self.stack.processes.values():
            if not proc.alive():
                proc.start()

    async def _connection(self) -> AbstractConnection:
        return await self.broker.connect()

    async def _duplicate_commands(self, n: int) -> int:
        """Republish copies of recent commands, taken from the tap queue, unchanged."""
        topology = Topology(prefix=self.stack.prefix)
        connection = await self._connection()
        sent = 0
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            tap = await channel.declare_queue(_tap_name(self.stack.prefix), passive=True)
            exchange = await channel.get_exchange(topology.commands_exchange)
            for _ in range(n):
                got = await tap.get(no_ack=True, fail=False)
                if got is None:
                    break
                await exchange.publish(
                    aio_pika.Message(
                        got.body,
                        message_id=got.message_id,
                        content_type=got.content_type,
                        type=got.type,
                        headers=dict(got.headers or {}),
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    ),
                    routing_key=got.routing_key or "",
                )
                sent += 1
        return sent

    async def _duplicate_replies(self, n: int) -> int:
        """Publish again replies a service already gave (same message id, same body)."""
        service = self.rng.choice(SERVICES)
        engine = sqlite_engine(
            f"sqlite+aiosqlite:///{self.stack.sqlite_file(service)}", immediate=False
        )
        try:
            async with engine.connect() as conn:
                rows = (
                    await conn.execute(
                        sa.select(replies.c.message_id, replies.c.body)
                        .order_by(replies.c.created_at.desc())
                        .limit(n)
                    )
                ).all()
        finally:
            await engine.dispose()
        reply_queue = Topology(prefix=self.stack.prefix).reply_queue
        connection = await self._connection()
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            for row in rows:
                await channel.default_exchange.publish(
                    aio_pika.Message(
                        bytes(row.body),
                        message_id=str(row.message_id),
                        content_type="application/json",
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    ),
                    routing_key=reply_queue,
                )
        return len(rows)

    async def _forge(self, n: int) -> None:
        """Malformed messages of every kind, to random queues; each must be dead-lettered."""
        topology = Topology(prefix=self.stack.prefix)
        queues = [topology.reply_queue, topology.start_queue] + [
            topology.command_queue(s) for s in SERVICES
        ]
        bodies: list[tuple[str, bytes, str | None]] = [
            ("bad_json", b'{"schema_version": 1, "message_id": ', "application/json"),
            ("bad_utf8", b'{"x": "\xff\xfe"}', "application/json"),
            ("wrong_content_type", b"<xml/>", "text/xml"),
            ("not_an_envelope", b'{"hello": "world"}', "application/json"),
            ("oversize", b'{"pad": "' + b"x" * 400_000 + b'"}', "application/json"),
        ]
        connection = await self._connection()
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            for _ in range(n):
                kind, body, content_type = self.rng.choice(bodies)
                forged = str(uuid.UUID(int=self.rng.getrandbits(128)))
                await channel.default_exchange.publish(
                    aio_pika.Message(
                        body,
                        message_id=forged,
                        content_type=content_type,
                        headers={FORGED_HEADER: forged, "x-chaos-kind": kind},
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    ),
                    routing_key=self.rng.choice(queues),
                )
                self.forged.append(forged)


async def until(condition: Callable[[], bool], within: float) -> bool:
    """Poll ``condition`` (a process, a counter: nothing to await) until it holds."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def _hold_lock(path: Path, seconds: float) -> None:
    """Hold SQLite's write lock on ``path`` for ``seconds``, as a stuck writer would."""
    conn = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        time.sleep(seconds)
        conn.execute("ROLLBACK")
    finally:
        conn.close()


async def _hold_table_locks(url: str, seconds: float) -> None:
    """Hold an exclusive lock on the orchestrators' saga table for ``seconds`` on PostgreSQL, as
    a stuck migration or a long batch job would: every writer waits behind it. PostgreSQL may
    pick the lock's own session to break a deadlock with the writers queued behind it: then it
    is taken again."""
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        for attempt in range(5):
            try:
                async with engine.begin() as conn:
                    await conn.execute(sa.text("LOCK TABLE saga_instances IN EXCLUSIVE MODE"))
                    await asyncio.sleep(seconds)
                return
            except sa.exc.DBAPIError as exc:
                if not rolled_back(exc) or attempt == 4:
                    raise
    finally:
        await engine.dispose()


def _tap_name(prefix: str) -> str:
    return f"{prefix}.chaos.tap"


# --- the soak ------------------------------------------------------------------------------


@dataclass
class Soak:
    plan: ChaosPlan
    directory: Path
    progress: Callable[[str], None]

    postgres: str = DEFAULT_POSTGRES  # the server of the temporary database (postgresql)

    async def run(self) -> Report:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.plan.save(self.directory / "plan.json")
        processes = (*self.plan.orchestrators, *SERVICES)
        try:
            broker = await Broker.start(self.plan, processes)
        except (NodeError, PartitionError) as exc:
            raise SoakError(str(exc)) from exc
        try:
            if self.plan.backend != "postgresql":
                return await self._run(broker, None)
            name = f"saga_chaos_{self.plan.seed}_{uuid.uuid4().hex[:6]}"
            try:
                database = temporary_database(self.postgres, name)
                url = await database.__aenter__()
            except (OSError, sa.exc.SQLAlchemyError) as exc:
                raise SoakError(
                    f"cannot create a database on {self.postgres}: {exc} (is PostgreSQL "
                    "running? scripts/services postgres starts it)"
                ) from exc
            try:
                return await self._run(broker, url)
            finally:
                await database.__aexit__(None, None, None)
        finally:
            await broker.close()

    async def _run(self, broker: Broker, postgres_url: str | None) -> Report:
        prefix = f"chaos{self.plan.seed % 100_000}"
        stack = Stack(
            self.directory,
            prefix,
            broker.url(self.plan.orchestrators[0]),
            max_in_flight=self.plan.max_in_flight,
            orchestrators=self.plan.orchestrators,
            postgres_url=postgres_url,
            quorum=self.plan.nodes > 1,
            urls={name: broker.url(name) for name in broker.proxies},
        )
        stack.build()
        stack.fault_plan.write_text(json.dumps(self.plan.fault_plan()))
        await self._prepare_services(stack)
        nemeses = Nemeses(stack, broker, random.Random(self.plan.seed))
        timing: dict[str, float] = {}  # seconds from the first start
        where = (
            "a private RabbitMQ node"
            if self.plan.nodes == 1
            else (f"a private {self.plan.nodes}-node RabbitMQ cluster (quorum queues)")
        )
        try:
            for proc in stack.processes.values():
                proc.start()
            for name in stack.processes:
                await stack.wait_started(name)
            await self._declare_tap(broker, prefix, quorum=stack.quorum)
            self.progress(
                f"stack up on {where}, {len(stack.orchestrators)} orchestrator(s) on "
                f"{self.plan.backend}; {len(self.plan.sagas)} sagas at "
                f"{self.plan.rate:g}/s, {len(self.plan.schedule)} faults"
            )
            t0 = time.monotonic()
            supervisor = asyncio.create_task(nemeses.supervise())
            nemesis = asyncio.create_task(nemeses.run(self.plan.schedule, t0))
            try:
                await self._publish_all(broker, prefix, t0)
                published = time.monotonic() - t0
                self.progress(
                    f"every start published in {published:.1f}s "
                    f"({len(self.plan.sagas) / published:.1f}/s offered)"
                )
                await nemesis
                await nemeses.heal()
                self.progress("nemesis done; everything healed; waiting for every saga to end")
                await self._wait_terminal(stack, nemeses)
                timing["starts_published_s"] = round(published, 1)
                timing["all_terminal_s"] = round(time.monotonic() - t0, 1)
                await self._wait_quiet(stack, broker)
            finally:
                supervisor.cancel()
                nemesis.cancel()
        finally:
            # in a thread: the proxy runs on this loop, and the processes' last frames (a
            # consumer's cancel, a channel's close) must still reach the broker while they stop
            await asyncio.to_thread(stack.stop_all)
        evidence = await self._collect(stack, broker, nemeses)
        report = check(evidence)
        report.messages["nemesis_notes"] = len(nemeses.notes)
        report.messages["supervisor_restarts"] = dict(nemeses.restarts)
        report.messages.update(timing)
        (self.directory / "report.json").write_text(json.dumps(report.to_dict(), indent=1))
        (self.directory / "report.txt").write_text(report.render() + "\n")
        if nemeses.notes:
            (self.directory / "nemesis-notes.txt").write_text("\n".join(nemeses.notes) + "\n")
        with contextlib.suppress(Exception):
            await _delete_prefix(broker, prefix)
        return report

    async def _prepare_services(self, stack: Stack) -> None:
        """Seed the service databases, with the plan's balances and stock, before they start."""
        stack.data_dir.mkdir(parents=True, exist_ok=True)
        settings = stack.service_settings()
        for module in (payment, inventory):
            participant = module.build(settings)
            try:
                await participant.setup_database()
                async with participant.ledger.begin() as conn:
                    if module is payment:
                        for name, balance in self.plan.balances.items():
                            await conn.execute(
                                payment.accounts.update()
                                .where(payment.accounts.c.name == name)
                                .values(balance=Decimal(balance))
                            )
                    else:
                        for sku, on_hand in self.plan.stock.items():
                            await conn.execute(
                                inventory.stock.update()
                                .where(inventory.stock.c.sku == sku)
                                .values(on_hand=on_hand)
                            )
            finally:
                await participant.ledger.close()

    async def _declare_tap(self, broker: Broker, prefix: str, *, quorum: bool) -> None:
        """A bounded queue receiving a copy of every command, for the duplicate-command fault."""
        topology = Topology(prefix=prefix)
        arguments: dict[str, Any] = {"x-max-length": 500, "x-overflow": "drop-head"}
        if quorum:  # a cluster: it must outlive the node it was declared on
            arguments["x-queue-type"] = "quorum"
        connection = await broker.connect()
        async with connection:
            channel = await connection.channel()
            tap = await channel.declare_queue(_tap_name(prefix), durable=True, arguments=arguments)
            for service in SERVICES:
                await tap.bind(topology.commands_exchange, routing_key=service)

    async def _publish_all(self, broker: Broker, prefix: str, t0: float) -> None:
        """Every start at the plan's rate, each confirmed; republished after a broker outage
        (on a cluster, through the next node)."""
        queue = Topology(prefix=prefix).start_queue
        batch = max(1, round(self.plan.rate / 4))
        starts = [
            StartSaga(
                schema_version=1,
                message_id=uuid.uuid5(s.saga_id, "start"),
                saga_name=CHECKOUT.name,
                key=s.key,
                input=dict(s.input),
            )
            for s in self.plan.sagas
        ]
        connection: AbstractConnection | None = None
        done = 0
        attempts = 0  # failed tries: the next goes to the next node
        try:
            while done < len(starts):
                due = t0 + done / self.plan.rate - time.monotonic()
                if due > 0:
                    await asyncio.sleep(due)
                chunk = starts[done : done + batch]
                try:
                    if connection is None or connection.is_closed:
                        node = broker.nodes[attempts % len(broker.nodes)]
                        connection = await aio_pika.connect(node.url, timeout=5)
                    channel = await connection.channel(
                        publisher_confirms=True, on_return_raises=True
                    )
                    # a confirm may never come from a node cut off from its cluster
                    await asyncio.wait_for(
                        asyncio.gather(
                            *(
                                channel.default_exchange.publish(
                                    aio_pika.Message(
                                        s.model_dump_json().encode(),
                                        message_id=str(s.message_id),
                                        content_type="application/json",
                                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                    ),
                                    routing_key=queue,
                                    mandatory=True,
                                )
                                for s in chunk
                            )
                        ),
                        PUBLISH_TIMEOUT,
                    )
                    await channel.close()
                except (TimeoutError, OSError, aiormq.exceptions.AMQPError, RuntimeError) as exc:
                    log.info("start_publish_retry", error=repr(exc))
                    attempts += 1
                    if connection is not None:
                        with contextlib.suppress(Exception):
                            await connection.close()
                    connection = None
                    await asyncio.sleep(0.5)
                    continue
                done += len(chunk)
                if done % max(batch, len(starts) // 10) < batch:
                    self.progress(f"started {done}/{len(starts)}")
        finally:
            if connection is not None:
                with contextlib.suppress(Exception):
                    await connection.close()

    async def _wait_terminal(self, stack: Stack, nemeses: Nemeses) -> None:
        ids = [s.saga_id for s in self.plan.sagas]
        within = 240.0 + 0.1 * len(ids)
        deadline = time.monotonic() + within
        engine = stack.engine()
        query = sa.select(sagas_table.c.status, sa.func.count()).group_by(sagas_table.c.status)
        last = ""
        try:
            while time.monotonic() < deadline:
                try:
                    async with engine.connect() as conn:
                        counts = {SagaStatus(r[0]): int(r[1]) for r in await conn.execute(query)}
                except (sa.exc.OperationalError, sa.exc.DBAPIError, OSError):
                    await asyncio.sleep(1.0)
                    continue
                terminal = sum(n for s, n in counts.items() if s.is_terminal)
                line = f"terminal {terminal}/{len(ids)} " + " ".join(
                    f"{s.value.lower()} {n}" for s, n in sorted(counts.items())
                )
                if line != last:
                    self.progress(line)
                    last = line
                if terminal >= len(ids):
                    return
                await nemeses.heal()  # a process that died by itself is restarted, and noted
                await asyncio.sleep(1.0)
        finally:
            await engine.dispose()
        self.progress(f"not every saga ended within {within:g}s; the checker reports them")

    async def _wait_quiet(self, stack: Stack, broker: Broker, within: float = 60.0) -> None:
        """Outboxes drained and no queue holding a message, twice in a row."""
        topology = Topology(prefix=stack.prefix)
        names = [topology.reply_queue, topology.start_queue] + [
            topology.command_queue(s) for s in SERVICES
        ]
        deadline = time.monotonic() + within
        calm = 0
        while time.monotonic() < deadline and calm < 2:
            pending = await _outbox_counts(stack)
            depths = await _depths(broker, names)
            calm = calm + 1 if not any(pending.values()) and not any(depths.values()) else 0
            await asyncio.sleep(0.5)

    async def _collect(self, stack: Stack, broker: Broker, nemeses: Nemeses) -> Evidence:
        store = SqlStore(stack.database_url)
        engine = stack.engine()
        try:
            async with engine.connect() as conn:
                ids = [r[0] for r in await conn.execute(sa.select(sagas_table.c.saga_id))]
            states = await store.load_many(ids)
            histories = {i: await store.history(i) for i in ids}
            orchestrator_outbox, _ = await store.outbox_stats(_now())
        finally:
            await store.close()
            await engine.dispose()
        rows: list[dict[str, Any]] = []
        tables: dict[str, list[dict[str, Any]]] = {}
        replies_given: dict[str, int] = {}
        for service in SERVICES:
            ledger = _ledger(stack, service)
            try:
                rows += [{**r, "service": service} for r in await ledger.history()]
                async with ledger.reader.connect() as conn:
                    replies_given[service] = int(
                        await conn.scalar(sa.select(sa.func.count()).select_from(replies)) or 0
                    )
                    table = {
                        "order": order.orders,
                        "payment": payment.payments,
                        "inventory": inventory.reservations,
                        "shipping": shipping.shipments,
                    }[service]
                    tables[service] = [
                        dict(r._mapping) for r in await conn.execute(sa.select(table))
                    ]
                    if service == "payment":
                        balances = {
                            r.name: r.balance
                            for r in await conn.execute(sa.select(payment.accounts))
                        }
                    if service == "inventory":
                        reserved = {
                            r.sku: int(r.reserved)
                            for r in await conn.execute(sa.select(inventory.stock))
                        }
            finally:
                await ledger.close()
        return Evidence(
            plan=self.plan,
            states=states,
            histories=histories,
            orchestrator_outbox=orchestrator_outbox,
            service_outboxes=await _outbox_counts(stack),
            replies_given=replies_given,
            rows=rows,
            payments=tables["payment"],
            reservations=tables["inventory"],
            orders=tables["order"],
            shipments=tables["shipping"],
            balances=balances,
            reserved=reserved,
            reserved_before={s["sku"]: int(s["reserved"]) for s in inventory.SEED},
            dead_letters=await _drain_dead_letters(broker, stack.prefix),
            faults=dict(nemeses.injected),
            forged=list(nemeses.forged),
            duplicates_published=nemeses.duplicates,
        )


def _now() -> Any:
    from datetime import UTC, datetime  # noqa: PLC0415

    return datetime.now(UTC)


def _ledger(stack: Stack, service: str) -> Ledger:
    url, _ = stack.service_settings().database_url(service)
    return Ledger(url, business=BUSINESS[service])


async def _outbox_counts(stack: Stack) -> dict[str, int]:
    counts: dict[str, int] = {}
    store = SqlStore(stack.database_url)
    try:
        counts["orchestrator"], _ = await store.outbox_stats(_now())
    finally:
        await store.close()
    for service in SERVICES:
        ledger = _ledger(stack, service)
        try:
            async with ledger.reader.connect() as conn:
                counts[service] = int(
                    await conn.scalar(sa.select(sa.func.count()).select_from(outbox)) or 0
                )
        finally:
            await ledger.close()
    return counts


async def _depths(broker: Broker, names: Sequence[str]) -> dict[str, int]:
    found: dict[str, int] = {}
    connection = await broker.connect()
    async with connection:
        for name in names:
            channel = await connection.channel()
            try:
                queue = await channel.declare_queue(name, passive=True)
                found[name] = queue.declaration_result.message_count or 0
            except aiormq.exceptions.ChannelNotFoundEntity:
                found[name] = 0
            finally:
                if not channel.is_closed:
                    await channel.close()
    return found


async def _drain_dead_letters(broker: Broker, prefix: str) -> list[DeadLetter]:
    topology = Topology(prefix=prefix)
    names = [topology.reply_queue, topology.start_queue] + [
        topology.command_queue(s) for s in SERVICES
    ]
    found: list[DeadLetter] = []
    connection = await broker.connect()
    async with connection:
        channel = await connection.channel()
        for name in names:
            dlq = await channel.declare_queue(topology.dead_letter_queue(name), passive=True)
            while (got := await dlq.get(no_ack=True, fail=False)) is not None:
                headers: Mapping[str, Any] = got.headers or {}
                forged = headers.get(FORGED_HEADER)
                reason = headers.get(DEAD_LETTER_REASON)
                found.append(
                    DeadLetter(
                        dlq.name,
                        str(forged) if forged is not None else got.message_id,
                        None if reason is None else str(reason),
                    )
                )
    return found


async def _delete_prefix(broker: Broker, prefix: str) -> None:
    topology = Topology(prefix=prefix)
    connection = await broker.connect()
    async with connection:
        channel = await connection.channel()
        for spec in topology.queues(SERVICES):
            await channel.queue_delete(spec.name)
        await channel.queue_delete(_tap_name(prefix))
        for exchange in topology.exchanges():
            await channel.exchange_delete(exchange.name)


async def run_soak(
    plan: ChaosPlan,
    directory: Path,
    progress: Callable[[str], None],
    postgres: str = DEFAULT_POSTGRES,
) -> Report:
    """Run ``plan`` in ``directory`` (plan, logs, databases and report are kept there); with
    backend postgresql the orchestrators use a temporary database on the ``postgres`` server."""
    return await Soak(plan, directory, progress, postgres).run()
