"""The ledger's own statements in a participant's transaction, two ways.

Around each command the runtime reads the replies and final answers already given, opens a
savepoint for the handler, and writes the ledger rows and the reply. Through SQLAlchemy each
of those statements costs about a tenth of a millisecond of Python on the event loop, several
times SQLite's own work on a local file, and the ledger's statements are most of a
participant's statements. So:

* :class:`CoreStatements` runs them through SQLAlchemy Core: PostgreSQL, or any engine;
* :class:`SqliteStatements` runs the same SQL directly on the sqlite3 connection under the
  transaction (the one the handler's SQLAlchemy connection uses, so they share it), with the
  inserts compiled once by SQLAlchemy and values converted by the same bind processors, so the
  rows are byte for byte what SQLAlchemy writes and reads back.

Both take part in the one transaction the runtime opened; neither commits.
"""

from __future__ import annotations

import functools
import itertools
import sqlite3
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple, Protocol
from uuid import UUID

import sqlalchemy as sa
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from saga.participant.ledger import Ledger, outbox, processed, replies, spans, tombstones
from saga.store import sqlite_driver
from saga.store.pg_batch import PgRun, pg_arrays, pg_insert_part, pg_table, pg_with
from saga.store.sqlite_batch import Prepared, PreparedCache
from saga.work import WorkCounts

__all__ = [
    "CoreStatements",
    "PostgresStatements",
    "Recorded",
    "Savepoint",
    "SqliteStatements",
    "statements",
]


class Recorded(NamedTuple):
    """A row of the ledger for one key: a final answer, or a tombstone."""

    key: UUID
    outcome: str | None
    reason: str | None
    detail: str | None
    data: dict[str, Any] | None
    tombstone: bool


class Savepoint(Protocol):
    async def commit(self) -> None: ...

    async def rollback(self) -> None: ...


class Rows(Protocol):
    """The rows one transaction writes (the runtime's ``_Rows``)."""

    processed_rows: list[dict[str, Any]]
    tombstone_rows: list[dict[str, Any]]
    reply_rows: list[dict[str, Any]]
    outbox_rows: list[dict[str, Any]]
    span_rows: list[dict[str, Any]]


class Statements(Protocol):
    async def delete_sent(self, message_ids: Sequence[UUID]) -> None: ...

    async def given(self, reply_ids: Sequence[UUID]) -> dict[UUID, bytes]: ...

    async def recorded(self, keys: Sequence[UUID]) -> list[Recorded]: ...

    async def savepoint(self) -> Savepoint: ...

    async def write(self, rows: Rows) -> None: ...


async def statements(conn: AsyncConnection, ledger: Ledger) -> Statements:
    """The statements for ``conn``, a connection of ``ledger``'s writer engine in a
    transaction."""
    if ledger.is_sqlite:
        lease = ledger.lease
        if lease is not None and lease.holds(conn) and lease.driver is not None:
            return SqliteStatements(lease.driver.raw, _compiled(ledger), lease.driver.counts)
        driver = (await conn.get_raw_connection()).driver_connection
        if isinstance(driver, sqlite_driver.Connection):
            return SqliteStatements(driver.raw, _compiled(ledger), driver.counts)
    if conn.dialect.driver == "asyncpg":
        return await PostgresStatements.on(conn, ledger)
    return CoreStatements(conn, ledger)


