"""The orchestrator's own CPU per event, in one process, without RabbitMQ.

``saga bench`` measures the whole stack, where the AMQP client's work and the machine's other
load move single runs by a fifth. This drives the production
:class:`~saga.orchestrator.service.OrchestratorService` (consume pipeline, runtime, engine,
codec, relay, SQLite file store with ``synchronous=FULL``) on the in-memory broker, with echo
participants in the same process answering every command at once (the replies ``saga bench
--participants echo`` sends), and reports the CPU the process spent per event decided
(``time.process_time``: every thread, the database's writer thread included), less the CPU the
echo participants took to build their replies (measured around it with
``time.thread_time``). The in-memory broker's own work (a task per delivery, copies of each
message) stays in the figure, for both directions; it stands in for the AMQP client, whose cost
this does not measure, and is the same before and after a change to the orchestrator.

    python -m saga_tools.bench.profile_decide --sagas 3000 --concurrency 200
    python -m saga_tools.bench.profile_decide --profile --top 40   # cProfile table
    python -m saga_tools.bench.profile_decide --database sqlite \
        --database postgresql+asyncpg://postgres@127.0.0.1:5432/test --instances 1 2 --rounds 3

``--database`` (repeatable) is ``sqlite`` (a file in a temporary directory) or a PostgreSQL URL,
on whose server each run gets a database of its own, dropped afterwards; ``--instances 2`` runs
two orchestrators in the process sharing that database and the broker's queues (PostgreSQL),
the CPU figure being theirs together. The runs alternate (every round runs each database and
instance count once), so a change in the machine's load falls on all of them alike.

Counts, not only time: events, transactions and statements per saga are printed too, so two
runs can be checked to have done the same work. With ``--profile`` the CPU figure includes
cProfile's overhead; take it from a run without.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import os
import pstats
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saga.logs import configure_logging
from saga.loop import run as run_loop
from saga.orchestrator.admission import Admission
from saga.orchestrator.service import OrchestratorService
from saga.settings import Settings, load_settings
from saga.transport.broker import IncomingMessage
from saga.transport.memory import MemoryBroker
from saga_demo.checkout import PARTICIPANTS
from saga_tools.bench.definitions import echo_registry
from saga_tools.bench.driver import Workload, bench_starts
from saga_tools.bench.echo import reply_to
from saga_tools.bench.stack import is_sqlite, temporary_database

__all__ = ["Measured", "measure"]

EVENTS_PER_SAGA = 5  # a checkout on the happy path: the start and four replies


@dataclass(frozen=True)
class Measured:
    database: str
    instances: int
    sagas: int
    events: int
    cpu_s: float  # the process's CPU over the measured part, less the echo's and the client's
    outside_s: float  # what was taken off: the echo participants building their replies
    batches: int
    statements: int
    wall_s: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "database": self.database,
            "instances": self.instances,
            "sagas": self.sagas,
            "events": self.events,
            "cpu_ms_per_event": round(1000 * self.cpu_s / self.events, 4),
            "cpu_ms_per_saga": round(1000 * self.cpu_s / self.sagas, 4),
            "outside_ms_per_saga": round(1000 * self.outside_s / self.sagas, 4),
            "events_per_transaction": round(self.events / max(self.batches, 1), 2),
            "statements_per_saga": round(self.statements / self.sagas, 3),
            "sagas_per_s": round(self.sagas / self.wall_s, 1),
        }


class _Ended:
    """Sagas ended, by every instance: what lets the load send the next."""

    def __init__(self) -> None:
        self.count = 0
        self.changed = asyncio.Event()


class _Counting(Admission):
    """The orchestrator's admission bound, which also tells the load when a saga ended."""

    def __init__(self, limit: int, ended: _Ended) -> None:
        super().__init__(limit)
        self.ended = ended

    def finished(self, saga_id: uuid.UUID) -> None:
        super().finished(saga_id)
        self.ended.count += 1
        self.ended.changed.set()


class _Outside:
    """CPU of the echo participants' own work, taken off the process's."""

    def __init__(self) -> None:
        self.seconds = 0.0

    @contextlib.contextmanager
    def timed(self) -> Iterator[None]:
        began = time.thread_time()
        try:
            yield
        finally:
            self.seconds += time.thread_time() - began


