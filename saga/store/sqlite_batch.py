"""A whole group-commit batch on SQLite in ONE hand-off to a worker thread.

Through SQLAlchemy every statement of a batch pays for its execution context, its parameter
processing and its result on the event loop's thread, and the COMMIT (the fsync) is another
hand-off; that was most of the orchestrator's and the participants' CPU per event. Here each
statement is compiled once, by SQLAlchemy, for the engine's own dialect (:func:`prepare`); a
batch turns its rows into tuples with the same bind processors (so values are stored exactly as
SQLAlchemy stores and reads them), and :func:`run_transaction` runs ``BEGIN IMMEDIATE``, every
``executemany`` and the ``COMMIT`` on the raw connection in one thread call. sqlite3 releases
the GIL inside SQLite, so the loop goes on decoding and deciding the next batch meanwhile.

SQLAlchemy still owns the schema, the migrations and PostgreSQL; the connection is the one
writer connection of the file, which a :class:`~saga.store.lease.WriterLease` holds and lends
to one transaction at a time. The one read on
the hot path, a batch's sagas (:class:`DirectSelect`), runs on a read-only connection of its
own, its values converted by SQLAlchemy's result processors.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sqlite3
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from operator import itemgetter
from typing import Any
from uuid import UUID

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql.compiler import SQLCompiler

from saga.store import sqlite_driver
from saga.store.lease import WriterLease
from saga.store.schema import UTCDateTime

__all__ = [
    "DirectSelect",
    "Prepared",
    "PreparedCache",
    "Work",
    "prepare",
    "run_transaction",
    "sqlite_utc_datetime",
    "sqlite_utc_text",
    "sqlite_uuid_text",
]


@dataclass(frozen=True, slots=True)
class Prepared:
    """A statement compiled once: its SQL with ``?`` placeholders, and for each placeholder
    the parameter's name and SQLAlchemy's bind processor for its type (None: stored as is)."""

    sql: str
    names: tuple[str, ...]
    processors: tuple[Callable[[Any], Any] | None, ...]
    #: made once from ``names`` and ``processors``, not on every batch (~5 calls a commit)
    _get: Callable[[Mapping[str, Any]], tuple[Any, ...]] = dataclasses.field(
        init=False, repr=False, compare=False
    )
    _converted: tuple[tuple[int, Callable[[Any], Any]], ...] = dataclasses.field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        converted = tuple((i, p) for i, p in enumerate(self.processors) if p is not None)
        object.__setattr__(self, "_get", _getter(self.names))
        object.__setattr__(self, "_converted", converted)

    def rows(self, values: Iterable[Mapping[str, Any]]) -> list[Sequence[Any]]:
        """``values`` (dicts keyed by parameter name) as the sequences sqlite3 binds; a
        processor sees every value, None included (JSON stores None as ``null``)."""
        get = self._get
        converted = self._converted
        out: list[Sequence[Any]] = []
        for each in values:
            row = list(get(each))
            for i, process in converted:
                row[i] = process(row[i])
            out.append(row)
        return out


def _getter(names: tuple[str, ...]) -> Callable[[Mapping[str, Any]], tuple[Any, ...]]:
    """The values of ``names`` as a tuple (``itemgetter`` of one name gives the bare value)."""
    if len(names) > 1:
        return itemgetter(*names)
    return _one(names[0]) if names else lambda each: ()


def _one(name: str) -> Callable[[Mapping[str, Any]], tuple[Any]]:
    return lambda each: (each[name],)


def prepare(engine: AsyncEngine, statement: sa.ClauseElement, keys: Sequence[str] = ()) -> Prepared:
    """Compile ``statement`` for ``engine``'s dialect; an INSERT binds exactly ``keys``."""
    dialect: Dialect = engine.dialect
    compiled = statement.compile(dialect=dialect, column_keys=list(keys) or None)
    assert isinstance(compiled, SQLCompiler)
    if compiled.positiontup is None:
        raise ValueError(f"{engine.dialect.name} does not bind by position")
    by_name = {name: bind for bind, name in compiled.bind_names.items()}
    names = tuple(compiled.positiontup)
    processors = tuple(_processor(by_name[name].type, dialect) for name in names)
    return Prepared(compiled.string, names, processors)


