"""The real processes of the checkout stack, started from their console scripts.

The orchestrator (``saga run``) and each demo service (``saga-service NAME``) run as processes of
their own, each in a session of its own, so teardown can kill a process together with anything
it started. Every test gets a private ``SAGA_PREFIX`` and data directory; teardown kills every
process group and deletes the prefix's queues and exchanges.

Reused from the crash tests: :class:`Proc` (output tails for failure messages),
:func:`wait_for_output`, :func:`wait_exit`, :func:`base_env` and :func:`publish_starts`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, NoReturn, cast
from uuid import UUID, uuid4

import aio_pika
import aiormq
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from saga.core.ids import saga_id_for_key
from saga.core.state import HistoryEntry, HistoryKind, SagaState, SagaStatus
from saga.participant.ledger import Ledger, outbox
from saga.participant.settings import ParticipantSettings
from saga.protocol.envelope import StartSaga
from saga.store.schema import sagas
from saga.store.sql import SqlStore, sqlite_engine
from saga.transport.topology import Topology
from saga_demo import inventory, order, payment, shipping
from saga_demo.checkout import PARTICIPANTS, checkout_input
from saga_demo.cli import SAMPLE_PRICES
from saga_demo.demo import HOME
from tests.crash.helpers import (
    REPO,
    Proc,
    base_env,
    delete_topology,
    publish_starts,
    wait_exit,
    wait_for_output,
)

__all__ = [
    "BIN",
    "SERVICES",
    "Group",
    "Stack",
    "applied_twice",
    "delete_topology",
    "leftover_queues",
    "queue_depths",
    "saga_id",
    "start_request",
]

BIN = Path(sys.executable).parent
"""Where the project's console scripts (``saga``, ``saga-service``) are installed."""

SERVICES = ("order", "payment", "inventory", "shipping")
BUSINESS = {
    "order": order.metadata,
    "payment": payment.metadata,
    "inventory": inventory.metadata,
    "shipping": shipping.metadata,
}
STARTUP_TIMEOUT = 30.0


# --- processes ---------------------------------------------------------------------------


@dataclass
class Group:
    """Processes started in sessions of their own; none outlives :meth:`stop_all`."""

    directory: Path
    started: list[Proc] = field(default_factory=list)

    def spawn(self, name: str, argv: Sequence[str], env: Mapping[str, str]) -> Proc:
        """Run ``argv`` (a console script of the venv or an absolute program) with ``env``."""
        program = argv[0] if os.path.isabs(argv[0]) else str(BIN / argv[0])
        assert os.access(program, os.X_OK), f"{program} is not an executable"
        index = len(self.started)
        stdout = self.directory / f"{index:02d}-{name}.out"
        stderr = self.directory / f"{index:02d}-{name}.err"
        with stdout.open("wb") as out, stderr.open("wb") as err:
            popen = subprocess.Popen(
                [program, *argv[1:]],
                cwd=REPO,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,  # its own process group: killpg reaches its children
            )
        proc = Proc(name, popen, stdout, stderr)
        self.started.append(proc)
        return proc

    def describe(self) -> str:
        return "\n".join(p.describe() for p in self.started)

    def stop_all(self) -> None:
        """SIGTERM every group, wait up to 5 s, then SIGKILL every group, whatever is left."""
        for proc in self.started:
            if proc.alive():
                _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for proc in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=max(deadline - time.monotonic(), 0.1))
        for proc in self.started:
            _signal_group(proc, signal.SIGKILL)  # children of an exited leader too
            proc.popen.wait(timeout=5)


