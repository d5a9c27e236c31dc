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
from saga.store.sqlite_batch import Prepared, PreparedCache
from saga.work import WorkCounts

__all__ = ["CoreStatements", "Recorded", "Savepoint", "SqliteStatements", "statements"]


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
        driver = (await conn.get_raw_connection()).driver_connection
        if isinstance(driver, sqlite_driver.Connection):
            return SqliteStatements(driver.raw, _compiled(ledger), driver.counts)
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