class CoreStatements:
    """Through SQLAlchemy Core, on any database."""

    def __init__(self, conn: AsyncConnection, ledger: Ledger):
        self._conn = conn
        self._ledger = ledger

    async def delete_sent(self, message_ids: Sequence[UUID]) -> None:
        await self._conn.execute(outbox.delete().where(outbox.c.message_id.in_(message_ids)))

    async def given(self, reply_ids: Sequence[UUID]) -> dict[UUID, bytes]:
        query = sa.select(replies.c.message_id, replies.c.body).where(
            replies.c.message_id.in_(reply_ids)
        )
        return {row.message_id: bytes(row.body) for row in await self._conn.execute(query)}

    async def recorded(self, keys: Sequence[UUID]) -> list[Recorded]:
        answered = sa.select(
            processed.c.idempotency_key,
            processed.c.outcome,
            processed.c.reason,
            processed.c.detail,
            processed.c.data,
            sa.literal(False).label("tombstone"),
        ).where(processed.c.idempotency_key.in_(keys))
        buried = sa.select(
            tombstones.c.idempotency_key,
            sa.null(),
            sa.null(),
            sa.null(),
            sa.null(),
            sa.literal(True),
        ).where(tombstones.c.idempotency_key.in_(keys))
        found = []
        for row in await self._conn.execute(sa.union_all(answered, buried)):
            key = row[0] if isinstance(row[0], UUID) else UUID(row[0])  # a UNION may lose it
            data = None if row.data is None else dict(row.data)
            found.append(
                Recorded(key, row.outcome, row.reason, row.detail, data, bool(row.tombstone))
            )
        return found

    async def savepoint(self) -> Savepoint:
        return await self._conn.begin_nested()

    async def write(self, rows: Rows) -> None:
        if rows.processed_rows:
            await self._conn.execute(processed.insert(), rows.processed_rows)
        if rows.tombstone_rows:
            await self._conn.execute(tombstones.insert(), rows.tombstone_rows)
        if rows.reply_rows:
            await self._conn.execute(replies.insert(), rows.reply_rows)
        if rows.outbox_rows:
            await self._conn.execute(self._ledger.insert_ignore(outbox), rows.outbox_rows)
        if rows.span_rows:
            await self._conn.execute(spans.insert(), rows.span_rows)


class PostgresStatements:
    """The ledger's statements on asyncpg's connection, each one fixed text whatever the
    batch's size (:mod:`saga.store.pg_batch`), under the transaction the runtime began.

    Through SQLAlchemy the reads' ``IN (...)``, the inserts' multi-row ``VALUES`` and every
    ``SAVEPOINT`` (named anew each time) were a new text, so asyncpg prepared them again and
    again: two round trips per statement and most of a participant's CPU on PostgreSQL. The
    savepoint runs on the very connection the handler's statements use, as on SQLite."""

    def __init__(self, conn: AsyncConnection, ledger: Ledger, run: PgRun):
        self._run = run
        self._sql = _pg_statements(ledger.schema)
        #: the savepoint of a handler that went through, released with the next one's
        #: ``SAVEPOINT`` in one round trip, or by ``COMMIT`` (see :class:`_PgSavepoint`)
        self.release: str | None = None

    @classmethod
    async def on(cls, conn: AsyncConnection, ledger: Ledger) -> PostgresStatements:
        return cls(conn, ledger, await PgRun.on(conn))

    async def delete_sent(self, message_ids: Sequence[UUID]) -> None:
        await self._run.execute(self._sql.delete_sent, [list(message_ids)])

    async def given(self, reply_ids: Sequence[UUID]) -> dict[UUID, bytes]:
        rows = await self._run.fetch(self._sql.given, [list(reply_ids)])
        return {row[0]: bytes(row[1]) for row in rows}

    async def recorded(self, keys: Sequence[UUID]) -> list[Recorded]:
        rows = await self._run.fetch(self._sql.recorded, [list(keys)])
        return [
            Recorded(
                row[0], row[1], row[2], row[3], None if row[4] is None else dict(row[4]), row[5]
            )
            for row in rows
        ]

    async def savepoint(self) -> Savepoint:
        name = f"ledger_{next(_SAVEPOINTS)}"
        done, self.release = self.release, None
        # one simple query, several statements: asyncpg sends text without arguments so
        sql = f"SAVEPOINT {name}" if done is None else f"RELEASE SAVEPOINT {done}; SAVEPOINT {name}"
        await self._run.execute(sql, [])
        return _PgSavepoint(self._run, self, name)

    async def write(self, rows: Rows) -> None:
        """Every row of the batch in one statement (a round trip per kind of row was most of a
        small batch's cost): data-modifying ``WITH`` queries, each run to completion, its
        arrays empty when it has no rows."""
        args: list[Any] = []
        for columns, values in (
            (_PG_PROCESSED, rows.processed_rows),
            (_PG_TOMBSTONES, rows.tombstone_rows),
            (_PG_REPLIES, rows.reply_rows),
            (_PG_OUTBOX, rows.outbox_rows),
            (_PG_SPANS, rows.span_rows),
        ):
            args += pg_arrays(columns, values)
        await self._run.execute(self._sql.write, args)


