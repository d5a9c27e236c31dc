"""The processes under test: ``saga run`` and the demo services, on a private prefix and data.

Every run gets its own ``SAGA_PREFIX``, a temporary data directory (SQLite) or a temporary
PostgreSQL database (which several orchestrator instances may share), and bench-only rows in the
services' databases (customers with a large balance, a SKU with a large stock), so thousands of
checkouts can succeed without touching the demo's seed. :meth:`BenchStack.stop` stops the
processes; :func:`delete_topology` and :func:`temporary_database` remove the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import aio_pika
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from saga.participant.settings import ParticipantSettings
from saga.transport.topology import Topology
from saga_demo import inventory, payment
from saga_demo.checkout import PARTICIPANTS
from saga_demo.cli import BUILDERS
from saga_tools.bench.definitions import STEP_TIMEOUT_ENV, VERSION_ENV

__all__ = [
    "BENCH_CUSTOMERS",
    "BENCH_SKU",
    "BROKE_CUSTOMER",
    "BenchStack",
    "StackConfig",
    "delete_topology",
    "temporary_database",
]

SERVICES = tuple(BUILDERS)
_NAMESPACE = uuid.UUID("0b3c2f9e-6a1d-4f57-8d0e-2b4c6a8e0f13")
#: customers with a large balance and no per-charge limit; checkouts spread over them so no
#: one account row is a hot spot on PostgreSQL
BENCH_CUSTOMERS = tuple(uuid.uuid5(_NAMESPACE, f"bench-{i}") for i in range(16))
#: a customer with nothing on the account: every charge is refused (insufficient funds)
BROKE_CUSTOMER = uuid.uuid5(_NAMESPACE, "bench-broke")
BENCH_SKU = "BENCH-1"
_BALANCE = Decimal("1000000.00")
STARTUP_TIMEOUT = 60.0


@dataclass(frozen=True)
class StackConfig:
    rabbitmq_url: str
    prefix: str
    directory: Path
    database_url: str  # the orchestrator's
    services_database_url: str | None  # None: a SQLite file per service in data_dir
    services_mode: str = "separate"  # "separate": a process per service; "all": one process
    log_level: str = "INFO"
    step_timeout: float | None = None  # None: the checkout's own
    checkout_version: int | None = None  # None: the newest
    sqlite_synchronous: str | None = None  # None: the processes' default (FULL)
    instances: int = 1  # orchestrator processes on the one database; > 1 needs PostgreSQL
    #: "echo": saga_tools.bench.echo answers instead of the services; "library": the
    #: participant library with handlers of no work of their own (saga_tools.bench.library)
    participants: str = "demo"

    def __post_init__(self) -> None:
        if self.instances < 1:
            raise ValueError("at least one orchestrator instance")
        if self.instances > 1 and is_sqlite(self.database_url):
            raise ValueError(
                "several orchestrator instances need PostgreSQL: SQLite allows one "
                "orchestrator per file"
            )

    @property
    def data_dir(self) -> Path:
        return self.directory / "data"

    @property
    def orchestrators(self) -> tuple[str, ...]:
        """The instances' process names: ``orchestrator`` alone, else numbered from 1."""
        if self.instances == 1:
            return ("orchestrator",)
        return tuple(f"orchestrator-{i}" for i in range(1, self.instances + 1))

    def service_settings(self) -> ParticipantSettings:
        return ParticipantSettings(
            rabbitmq_url=self.rabbitmq_url,
            prefix=self.prefix,
            data_dir=self.data_dir,
            services_database_url=self.services_database_url,
        )


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid


