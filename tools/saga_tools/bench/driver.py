"""The load: publish checkout starts, keep a number in flight, watch them end.

Starts go to the start queue the way any client sends them (persistent, mandatory, confirmed).
Completion is read from the orchestrator's database: a count of terminal sagas, polled, decides
when the next start may go (closed loop), and at the end every saga's terminal time
(``updated_at``) minus the moment its start was published is its latency. Both clocks are this
machine's wall clock; ``updated_at`` is taken when the final event was decided, just before its
commit, so a latency is short of the truth by at most one commit.
"""

from __future__ import annotations

import asyncio
import inspect
import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import aio_pika
import aiormq
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from saga.core.state import SagaStatus
from saga.protocol.envelope import StartSaga
from saga.store.schema import outbox, sagas
from saga.store.sql import sqlite_engine
from saga.transport.topology import Topology
from saga_demo.checkout import CHECKOUT, checkout_input
from saga_demo.inventory import RARE
from saga_tools.bench.stack import BENCH_CUSTOMERS, BENCH_SKU, BROKE_CUSTOMER, is_sqlite

__all__ = ["FAIL_STEPS", "Load", "Observer", "Workload", "bench_starts", "run_load"]

TERMINAL = (SagaStatus.COMPLETED.value, SagaStatus.COMPENSATED.value, SagaStatus.FAILED.value)
_ADDRESS = {
    "name": "Bench Customer",
    "street": "Main St 1",
    "city": "Berlin",
    "postal_code": "10115",
    "country": "DE",
}
#: the step each failure is forced at, and the input the demo rules refuse there
FAIL_STEPS = ("payment", "inventory", "shipping")


@dataclass(frozen=True)
class Workload:
    sagas: int
    concurrency: int
    rate: float | None = None  # starts per second (open loop), capped by concurrency
    fail_rate: float = 0.0
    fail_step: str = "shipping"
    warmup: int = 0
    timeout: float = 600.0
    crash_after: float | None = None  # SIGKILL and restart the orchestrator this far in


def bench_starts(count: int, workload: Workload, tag: str) -> list[StartSaga]:
    """``count`` checkouts; an evenly spread ``fail_rate`` of them are refused at
    ``fail_step`` by the demo rules (no funds, a sold-out SKU, an undeliverable address)."""
    starts = []
    for i in range(count):
        fails = int((i + 1) * workload.fail_rate) > int(i * workload.fail_rate)
        customer = BENCH_CUSTOMERS[i % len(BENCH_CUSTOMERS)]
        sku, address = BENCH_SKU, _ADDRESS
        if fails and workload.fail_step == "payment":
            customer = BROKE_CUSTOMER
        elif fails and workload.fail_step == "inventory":
            sku = RARE
        elif fails and workload.fail_step == "shipping":
            address = {**_ADDRESS, "postal_code": "00000"}
        starts.append(
            StartSaga(
                schema_version=1,
                message_id=uuid.uuid4(),
                saga_name=CHECKOUT.name,
                key=f"bench-{tag}-{i}",
                input=checkout_input(customer, [(sku, 1, Decimal("1.00"))], address),
            )
        )
    return starts


class Observer:
    """Reads the orchestrator's database: how many sagas ended, the outbox, final rows."""

    def __init__(self, database_url: str):
        self.engine: AsyncEngine = (
            sqlite_engine(database_url, immediate=False)
            if is_sqlite(database_url)
            else create_async_engine(database_url, pool_size=2)
        )
        # Polled every few milliseconds: on SQLite a plain read-only connection costs ~50x
        # less CPU than a query through the async engine, CPU the stack under test needs.
        self._count: sqlite3.Connection | None = None
        if is_sqlite(database_url):
            path = make_url(database_url).database
            self._count = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        self._count_sql = str(
            sa.select(sa.func.count())
            .select_from(sagas)
            .where(sagas.c.status.in_(TERMINAL))
            .compile(compile_kwargs={"literal_binds": True})
        )

    async def terminal(self) -> int:
        if self._count is not None:
            return int(self._count.execute(self._count_sql).fetchone()[0])
        query = sa.select(sa.func.count()).select_from(sagas).where(sagas.c.status.in_(TERMINAL))
        async with self.engine.connect() as conn:
            return int(await conn.scalar(query) or 0)

    async def outbox(self) -> tuple[int, float]:
        """(rows waiting, age in seconds of the oldest)."""
        query = sa.select(sa.func.count(), sa.func.min(outbox.c.created_at))
        async with self.engine.connect() as conn:
            count, oldest = (await conn.execute(query)).one()
        if oldest is None:
            return int(count), 0.0
        return int(count), max(time.time() - oldest.timestamp(), 0.0)

    async def finals(self, keys: list[str]) -> dict[str, tuple[str, float]]:
        """key -> (status, wall-clock seconds of the last change) for ``keys``."""
        found: dict[str, tuple[str, float]] = {}
        async with self.engine.connect() as conn:
            for i in range(0, len(keys), 500):
                query = sa.select(sagas.c.key, sagas.c.status, sagas.c.updated_at).where(
                    sagas.c.name == CHECKOUT.name, sagas.c.key.in_(keys[i : i + 500])
                )
                for row in await conn.execute(query):
                    found[row.key] = (row.status, row.updated_at.timestamp())
        return found

    async def commits(self) -> int | None:
        """Transactions committed in the database so far, by every connection (PostgreSQL's
        statistics, flushed by each backend about once a second); None on SQLite."""
        if self._count is not None:
            return None
        query = sa.text(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        )
        async with self.engine.connect() as conn:
            found = await conn.scalar(query)
        return None if found is None else int(found)

    async def close(self) -> None:
        if self._count is not None:
            self._count.close()
        await self.engine.dispose()