class _PgSavepoint:
    """A handler's savepoint. Kept, it is released later and for free: with the next
    handler's ``SAVEPOINT`` (so savepoints never nest deeper than one) or by the transaction's
    ``COMMIT``; a round trip of its own for each ``RELEASE`` was an eighth of a command's."""

    def __init__(self, run: PgRun, statements: PostgresStatements, name: str):
        self._run = run
        self._statements = statements
        self._name = name

    async def commit(self) -> None:
        self._statements.release = self._name

    async def rollback(self) -> None:
        await self._run.execute(
            f"ROLLBACK TO SAVEPOINT {self._name}; RELEASE SAVEPOINT {self._name}", []
        )


_PG_PROCESSED = (
    ("idempotency_key", "uuid"),
    ("message_id", "uuid"),
    ("saga_id", "uuid"),
    ("command_type", "text"),
    ("direction", "text"),
    ("outcome", "text"),
    ("reason", "text"),
    ("detail", "text"),
    ("data", "json"),
    ("processed_at", "timestamptz"),
)
_PG_TOMBSTONES = (
    ("idempotency_key", "uuid"),
    ("saga_id", "uuid"),
    ("step", "text"),
    ("compensation_message_id", "uuid"),
    ("created_at", "timestamptz"),
)
_PG_REPLIES = (
    ("message_id", "uuid"),
    ("command_message_id", "uuid"),
    ("body", "bytea"),
    ("created_at", "timestamptz"),
)
_PG_OUTBOX = (
    ("message_id", "uuid"),
    ("saga_id", "uuid"),
    ("routing_key", "text"),
    ("message_type", "text"),
    ("body", "bytea"),
    ("created_at", "timestamptz"),
    ("headers", "json"),
)
_PG_SPANS = (("records", "json"),)


class _PgLedgerSql(NamedTuple):
    delete_sent: str
    given: str
    recorded: str
    write: str


@functools.lru_cache(maxsize=64)
def _pg_statements(schema: str | None) -> _PgLedgerSql:
    def t(table: sa.Table) -> str:
        return pg_table(table.name, schema)

    return _PgLedgerSql(
        delete_sent=f"DELETE FROM {t(outbox)} WHERE message_id = ANY($1::uuid[])",
        given=f"SELECT message_id, body FROM {t(replies)} WHERE message_id = ANY($1::uuid[])",
        recorded=(
            "SELECT idempotency_key, outcome, reason, detail, data, false "
            f"FROM {t(processed)} WHERE idempotency_key = ANY($1::uuid[]) "
            "UNION ALL SELECT idempotency_key, NULL, NULL, NULL, NULL::json, true "
            f"FROM {t(tombstones)} WHERE idempotency_key = ANY($1::uuid[])"
        ),
        write=_pg_write(t),
    )


def _pg_write(t: Callable[[sa.Table], str]) -> str:
    """The inserts of :meth:`PostgresStatements.write` as one statement (:func:`pg_with`)."""
    kinds: tuple[tuple[sa.Table, tuple[tuple[str, str], ...], str], ...] = (
        (processed, _PG_PROCESSED, ""),
        (tombstones, _PG_TOMBSTONES, ""),
        (replies, _PG_REPLIES, ""),
        (outbox, _PG_OUTBOX, " ON CONFLICT DO NOTHING"),
        (spans, _PG_SPANS, ""),
    )
    return pg_with(
        [
            pg_insert_part(f"w{n}", t(table), columns, tail)
            for n, (table, columns, tail) in enumerate(kinds)
        ],
        "SELECT 1",
    )


class _Compiled:
    """What :class:`SqliteStatements` needs of an engine, made once per engine."""

    def __init__(self, engine: AsyncEngine):
        self.engine = engine
        dialect = engine.dialect
        # the dialect's own types, whose processors SQLAlchemy itself uses
        uuid_type = processed.c.idempotency_key.type.dialect_impl(dialect)
        json_type = processed.c.data.type.dialect_impl(dialect)
        self.uuid_in: Callable[[Any], Any] = uuid_type.bind_processor(dialect) or _same
        self.uuid_out: Callable[[Any], Any] = uuid_type.result_processor(dialect, None) or _same
        self.json_out: Callable[[Any], Any] = json_type.result_processor(dialect, None) or _same
        self._inserts = PreparedCache(engine)

    def insert(self, table: sa.Table, keys: tuple[str, ...], ignore: bool = False) -> Prepared:
        def build() -> sa.ClauseElement:
            if ignore:
                return sqlite_dialect.insert(table).on_conflict_do_nothing()
            return table.insert()

        return self._inserts.get((table.name, ignore), keys, build)