async def measure(
    sagas: int,
    concurrency: int,
    *,
    warmup: int = 100,
    data_dir: Path,
    profile: cProfile.Profile | None = None,
    database_url: str | None = None,
    instances: int = 1,
) -> Measured:
    """Run ``warmup`` and then ``sagas`` checkouts, ``concurrency`` in flight, on a SQLite file
    in ``data_dir`` or on ``database_url``, with ``instances`` orchestrators sharing it."""
    broker = MemoryBroker()
    url = database_url or f"sqlite+aiosqlite:///{data_dir / 'orchestrator.db'}"
    settings = load_settings(
        database_url=url,
        rabbitmq_url="amqp://unused/",
        prefix="profile",
        auto_migrate=True,
        data_dir=str(data_dir),
        max_in_flight=max(concurrency, 1),
    )
    ended = _Ended()
    services = [_instance(settings, broker, ended) for _ in range(instances)]
    topology = services[0].topology
    outside = _Outside()

    async def echo(message: IncomingMessage) -> None:
        with outside.timed():  # no await inside: thread_time would count other tasks
            routing_key, message_id, body = reply_to(message.body)
        await broker.publish_raw(
            exchange="",
            routing_key=routing_key,
            body=body,
            message_id=message_id,
            correlation_id=message.correlation_id,
        )
        await message.ack()

    start_queue = topology.start_queue

    def requests(count: int, tag: str) -> list[tuple[str, bytes]]:
        """The start requests' ids and bodies: a client's work, made before it is measured."""
        return [
            (str(s.message_id), s.model_dump_json().encode())
            for s in bench_starts(count, Workload(count, concurrency), tag)
        ]

    async def load(bodies: list[tuple[str, bytes]]) -> None:
        count = len(bodies)
        base = ended.count
        for sent, (message_id, body) in enumerate(bodies):
            while sent - (ended.count - base) >= concurrency:
                ended.changed.clear()
                await ended.changed.wait()
            await broker.publish_raw(
                exchange="",
                routing_key=start_queue,
                body=body,
                message_id=message_id,
                message_type="saga.start",
            )
        while ended.count - base < count:
            ended.changed.clear()
            await ended.changed.wait()

    started: list[OrchestratorService] = []
    try:
        for each in services:
            await each.start()
            started.append(each)
        for participant in PARTICIPANTS:
            queue = topology.command_queue(participant)
            await broker.consume(queue, echo, prefetch=settings.prefetch)
        if warmup:
            await load(requests(warmup, "warm"))
        measured = requests(sagas, "run")
        await asyncio.sleep(0.6)  # the warm-up's sent rows deleted, the relay idle
        events0, batches0, statements0 = _totals(services)
        outside.seconds = 0.0
        wall, cpu = time.perf_counter(), time.process_time()
        if profile is not None:
            profile.enable()
        await load(measured)
        if profile is not None:
            profile.disable()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        events1, batches1, statements1 = _totals(services)
        return Measured(
            database="sqlite" if is_sqlite(url) else "postgresql",
            instances=instances,
            sagas=sagas,
            events=events1 - events0,
            cpu_s=cpu - outside.seconds,
            outside_s=outside.seconds,
            batches=batches1 - batches0,
            statements=statements1 - statements0,
            wall_s=wall,
        )
    finally:
        for each in reversed(started):
            await each.stop()


def _instance(settings: Settings, broker: MemoryBroker, ended: _Ended) -> OrchestratorService:
    service = OrchestratorService(settings, echo_registry(), broker=broker)
    service.orchestrator.admission = _Counting(settings.max_in_flight, ended)
    return service


def _totals(services: list[OrchestratorService]) -> tuple[int, int, int]:
    """Events decided, transactions and statements, of every instance."""
    return (
        sum(s.orchestrator.events for s in services),
        sum(s.orchestrator.batches for s in services),
        sum(s.store.counts.statements for s in services),
    )


#: a deepest frame's file, by where it lives, for the table of shares
_GROUPS = (
    ("saga/store/", "saga store"),
    ("saga/core/", "saga engine"),
    ("saga/orchestrator/", "saga orchestrator"),
    ("saga/protocol/", "saga protocol"),
    ("saga/messaging/", "saga messaging"),
    ("saga/transport/", "saga transport (memory broker)"),
    ("saga/relay", "saga relay"),
    ("saga/telemetry", "saga telemetry"),
    ("saga/", "saga, other"),
    ("pydantic", "pydantic"),
    ("sqlalchemy", "sqlalchemy"),
    ("structlog", "structlog"),
    ("opentelemetry", "opentelemetry"),
    ("json", "json"),
    ("uuid", "uuid"),
    ("asyncio", "asyncio"),
    ("sqlite3", "sqlite3"),
)