def _signal_group(proc: Proc, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


# --- broker ------------------------------------------------------------------------------


def _queue_names(prefix: str) -> list[str]:
    return [q.name for q in Topology(prefix=prefix).queues(PARTICIPANTS)]


async def leftover_queues(url: str, prefix: str) -> list[str]:
    """The queues of ``prefix`` that still exist (by passive declare)."""
    left = []
    connection = await aio_pika.connect(url)
    async with connection:
        for name in _queue_names(prefix):
            channel = await connection.channel()
            try:
                await channel.declare_queue(name, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                continue
            left.append(name)
            await channel.close()
    return left


async def queue_depths(url: str, prefix: str) -> dict[str, int]:
    """Messages ready in each queue of ``prefix`` (-1: the queue does not exist)."""
    depths: dict[str, int] = {}
    connection = await aio_pika.connect(url)
    async with connection:
        for name in _queue_names(prefix):
            channel = await connection.channel()
            try:
                queue = await channel.declare_queue(name, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                depths[name] = -1
                continue
            depths[name] = queue.declaration_result.message_count or 0
            await channel.close()
    return depths


#: entries a saga's history holds at most once per (step, direction): a transition applied
#: twice would write its entry twice
ONCE = frozenset(
    {
        HistoryKind.STARTED,
        HistoryKind.STEP_SUCCEEDED,
        HistoryKind.STEP_COMPENSATED,
        HistoryKind.COMPLETED,
        HistoryKind.COMPENSATED,
        HistoryKind.FAILED,
        HistoryKind.COMPENSATION_STARTED,
    }
)


def applied_twice(histories: Mapping[UUID, Sequence[HistoryEntry]]) -> list[str]:
    """One line per saga whose history holds a once-only transition twice."""
    problems = []
    for saga_id, history in histories.items():
        counts = Counter((h.kind, h.step, h.direction) for h in history if h.kind in ONCE)
        twice = [k for k, n in counts.items() if n > 1]
        if twice:
            problems.append(f"{saga_id}: applied twice: {twice}")
    return problems


def start_request(key: str, input: Mapping[str, Any]) -> StartSaga:
    return StartSaga(
        schema_version=1,
        message_id=uuid4(),
        saga_name="checkout",
        key=key,
        input=dict(input),
    )


# --- the stack ---------------------------------------------------------------------------


@dataclass
class Stack:
    """The orchestrator and the four services of one test, on a private prefix."""

    rabbitmq_url: str
    prefix: str
    directory: Path
    processes: Group
    #: a PostgreSQL database for the orchestrator and the services (a schema each); SQLite
    #: files in ``data_dir`` when None
    postgres_url: str | None = None

    @property
    def data_dir(self) -> Path:
        return self.directory / "data"

    @property
    def database_url(self) -> str:
        if self.postgres_url is not None:
            return self.postgres_url
        return f"sqlite+aiosqlite:///{self.data_dir / 'saga.db'}"

    def service_settings(self) -> ParticipantSettings:
        return ParticipantSettings(
            rabbitmq_url=self.rabbitmq_url,
            prefix=self.prefix,
            data_dir=self.data_dir,
            services_database_url=self.postgres_url,
        )

    # --- processes -------------------------------------------------------------------

    def orchestrator_env(self, **extra: str) -> dict[str, str]:
        env = base_env()
        env.update(
            SAGA_DATABASE_URL=self.database_url,
            SAGA_RABBITMQ_URL=self.rabbitmq_url,
            SAGA_DEFINITIONS="saga_demo.checkout:registry",
            SAGA_PREFIX=self.prefix,
            SAGA_TIMER_INTERVAL="0.05",
            SAGA_TIMER_GRACE="0.5",
            SAGA_RELAY_POLL_INTERVAL="0.2",
        )
        env.update(extra)
        return env

    def service_env(self, fault: tuple[str, int] | None = None, **extra: str) -> dict[str, str]:
        env = base_env()
        env.update(
            SAGA_RABBITMQ_URL=self.rabbitmq_url,
            SAGA_PREFIX=self.prefix,
            SAGA_DATA_DIR=str(self.data_dir),
            SAGA_RELAY_POLL_INTERVAL="0.2",
        )
        if self.postgres_url is not None:
            env["SAGA_SERVICES_DATABASE_URL"] = self.postgres_url
        if fault is not None:
            env.update(SAGA_FAULT_POINT=fault[0], SAGA_FAULT_AFTER=str(fault[1]))
        env.update(extra)
        return env

    def spawn_orchestrator(self, name: str = "orchestrator") -> Proc:
        return self.processes.spawn(name, ["saga", "run", "--migrate"], self.orchestrator_env())

    def spawn_service(
        self, service: str, *, fault: tuple[str, int] | None = None, name: str | None = None
    ) -> Proc:
        return self.processes.spawn(
            name or service, ["saga-service", service], self.service_env(fault)
        )

    async def started(self, procs: Iterable[Proc]) -> None:
        """Wait until each process logged that it is up (``saga`` the orchestrator, anything
        else a participant service)."""
        for proc in procs:
            program = Path(cast(list[str], proc.popen.args)[0]).name
            needle = "orchestrator_started" if program == "saga" else "participant_started"
            await wait_for_output(
                proc, needle, within=STARTUP_TIMEOUT, context=self.processes.describe() + "\n"
            )

    async def start(self) -> dict[str, Proc]:
        """The orchestrator and the four services, all at once; returns once each is up."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        procs = {"orchestrator": self.spawn_orchestrator()}
        procs.update({s: self.spawn_service(s) for s in SERVICES})
        await self.started(procs.values())
        return procs

    async def wait_exit(self, proc: Proc, within: float) -> int | None:
        return await wait_exit(proc, within=within)

    def fail(self, message: str) -> NoReturn:
        pytest.fail(f"{message}\n{self.processes.describe()}", pytrace=False)

    # --- sagas -----------------------------------------------------------------------

    async def publish(self, starts: Iterable[StartSaga]) -> None:
        await publish_starts(self.rabbitmq_url, self.prefix, starts)

    async def states(
        self, ids: Sequence[UUID], database_url: str | None = None
    ) -> dict[UUID, SagaState]:
        store = SqlStore(database_url or self.database_url)
        try:
            return await store.load_many(list(ids))
        finally:
            await store.close()

    async def histories(self, ids: Sequence[UUID]) -> dict[UUID, list[HistoryEntry]]:
        store = SqlStore(self.database_url)
        try:
            return {i: await store.history(i) for i in ids}
        finally:
            await store.close()

    async def wait_terminal(
        self,
        ids: Sequence[UUID],
        within: float,
        *,
        database_url: str | None = None,
        watch: Sequence[Proc] = (),
    ) -> dict[UUID, SagaState]:
        """Every saga of ``ids`` terminal, or a failure listing the stuck ones and the logs.

        Polls only the status column, twice a second: the stack under test needs the CPU."""
        deadline = time.monotonic() + within
        url = database_url or self.database_url
        engine = (
            sqlite_engine(url, immediate=False)
            if url.startswith("sqlite")
            else create_async_engine(url, poolclass=NullPool)
        )
        query = sa.select(sagas.c.saga_id, sagas.c.status).where(sagas.c.saga_id.in_(ids))
        try:
            while True:
                async with engine.connect() as conn:
                    status = {r.saga_id: SagaStatus(r.status) for r in await conn.execute(query)}
                if all(i in status and status[i].is_terminal for i in ids):
                    return await self.states(ids, database_url)
                dead = [p.name for p in watch if not p.alive()]
                if dead or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
        finally:
            await engine.dispose()
        states = await self.states(ids, database_url)
        stuck = [
            f"  {i}: "
            + (
                "never started"
                if i not in states
                else f"{states[i].status.value} at step {states[i].current} "
                f"{states[i].direction.value} attempt {states[i].attempt} "
                f"phase {states[i].phase.value}"
            )
            for i in ids
            if i not in states or not states[i].status.is_terminal
        ]
        why = f"{', '.join(dead)} died" if dead else f"timeout after {within:g}s"
        self.fail(
            f"{why}: {len(stuck)} of {len(ids)} sagas not terminal:\n" + "\n".join(stuck[:20])
        )

    async def wait_quiet(self, within: float = 15.0, database_url: str | None = None) -> None:
        """Outboxes empty and no queue holding a message; no dead letters."""
        deadline = time.monotonic() + within
        store = SqlStore(database_url or self.database_url)
        try:
            while True:
                outbox, _ = await store.outbox_stats(datetime.now(UTC))
                depths = await queue_depths(self.rabbitmq_url, self.prefix)
                busy = {q: n for q, n in depths.items() if not q.endswith(".dlq") and n > 0}
                pending = {s: n for s, n in (await self.service_outboxes()).items() if n}
                if outbox == 0 and not busy and not pending:
                    break
                if time.monotonic() > deadline:
                    self.fail(
                        f"not quiet after {within:g}s: orchestrator outbox {outbox}, "
                        f"service outboxes {pending}, queues {busy}"
                    )
                await asyncio.sleep(0.5)
        finally:
            await store.close()
        dead = {q: n for q, n in depths.items() if q.endswith(".dlq") and n != 0}
        if dead:
            self.fail(f"messages were dead-lettered: {dead}")

    # --- the services' databases -----------------------------------------------------

    def ledger(self, service: str) -> Ledger:
        url, schema = self.service_settings().database_url(service)
        return Ledger(url, schema=schema, business=BUSINESS[service])

    async def service_outboxes(self) -> dict[str, int]:
        counts = {}
        for service in SERVICES:
            ledger = self.ledger(service)
            try:
                async with ledger.reader.connect() as conn:
                    counts[service] = (
                        await conn.scalar(sa.select(sa.func.count()).select_from(outbox)) or 0
                    )
            except sa.exc.DBAPIError:  # not created yet
                counts[service] = 0
            finally:
                await ledger.close()
        return counts

    async def processed(self) -> list[dict[str, Any]]:
        """Every service's ledger rows, each with its ``service``, by ``processed_at``."""
        found: list[dict[str, Any]] = []
        for service in SERVICES:
            ledger = self.ledger(service)
            try:
                found += [{**row, "service": service} for row in await ledger.history()]
            finally:
                await ledger.close()
        return sorted(found, key=lambda r: (r["processed_at"], r["service"], r["id"]))

    async def rows(self, service: str, table: sa.Table) -> list[dict[str, Any]]:
        ledger = self.ledger(service)
        try:
            async with ledger.reader.connect() as conn:
                return [dict(r._mapping) for r in await conn.execute(sa.select(table))]
        finally:
            await ledger.close()

    async def snapshot(self) -> dict[str, dict[str, Any]]:
        """Balances by customer name and available units by SKU (the services' own view)."""
        pay, inv = self.ledger("payment"), self.ledger("inventory")
        try:
            return {
                "balances": await payment.snapshot(pay),
                "stock": await inventory.snapshot(inv),
            }
        finally:
            await pay.close()
            await inv.close()

    async def prepare(
        self,
        *,
        balances: Mapping[str, Any] | None = None,
        on_hand: Mapping[str, int] | None = None,
    ) -> None:
        """Create and seed the payment and inventory databases before the services start,
        with some balances and stock changed (a service's seed leaves existing rows alone)."""
        settings = self.service_settings()
        for module, changes in ((payment, balances), (inventory, on_hand)):
            participant = module.build(settings)
            try:
                await participant.setup_database()
                async with participant.ledger.begin() as conn:
                    for name, value in (changes or {}).items():
                        if module is payment:
                            await conn.execute(
                                payment.accounts.update()
                                .where(payment.accounts.c.name == name)
                                .values(balance=value)
                            )
                        else:
                            await conn.execute(
                                inventory.stock.update()
                                .where(inventory.stock.c.sku == name)
                                .values(on_hand=value)
                            )
            finally:
                await participant.ledger.close()


def saga_id(key: str) -> UUID:
    return saga_id_for_key("checkout", key)


# --- checkouts ------------------------------------------------------------------------------

PARIS = {
    "name": "Jean Dupont",
    "street": "12 Rue de Rivoli",
    "city": "Paris",
    "postal_code": "75001",
    "country": "FR",
}
TOKYO = {**PARIS, "city": "Tokyo", "postal_code": "100-0001", "country": "JP"}  # not served
SLOWTOWN = {**PARIS, "city": "Slowtown", "postal_code": "12345", "country": "DE"}  # never answers
RICH = Decimal("100000.00")
PLENTY = 100_000


def checkout(
    customer: str | UUID,
    lines: list[tuple[str, int]],
    address: Mapping[str, str] = HOME,
    currency: str = "EUR",
) -> dict[str, Any]:
    """A checkout's saga input: a demo customer (by name) or any id, (sku, quantity) lines at
    the sample prices."""
    who = payment.CUSTOMERS[customer] if isinstance(customer, str) else customer
    items = [(sku, qty, SAMPLE_PRICES[sku]) for sku, qty in lines]
    return dict(checkout_input(who, items, address, currency))


async def submit(
    stack: Stack, checkouts: list[dict[str, Any]], first: int = 0
) -> dict[UUID, dict[str, Any]]:
    """Publish one StartSaga per checkout (confirmed, persistent); saga id -> input."""
    keyed = {f"{stack.prefix}-{n}": c for n, c in enumerate(checkouts, first)}
    await stack.publish(start_request(key, c) for key, c in keyed.items())
    return {saga_id(key): c for key, c in keyed.items()}
