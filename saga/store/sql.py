"""The SQL store: SQLite (embedded default) or PostgreSQL, one code path, SQLAlchemy Core.

One :meth:`SqlStore.commit` call is one transaction holding many events (group commit). Per
event, in order: the inbox insert (a duplicate message id writes nothing more), the saga write
with its version check (a conflict undoes that event's inbox row), then the history and outbox
rows of every event that went through, written with one ``executemany`` each.

SQLite is used the way it needs to be under concurrency:

* WAL, so readers (the relay, the admin API) never block the writer and vice versa;
* ``BEGIN IMMEDIATE`` for every write transaction: a deferred transaction that reads and then
  writes fails at once with SQLITE_BUSY_SNAPSHOT when another writer got in between, and the
  busy timeout cannot help it; taking the write lock up front makes the timeout apply;
* a generous ``busy_timeout``, so a moment of contention waits instead of failing;
* ``foreign_keys=ON`` (off by default in SQLite), so history rows cannot orphan;
* ``synchronous=FULL`` by default: an acknowledged reply must survive a power cut, not only a
  process crash (NORMAL is ~1.2x faster and safe against crashes; a setting chooses).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import asyncpg
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from saga.core.errors import ConfigError
from saga.core.jsontext import dumps
from saga.core.state import (
    Direction,
    HistoryEntry,
    HistoryKind,
    Lane,
    Phase,
    SagaContext,
    SagaState,
    SagaStatus,
    StepState,
    StepStatus,
)
from saga.ports import Change, CommitResult, DueTimer, OutboxMessage, SagaFilter
from saga.store import sqlite_driver
from saga.store.faults import UnusableConnectionError, database_reachable, describe_error
from saga.store.fresh import OutboxCopy
from saga.store.lease import WriterLease, write_connection, write_transaction
from saga.store.pg_batch import (
    count_statements,
    pg_arrays,
    pg_insert_part,
    pg_params,
    pg_table,
    pg_with,
)
from saga.store.presence import Presence, live_instances
from saga.store.schema import (
    HEAD,
    MIGRATIONS,
    UTCDateTime,
    history,
    inbox,
    outbox,
    sagas,
    schema_version,
    spans,
)
from saga.store.sqlite_batch import DirectSelect, PreparedCache, Work, run_transaction
from saga.work import WorkCounts

__all__ = ["SqlStore", "delete_sent", "sqlite_engine"]

#: seconds a read straight on asyncpg may take before its connection is given up (and the
#: read made again on another)
_PG_READ_TIMEOUT = 10.0


def sqlite_engine(
    url: str,
    *,
    immediate: bool,
    synchronous: str = "FULL",
    busy_timeout_ms: int = 10_000,
    counts: WorkCounts | None = None,
    spare: int = 0,
) -> AsyncEngine:
    """An aiosqlite engine set up as the module docstring explains; ``immediate`` makes every
    transaction ``BEGIN IMMEDIATE`` (for writers). ``spare`` writer connections beyond the one
    are for callers outside a :class:`~saga.store.lease.WriterLease` that holds it."""
    # Writers share ONE connection: SQLite runs one write transaction at a time anyway, and
    # queueing for the pool is an asyncio wait, whereas a second writer on its own connection
    # spins in SQLite's busy handler (sleeps of up to 100 ms). Readers get a small pool (WAL).
    pool = {"pool_size": 1, "max_overflow": spare} if immediate else {"pool_size": 4}
    database = make_url(url).database or ""
    # Statements run on the loop's thread, BEGIN and COMMIT in a thread: see sqlite_driver.
    creator = sqlite_driver.connect(database, timeout=busy_timeout_ms / 1000, counts=counts)
    # json_serializer: json.dumps's text without its per-call encoder (saga.core.jsontext)
    engine = create_async_engine(
        url, async_creator=creator, pool_timeout=60, json_serializer=dumps, **pool
    )

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let us issue BEGIN ourselves: pysqlite's implicit BEGIN is always DEFERRED.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in (
            "PRAGMA journal_mode=WAL",
            f"PRAGMA synchronous={synchronous}",
            f"PRAGMA busy_timeout={busy_timeout_ms}",
            "PRAGMA foreign_keys=ON",
        ):
            cursor.execute(pragma)
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        driver = conn.connection.driver_connection
        if isinstance(driver, sqlite_driver.Connection) and (
            driver.joins or driver.begin_now(immediate)
        ):
            return
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


async def drain_span_rows(
    table: sa.Table,
    read: AsyncEngine,
    write: Callable[[], AbstractAsyncContextManager[AsyncConnection]],
    synchronous: str,
    limit: int,
    export: Callable[[list[Mapping[str, Any]]], Awaitable[None]],
) -> int:
    """Read up to ``limit`` rows of span records from ``table`` (``id``, ``records``), export
    them, then delete them as :func:`delete_sent` does, on a connection of ``write()``:
    at-least-once, for a database one process drains (the store on SQLite, a participant's
    ledger)."""
    query = sa.select(table.c.id, table.c.records).order_by(table.c.id).limit(limit)
    async with read.connect() as conn:
        rows = (await conn.execute(query)).all()
    if not rows:
        return 0
    await export([r for row in rows for r in row.records])
    async with write() as conn:
        await delete_sent(
            conn, table.delete().where(table.c.id.in_([r.id for r in rows])), synchronous
        )
    return len(rows)


async def delete_sent(conn: AsyncConnection, delete: Any, synchronous: str) -> None:
    """Run ``delete`` (of outbox rows the broker confirmed) in a transaction of its own.

    On SQLite it commits without waiting for the fsync (``synchronous=NORMAL``, which WAL keeps
    free of corruption): losing the delete in a power cut only re-sends messages, which
    at-least-once delivery allows, and the next durable commit syncs it anyway. That keeps the
    relay's bookkeeping from taking the single writer for a whole fsync after every flush.
    """
    driver = (await conn.get_raw_connection()).driver_connection
    relax = driver if isinstance(driver, sqlite_driver.Connection) else None
    if relax is not None and synchronous in ("FULL", "EXTRA"):
        relax.set_synchronous("NORMAL")
    else:
        relax = None
    try:
        async with conn.begin():
            await conn.execute(delete)
    finally:
        if relax is not None:
            relax.set_synchronous(synchronous)


class SqlStore:
    def __init__(
        self,
        url: str,
        *,
        schema: str | None = None,
        sqlite_synchronous: str = "FULL",
        busy_timeout_ms: int = 10_000,
        pool_size: int = 5,
    ):
        parsed = make_url(url)
        self.url = url
        self.dialect = parsed.get_backend_name()
        if self.dialect not in ("sqlite", "postgresql"):
            raise ConfigError(
                f"unsupported database {self.dialect!r} in SAGA_DATABASE_URL; use "
                "sqlite+aiosqlite:///path/to/saga.db or postgresql+asyncpg://user@host/db"
            )
        self.schema = schema
        #: statements, transactions and thread hand-offs (saga.work)
        self.counts = WorkCounts()
        self._outbox = OutboxCopy(self._delete_sent)  # what the relay has not sent yet
        self._synchronous = sqlite_synchronous.upper()
        self._bulk = self.dialect == "sqlite"  # see _commit_bulk
        self._bulk_pg = self.dialect == "postgresql"  # see _commit_bulk_pg
        #: SQLite: the copy of a saga in flight is the committed row; PostgreSQL: it is checked
        #: against the row's version at each use (see _remember)
        self._trust_states = self.dialect == "sqlite"
        self._states: dict[UUID, SagaState] = {}
        #: SQLite: the one writer connection, held across transactions (saga.store.lease)
        self._lease: WriterLease | None = None
        self._absent: dict[UUID, None] = {}  # looked up and not there (insertion-ordered set)
        self._loading: dict[UUID, list[asyncio.Future[SagaState | None]]] = {}  # see load
        self._load_soon: asyncio.Handle | None = None
        self._load_tasks: set[asyncio.Task[None]] = set()
        #: this instance's presence (PostgreSQL, after join()): claims name it
        self._presence: Presence | None = None
        #: SQLite: the read of sagas by id, straight on sqlite3 (see load_many)
        self._select_sagas: DirectSelect | None = None
        #: how long a due deadline waits for its saga's unsent commands (see due_timers)
        self.unsent_hold = timedelta(seconds=30)
        options: dict[str, Any] = {}
        if schema is not None:
            options["schema_translate_map"] = {None: schema}
        if self.dialect == "sqlite":
            if sqlite_synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
                raise ConfigError("sqlite synchronous must be FULL, NORMAL or EXTRA")
            self._write = sqlite_engine(
                url,
                immediate=True,
                synchronous=sqlite_synchronous,
                busy_timeout_ms=busy_timeout_ms,
                counts=self.counts,
                spare=1,  # for the schema's set-up and tests, outside the lease
            )
            self._lease = WriterLease(self._write)
            self._read = sqlite_engine(
                url,
                immediate=False,
                synchronous=sqlite_synchronous,
                busy_timeout_ms=busy_timeout_ms,
                counts=self.counts,
            )
            path = parsed.database or ""
            if path and path != ":memory:" and not path.startswith("file:"):
                self._select_sagas = DirectSelect(
                    self._read,
                    path,
                    sagas,
                    sagas.c.saga_id,
                    timeout=busy_timeout_ms / 1000,
                    counts=self.counts,
                )
        else:
            # no pool_pre_ping: a round trip on every checkout (a tenth of the orchestrator's
            # CPU); a pooled connection found dead fails its transaction, which the group commit
            # runs again on a fresh one (saga.messaging.group)
            self._write = create_async_engine(url, pool_size=pool_size, execution_options=options)
            self._read = self._write
            count_statements(self._write, self.counts)

    def _begin(self) -> AbstractAsyncContextManager[AsyncConnection]:
        """A write transaction: on SQLite on the writer connection the lease holds, so it is
        not taken from the pool and given back each time; else the engine's."""
        return write_transaction(self._lease, self._write)

    def _writer(self) -> AbstractAsyncContextManager[AsyncConnection]:
        """A writer connection outside a transaction, for a caller that runs its own."""
        return write_connection(self._lease, self._write)

    # --- schema --------------------------------------------------------------------------

    async def migrate(self) -> list[int]:
        """Apply every missing migration; returns the versions applied."""
        await self._reachable()
        applied: list[int] = []
        async with self._write.begin() as conn:
            if self.dialect == "postgresql":
                # Instances started together (`saga run --migrate` on each replica) migrate
                # one after another: the lock is held until this transaction ends, and the
                # next one then finds nothing left to do.
                await conn.execute(
                    sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATE_LOCK}
                )
            if self.schema is not None and self.dialect == "postgresql":
                await conn.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"'))
            await conn.run_sync(lambda c: schema_version.create(c, checkfirst=True))
            current = await self._version(conn)
            for version, _, upgrade in MIGRATIONS:
                if version > current:
                    await conn.run_sync(upgrade)
                    await conn.execute(
                        schema_version.insert().values(version=version, applied_at=_now())
                    )
                    applied.append(version)
        return applied

    async def current_version(self) -> int:
        async with self._read.connect() as conn:
            exists = await conn.run_sync(
                lambda c: sa.inspect(c).has_table(schema_version.name, schema=self.schema)
            )
            return await self._version(conn) if exists else 0

    @staticmethod
    async def _version(conn: AsyncConnection) -> int:
        found = await conn.scalar(sa.select(sa.func.max(schema_version.c.version)))
        return int(found or 0)

    async def _reachable(self) -> None:
        """Open a connection, or fail with one line saying why and what to change: the same
        line whether the caller goes on to migrate or only to check the schema."""
        try:
            async with self._read.connect():
                pass
        except (OSError, sa.exc.DBAPIError) as exc:  # nothing ran yet: the database's fault
            raise unreachable(self.safe_url, exc) from exc

    async def setup(self) -> None:
        """Check the schema is exactly at the version this code needs."""
        await self._reachable()
        try:
            current = await self.current_version()
        except (OSError, sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
            raise unreachable(self.safe_url, exc) from exc
        if current < HEAD:
            raise ConfigError(
                f"the database schema is at version {current}, this saga needs {HEAD}: "
                "run `saga migrate` (or start with SAGA_AUTO_MIGRATE=true)"
            )
        if current > HEAD:
            raise ConfigError(
                f"the database schema is at version {current}, newer than this saga "
                f"understands ({HEAD}): upgrade saga"
            )

    async def join(self) -> None:
        """Take part in claiming outbox rows and timers as an instance among several
        (PostgreSQL): hold the presence lock whose loss frees this instance's claims at once
        (:mod:`saga.store.presence`). Nothing to do on SQLite, where one instance runs."""
        if self.dialect == "postgresql" and self._presence is None:
            presence = Presence(self._write)
            await presence.start()
            self._presence = presence

    @property
    def instance(self) -> int | None:
        """This instance's number in claims, once joined (PostgreSQL)."""
        return self._presence.instance if self._presence is not None else None

    @property
    def safe_url(self) -> str:
        return make_url(self.url).render_as_string(hide_password=True)

    async def ping(self) -> bool:
        """Whether the database answers ``SELECT 1``: tells an outage from a bad message."""
        return await database_reachable(self._read)

    async def close(self) -> None:
        while self._load_soon is not None or self._load_tasks:
            if self._load_soon is not None:  # look-ups not started yet: read them now
                self._load_soon.cancel()
                self._load_together()
            await asyncio.gather(*self._load_tasks, return_exceptions=True)
        await self._outbox.close()
        if self._lease is not None:
            await self._lease.close()
        if self._select_sagas is not None:
            await self._select_sagas.close()
        if self._presence is not None:
            await self._presence.stop()
            self._presence = None
        await self._write.dispose()
        if self._read is not self._write:
            await self._read.dispose()

    async def drop_schema(self) -> None:
        """Remove every table (or the whole PostgreSQL schema); for tests."""
        async with self._write.begin() as conn:
            if self.schema is not None and self.dialect == "postgresql":
                await conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE'))
            else:
                await conn.run_sync(_drop_all)

    # --- sagas ---------------------------------------------------------------------------

    async def load(self, saga_id: UUID) -> SagaState | None:
        """One saga's state. Look-ups made in the same turn of the loop (every start being
        handled checks that its saga is new), or while the previous read of look-ups is under
        way, are read together, with one statement and one connection, instead of one each.

        One such read at a time: the starts of a batch's finished sagas arrive over several
        turns, and a read per turn held several pooled connections at once, past the pool's
        size, so PostgreSQL connections were opened and closed again (asyncpg's connect, TLS
        attempt included: 4 % of the orchestrator's CPU)."""
        if self._trust_states and saga_id in self._states:
            return self._states[saga_id]
        future: asyncio.Future[SagaState | None] = asyncio.get_running_loop().create_future()
        self._loading.setdefault(saga_id, []).append(future)
        if self._load_soon is None and not self._load_tasks:
            self._load_soon = asyncio.get_running_loop().call_soon(self._load_together)
        return await future

    def _load_together(self) -> None:
        self._load_soon = None
        waiting, self._loading = self._loading, {}
        task = asyncio.ensure_future(self._load_waiting(waiting))
        self._load_tasks.add(task)
        task.add_done_callback(self._load_done)

    def _load_done(self, task: asyncio.Task[None]) -> None:
        """The read of look-ups ended: those that came meanwhile are read next, together."""
        self._load_tasks.discard(task)
        if self._loading and self._load_soon is None and not self._load_tasks:
            self._load_soon = task.get_loop().call_soon(self._load_together)

    async def _load_waiting(
        self, waiting: dict[UUID, list[asyncio.Future[SagaState | None]]]
    ) -> None:
        try:
            found = await self.load_many(list(waiting))
        except BaseException as exc:
            for futures in waiting.values():
                for future in futures:
                    if future.done():
                        continue
                    if isinstance(exc, asyncio.CancelledError):
                        future.cancel()
                    else:
                        future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for saga_id, futures in waiting.items():
            for future in futures:
                if not future.done():
                    future.set_result(found.get(saga_id))

    async def load_many(self, saga_ids: Sequence[UUID]) -> dict[UUID, SagaState]:
        if not self._trust_states:
            loaded = await self._load_pg(list(saga_ids))
            # what was read is the row: it replaces a copy even of a higher version (which the
            # database no longer has, after a fail-over or a restore; a read that raced this
            # instance's own commit only costs the next read a decode)
            self._remember(loaded.values(), read=True)
            return loaded
        found = {i: self._states[i] for i in saga_ids if i in self._states}
        missing = [i for i in saga_ids if i not in found and i not in self._absent]
        if missing and self._select_sagas is not None:
            direct = await self._select_sagas.rows(missing)
            loaded = {row["saga_id"]: _state_from_row(row) for row in direct}
        elif missing:
            async with self._read.connect() as conn:
                rows = await conn.execute(_SELECT_SAGAS, {"ids": missing})
                loaded = {row.saga_id: _state_from_row(row._mapping) for row in rows}
        if missing:
            self._remember(loaded.values())
            # a start looks its saga up twice: once is enough (SQLite, where nobody else
            # could have made it since)
            self._absent.update((i, None) for i in missing if i not in loaded)
            while len(self._absent) > _MAX_CACHED_STATES:
                del self._absent[next(iter(self._absent))]
            found.update(loaded)
        return found

    async def _load_pg(self, ids: list[UUID]) -> dict[UUID, SagaState]:
        """The sagas ``ids`` on PostgreSQL, one array parameter, as the driver reads them.

        A saga this instance holds a copy of is sent with the copy's version, and its row comes
        back with only its id and version when they match (every other column NULL): the copy
        is then exactly the row (a saga's version rises with every write and its row is never
        deleted), so nothing is decoded. A row whose version moved (another instance, or the
        admin API of another process, wrote it) comes back whole and is decoded. The copies
        are taken before the read: one replaced meanwhile cannot pair with an older row.

        Through the compiled statement, the expanding ``IN`` is rendered again for every
        number of ids and each row's columns go through SQLAlchemy's result processors: a
        tenth of the orchestrator's CPU on PostgreSQL. The driver's values are what those
        processors would give: aware UTC datetimes, UUIDs, and JSON decoded by the codec
        SQLAlchemy's dialect sets on each connection (:meth:`_read_pg`)."""
        states = self._states
        copies = {i: states[i] for i in ids if i in states}
        known = [None if (c := copies.get(i)) is None else c.version for i in ids]
        found: dict[UUID, SagaState] = {}
        for row in await self._read_pg(self._pg_select_sql, ids, known):
            saga_id = row["saga_id"]
            copy = copies.get(saga_id)
            if copy is not None and copy.version == row["version"]:
                found[saga_id] = copy
            else:
                found[saga_id] = _state_from_row(row)
        return found

    async def _read_pg(self, sql: str, *args: Any) -> Sequence[Any]:
        """The rows of one read on PostgreSQL, on a pooled connection's driver, outside a
        transaction (asyncpg's autocommit: one round trip, no ``BEGIN`` and ``ROLLBACK``).

        Through an ``AsyncConnection`` each read cost 370 us of CPU (its check-out, greenlet
        hand-offs, an execution context and result metadata built for driver SQL); straight
        on the pool's connection, 130 us: every start's look-up is one. A failed read gives
        up its connection (it may be dead, or cut off mid-statement) and is made again
        through SQLAlchemy, which raises its own wrapped error (and invalidates a dead
        connection) as it always did, or answers from a sound connection."""
        raw = await self._read.raw_connection()
        driver: Any = raw.driver_connection
        self.counts.statements += 1
        try:
            # bounded: look-ups are read one at a time, so a connection left half-open by the
            # network must not hold every start and every admin read behind it
            rows: Sequence[Any] = await driver.fetch(sql, *args, timeout=_PG_READ_TIMEOUT)
        except Exception:
            raw.invalidate()
        except BaseException:
            raw.invalidate()
            raise
        else:
            raw.close()
            return rows
        async with self._read.connect() as opened:
            conn = await opened.execution_options(isolation_level="AUTOCOMMIT")
            return list((await conn.exec_driver_sql(sql, tuple(args))).mappings())

    @functools.cached_property
    def _pg_select_sql(self) -> str:
        table = pg_table("saga_instances", self.schema)
        moved = "s.version IS DISTINCT FROM v.known"
        columns = ", ".join(
            f"s.{c.name}"
            if c.name in ("saga_id", "version")
            else f"CASE WHEN {moved} THEN s.{c.name} END AS {c.name}"
            for c in sagas.columns
        )
        return (
            f"SELECT {columns} FROM unnest($1::uuid[], $2::integer[]) AS v(saga_id, known) "
            f"JOIN {table} AS s ON s.saga_id = v.saga_id"
        )

    def _remember(self, states: Iterable[SagaState], *, read: bool = False) -> None:
        """Keep the committed state of sagas in flight, so the next event of one needs no read
        (SQLite; and which ids were not there, so a start's second look-up needs none either)
        or no decoding (PostgreSQL).

        On SQLite one orchestrator owns the file (see ``saga run``'s lock), so nothing else
        changes a saga and the copy is exact. With PostgreSQL several instances share the
        sagas, so a copy is only used when the row still has its version (:meth:`_load_pg`).
        Either way every write still checks the version, and a conflict drops the copy; a
        committed state older than the copy does not replace it, a ``read`` one does.
        """
        for state in states:
            current = self._states.get(state.saga_id)
            if not read and current is not None and current.version > state.version:
                continue
            self._states.pop(state.saga_id, None)
            self._absent.pop(state.saga_id, None)
            if state.status not in _TERMINAL:
                self._states[state.saga_id] = state
        while len(self._states) > _MAX_CACHED_STATES:
            del self._states[next(iter(self._states))]

    def _forget(self, saga_ids: Iterable[UUID]) -> None:
        for saga_id in saga_ids:
            self._states.pop(saga_id, None)
            self._absent.pop(saga_id, None)

    def _insert_ignore(self, table: sa.Table) -> Any:
        dialect = postgresql if self.dialect == "postgresql" else sqlite
        return dialect.insert(table).on_conflict_do_nothing()

    @functools.cached_property
    def _inbox_insert(self) -> Any:
        return self._insert_ignore(inbox)

    @functools.cached_property
    def _saga_insert(self) -> Any:
        return self._insert_ignore(sagas)

    @functools.cached_property
    def _prepared(self) -> PreparedCache:
        return PreparedCache(self._write)

    def _work(self, statement: Any, rows: list[dict[str, Any]], *, exact: bool = False) -> Work:
        """``rows`` for ``statement`` compiled once (per set of keys) for :func:`_commit_bulk`."""
        if not rows:
            return Work("", [])
        keys = tuple(rows[0])
        columns = [k for k in keys if not k.startswith("w_")]  # not the WHERE's binds
        prepared = self._prepared.get(id(statement), keys, lambda: statement, columns)
        return Work(prepared.sql, prepared.rows(rows), exact)

    async def commit(self, changes: Sequence[Change]) -> list[CommitResult]:
        results: list[CommitResult] = []
        history_rows: list[dict[str, Any]] = []
        outbox_rows: list[dict[str, Any]] = []
        now = _now()
        broken: set[UUID] = set()  # sagas whose earlier change in this batch did not land
        doomed = self._outbox.take_deletes()  # sent rows, deleted by this transaction
        try:
            if self._bulk:
                bulk = await self._commit_bulk(changes, doomed, now)
            elif self._bulk_pg:
                bulk = await self._commit_bulk_pg(changes, doomed, now)
            else:
                bulk = None
            if bulk is None:
                await self._commit(changes, doomed, now, results, history_rows, outbox_rows, broken)
            else:
                results = bulk
        except BaseException:
            self._outbox.deletes_done(doomed, committed=False)
            raise
        self._outbox.deletes_done(doomed, committed=True)
        self._remember(
            c.transition.state
            for c, r in zip(changes, results, strict=True)
            if r is CommitResult.APPLIED
        )
        self._forget(
            c.transition.state.saga_id
            for c, r in zip(changes, results, strict=True)
            if r is CommitResult.CONFLICT
        )
        self._outbox.add(
            m
            for change, result in zip(changes, results, strict=True)
            if result is CommitResult.APPLIED
            for m in change.outbox
        )
        return results

    async def _commit_bulk(
        self, changes: Sequence[Change], doomed: list[UUID], now: datetime
    ) -> list[CommitResult] | None:
        """The batch with one statement per kind of row, when every change goes through;
        None (nothing written) when any is a duplicate or a version conflict, which the
        row-by-row path then sorts out.

        SQLite only, where the row count of an ``executemany`` is exact; the whole transaction
        is one call to a worker thread with statements compiled once (:mod:`.sqlite_batch`):
        through SQLAlchemy, per statement, the async driver cost far more than SQLite's work.
        """
        inbox_rows, inserts, updates, history_rows, outbox_rows, span_rows = _bulk_rows(
            changes, now, None
        )
        for row in updates:
            row["w_saga_id"] = row.pop("saga_id")
        work = [
            self._work(_OUTBOX_DELETE, [{"message_id": i} for i in doomed]),
            self._work(self._inbox_insert, inbox_rows, exact=True),
            self._work(self._saga_insert, inserts, exact=True),
            self._work(_SAGA_UPDATE, updates, exact=True),
            self._work(_HISTORY_INSERT, history_rows),
            self._work(_OUTBOX_INSERT, outbox_rows),
            self._work(_SPANS_INSERT, span_rows),
        ]
        assert self._lease is not None  # SQLite
        if not await run_transaction(self._lease, work):
            return None
        return [
            CommitResult.APPLIED if c.transition.applied else CommitResult.RECORDED for c in changes
        ]

    async def _commit_bulk_pg(
        self, changes: Sequence[Change], doomed: list[UUID], now: datetime
    ) -> list[CommitResult] | None:
        """PostgreSQL's batch in two statements: the saga rows locked in id order, then every
        write in one (:func:`_pg_write`: the inbox and new sagas inserted with ``RETURNING``,
        so a duplicate shows, the updates in one ``UPDATE ... FROM unnest(...)`` that returns
        the rows whose version matched, and the history, outbox and span rows); None (rolled
        back, nothing written) when any row did not go through: the row-by-row path then
        decides each.

        A saga with several changes in the batch (the replies of a parallel group's members
        arrive together) is one saga row: its last state, checked against the version its
        first change expected (one statement cannot update a row twice); its inbox ids,
        history and outbox rows are every change's.

        A saga whose row, once locked, no longer has the version its changes expect (another
        instance moved it: the members of a parallel group replied to both) stays out of the
        batch, as row by row leaves it: its changes from the first one that applied on are
        CONFLICT (decided again on fresh state), those before it go through. The rest of the
        batch stays in bulk: two instances see such a conflict in most batches.

        Row by row, each event cost two round trips and their SQLAlchemy and asyncpg overhead:
        most of the orchestrator's extra CPU on PostgreSQL.
        """
        ordered = sorted(changes, key=lambda c: c.transition.state.saga_id)
        rows = _saga_rows(ordered)
        if rows is None:
            return None
        expected = {
            r.transition.state.saga_id: r.expected_version
            for r in rows
            if r.expected_version is not None
        }
        # Straight on the pooled connection's driver, in asyncpg's own transaction: through
        # an AsyncConnection (its check-out, BEGIN and COMMIT with greenlet hand-offs and an
        # execution context each) a commit of one change cost 1.2 ms of CPU, on the driver
        # 0.85 ms (of five changes: 1.5 -> 1.05 ms).
        # The errors are asyncpg's own (saga.store.faults classifies them as SQLAlchemy's).
        raw = await self._write.raw_connection()
        driver: Any = raw.driver_connection
        counts = self.counts
        counts.statements += 2  # BEGIN, and COMMIT or ROLLBACK
        sound = False  # the connection is idle outside a transaction: back to the pool
        try:
            transaction = driver.transaction()
            try:
                await transaction.start()
            except Exception as exc:  # nothing sent yet: the pooled connection was unusable
                raise UnusableConnectionError(describe_error(exc)) from exc
            try:
                answers = await self._bulk_pg_statements(
                    driver, ordered, rows, expected, doomed, now
                )
            except (_RowByRowError, asyncpg.PostgresError):
                # the server answered: only the transaction is to undo (a connection it closed
                # fails the rollback, and is given up)
                await transaction.rollback()
                sound = True
                raise
            await transaction.commit()
            counts.transactions += 1
            sound = True
        except _RowByRowError:
            return None
        finally:
            # anything else (cancelled mid-statement, a dead connection, a failed rollback or
            # commit) may have left it mid-transaction or broken: closed, and the server rolls
            # back whatever was open
            if sound and not driver.is_closed():
                raw.close()
            else:
                raw.invalidate()
        return [
            answers.get(
                id(c), CommitResult.APPLIED if c.transition.applied else CommitResult.RECORDED
            )
            for c in changes
        ]

    async def _bulk_pg_statements(
        self,
        driver: Any,
        ordered: Sequence[Change],
        rows: list[Change],
        expected: dict[UUID, int],
        doomed: list[UUID],
        now: datetime,
    ) -> dict[int, CommitResult]:
        """The statements of :meth:`_commit_bulk_pg` on asyncpg's connection ``driver`` in a
        transaction; the stale sagas' answers by ``id()``. Raises :class:`_RowByRowError` when
        a row did not go through."""
        sql = self._pg_sql
        answers: dict[int, CommitResult] = {}
        if expected:  # lock in id order first: two instances queue, never deadlock
            self.counts.statements += 1
            locked = await driver.fetch(sql.lock, list(expected))
            found = {r[0]: r[1] for r in locked}
            stale = {i for i, v in expected.items() if found.get(i) != v}
            if stale:
                ordered, answers = await self._without_stale(driver, ordered, stale)
                rows = [r for r in rows if r.transition.state.saga_id not in stale]
        inbox_rows, inserts, updates, history_rows, outbox_rows, span_rows = _bulk_rows(
            ordered, now, self.instance, rows
        )
        # one round trip for every write (each one was a round trip of its own: most of a
        # small batch's cost, on both sides)
        self.counts.statements += 1
        try:
            went_in = await driver.fetchrow(
                sql.write,
                doomed,
                *pg_arrays(_PG_INBOX, inbox_rows),
                *pg_arrays(_PG_INSERT, inserts),
                *pg_arrays(_PG_UPDATE_COLUMNS, updates),
                *pg_arrays(_PG_HISTORY, history_rows),
                *pg_arrays(_PG_OUTBOX, outbox_rows),
                *pg_arrays(_PG_SPANS, span_rows),
            )
        except asyncpg.IntegrityConstraintViolationError as exc:
            # the statement's parts run together, so a row that did not go in shows here
            # before the counts can: a duplicate start's outbox rows (unique), the history
            # of a new saga whose key was taken (foreign key). Row by row sorts each out, and
            # raises what was not such a case.
            raise _RowByRowError from exc
        if tuple(went_in) != (len(inbox_rows), len(inserts), len(updates)):
            raise _RowByRowError
        return answers

    async def _without_stale(
        self, driver: Any, ordered: Sequence[Change], stale: Collection[UUID]
    ) -> tuple[list[Change], dict[int, CommitResult]]:
        """``ordered`` without the changes of the ``stale`` sagas that row by row would not
        write, and their answers by ``id()``, as row by row gives them: a change whose message
        was already received is DUPLICATE, a stale saga's first applied change and every later
        one CONFLICT (each was decided on top of it); its ignored changes before that go
        through (RECORDED)."""
        received = [
            c.inbox_id
            for c in ordered
            if c.inbox_id is not None and c.transition.state.saga_id in stale
        ]
        seen: set[UUID] = set()
        if received:
            self.counts.statements += 1
            seen = {r[0] for r in await driver.fetch(self._pg_sql.received, received)}
        kept: list[Change] = []
        answers: dict[int, CommitResult] = {}
        broken: set[UUID] = set()
        for change in ordered:
            saga_id = change.transition.state.saga_id
            applied = change.transition.applied
            if saga_id not in stale:
                kept.append(change)
            elif saga_id in broken:
                answers[id(change)] = CommitResult.CONFLICT
            elif change.inbox_id in seen:
                answers[id(change)] = CommitResult.DUPLICATE
                if applied:
                    broken.add(saga_id)
            elif applied:
                answers[id(change)] = CommitResult.CONFLICT
                broken.add(saga_id)
            else:
                kept.append(change)
        return kept, answers

    @functools.cached_property
    def _pg_sql(self) -> _PgStatements:
        return _PgStatements.for_schema(self.schema)

    async def _commit(
        self,
        changes: Sequence[Change],
        doomed: list[UUID],
        now: datetime,
        results: list[CommitResult],
        history_rows: list[dict[str, Any]],
        outbox_rows: list[dict[str, Any]],
        broken: set[UUID],
    ) -> None:
        # Rows are locked in the order of their sagas' ids (a saga's own changes keep their
        # order): two instances whose batches touch the same sagas then wait for each other
        # instead of deadlocking, whatever order the messages came in.
        order = sorted(range(len(changes)), key=lambda i: changes[i].transition.state.saga_id)
        answers: list[CommitResult | None] = [None] * len(changes)
        span_rows: list[dict[str, Any]] = []
        async with self._begin() as conn:
            if doomed:
                await conn.execute(outbox.delete().where(outbox.c.message_id.in_(sorted(doomed))))
            for index in order:
                change = changes[index]
                saga_id = change.transition.state.saga_id
                if saga_id in broken:
                    # decided on top of a state that was not written: never let it land, even
                    # if another instance moved the saga to the version it expects
                    answers[index] = CommitResult.CONFLICT
                    continue
                result = await self._apply(conn, change, now, history_rows, outbox_rows)
                if result in (CommitResult.APPLIED, CommitResult.RECORDED) and change.spans:
                    span_rows.append({"records": list(change.spans)})
                if change.transition.applied and result in (
                    CommitResult.CONFLICT,
                    CommitResult.DUPLICATE,
                ):
                    broken.add(saga_id)
                answers[index] = result
            results.extend(a for a in answers if a is not None)
            if history_rows:
                await conn.execute(history.insert(), history_rows)
            if outbox_rows:
                await conn.execute(outbox.insert(), outbox_rows)
            if span_rows:
                await conn.execute(_SPANS_INSERT, span_rows)

    async def _apply(
        self,
        conn: AsyncConnection,
        change: Change,
        now: datetime,
        history_rows: list[dict[str, Any]],
        outbox_rows: list[dict[str, Any]],
    ) -> CommitResult:
        state = change.transition.state
        if change.inbox_id is not None:
            inserted = await conn.execute(
                self._inbox_insert,
                {"message_id": change.inbox_id, "saga_id": state.saga_id, "received_at": now},
            )
            if inserted.rowcount == 0:
                return CommitResult.DUPLICATE
        if change.transition.applied:
            row = _row_from_state(state)
            if change.expected_version is None:
                written = await conn.execute(self._saga_insert, row)
            else:
                row["w_saga_id"] = row.pop("saga_id")
                row["w_version"] = change.expected_version
                written = await conn.execute(_SAGA_UPDATE, row)
            if written.rowcount != 1:
                if change.inbox_id is not None:
                    await conn.execute(inbox.delete().where(inbox.c.message_id == change.inbox_id))
                return CommitResult.CONFLICT
            outbox_rows.extend(_outbox_row(m, now, self.instance) for m in change.outbox)
        history_rows.extend(_history_row(state.saga_id, h) for h in change.transition.history)
        return CommitResult.APPLIED if change.transition.applied else CommitResult.RECORDED

    async def _claim_outbox(self, limit: int) -> list[OutboxMessage]:
        """Rows no instance is publishing (their claim ran out: the writer died or is cut off
        from the broker), now claimed by this one. ``SKIP LOCKED``: instances polling at once
        share the rows instead of queueing on them."""
        now = _now()
        claim = _claim(
            outbox, outbox.c.message_id, outbox.c.claimed_until, outbox.c.claimed_by,
            outbox.c.created_at, (), now, limit, outbox.c, self.instance,
        )  # fmt: skip
        async with self._write.begin() as conn:
            rows = (await conn.execute(claim)).all()
        return sorted((_outbox_message(r) for r in rows), key=lambda m: m.created_at)

    async def due_timers(self, now: datetime, limit: int) -> list[DueTimer]:
        if self.dialect == "postgresql":
            return await self._claim_timers(now, limit)
        query = (
            sa.select(sagas.c.saga_id, sagas.c.awaiting, sagas.c.deadline)
            .where(sagas.c.deadline.is_not(None))
            .where(sagas.c.deadline <= now)
            .where(self._sent(now))
            .order_by(sagas.c.deadline)
            .limit(limit)
        )
        async with self._read.connect() as conn:
            rows = await conn.execute(query)
            return [DueTimer(r.saga_id, r.awaiting, r.deadline) for r in rows if r.awaiting]

    def _sent(self, now: datetime) -> sa.ColumnElement[bool]:
        """The saga has no command waiting in the outbox (younger than ``unsent_hold``): a
        step's deadline never fires while its command has not left, for instance while a
        killed instance's claim on it is being taken over."""
        waiting = (
            sa.select(outbox.c.message_id)
            .where(outbox.c.saga_id == sagas.c.saga_id)
            .where(outbox.c.created_at > now - self.unsent_hold)
            .exists()
        )
        return ~waiting

    async def _claim_timers(self, now: datetime, limit: int) -> list[DueTimer]:
        """Due timers no other instance is firing, claimed by this one until it commits the
        event (every write of a saga clears the claim) or for CLAIM at most."""
        probe = (
            sa.select(sagas.c.saga_id)
            .where(sagas.c.deadline.is_not(None))
            .where(sagas.c.deadline <= now)
            .limit(1)
        )
        async with self._read.connect() as conn:  # most polls find nothing: no write then
            if (await conn.execute(probe)).first() is None:
                return []
        claim = _claim(
            sagas, sagas.c.saga_id, sagas.c.timer_claimed_until, sagas.c.timer_claimed_by,
            sagas.c.deadline,
            (sagas.c.deadline.is_not(None), sagas.c.deadline <= now, self._sent(now)), now,
            limit, (sagas.c.saga_id, sagas.c.awaiting, sagas.c.deadline), self.instance,
        )  # fmt: skip
        async with self._write.begin() as conn:
            rows = (await conn.execute(claim)).all()
        return sorted(
            (DueTimer(r.saga_id, r.awaiting, _as_utc(r.deadline)) for r in rows if r.awaiting),
            key=lambda t: t.deadline,
        )

    async def next_deadline(self) -> datetime | None:
        """The earliest deadline of any saga (this instance's or not): what the timer loop
        asks ten times a second, so on SQLite one index probe on the loop's thread, on
        PostgreSQL one statement on the driver."""
        if self._select_sagas is not None:
            found = await self._select_sagas.minimum(sagas.c.deadline)
        elif self.dialect == "postgresql":  # one round trip, no BEGIN and ROLLBACK around it
            rows = await self._read_pg(self._pg_next_deadline_sql)
            found = rows[0]["deadline"]
        else:
            async with self._read.connect() as conn:
                found = await conn.scalar(_NEXT_DEADLINE)
        return None if found is None else _as_utc(found)

    @functools.cached_property
    def _pg_next_deadline_sql(self) -> str:
        return f"SELECT min(deadline) AS deadline FROM {pg_table('saga_instances', self.schema)}"

    async def history(self, saga_id: UUID) -> list[HistoryEntry]:
        query = sa.select(history).where(history.c.saga_id == saga_id).order_by(history.c.id)
        async with self._read.connect() as conn:
            return [_history_from_row(r._mapping) for r in await conn.execute(query)]

    async def histories(
        self, saga_ids: Sequence[UUID], kinds: Collection[HistoryKind]
    ) -> dict[UUID, list[HistoryEntry]]:
        found: dict[UUID, list[HistoryEntry]] = {i: [] for i in saga_ids}
        if not found or not kinds:
            return found
        query = (
            sa.select(history)
            .where(history.c.saga_id.in_(list(found)))
            .where(history.c.kind.in_(sorted(k.value for k in kinds)))
            .order_by(history.c.id)
        )
        async with self._read.connect() as conn:
            for r in await conn.execute(query):
                found[r.saga_id].append(_history_from_row(r._mapping))
        return found

    async def list_sagas(self, query: SagaFilter) -> list[SagaState]:
        # One order both ways, (created_at, saga_id), served by ix_saga_instances_created
        # (scanned backwards for newest first); the keyset condition is a row comparison
        # on the same columns, so every page is an index range, however deep.
        order = (sagas.c.created_at, sagas.c.saga_id)
        q = sa.select(sagas).limit(query.limit)
        q = q.order_by(*(c.desc() for c in order) if query.newest_first else order)
        wanted = query.wanted_statuses()
        if wanted is not None:
            q = q.where(sagas.c.status.in_(sorted(s.value for s in wanted)))
        if query.name is not None:
            q = q.where(sagas.c.name == query.name)
        if query.key is not None:
            q = q.where(sagas.c.key == query.key)
        if query.since is not None:
            q = q.where(sagas.c.created_at >= query.since)
        if query.until is not None:
            q = q.where(sagas.c.created_at < query.until)
        bounds = query.id_bounds()
        if bounds is not None:
            q = q.where(sagas.c.saga_id.between(*bounds))
        async with self._read.connect() as conn:
            position = query.start_after
            if position is None and query.after is not None:
                anchor = (
                    await conn.execute(
                        sa.select(sagas.c.created_at).where(sagas.c.saga_id == query.after)
                    )
                ).first()
                if anchor is not None:
                    position = (_as_utc(anchor.created_at), query.after)
            if position is not None:
                here = sa.tuple_(*order)
                there = sa.tuple_(
                    sa.literal(position[0], UTCDateTime()), sa.literal(position[1], sa.Uuid())
                )
                q = q.where(here < there if query.newest_first else here > there)
            return [_state_from_row(r._mapping) for r in await conn.execute(q)]

    async def prune_inbox(self, before: datetime) -> int:
        async with self._begin() as conn:
            result = await conn.execute(inbox.delete().where(inbox.c.received_at < before))
            return int(result.rowcount or 0)

    # --- outbox --------------------------------------------------------------------------

    async def pending_outbox(self, limit: int) -> list[OutboxMessage]:
        known = self._outbox.pending(limit)
        if known is not None:
            return known
        if self.dialect == "postgresql":
            return self._outbox.claimed(await self._claim_outbox(limit), limit)
        query = sa.select(outbox).order_by(outbox.c.created_at).limit(limit)
        async with self._read.connect() as conn:
            rows = [_outbox_message(r) for r in await conn.execute(query)]
        return self._outbox.read(rows, limit)

    async def mark_sent(self, message_ids: Sequence[UUID]) -> None:
        """Sent rows are deleted (the broker holds them now, and the table stays small) by the
        next commit, or soon by a transaction of their own (:mod:`saga.store.fresh`)."""
        if message_ids:
            self._outbox.sent(message_ids)

    async def _delete_sent(self, message_ids: list[UUID]) -> None:
        delete = outbox.delete().where(outbox.c.message_id.in_(message_ids))
        async with self._writer() as conn:
            await delete_sent(conn, delete, self._synchronous)

    # --- spans ---------------------------------------------------------------------------

    async def drain_spans(
        self, limit: int, export: Callable[[list[Mapping[str, Any]]], Awaitable[None]]
    ) -> int:
        """Export committed span records, then delete them (at-least-once).

        PostgreSQL: the rows are locked (``SKIP LOCKED``) in a transaction held across the
        export, so instances sharing the database export different rows, and a crash rolls
        the delete back. SQLite (one instance): read, export, then delete in a transaction
        of its own that does not wait for an fsync (a delete lost in a power cut exports a
        duplicate, nothing more)."""
        query = _SPANS_PENDING.limit(limit)
        if self.dialect == "postgresql":
            async with self._write.begin() as conn:
                rows = (await conn.execute(query.with_for_update(skip_locked=True))).all()
                if rows:
                    await export([r for row in rows for r in row.records])
                    await conn.execute(spans.delete().where(spans.c.id.in_([r.id for r in rows])))
            return len(rows)
        return await drain_span_rows(
            spans, self._read, self._writer, self._synchronous, limit, export
        )

    async def outbox_stats(self, now: datetime) -> tuple[int, float]:
        """(rows waiting, age in seconds of the oldest) for metrics and the benchmark."""
        async with self._read.connect() as conn:
            row = (
                await conn.execute(sa.select(sa.func.count(), sa.func.min(outbox.c.created_at)))
            ).one()
        count, oldest = int(row[0]), row[1]
        age = 0.0 if oldest is None else (now - _as_utc(oldest)).total_seconds()
        return count, max(age, 0.0)

    async def live_counts(
        self, statuses: Iterable[SagaStatus], now: datetime
    ) -> list[tuple[str, SagaStatus, int, float]]:
        """(name, status, how many, age in seconds of the oldest) of the sagas in ``statuses``:
        one GROUP BY over the (status, created_at) index, which reads only those sagas (in
        flight, bounded by admission, or FAILED), never the finished ones."""
        query = (
            sa.select(
                sagas.c.name, sagas.c.status, sa.func.count(), sa.func.min(sagas.c.created_at)
            )
            .where(sagas.c.status.in_([s.value for s in statuses]))
            .group_by(sagas.c.status, sagas.c.name)
        )
        async with self._read.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [
            (name, SagaStatus(status), int(n), max((now - _as_utc(oldest)).total_seconds(), 0.0))
            for name, status, n, oldest in rows
        ]

    async def status_counts(self) -> dict[SagaStatus, int]:
        """How many sagas are in each status (the admin overview)."""
        query = sa.select(sagas.c.status, sa.func.count()).group_by(sagas.c.status)
        async with self._read.connect() as conn:
            return {SagaStatus(status): int(n) for status, n in await conn.execute(query)}

    async def recent_finished(
        self, started_since: datetime, limit: int = 20_000
    ) -> list[tuple[str, SagaStatus, datetime, datetime]]:
        """(name, status, created_at, updated_at) of the sagas started since ``started_since``
        that have ended: by start time, so the (status, created_at) index serves it."""
        query = (
            sa.select(sagas.c.name, sagas.c.status, sagas.c.created_at, sagas.c.updated_at)
            .where(sagas.c.status.in_([s.value for s in _TERMINAL]))
            .where(sagas.c.created_at >= started_since)
            .limit(limit)
        )
        async with self._read.connect() as conn:
            return [
                (r.name, SagaStatus(r.status), _as_utc(r.created_at), _as_utc(r.updated_at))
                for r in await conn.execute(query)
            ]

    async def oldest_running(self) -> tuple[UUID, str, datetime] | None:
        """The running or compensating saga that started first: what waits longest."""
        query = (
            sa.select(sagas.c.saga_id, sagas.c.name, sagas.c.created_at)
            .where(sagas.c.status.in_([SagaStatus.RUNNING.value, SagaStatus.COMPENSATING.value]))
            .order_by(sagas.c.created_at)
            .limit(1)
        )
        async with self._read.connect() as conn:
            row = (await conn.execute(query)).first()
        return None if row is None else (row.saga_id, row.name, _as_utc(row.created_at))


_TERMINAL = frozenset({SagaStatus.COMPLETED, SagaStatus.COMPENSATED, SagaStatus.FAILED})
#: the advisory lock that serialises migrations of one PostgreSQL database ("saga" in ASCII)
_MIGRATE_LOCK = 0x73616761
#: how long a claim on an outbox row or a due timer holds off other instances (PostgreSQL): long
#: enough to publish or to decide and commit, short enough that a dead instance's rows and
#: timers are taken over within seconds
CLAIM = timedelta(seconds=5)
_MAX_CACHED_STATES = 10_000


class _NotAllRowsError(Exception):
    """A bulk statement touched fewer rows than it had: roll back, go row by row."""


# Built once: a statement made per call costs more CPU than SQLite's work on the row.
# Executed with the row as parameters; the WHERE binds are prefixed so they differ from columns.
_SAGA_UPDATE = (
    sagas.update()
    .where(sagas.c.saga_id == sa.bindparam("w_saga_id"))
    .where(sagas.c.version == sa.bindparam("w_version"))
)


#: (column, PostgreSQL type) of the version-checked update, in the order of its arrays
_PG_UPDATE_COLUMNS = (
    ("saga_id", "uuid"),
    ("w_version", "integer"),
    ("name", "varchar"),
    ("definition_version", "integer"),
    ("status", "varchar"),
    ("key", "varchar"),
    ("current_step", "integer"),
    ("direction", "varchar"),
    ("attempt", "integer"),
    ("tries", "integer"),
    ("phase", "varchar"),
    ("awaiting", "uuid"),
    ("deadline", "timestamptz"),
    ("version", "integer"),
    ("created_at", "timestamptz"),
    ("updated_at", "timestamptz"),
    ("failure", "text"),
    ("stuck_step", "varchar"),
    ("steps", "json"),
    ("context", "json"),
    ("trace_context", "json"),
    ("sent_at", "timestamptz"),
    ("lanes", "json"),
    ("expires_at", "timestamptz"),
)
_PG_JSON = frozenset({"steps", "context", "trace_context", "lanes"})
#: the new sagas' columns (the update's, without the version check, and no timer claim)
_PG_INSERT = (
    *(c for c in _PG_UPDATE_COLUMNS if c[0] != "w_version"),
    ("timer_claimed_until", "timestamptz"),
    ("timer_claimed_by", "integer"),
)
_PG_INBOX = (("message_id", "uuid"), ("saga_id", "uuid"), ("received_at", "timestamptz"))
_PG_HISTORY = (
    ("saga_id", "uuid"),
    ("at", "timestamptz"),
    ("kind", "text"),
    ("step", "text"),
    ("direction", "text"),
    ("attempt", "integer"),
    ("message_id", "uuid"),
    ("actor", "text"),
    ("detail", "text"),
)
_PG_OUTBOX = (
    ("message_id", "uuid"),
    ("saga_id", "uuid"),
    ("exchange", "text"),
    ("routing_key", "text"),
    ("message_type", "text"),
    ("headers", "json"),
    ("body", "bytea"),
    ("created_at", "timestamptz"),
    ("claimed_until", "timestamptz"),
    ("claimed_by", "integer"),
)
_PG_SPANS = (("records", "json"),)


def _pg_update(table: str, first: int) -> str:
    """The version-checked update of the saga rows in one array per column (parameters from
    ``$first`` on), returning the rows whose version matched."""
    return (
        f"UPDATE {table} AS s SET "
        + ", ".join(
            f"{c} = v.{c}::json" if c in _PG_JSON else f"{c} = v.{c}"
            for c, _ in _PG_UPDATE_COLUMNS
            if c not in ("saga_id", "w_version")
        )
        + ", timer_claimed_until = NULL, timer_claimed_by = NULL FROM unnest("
        + pg_params(_PG_UPDATE_COLUMNS, first)
        + ") AS v("
        + ", ".join(c for c, _ in _PG_UPDATE_COLUMNS)
        + ") WHERE s.saga_id = v.saga_id AND s.version = v.w_version RETURNING s.saga_id"
    )


def _pg_write(t: Callable[[str], str]) -> str:
    """Every write of a bulk batch in one statement (:func:`pg_with`): the sent outbox rows'
    delete, then the inbox ids, new sagas, updates, history, outbox and span rows, returning
    how many inbox ids, new sagas and updates went in."""
    returning = " ON CONFLICT DO NOTHING RETURNING 1"
    return pg_with(
        [
            (
                "gone",
                1,
                lambda n: f"DELETE FROM {t('saga_outbox')} WHERE message_id = ANY(${n}::uuid[])",
            ),
            pg_insert_part("inbox", t("saga_inbox"), _PG_INBOX, returning),
            pg_insert_part("born", t("saga_instances"), _PG_INSERT, returning),
            ("moved", len(_PG_UPDATE_COLUMNS), lambda n: _pg_update(t("saga_instances"), n)),
            pg_insert_part("history", t("saga_history"), _PG_HISTORY),
            pg_insert_part("outbox", t("saga_outbox"), _PG_OUTBOX),
            pg_insert_part("spans", t("saga_spans"), _PG_SPANS),
        ],
        "SELECT (SELECT count(*) FROM inbox), (SELECT count(*) FROM born), "
        "(SELECT count(*) FROM moved)",
    )


@dataclass(frozen=True, slots=True)
class _PgStatements:
    """The bulk batch's statements on PostgreSQL, each one fixed text whatever the batch's size:
    asyncpg prepares each once per connection (SQLAlchemy's expanding ``IN`` and multi-row
    ``VALUES`` made a new text, so a new prepare, for every number of rows)."""

    lock: str
    received: str
    write: str

    @classmethod
    def for_schema(cls, schema: str | None) -> _PgStatements:
        def t(name: str) -> str:
            return pg_table(name, schema)

        return cls(
            lock=f"SELECT saga_id, version FROM {t('saga_instances')} "
            "WHERE saga_id = ANY($1::uuid[]) "
            "ORDER BY saga_id FOR UPDATE",
            received=f"SELECT message_id FROM {t('saga_inbox')} WHERE message_id = ANY($1::uuid[])",
            write=_pg_write(t),
        )


def _bulk_rows(
    changes: Sequence[Change],
    now: datetime,
    instance: int | None,
    saga_rows: Sequence[Change] | None = None,
) -> tuple[list[dict[str, Any]], ...]:
    """A batch's rows by kind, in the changes' order, for the bulk paths: inbox ids, new
    sagas, version-checked updates (with ``w_version``), history and outbox rows; the new
    sagas and the updates from ``saga_rows`` instead when given (:func:`_saga_rows`)."""
    inbox_rows: list[dict[str, Any]] = []
    inserts: list[dict[str, Any]] = []
    updates: list[dict[str, Any]] = []
    history_rows: list[dict[str, Any]] = []
    outbox_rows: list[dict[str, Any]] = []
    span_rows: list[dict[str, Any]] = []
    for change in changes:
        state = change.transition.state
        if change.inbox_id is not None:
            inbox_rows.append(
                {"message_id": change.inbox_id, "saga_id": state.saga_id, "received_at": now}
            )
        if change.transition.applied:
            outbox_rows.extend(_outbox_row(m, now, instance) for m in change.outbox)
        history_rows.extend(_history_row(state.saga_id, h) for h in change.transition.history)
        if change.spans:
            span_rows.append({"records": list(change.spans)})
    for change in changes if saga_rows is None else saga_rows:
        if change.transition.applied:
            row = _row_from_state(change.transition.state)
            if change.expected_version is None:
                inserts.append(row)
            else:
                row["w_version"] = change.expected_version
                updates.append(row)
    return inbox_rows, inserts, updates, history_rows, outbox_rows, span_rows


def _saga_rows(ordered: Sequence[Change]) -> list[Change] | None:
    """``ordered`` (by saga id, each saga's changes in their order) with each saga's applied
    changes as one: its last state, expecting the version its first change expected; None
    when a saga's changes do not follow one another (each decided on the one before)."""
    rows: list[Change] = []
    last: Change | None = None
    for change in ordered:
        if not change.transition.applied:
            continue
        state = change.transition.state
        if last is not None and last.transition.state.saga_id == state.saga_id:
            if change.expected_version != last.transition.state.version:
                return None
            rows[-1] = dataclasses.replace(change, expected_version=rows[-1].expected_version)
        else:
            rows.append(change)
        last = change
    return rows


class _RowByRowError(Exception):
    """A row of a bulk batch did not go through: roll it back, decide each change alone."""


_SELECT_SAGAS = sa.select(sagas).where(sagas.c.saga_id.in_(sa.bindparam("ids", expanding=True)))
_OUTBOX_DELETE = outbox.delete().where(outbox.c.message_id == sa.bindparam("message_id"))
_NEXT_DEADLINE = sa.select(sa.func.min(sagas.c.deadline))
_HISTORY_INSERT = history.insert()
_OUTBOX_INSERT = outbox.insert()
_SPANS_INSERT = spans.insert()
_SPANS_PENDING = sa.select(spans.c.id, spans.c.records).order_by(spans.c.id)


def _drop_all(conn: sa.Connection) -> None:
    for table in (spans, history, outbox, inbox, sagas, schema_version):
        table.drop(conn, checkfirst=True)


# --- rows <-> values (pure) ------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC)


def _as_utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _row_from_state(s: SagaState) -> dict[str, Any]:
    # ``_value_`` rather than ``.value``: the same string, read as a plain attribute instead of
    # through the enum's descriptor (a row per event, a step status per step)
    return {
        "saga_id": s.saga_id,
        "name": s.name,
        "definition_version": s.definition_version,
        "status": s.status._value_,
        "key": s.key,
        "current_step": s.current,
        "direction": s.direction._value_,
        "attempt": s.attempt,
        "tries": s.tries,
        "phase": s.phase._value_,
        "awaiting": s.awaiting,
        "deadline": s.deadline,
        "version": s.version,
        "created_at": s.created_at,
        "updated_at": s.updated_at,
        "failure": s.failure,
        "stuck_step": s.stuck_step,
        "sent_at": s.sent_at,
        "timer_claimed_until": None,  # a claim is for the deadline this write replaces
        "timer_claimed_by": None,
        "trace_context": None if s.trace is None else dict(s.trace),
        "steps": [
            {
                "name": st.name,
                "status": st.status._value_,
                "attempts": st.attempts,
                "compensation_attempts": st.compensation_attempts,
                "error": st.error,
            }
            for st in s.steps
        ],
        "context": {"input": dict(s.context.input), "outputs": dict(s.context.outputs)},
        "lanes": [_lane_json(lane) for lane in s.lanes] if s.lanes else None,
        "expires_at": s.expires_at,
    }


def _lane_json(lane: Lane) -> dict[str, Any]:
    return {
        "index": lane.index,
        "tries": lane.tries,
        "phase": lane.phase.value,
        "awaiting": str(lane.awaiting),
        "deadline": lane.deadline.isoformat(),
        "sent_at": None if lane.sent_at is None else lane.sent_at.isoformat(),
    }


def _lane_from_json(j: dict[str, Any]) -> Lane:
    sent_at = j["sent_at"]
    return Lane(
        index=j["index"],
        tries=j["tries"],
        phase=Phase(j["phase"]),
        awaiting=UUID(j["awaiting"]),
        deadline=datetime.fromisoformat(j["deadline"]),
        sent_at=None if sent_at is None else datetime.fromisoformat(sent_at),
    )


def _state_from_row(r: Any) -> SagaState:
    return SagaState(
        saga_id=r["saga_id"],
        name=r["name"],
        definition_version=r["definition_version"],
        status=SagaStatus(r["status"]),
        steps=tuple(
            StepState(
                name=st["name"],
                status=StepStatus(st["status"]),
                attempts=st["attempts"],
                compensation_attempts=st["compensation_attempts"],
                error=st["error"],
            )
            for st in r["steps"]
        ),
        context=SagaContext(r["context"]["input"], r["context"]["outputs"], r["saga_id"]),
        current=r["current_step"],
        direction=Direction(r["direction"]),
        attempt=r["attempt"],
        tries=r["tries"],
        phase=Phase(r["phase"]),
        awaiting=r["awaiting"],
        deadline=r["deadline"],
        version=r["version"],
        created_at=r["created_at"],
        updated_at=r["updated_at"],
        key=r["key"],
        failure=r["failure"],
        stuck_step=r["stuck_step"],
        sent_at=r["sent_at"],
        trace=r["trace_context"],
        # sagas stored before parallel groups and deadlines have neither (NULL)
        lanes=tuple(_lane_from_json(j) for j in r["lanes"]) if r["lanes"] else (),
        expires_at=r["expires_at"],
    )


def _claim(
    table: sa.Table,
    key: sa.Column[Any],
    claimed_until: sa.Column[Any],
    claimed_by: sa.Column[Any],
    order: sa.Column[Any],
    due: Sequence[sa.ColumnElement[bool]],
    now: datetime,
    limit: int,
    returning: Iterable[sa.ColumnElement[Any]],
    instance: int | None,
) -> sa.UpdateBase:
    """Claim up to ``limit`` rows that match ``due`` and no live claim, for CLAIM: one
    statement, ``FOR UPDATE SKIP LOCKED`` so instances claiming at once take different rows.
    A claim is live while its time lasts and its instance is alive (saga.store.presence)."""
    free = (
        sa.select(key)
        .where(*due)
        .where(
            sa.or_(
                claimed_until.is_(None),
                claimed_until < now,
                sa.and_(claimed_by.is_not(None), claimed_by.not_in(live_instances())),
            )
        )
        .order_by(order)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return (
        table.update()
        .where(key.in_(free.scalar_subquery()))
        .values({claimed_until.name: now + CLAIM, claimed_by.name: instance})
        .returning(*returning)
    )


def _outbox_message(r: Any) -> OutboxMessage:
    return OutboxMessage(
        message_id=r.message_id,
        saga_id=r.saga_id,
        exchange=r.exchange,
        routing_key=r.routing_key,
        message_type=r.message_type,
        body=bytes(r.body),
        headers=dict(r.headers),
        created_at=_as_utc(r.created_at),
    )


def _outbox_row(m: OutboxMessage, now: datetime, instance: int | None) -> dict[str, Any]:
    return {
        "message_id": m.message_id,
        "saga_id": m.saga_id,
        "exchange": m.exchange,
        "routing_key": m.routing_key,
        "message_type": m.message_type,
        "headers": dict(m.headers),
        "body": m.body,
        "created_at": m.created_at,
        # the writer publishes it; other instances leave it alone for a while (see CLAIM)
        "claimed_until": now + CLAIM,
        "claimed_by": instance,
    }


def _history_row(saga_id: UUID, h: HistoryEntry) -> dict[str, Any]:
    return {
        "saga_id": saga_id,
        "at": h.at,
        "kind": h.kind._value_,
        "step": h.step,
        "direction": None if h.direction is None else h.direction._value_,
        "attempt": h.attempt,
        "message_id": h.message_id,
        "actor": h.actor,
        "detail": h.detail,
    }


#: what to change when the database refuses a connection, by the server's SQLSTATE
_CONNECT_HINTS = {
    "3D000": "create that database, or point SAGA_DATABASE_URL at one that exists",
    "28P01": "check the user and password in SAGA_DATABASE_URL",
    "28000": "check the user and password in SAGA_DATABASE_URL",
}


def unreachable(url: str, exc: BaseException) -> ConfigError:
    """The database could not be opened, on one line: the driver's own reason (not
    SQLAlchemy's wrapper with its links) and what to change."""
    cause: BaseException = exc
    if isinstance(exc, sa.exc.DBAPIError) and exc.orig is not None:
        cause = exc.orig.__cause__ or exc.orig  # the async driver's error, under the adapter
    if isinstance(cause, OSError) and cause.errno:  # worded the same on every event loop
        reason = f"[Errno {cause.errno}] {os.strerror(cause.errno)}"
    else:
        reason = " ".join(str(cause).split()) or type(cause).__name__
    hint = _CONNECT_HINTS.get(str(getattr(cause, "sqlstate", "")))
    if hint is None:
        hint = "is it running? Check the host, port and path in SAGA_DATABASE_URL"
    return ConfigError(f"cannot reach the database at {url}: {reason}; {hint}")


def _history_from_row(r: Any) -> HistoryEntry:
    return HistoryEntry(
        at=r["at"],
        kind=HistoryKind(r["kind"]),
        detail=r["detail"],
        step=r["step"],
        direction=None if r["direction"] is None else Direction(r["direction"]),
        attempt=r["attempt"],
        message_id=r["message_id"],
        actor=r["actor"],
    )