def _processor(type_: Any, dialect: Dialect) -> Callable[[Any], Any] | None:
    """SQLAlchemy's bind processor for ``type_``, the dialect's own (sqlite.DATETIME, not the
    generic DateTime), except for :class:`UTCDateTime` on SQLite: there the same text comes
    from one ``isoformat`` instead of the decorator's conversion and the dialect's format
    string (a third of a batch's row building; ``tests/store`` checks they agree)."""
    if isinstance(type_, UTCDateTime) and dialect.name == "sqlite":
        return sqlite_utc_text
    if isinstance(type_, sa.Uuid) and dialect.name == "sqlite" and type_.as_uuid:
        return sqlite_uuid_text
    processor: Callable[[Any], Any] | None = type_.dialect_impl(dialect).bind_processor(dialect)
    return processor


#: the last datetime converted and its text: a batch's rows repeat the same few datetimes
#: (the decision's time in the saga and history rows, the commit's in inbox and outbox rows),
#: and a datetime never changes, so the same object has the same text
_last_time: tuple[datetime | None, str | None] = (None, None)


def sqlite_utc_text(value: datetime | None) -> str | None:
    """An aware datetime as SQLAlchemy's SQLite DATETIME stores it, in UTC without a zone."""
    global _last_time  # noqa: PLW0603 - a one-entry cache, replaced whole (atomic)
    if value is None:
        return None
    last = _last_time
    if value is last[0]:
        return last[1]
    if value.tzinfo is None:
        raise ValueError("naive datetimes are not stored; use UTC-aware ones")
    utc = value if value.tzinfo is UTC else value.astimezone(UTC)
    text = utc.isoformat(" ", "microseconds")[:-6]  # without its "+00:00"
    _last_time = (value, text)
    return text


def sqlite_uuid_text(value: UUID | None) -> str | None:
    """A UUID as SQLAlchemy's ``Uuid`` stores it on SQLite (32 hex digits, ``value.hex``),
    without the processor's wrapper and the property: ~9 UUIDs per event in a batch's rows."""
    return None if value is None else "%032x" % value.int  # noqa: UP031 - the fastest form


def sqlite_utc_datetime(value: str | None) -> datetime | None:
    """A stored :class:`UTCDateTime` as SQLAlchemy reads it on SQLite: an aware UTC datetime.
    The text is always ``sqlite_utc_text``'s ``YYYY-MM-DD HH:MM:SS.ffffff``, which
    ``fromisoformat`` reads in one call (SQLAlchemy's processor matches a regular expression
    and converts each group; ``tests/store`` checks they agree)."""
    if value is None:
        return None
    return datetime.fromisoformat(value).replace(tzinfo=UTC)


def _result_processor(type_: Any, dialect: Dialect) -> Callable[[Any], Any] | None:
    if isinstance(type_, UTCDateTime) and dialect.name == "sqlite":
        return sqlite_utc_datetime
    processor: Callable[[Any], Any] | None = type_.dialect_impl(dialect).result_processor(
        dialect, None
    )
    return processor