@dataclass
class Load:
    """What one run of the load saw."""

    published: dict[str, float] = field(default_factory=dict)  # key -> wall time of publish
    started_at: float = 0.0  # perf_counter at the first measured publish
    seconds: float = 0.0  # first publish to the last saga terminal
    finished: int = 0
    max_outbox_rows: int = 0
    max_outbox_lag_s: float = 0.0
    crashed_at: float | None = None  # perf_counter
    restarted_at: float | None = None
    in_flight_at_crash: int = 0
    finals: dict[str, tuple[str, float]] = field(default_factory=dict)
    timed_out: bool = False


class _Publisher:
    def __init__(self, channel: aio_pika.abc.AbstractChannel, queue: str):
        self.channel = channel
        self.queue = queue

    async def publish(self, start: StartSaga, load: Load) -> None:
        load.published[start.key or ""] = time.time()
        confirm = await self.channel.default_exchange.publish(
            aio_pika.Message(
                start.model_dump_json().encode(),
                message_id=str(start.message_id),
                type="saga.start",
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=self.queue,
            mandatory=True,
        )
        if not isinstance(confirm, aiormq.spec.Basic.Ack):
            raise RuntimeError(f"a start was not confirmed: {confirm!r}")


Progress = Callable[[int, int, int, float], None]  # done, in flight, total, seconds


async def run_load(
    rabbitmq_url: str,
    prefix: str,
    observer: Observer,
    workload: Workload,
    *,
    tag: str,
    progress: Progress | None = None,
    crash: Callable[[], Any] | None = None,
    check: Callable[[], str | None] | None = None,
    begin: Callable[[], Awaitable[None] | None] | None = None,
) -> Load:
    """Warm up, then run ``workload``; returns when every saga ended or the timeout passed.

    ``begin`` is called when the measured part starts (after the warm-up).
    ``crash`` (kill and restart the orchestrator) is awaited ``workload.crash_after`` seconds
    in; ``check`` names a dead process, which ends the run with an error.
    """
    queue = Topology(prefix=prefix).start_queue
    connection = await aio_pika.connect(rabbitmq_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        publisher = _Publisher(channel, queue)
        if workload.warmup:
            warm = Workload(min(workload.warmup, workload.sagas), min(workload.concurrency, 50))
            await _closed_loop(
                publisher,
                observer,
                bench_starts(warm.sagas, warm, tag + "w"),
                warm,
                Load(),
                0,
                check=check,
            )
        base = await observer.terminal()
        if begin is not None:
            started = begin()
            if inspect.isawaitable(started):
                await started
        load = Load()
        starts = bench_starts(workload.sagas, workload, tag)
        await _closed_loop(
            publisher,
            observer,
            starts,
            workload,
            load,
            base,
            progress=progress,
            crash=crash,
            check=check,
        )
        load.finals = await observer.finals([s.key or "" for s in starts])
    return load


async def _closed_loop(
    publisher: _Publisher,
    observer: Observer,
    starts: list[StartSaga],
    workload: Workload,
    load: Load,
    base: int,
    *,
    progress: Progress | None = None,
    crash: Callable[[], Any] | None = None,
    check: Callable[[], str | None] | None = None,
) -> None:
    total = len(starts)
    poll = 0.002 if workload.concurrency <= 2 else 0.02
    sent = 0
    done = 0
    pending: set[asyncio.Task[None]] = set()
    load.started_at = time.perf_counter()
    deadline = load.started_at + workload.timeout
    next_sample = next_progress = 0.0
    while done < total:
        now = time.perf_counter()
        if now > deadline:
            load.timed_out = True
            break
        if check is not None and (dead := check()) is not None:
            raise RuntimeError(dead)
        elapsed = now - load.started_at
        if (
            crash is not None
            and workload.crash_after is not None
            and load.crashed_at is None
            and elapsed >= workload.crash_after
        ):
            load.crashed_at = time.perf_counter()
            load.in_flight_at_crash = sent - done
            await crash()
            load.restarted_at = time.perf_counter()
        allowed = workload.concurrency - (sent - done)
        if workload.rate is not None:
            allowed = min(allowed, int(elapsed * workload.rate) + 1 - sent)
        for _ in range(max(0, min(allowed, total - sent))):
            task = asyncio.create_task(publisher.publish(starts[sent], load))
            pending.add(task)
            task.add_done_callback(pending.discard)
            sent += 1
        await asyncio.sleep(poll)
        for task in [t for t in pending if t.done()]:
            task.result()  # a refused start ends the run loudly
        done = await observer.terminal() - base
        if now >= next_sample:
            rows, lag = await observer.outbox()
            load.max_outbox_rows = max(load.max_outbox_rows, rows)
            load.max_outbox_lag_s = max(load.max_outbox_lag_s, lag)
            next_sample = now + 0.25
        if progress is not None and now >= next_progress:
            progress(done, sent - done, total, elapsed)
            next_progress = now + 0.5
    await asyncio.gather(*pending)
    load.finished = done
    load.seconds = time.perf_counter() - load.started_at
    if progress is not None:
        progress(done, sent - done, total, load.seconds)