def _group(path: str) -> str:
    where = path.replace(os.sep, "/")
    return next((label for key, label in _GROUPS if key in where), "other")


def _shares(stats: pstats.Stats) -> list[tuple[str, float]]:
    """Own time by module group, as fractions of the total, largest first. A C function's
    time goes to the module of the Python function that called it (as a sampling profiler
    attributes it to the deepest Python frame)."""
    totals: dict[str, float] = {}
    rows = stats.stats  # type: ignore[attr-defined]
    for (path, _line, _name), (_cc, _nc, own, _cum, callers) in rows.items():
        if path != "~":
            totals[_group(path)] = totals.get(_group(path), 0.0) + own
            continue
        for (caller_path, _l, _n), row in callers.items():
            group = _group(caller_path) if caller_path != "~" else "other"
            totals[group] = totals.get(group, 0.0) + row[2]
    whole = sum(totals.values()) or 1.0
    return sorted(((g, t / whole) for g, t in totals.items()), key=lambda x: -x[1])


async def _measure_on(
    database: str,
    sagas: int,
    concurrency: int,
    *,
    warmup: int,
    data_dir: Path,
    profile: cProfile.Profile | None,
    instances: int,
) -> Measured:
    """:func:`measure` on a SQLite file, or in a PostgreSQL database of its own on the server
    of the URL ``database``, dropped afterwards."""
    if database == "sqlite":
        if instances > 1:
            raise ValueError("several instances share a PostgreSQL database, not a SQLite file")
        return await measure(sagas, concurrency, warmup=warmup, data_dir=data_dir, profile=profile)
    name = f"saga_profile_{uuid.uuid4().hex[:12]}"
    async with temporary_database(database, name) as url:
        return await measure(
            sagas,
            concurrency,
            warmup=warmup,
            data_dir=data_dir,
            profile=profile,
            database_url=url,
            instances=instances,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m saga_tools.bench.profile_decide")
    parser.add_argument("--sagas", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=1, help="runs, each on a new database")
    parser.add_argument(
        "--database",
        action="append",
        help="sqlite (the default) or a PostgreSQL URL; repeat to compare, runs alternating",
    )
    parser.add_argument(
        "--instances",
        type=int,
        nargs="+",
        default=[1],
        help="orchestrators sharing the database (several: PostgreSQL only)",
    )
    parser.add_argument("--profile", action="store_true", help="cProfile the measured part")
    parser.add_argument("--top", type=int, default=30, help="rows of the cProfile table")
    parser.add_argument("--dump", type=Path, help="write the cProfile data to this file")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    configure_logging("INFO")
    results: list[dict[str, Any]] = []
    profile = cProfile.Profile() if args.profile else None
    with tempfile.TemporaryDirectory(prefix="saga-profile-") as tmp:
        log = Path(tmp) / "orchestrator.log"
        runs = [
            (database, instances)
            for database in args.database or ["sqlite"]
            for instances in args.instances
            if instances == 1 or database != "sqlite"
        ]
        for n in range(args.rounds):
            for k, (database, instances) in enumerate(runs):
                data = Path(tmp) / f"round-{n}-{k}"
                data.mkdir()
                # the orchestrator's log lines are written as in production, to a file
                with log.open("a") as sink, contextlib.redirect_stderr(sink):
                    measured = run_loop(
                        _measure_on(
                            database,
                            args.sagas,
                            args.concurrency,
                            warmup=args.warmup,
                            data_dir=data,
                            profile=profile,
                            instances=instances,
                        )
                    )
                results.append(measured.as_dict())
    report: dict[str, Any] = {"rounds": results}
    if profile is not None:
        stats = pstats.Stats(profile)
        report["shares"] = {g: round(s, 4) for g, s in _shares(stats)}
        if args.dump is not None:
            stats.dump_stats(args.dump)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for row in results:
            print("  ".join(f"{k}={v}" for k, v in row.items()))
        if profile is not None:
            print("\nown time by module (cProfile, main thread):")
            for group, share in report["shares"].items():
                print(f"  {share:6.1%}  {group}")
            print()
            pstats.Stats(profile, stream=sys.stdout).sort_stats("tottime").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
