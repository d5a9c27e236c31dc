"""``saga bench``: the checkout saga on real processes, against the broker's own ceiling.

It starts ``saga run`` (``--instances`` of it, sharing one PostgreSQL database) and the four demo
services on a private prefix and temporary data (or, with ``--connect``, uses a stack already
running), measures the broker ceiling with two plain aio-pika processes, runs the checkouts,
prints a table (or ``--json``), and cleans up.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from aiormq.exceptions import AMQPError
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from saga.core.errors import ConfigError
from saga.loop import run as run_loop
from saga_tools.bench import ceiling as ceiling_
from saga_tools.bench.definitions import VERSIONS
from saga_tools.bench.driver import FAIL_STEPS, Observer, Workload, run_load
from saga_tools.bench.procfs import cpu_seconds, peak_rss_mib
from saga_tools.bench.report import render_table, result_document
from saga_tools.bench.stack import (
    SERVICES,
    BenchStack,
    StackConfig,
    delete_topology,
    is_sqlite,
    seed_services,
    temporary_database,
    work_done,
)

__all__ = ["app", "bench"]

app = typer.Typer(name="bench", add_completion=False)


class ServicesMode(StrEnum):
    SEPARATE = "separate"
    ALL = "all"


class Participants(StrEnum):
    DEMO = "demo"
    ECHO = "echo"
    LIBRARY = "library"


class Synchronous(StrEnum):
    FULL = "FULL"
    NORMAL = "NORMAL"


class FailStep(StrEnum):
    """The step refused checkouts fail at, by the demo rules (then compensate)."""

    PAYMENT = "payment"  # a customer with no money: insufficient funds
    INVENTORY = "inventory"  # a sold-out SKU
    SHIPPING = "shipping"  # an address no carrier delivers to


assert tuple(FailStep) == FAIL_STEPS


@app.callback(invoke_without_command=True)
def main(
    sagas: Annotated[int, typer.Option(min=1, max=1_000_000, help="Checkouts to run.")] = 1000,
    concurrency: Annotated[int, typer.Option(min=1, max=100_000, help="Sagas in flight.")] = 100,
    rate: Annotated[
        float | None,
        typer.Option(min=0.1, help="Start this many per second (open loop) instead of a window."),
    ] = None,
    fail_rate: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share of checkouts refused at --fail-step.")
    ] = 0.0,
    fail_step: Annotated[
        FailStep, typer.Option(help="Step the refused checkouts fail at (then compensate).")
    ] = FailStep.SHIPPING,
    database_url: Annotated[
        str | None,
        typer.Option(
            help="postgresql+asyncpg://... to use PostgreSQL (a temporary database is created "
            "on that server and dropped); default: SQLite files in a temporary directory."
        ),
    ] = None,
    rabbitmq_url: Annotated[
        str, typer.Option(envvar="SAGA_RABBITMQ_URL", help="RabbitMQ to use.")
    ] = "amqp://guest:guest@127.0.0.1:5672/",
    services: Annotated[
        ServicesMode, typer.Option(help="A process per service, or all four in one.")
    ] = ServicesMode.SEPARATE,
    participants: Annotated[
        Participants,
        typer.Option(
            help="demo: the four demo services with their databases and ledgers; echo: "
            "responders that answer every command at once (no database), to measure the "
            "orchestrator alone against the ceiling; library: the participant library with its "
            "durable ledger and handlers of no work of their own, to measure what the library "
            "costs per command."
        ),
    ] = Participants.DEMO,
    instances: Annotated[
        int,
        typer.Option(
            min=1,
            max=16,
            help="Orchestrator processes sharing the database (more than one needs PostgreSQL: "
            "--database-url postgresql+asyncpg://...).",
        ),
    ] = 1,
    ceiling: Annotated[
        bool, typer.Option(help="Measure the broker's request/reply ceiling in the same run.")
    ] = True,
    ceiling_round_trips: Annotated[
        int | None, typer.Option(min=100, help="Round trips of the ceiling (default: auto).")
    ] = None,
    warmup: Annotated[int, typer.Option(min=0, help="Sagas run first and not counted.")] = 50,
    crash_after: Annotated[
        float | None,
        typer.Option(
            help="kill -9 the orchestrator (the first one, with --instances) this many seconds "
            "in, then restart it."
        ),
    ] = None,
    timeout: Annotated[float, typer.Option(min=1, help="Give up after this many seconds.")] = 600,
    step_timeout: Annotated[
        float | None,
        typer.Option(
            min=0.1,
            help="Run the checkout with this step timeout (s) instead of its 3 s, so thousands "
            "in flight wait in queues instead of timing out.",
        ),
    ] = None,
    checkout_version: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=max(VERSIONS),
            envvar="SAGA_BENCH_CHECKOUT_VERSION",
            help="Run this version of the checkout instead of the newest: 1 runs its four "
            "steps one after another (the peers' shape), 2 the charge and the reservation in "
            "parallel.",
        ),
    ] = None,
    sqlite_synchronous: Annotated[
        Synchronous | None,
        typer.Option(
            help="SAGA_SQLITE_SYNCHRONOUS for every process (default FULL: an fsync per commit; "
            "NORMAL survives a process crash but not a power cut)."
        ),
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print JSON instead of a table.")
    ] = False,
    connect: Annotated[
        bool,
        typer.Option(
            help="Use a stack already running (with --prefix, --database-url and --data-dir "
            "or --services-database-url) instead of starting one."
        ),
    ] = False,
    prefix: Annotated[str | None, typer.Option(help="SAGA_PREFIX (default: a new one).")] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="With --connect: the services' SAGA_DATA_DIR.")
    ] = None,
    services_database_url: Annotated[
        str | None, typer.Option(help="With --connect: the services' database URL.")
    ] = None,
    keep: Annotated[bool, typer.Option(help="Keep the temporary directory (logs).")] = False,
) -> None:
    """Run checkout sagas on the real processes and report sagas/s, latency, CPU per saga,
    memory and outbox lag, next to the broker's ceiling measured in the same run."""
    workload = Workload(
        sagas=sagas,
        concurrency=concurrency,
        rate=rate,
        fail_rate=fail_rate,
        fail_step=str(fail_step.value),
        warmup=warmup,
        timeout=timeout,
        crash_after=crash_after,
    )
    if connect and (prefix is None or database_url is None):
        raise typer.BadParameter("--connect needs --prefix and --database-url")
    if connect and crash_after is not None:
        raise typer.BadParameter("--crash-after needs a stack the bench started")
    if connect and instances > 1:
        raise typer.BadParameter("--instances needs a stack the bench started")
    if participants is not Participants.DEMO and (
        connect or fail_rate > 0 or services.value == "all"
    ):
        raise typer.BadParameter(
            f"{participants.value} participants answer every command with success in processes "
            "of their own: not with --connect, --fail-rate or --services all",
            param_hint="--participants",
        )
    if instances > 1 and (database_url is None or is_sqlite(database_url)):
        raise typer.BadParameter(
            f"{instances} orchestrator instances need PostgreSQL (--database-url "
            "postgresql+asyncpg://user@host/db); SQLite allows one orchestrator per file "
            "and refuses a second one",
            param_hint="--instances",
        )
    options = _Options(
        rabbitmq_url=rabbitmq_url,
        database_url=database_url,
        services_mode=services.value,
        participants=participants.value,
        instances=instances,
        ceiling=ceiling,
        ceiling_round_trips=ceiling_round_trips,
        connect=connect,
        prefix=prefix,
        data_dir=data_dir,
        services_database_url=services_database_url,
        keep=keep,
        step_timeout=step_timeout,
        checkout_version=checkout_version,
        sqlite_synchronous=None if sqlite_synchronous is None else sqlite_synchronous.value,
    )
    try:
        doc = run_loop(bench(workload, options))  # the event loop of the stack's processes
    except (OSError, RuntimeError, ConfigError, AMQPError, SQLAlchemyError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    if json_output:
        typer.echo(json.dumps(doc, indent=2))
    else:
        typer.echo(render_table(doc))
    if not doc["all_finished"]:
        raise typer.Exit(1)


@dataclass(frozen=True)
class _Options:
    rabbitmq_url: str
    database_url: str | None
    services_mode: str
    participants: str
    instances: int
    ceiling: bool
    ceiling_round_trips: int | None
    connect: bool
    prefix: str | None
    data_dir: Path | None
    services_database_url: str | None
    keep: bool
    step_timeout: float | None
    checkout_version: int | None
    sqlite_synchronous: str | None


def _say(text: str) -> None:
    """Progress and notes go to stderr, so stdout stays the table or the JSON."""
    print(text, file=sys.stderr, flush=True)


async def bench(workload: Workload, options: _Options) -> dict[str, Any]:
    """One benchmark run; returns the result document."""
    tag = uuid.uuid4().hex[:8]
    prefix = options.prefix or f"bench-{tag}"
    directory = Path(tempfile.mkdtemp(prefix="saga-bench-"))
    async with contextlib.AsyncExitStack() as cleanup:
        if not options.keep:
            cleanup.callback(shutil.rmtree, directory, True)
        else:
            _say(f"logs and data in {directory}")
        if options.connect:
            assert options.database_url is not None
            database_url = options.database_url
            services_db = options.services_database_url
            data_dir = options.data_dir or directory / "data"
        elif options.database_url is None or is_sqlite(options.database_url):
            database_url = options.database_url or f"sqlite+aiosqlite:///{directory}/data/saga.db"
            services_db = None
            data_dir = directory / "data"
        else:
            name = f"saga_bench_{tag}"
            database_url = await cleanup.enter_async_context(
                temporary_database(options.database_url, name)
            )
            services_db = database_url
            data_dir = directory / "data"
        result: CeilingOrNone = None
        if options.ceiling:
            trips = options.ceiling_round_trips or min(max(4 * workload.sagas, 2000), 20_000)
            _say(f"broker ceiling: {trips} round trips, {workload.concurrency} in flight")
            result = await ceiling_.measure(
                options.rabbitmq_url,
                f"{prefix}-ceiling",
                round_trips=trips,
                concurrency=workload.concurrency,
            )
            _say(f"  {result.rate:.0f} round trips/s")
        config = StackConfig(
            rabbitmq_url=options.rabbitmq_url,
            prefix=prefix,
            directory=directory,
            database_url=database_url,
            services_database_url=services_db,
            services_mode=options.services_mode,
            step_timeout=options.step_timeout,
            checkout_version=options.checkout_version,
            sqlite_synchronous=options.sqlite_synchronous,
            instances=options.instances,
            participants=options.participants,
        )
        if options.connect:
            config = _with_data_dir(config, data_dir)
        await seed_services(config)
        stack = BenchStack(config)
        if not options.connect:
            cleanup.push_async_callback(delete_topology, options.rabbitmq_url, prefix)
            cleanup.callback(stack.stop)
            who = (
                "the orchestrator"
                if options.instances == 1
                else f"{options.instances} orchestrators"
            )
            _say(f"starting {who} and the services (prefix {prefix})")
            await stack.start()
        observer = Observer(database_url)
        cleanup.push_async_callback(observer.close)
        meter = _Meter(stack, observer, local_postgres=_is_local_postgres(database_url))
        load = await run_load(
            options.rabbitmq_url,
            prefix,
            observer,
            workload,
            tag=tag,
            progress=_progress(options),
            crash=meter.crash if not options.connect else None,
            check=stack.failure if not options.connect else None,
            begin=meter.begin,
        )
        cpu_s, rss, commits = await meter.end()
        work = await meter.work_since_begin()
        database = "sqlite" if is_sqlite(database_url) else "postgresql"
        return result_document(
            workload=workload,
            load=load,
            database=database,
            services_mode="external"
            if options.connect
            else (
                options.participants
                if options.participants != Participants.DEMO.value
                else options.services_mode
            ),
            prefix=prefix,
            cpu_s=cpu_s,
            orchestrators=config.orchestrators,
            orchestrator_rss_mib=rss,
            killed=meter.killed,
            database_commits=commits,
            work=work,
            ceiling=result,
            step_timeout=options.step_timeout,
            checkout_version=options.checkout_version,
            sqlite_synchronous=options.sqlite_synchronous,
        )
    raise AssertionError("unreachable")  # pragma: no cover - the context manager never swallows


CeilingOrNone = ceiling_.CeilingResult | None


def _with_data_dir(config: StackConfig, data_dir: Path) -> StackConfig:
    """A config whose services' SQLite files are in ``data_dir`` (an external stack's)."""
    directory = data_dir.parent if data_dir.name == "data" else data_dir
    if directory / "data" != data_dir:
        raise RuntimeError("--data-dir must be a directory named data")
    return StackConfig(
        rabbitmq_url=config.rabbitmq_url,
        prefix=config.prefix,
        directory=directory,
        database_url=config.database_url,
        services_database_url=config.services_database_url,
        services_mode=config.services_mode,
    )


class _Meter:
    """CPU seconds of every process over the measured part, and each orchestrator's memory."""

    def __init__(self, stack: BenchStack, observer: Observer, *, local_postgres: bool = False):
        self.stack = stack
        self.observer = observer
        self.commits: int | None = None  # PostgreSQL's committed transactions at the start
        # the server's processes, by pid: backends come and go with connections
        self.postgres: dict[int, float] | None = {} if local_postgres else None
        self.start: dict[str, float] = {}
        self.spent: dict[str, float] = {}  # of processes that are gone (a killed orchestrator)
        self.peak_rss: dict[str, float] = {}  # orchestrator instance -> MiB, of gone processes
        self.killed: str | None = None  # the instance killed and restarted
        self.broker = _broker_pid()
        self.work: dict[str, dict[str, float]] = {}  # saga_work_total at the start, by process

    def _now(self) -> dict[str, float]:
        values = {name: cpu_seconds(pid) for name, pid in self.stack.pids().items()}
        values["bench driver"] = time.process_time()
        if self.broker is not None:
            values["rabbitmq (shared)"] = cpu_seconds(self.broker)
        return values

    async def begin(self) -> None:
        self.work = await work_done(self.stack.metrics_ports)
        self.start = self._now()
        self.commits = await self.observer.commits()
        if self.postgres is not None:
            self.postgres = _processes_cpu("postgres")

    async def crash(self) -> None:
        """Kill the first orchestrator instance and start it again; the others keep running,
        so with several instances they take over its work meanwhile."""
        name = self.stack.config.orchestrators[0]
        pid = self.stack.pids()[name]
        self.spent[name] = cpu_seconds(pid) - self.start.get(name, 0.0)
        self.peak_rss[name] = max(self.peak_rss.get(name, 0.0), peak_rss_mib(pid))
        self.stack.kill_orchestrator(name)
        self.killed = name
        await self.stack.start_orchestrator(name)
        self.start[name] = cpu_seconds(self.stack.pids()[name])

    async def work_since_begin(self) -> dict[str, dict[str, float]]:
        """The work each process did over the measured part, by kind (a restarted process
        started counting anew: left out)."""
        now = await work_done(self.stack.metrics_ports)
        return {
            name: {kind: value - self.work[name].get(kind, 0.0) for kind, value in kinds.items()}
            for name, kinds in now.items()
            if name in self.work and name != self.killed
        }

    async def end(self) -> tuple[dict[str, float], dict[str, float], int | None]:
        """(CPU seconds by process, peak RSS MiB by orchestrator instance, transactions
        PostgreSQL committed meanwhile or None)."""
        now = self._now()
        commits = await self.observer.commits()
        if commits is not None and self.commits is not None:
            commits -= self.commits
        orchestrators = self.stack.config.orchestrators
        names = [*orchestrators, *SERVICES, "all", "bench driver", "rabbitmq (shared)"]
        cpu = {
            name: now[name] - self.start.get(name, 0.0) + self.spent.get(name, 0.0)
            for name in names
            if name in now and name in self.start  # present from start to end
        }
        if self.postgres is not None:  # a backend that ended meanwhile is missed: a lower bound
            cpu["postgresql (shared)"] = sum(
                seconds - self.postgres.get(pid, 0.0)
                for pid, seconds in _processes_cpu("postgres").items()
            )
        pids = self.stack.pids()
        rss = {
            name: max(self.peak_rss.get(name, 0.0), peak_rss_mib(pids[name]))
            for name in orchestrators
            if name in pids
        }
        return cpu, rss, commits if self.commits is not None else None


def _is_local_postgres(url: str) -> bool:
    """A PostgreSQL server on this machine, whose processes' CPU can be read from /proc."""
    parsed = make_url(url)
    return parsed.get_backend_name() == "postgresql" and parsed.host in (
        None,
        "",
        "localhost",
        "127.0.0.1",
        "::1",
    )


def _processes_cpu(comm: str) -> dict[int, float]:
    """CPU seconds of every process named ``comm``, by pid."""
    found: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as f:
                if f.read().strip() != comm:
                    continue
        except OSError:
            continue
        found[int(entry)] = cpu_seconds(int(entry))
    return found


def _broker_pid() -> int | None:
    """The local RabbitMQ node's pid, if one runs here (its CPU is shown, marked shared): the
    longest-running ``beam.smp``, as tests may start short-lived private nodes beside it."""
    found: list[tuple[int, int]] = []  # (start time, pid)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as f:
                if f.read().strip() != "beam.smp":
                    continue
            with open(f"/proc/{entry}/stat") as f:
                started = int(f.read().rsplit(")", 1)[1].split()[19])
        except (OSError, ValueError, IndexError):
            continue
        found.append((started, int(entry)))
    return min(found)[1] if found else None


def _progress(options: _Options) -> Any:
    tty = sys.stderr.isatty()
    last = [0.0]

    def show(done: int, in_flight: int, total: int, seconds: float) -> None:
        rate = done / seconds if seconds > 0 else 0.0
        line = f"  {done}/{total} done, {in_flight} in flight, {seconds:.1f} s, {rate:.0f}/s"
        if tty:
            print(f"\r{line}   ", end="" if done < total else "\n", file=sys.stderr, flush=True)
        elif seconds - last[0] >= 5 or done == total:
            last[0] = seconds
            print(line, file=sys.stderr, flush=True)

    return show