@dataclass
class BenchStack:
    """Starts, kills, restarts and stops the stack's processes; owns nothing else."""

    config: StackConfig
    processes: dict[str, _Proc] = field(default_factory=dict)
    #: the /metrics port of each process that serves one
    metrics_ports: dict[str, int] = field(default_factory=dict)
    _spawned: int = 0

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SAGA_")}
        c = self.config
        env.update(
            SAGA_RABBITMQ_URL=c.rabbitmq_url,
            SAGA_PREFIX=c.prefix,
            SAGA_DATABASE_URL=c.database_url,
            SAGA_DEFINITIONS=_definitions(c),
            SAGA_DATA_DIR=str(c.data_dir),
            SAGA_LOG_LEVEL=c.log_level,
        )
        if c.services_database_url is not None:
            env["SAGA_SERVICES_DATABASE_URL"] = c.services_database_url
        if c.step_timeout is not None:
            env[STEP_TIMEOUT_ENV] = str(c.step_timeout)
        if c.checkout_version is not None:
            env[VERSION_ENV] = str(c.checkout_version)
        if c.sqlite_synchronous is not None:
            env["SAGA_SQLITE_SYNCHRONOUS"] = c.sqlite_synchronous
        return env

    def _spawn(self, name: str, argv: Sequence[str], *, metrics: bool = True) -> _Proc:
        """Start ``argv`` as process ``name``; ``metrics``: with a /metrics port of its own,
        from which the bench reads the work it did (``saga_work_total``)."""
        self._spawned += 1
        env = self._env()
        if metrics:
            self.metrics_ports[name] = _free_port()
            env.update(
                SAGA_METRICS_HOST="127.0.0.1", SAGA_METRICS_PORT=str(self.metrics_ports[name])
            )
        else:
            self.metrics_ports.pop(name, None)
        log = self.config.directory / f"{self._spawned:02d}-{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                [_script(argv[0]), *argv[1:]],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a group of its own: nothing it starts outlives it
            )
        proc = _Proc(name, popen, log)
        self.processes[name] = proc
        return proc

    async def start(self) -> None:
        """Start the orchestrators, then the services, and wait until all of them are ready.

        The first orchestrator migrates the schema alone; the others start once it is ready,
        so no two processes run the migrations at once."""
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        first, *others = self.config.orchestrators
        await self.start_orchestrator(first)
        await asyncio.gather(*(self.start_orchestrator(name) for name in others))
        if self.config.participants in ("echo", "library"):
            module = [sys.executable, "-m", f"saga_tools.bench.{self.config.participants}"]
            metrics = self.config.participants == "library"
            started = [self._spawn(n, [*module, n], metrics=metrics) for n in SERVICES]
            expected = 1
        else:
            names = ["all"] if self.config.services_mode == "all" else list(SERVICES)
            started = [self._spawn(n, ["saga-service", n]) for n in names]
            expected = len(SERVICES) if self.config.services_mode == "all" else 1
        await asyncio.gather(*(_ready(p, "participant_started", expected) for p in started))

    async def start_orchestrator(self, name: str = "orchestrator") -> None:
        """Start (or restart) the orchestrator instance ``name`` and wait until it is ready."""
        if name not in self.config.orchestrators:
            raise ValueError(f"no orchestrator instance {name!r}")
        migrate = ["--migrate"] if name == self.config.orchestrators[0] else []
        await _ready(self._spawn(name, ["saga", "run", *migrate]), "orchestrator_started")

    def kill_orchestrator(self, name: str = "orchestrator") -> None:
        """SIGKILL: no shutdown, no last flush, as a power cut of the process would."""
        proc = self.processes[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.popen.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM everything, wait a little, then SIGKILL what is left."""
        for proc in self.processes.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=max(deadline - time.monotonic(), 0.1))
        for proc in self.processes.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.popen.wait(timeout=10)

    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.processes.items() if p.popen.poll() is None}

    def failure(self) -> str | None:
        """Which process died, with the tail of its log; None while all run."""
        for proc in self.processes.values():
            code = proc.popen.poll()
            if code is not None:
                tail = "\n".join(proc.log.read_text(errors="replace").splitlines()[-15:])
                return f"{proc.name} exited with status {code}:\n{tail}"
        return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def work_done(ports: Mapping[str, int]) -> dict[str, dict[str, float]]:
    """``saga_work_total`` of each process, by kind, read from its /metrics (a process that
    does not answer is left out)."""

    def read(port: int) -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
        found = {}
        for line in text.splitlines():
            if line.startswith('saga_work_total{kind="'):
                kind = line.split('"', 2)[1]
                found[kind] = float(line.rsplit(" ", 1)[1])
        return found

    done: dict[str, dict[str, float]] = {}
    for name, port in ports.items():
        try:
            done[name] = await asyncio.to_thread(read, port)
        except OSError:
            continue
    return done


def _definitions(config: StackConfig) -> str:
    """SAGA_DEFINITIONS for the orchestrators."""
    if config.participants in ("echo", "library"):
        return "saga_tools.bench.definitions:echo_registry"
    if config.step_timeout is not None or config.checkout_version is not None:
        return "saga_tools.bench.definitions:registry"
    return "saga_demo.checkout:registry"


def _script(name: str) -> str:
    """A console script of this installation (next to the interpreter), else from PATH; an
    absolute path as it is."""
    if os.path.isabs(name):
        return name
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} is not installed")
    return found


async def _ready(proc: _Proc, marker: str, count: int = 1) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    needle = marker.encode()
    while time.monotonic() < deadline:
        if proc.log.read_bytes().count(needle) >= count:
            return
        if proc.popen.poll() is not None:
            break
        await asyncio.sleep(0.05)
    tail = "\n".join(proc.log.read_text(errors="replace").splitlines()[-15:])
    raise RuntimeError(f"{proc.name} did not start:\n{tail}")


# --- data ----------------------------------------------------------------------------------


async def seed_services(config: StackConfig) -> None:
    """Create the services' databases (as their start would) and add the bench's rows."""
    if config.participants in ("echo", "library"):
        return  # nothing to keep (the library's ledgers are made at its start)
    settings = config.service_settings()
    for name in SERVICES:
        participant = BUILDERS[name](settings)
        try:
            await participant.setup_database()
            async with participant.ledger.begin() as conn:
                dialect = sqlite if conn.dialect.name == "sqlite" else postgresql
                if name == "payment":
                    rows = [
                        {
                            "customer_id": cid,
                            "name": f"bench-{i}",
                            "balance": _BALANCE,
                            "currency": "EUR",
                            "per_charge_limit": None,
                            "flaky": False,
                        }
                        for i, cid in enumerate(BENCH_CUSTOMERS)
                    ]
                    rows.append(
                        {
                            "customer_id": BROKE_CUSTOMER,
                            "name": "bench-broke",
                            "balance": Decimal("0.00"),
                            "currency": "EUR",
                            "per_charge_limit": None,
                            "flaky": False,
                        }
                    )
                    await conn.execute(
                        dialect.insert(payment.accounts).on_conflict_do_nothing(), rows
                    )
                elif name == "inventory":
                    row = {"sku": BENCH_SKU, "name": "Bench item", "on_hand": 10**9, "reserved": 0}
                    await conn.execute(
                        dialect.insert(inventory.stock).on_conflict_do_nothing(), [row]
                    )
        finally:
            await participant.ledger.close()


async def delete_topology(url: str, prefix: str) -> None:
    """Delete every queue and exchange of ``prefix``; missing ones are fine."""
    topology = Topology(prefix=prefix)
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        for q in topology.queues(PARTICIPANTS):
            await channel.queue_delete(q.name)
        for spec in topology.exchanges():
            await channel.exchange_delete(spec.name)


@contextlib.asynccontextmanager
async def temporary_database(url: str, name: str) -> AsyncIterator[str]:
    """A fresh PostgreSQL database ``name`` on ``url``'s server, dropped on exit; yields its
    URL. A database of its own keeps the run apart from anything else on that server."""
    admin = create_async_engine(url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        async with admin.connect() as conn:
            await conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        try:
            yield make_url(url).set(database=name).render_as_string(hide_password=False)
        finally:
            async with admin.connect() as conn:
                await conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        await admin.dispose()


def is_sqlite(url: str) -> bool:
    return sa.engine.make_url(url).get_backend_name() == "sqlite"
