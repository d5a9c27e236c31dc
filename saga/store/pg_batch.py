"""Batches of rows on PostgreSQL in statements of fixed text, on asyncpg's connection.

Through SQLAlchemy a batch's ``IN (...)`` and multi-row ``VALUES`` are a new statement text for
every number of rows, and asyncpg prepares every new text (a round trip, and a parse on both
sides); a ``SAVEPOINT`` named anew each time is prepared anew too. Here a batch of rows is one
array per column (``unnest``, ``= ANY``), so each statement has one text, prepared once per
connection. The participants' ledger (:mod:`saga.participant.ledger_sql`) runs them on the
driver's connection under the transaction SQLAlchemy began (:class:`PgRun`); the orchestrator's
bulk batch (:mod:`saga.store.sql`) in asyncpg's own transaction, without SQLAlchemy around it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from saga.core.jsontext import dumps
from saga.work import WorkCounts

__all__ = [
    "PgPart",
    "PgRun",
    "count_statements",
    "pg_arrays",
    "pg_insert",
    "pg_insert_part",
    "pg_params",
    "pg_table",
    "pg_with",
]

#: one query of :func:`pg_with`: its name, how many parameters it takes, and its SQL given the
#: number of its first parameter
PgPart = tuple[str, int, Callable[[int], str]]


def count_statements(engine: AsyncEngine, counts: WorkCounts) -> None:
    """Count in ``counts`` what goes through ``engine``'s SQLAlchemy connections: each
    statement (an ``executemany`` once), ``BEGIN``, ``COMMIT`` and ``ROLLBACK``, and the
    transactions committed, as the SQLite driver counts its own. Statements sent on asyncpg's
    connection directly are counted where they are sent."""
    sync = engine.sync_engine

    @event.listens_for(sync, "before_cursor_execute")
    def _statement(*_args: Any) -> None:
        counts.statements += 1

    @event.listens_for(sync, "begin")
    def _begin(_conn: Any) -> None:
        counts.statements += 1

    @event.listens_for(sync, "commit")
    def _commit(_conn: Any) -> None:
        counts.statements += 1
        counts.transactions += 1

    @event.listens_for(sync, "rollback")
    def _rollback(_conn: Any) -> None:
        counts.statements += 1


def pg_table(name: str, schema: str | None) -> str:
    return name if schema is None else f'"{schema}".{name}'


def pg_arrays(columns: Sequence[tuple[str, str]], rows: list[dict[str, Any]]) -> list[list[Any]]:
    """One array per column of an ``unnest`` statement; JSON as the text SQLAlchemy's JSON
    type would have sent (``json.dumps``'s, with the encoder built once: four JSON columns
    per saga row), datetimes in UTC as :class:`UTCDateTime` stores them."""
    args: list[list[Any]] = []
    for column, kind in columns:
        values = [r[column] for r in rows]
        if kind == "json":  # None too: SQLAlchemy's JSON type stores it as JSON null
            values = [dumps(v) for v in values]
        elif kind == "timestamptz":
            values = [None if v is None else v.astimezone(UTC) for v in values]
        args.append(values)
    return args


def pg_insert(
    table: str, columns: Sequence[tuple[str, str]], tail: str = "", *, first: int = 1
) -> str:
    """``INSERT`` of the rows of one array per column (parameters from ``$first`` on), in
    the arrays' order (a history's ids follow its entries)."""
    names = ", ".join(c for c, _ in columns)
    values = ", ".join(f"{c}::json" if t == "json" else c for c, t in columns)
    return (
        f"INSERT INTO {table} ({names}) SELECT {values} FROM unnest({pg_params(columns, first)}) "
        f"WITH ORDINALITY AS v({names}, ord) ORDER BY ord{tail}"
    )


def pg_insert_part(
    name: str, table: str, columns: Sequence[tuple[str, str]], tail: str = ""
) -> PgPart:
    """:func:`pg_insert` as a query of :func:`pg_with`."""
    return (name, len(columns), lambda first: pg_insert(table, columns, tail, first=first))


def pg_with(parts: Sequence[PgPart], select: str) -> str:
    """One statement of data-modifying ``WITH`` queries, each one's parameters numbered after
    the previous one's (from ``$1``), then ``select``: a batch's writes to several tables in one
    round trip instead of one each. PostgreSQL runs every query to completion (arrays may be
    empty), all on one snapshot, and checks foreign keys when the statement ends, so a row may
    refer to one another query of the statement inserts."""
    first = 1
    queries = []
    for name, width, build in parts:
        queries.append(f"{name} AS ({build(first)})")
        first += width
    return "WITH " + ", ".join(queries) + " " + select


def pg_params(columns: Sequence[tuple[str, str]], first: int = 1) -> str:
    """The typed array parameters of ``columns``, numbered from ``$first``."""
    return ", ".join(
        f"${i}::{'text' if t == 'json' else t}[]" for i, (_, t) in enumerate(columns, first)
    )


class PgRun:
    """Statements on asyncpg's connection under a SQLAlchemy transaction. The first one goes
    through SQLAlchemy, which begins the transaction on its first statement (and wraps a
    failure, invalidating a dead connection); the rest go to the driver directly."""

    def __init__(self, conn: AsyncConnection, driver: Any):
        self._conn = conn
        self._driver = driver
        self._begun = False

    @classmethod
    async def on(cls, conn: AsyncConnection) -> PgRun:
        raw = await conn.get_raw_connection()
        return cls(conn, raw.driver_connection)

    async def fetch(self, sql: str, args: Sequence[Any]) -> list[Any]:
        if not self._begun:
            self._begun = True
            return list((await self._conn.exec_driver_sql(sql, tuple(args))).all())
        return list(await self._driver.fetch(sql, *args))

    async def execute(self, sql: str, args: Sequence[Any]) -> None:
        if not self._begun:
            self._begun = True
            await self._conn.exec_driver_sql(sql, tuple(args))
            return
        await self._driver.execute(sql, *args)