class DirectSelect:
    """``SELECT`` every column of ``table`` for a list of keys, on a sqlite3 connection of
    its own (``query_only``), run on the loop's thread (a read of a few rows takes SQLite
    microseconds). Through the read engine each such read paid a pool checkout, a greenlet
    switch per call, the ``ROLLBACK`` of the connection's reset and SQLAlchemy's result rows:
    several times SQLite's own work, for the read every start and every batch makes. Rows are
    dicts by column name, each value converted by SQLAlchemy's result processor for its type,
    so they are the values a read through SQLAlchemy gives."""

    def __init__(
        self,
        engine: AsyncEngine,
        path: str,
        table: sa.Table,
        key: sa.Column[Any],
        *,
        timeout: float,
        counts: Any,
    ):
        dialect: Dialect = engine.dialect
        self._path = path
        self._timeout = timeout
        self._counts = counts
        self._dialect = dialect
        self._table = table.name
        self._names = tuple(c.name for c in table.columns)
        self._sql = f"SELECT {', '.join(self._names)} FROM {table.name} WHERE {key.name} IN "
        self._processors = [
            (i, p)
            for i, p in enumerate(_result_processor(c.type, dialect) for c in table.columns)
            if p is not None
        ]
        bind = key.type.dialect_impl(dialect).bind_processor(dialect)
        self._bind: Callable[[Any], Any] = bind if bind is not None else (lambda v: v)
        self._conn: sqlite3.Connection | None = None
        self._opening: asyncio.Future[sqlite3.Connection] | None = None

    async def _connection(self) -> sqlite3.Connection:
        if self._conn is not None:
            return self._conn
        if self._opening is None:  # the first callers share one open
            self._opening = asyncio.ensure_future(asyncio.to_thread(self._open))
        conn = await asyncio.shield(self._opening)
        self._conn = conn
        return conn

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self._path, timeout=self._timeout, isolation_level=None, check_same_thread=False
        )
        conn.execute("PRAGMA query_only=ON")
        return conn

    async def rows(self, keys: Sequence[Any]) -> list[dict[str, Any]]:
        conn = await self._connection()
        sql = self._sql + "(" + ", ".join("?" * len(keys)) + ")"
        found = conn.execute(sql, [self._bind(k) for k in keys]).fetchall()
        self._counts.statements += 1
        names = self._names
        out: list[dict[str, Any]] = []
        for raw in found:
            row = list(raw)
            for i, process in self._processors:
                row[i] = process(row[i])
            out.append(dict(zip(names, row, strict=True)))
        return out

    async def minimum(self, column: sa.Column[Any]) -> Any:
        """The least non-NULL value of ``column`` (of this table), as SQLAlchemy reads it;
        None when there is none. An indexed column's minimum is one index probe."""
        conn = await self._connection()
        (found,) = conn.execute(f"SELECT min({column.name}) FROM {self._table}").fetchone()
        self._counts.statements += 1
        process = _result_processor(column.type, self._dialect)
        return found if found is None or process is None else process(found)

    async def close(self) -> None:
        if self._opening is not None and self._conn is None:
            with contextlib.suppress(Exception):
                self._conn = await self._opening
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._opening = None


class PreparedCache:
    """The statements of one engine, each compiled once per ``(name, keys)``: the store's batch
    and the participants' ledger both look theirs up here."""

    def __init__(self, engine: AsyncEngine):
        self._engine = engine
        self._known: dict[tuple[Hashable, tuple[str, ...]], Prepared] = {}

    def get(
        self,
        name: Hashable,
        keys: tuple[str, ...],
        build: Callable[[], sa.ClauseElement],
        columns: Sequence[str] | None = None,
    ) -> Prepared:
        """The statement ``build()`` makes, binding ``columns`` (``keys`` unless given),
        compiled the first time ``name`` is asked for with these ``keys``."""
        found = self._known.get((name, keys))
        if found is None:
            bound = keys if columns is None else columns
            found = self._known[name, keys] = prepare(self._engine, build(), bound)
        return found


@dataclass(frozen=True, slots=True)
class Work:
    """One ``executemany`` of a transaction. ``exact``: every row must change one row (an
    insert that met a duplicate, an update that met another version), else the whole
    transaction is rolled back and :func:`run_transaction` returns False."""

    sql: str
    rows: list[Sequence[Any]]
    exact: bool = False


def _run(conn: sqlite3.Connection, work: Sequence[Work]) -> bool:
    conn.execute("BEGIN IMMEDIATE")  # waits out another writer in the busy handler, here
    try:
        for each in work:
            if not each.rows:
                continue
            cursor = conn.executemany(each.sql, each.rows)
            if each.exact and cursor.rowcount != len(each.rows):
                conn.rollback()
                return False
        conn.commit()
    except BaseException:
        if conn.in_transaction:
            conn.rollback()
        raise
    return True


async def run_transaction(lease: WriterLease, work: Sequence[Work]) -> bool:
    """Run ``work`` as one write transaction on the writer connection ``lease`` lends (of a
    :func:`saga.store.sql.sqlite_engine`); False (nothing written) when an ``exact`` step
    did not change every row."""
    async with lease.connection():
        driver = lease.driver
        if driver is None:
            raise TypeError("run_transaction needs the lease of an engine made by sqlite_engine")
        counts = driver.counts
        counts.statements += 2 + sum(1 for each in work if each.rows)  # BEGIN and COMMIT
        counts.transactions += 1
        counts.handoffs += 1
        # the lease lends this connection to one caller at a time, so the thread may use it;
        # a cancelled caller still waits for the thread (in_thread). If the transaction
        # committed meanwhile, the caller only loses its bookkeeping: the relay reads the
        # outbox table again within a second, and the version checks catch a stale copy.
        return await sqlite_driver.in_thread(_run, driver.raw, work)