_COMPILED: weakref.WeakKeyDictionary[Ledger, _Compiled] = weakref.WeakKeyDictionary()


def _compiled(ledger: Ledger) -> _Compiled:
    """The ledger's statements compiled for its engine, made once and gone with the ledger."""
    found = _COMPILED.get(ledger)
    if found is None or found.engine is not ledger.engine:
        found = _COMPILED[ledger] = _Compiled(ledger.engine)
    return found


def _same(value: Any) -> Any:
    return value


_SAVEPOINTS = itertools.count(1)


class _RawSavepoint:
    def __init__(self, conn: sqlite3.Connection, counts: WorkCounts):
        self._conn = conn
        self._counts = counts
        self._name = f"ledger_{next(_SAVEPOINTS)}"
        counts.statements += 1
        conn.execute(f"SAVEPOINT {self._name}")

    async def commit(self) -> None:
        self._counts.statements += 1
        self._conn.execute(f"RELEASE SAVEPOINT {self._name}")

    async def rollback(self) -> None:
        self._counts.statements += 2
        self._conn.execute(f"ROLLBACK TO SAVEPOINT {self._name}")
        self._conn.execute(f"RELEASE SAVEPOINT {self._name}")


class SqliteStatements:
    """Directly on the sqlite3 connection of the transaction; inline, as
    :mod:`saga.store.sqlite_driver` runs every statement but BEGIN and COMMIT."""

    def __init__(self, conn: sqlite3.Connection, compiled: _Compiled, counts: WorkCounts):
        self._conn = conn
        self._c = compiled
        self._counts = counts

    def _ids(self, values: Iterable[UUID]) -> list[Any]:
        return [self._c.uuid_in(v) for v in values]

    async def delete_sent(self, message_ids: Sequence[UUID]) -> None:
        self._counts.statements += 1
        self._conn.executemany(
            f"DELETE FROM {outbox.name} WHERE message_id = ?",
            [(each,) for each in self._ids(message_ids)],
        )

    async def given(self, reply_ids: Sequence[UUID]) -> dict[UUID, bytes]:
        if not reply_ids:
            return {}
        marks = ",".join("?" * len(reply_ids))
        self._counts.statements += 1
        found = self._conn.execute(
            f"SELECT message_id, body FROM {replies.name} WHERE message_id IN ({marks})",
            self._ids(reply_ids),
        )
        return {self._c.uuid_out(message_id): bytes(body) for message_id, body in found}

    async def recorded(self, keys: Sequence[UUID]) -> list[Recorded]:
        if not keys:
            return []
        marks = ",".join("?" * len(keys))
        ids = self._ids(keys)
        self._counts.statements += 1
        found = self._conn.execute(
            f"SELECT idempotency_key, outcome, reason, detail, data, 0 FROM {processed.name} "
            f"WHERE idempotency_key IN ({marks}) UNION ALL "
            f"SELECT idempotency_key, NULL, NULL, NULL, NULL, 1 FROM {tombstones.name} "
            f"WHERE idempotency_key IN ({marks})",
            [*ids, *ids],
        )
        return [
            Recorded(
                self._c.uuid_out(key),
                outcome,
                reason,
                detail,
                None if data is None else dict(self._c.json_out(data)),
                bool(tombstone),
            )
            for key, outcome, reason, detail, data, tombstone in found
        ]

    async def savepoint(self) -> Savepoint:
        return _RawSavepoint(self._conn, self._counts)

    async def write(self, rows: Rows) -> None:
        for table, values, ignore in (
            (processed, rows.processed_rows, False),
            (tombstones, rows.tombstone_rows, False),
            (replies, rows.reply_rows, False),
            (outbox, rows.outbox_rows, True),
            (spans, rows.span_rows, False),
        ):
            if values:
                prepared = self._c.insert(table, tuple(values[0]), ignore)
                self._counts.statements += 1
                self._conn.executemany(prepared.sql, prepared.rows(values))
