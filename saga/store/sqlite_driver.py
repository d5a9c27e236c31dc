"""SQLite on the event loop's own thread, for SQLAlchemy's aiosqlite dialect.

aiosqlite runs every call in a worker thread and wakes the loop for each result; SQLAlchemy
makes three or four such calls per statement (cursor, execute, fetch, close). Measured on the
participants' ledgers that was ~70 thread hand-offs and ~4 ms of CPU per command, far more than
SQLite's own work, which takes microseconds on a local file. This driver gives the dialect the
same interface (handed over with ``create_async_engine(async_creator=...)``) but runs statements
inline; only the two calls that can wait go to a thread, so the loop never stalls on them:

* ``BEGIN IMMEDIATE``: it may sit in SQLite's busy handler while another connection holds the
  write lock. It is tried inline first with no busy wait (the lock is almost always free: one
  writer per process and file) and handed to a thread only when the lock is taken;
* ``COMMIT``: the fsync (``synchronous=FULL``) takes milliseconds.

A connection is used by one task at a time (SQLAlchemy's pool guarantees it), so handing it to a
thread for those calls and back is safe (``check_same_thread=False``).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from saga.work import WorkCounts

__all__ = ["Connection", "connect", "in_thread"]

T = TypeVar("T")


_INLINE, _LOCK, _COMMIT = 0, 1, 2


def _kind(sql: str) -> int:
    """Whether ``sql`` can block: taking the write lock, or committing (a deferred BEGIN
    takes no lock, so readers stay on the loop)."""
    if sql[:1] not in ("B", "C", "E", "b", "c", "e"):  # the common case, checked cheaply
        return _INLINE
    head = " ".join(sql.split()[:2]).upper()
    if head in ("BEGIN IMMEDIATE", "BEGIN EXCLUSIVE"):
        return _LOCK
    return _COMMIT if head.startswith(("COMMIT", "END")) else _INLINE


async def in_thread(function: Callable[..., T], *args: Any) -> T:
    """``function(*args)`` in a worker thread, with the connection it uses: a caller cancelled
    meanwhile still waits for the thread to finish before the cancellation goes on, so the
    pool never lends the connection out while a thread holds it."""
    running = asyncio.ensure_future(asyncio.to_thread(function, *args))
    try:
        return await asyncio.shield(running)
    finally:
        while not running.done():
            with contextlib.suppress(BaseException):
                await asyncio.shield(running)


class Cursor:
    __slots__ = ("_cursor", "_owner")

    def __init__(self, cursor: sqlite3.Cursor, owner: Connection):
        self._cursor = cursor
        self._owner = owner

    async def __aenter__(self) -> Cursor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._cursor.close()

    @property
    def description(self) -> Any:
        return self._cursor.description

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    @property
    def lastrowid(self) -> int | None:
        return self._cursor.lastrowid

    @property
    def arraysize(self) -> int:
        return self._cursor.arraysize

    @arraysize.setter
    def arraysize(self, value: int) -> None:
        self._cursor.arraysize = value

    async def execute(self, sql: str, parameters: Sequence[Any] | None = None) -> Cursor:
        args = () if parameters is None else parameters
        kind = _kind(sql)
        counts = self._owner.counts
        counts.statements += 1
        if kind == _INLINE:
            self._cursor.execute(sql, args)
        elif kind == _COMMIT or not self._owner.lock_now(self._cursor, sql):
            counts.handoffs += 1
            counts.transactions += kind == _COMMIT
            await in_thread(self._cursor.execute, sql, args)
        return self

    async def executemany(self, sql: str, parameters: Iterable[Sequence[Any]]) -> Cursor:
        self._owner.counts.statements += 1
        self._cursor.executemany(sql, parameters)
        return self

    async def fetchone(self) -> Any:
        return self._cursor.fetchone()

    async def fetchmany(self, size: int | None = None) -> list[Any]:
        return self._cursor.fetchmany(self._cursor.arraysize if size is None else size)

    async def fetchall(self) -> list[Any]:
        return self._cursor.fetchall()

    async def close(self) -> None:
        self._cursor.close()


class _Inline:
    """Stands in for aiosqlite's request queue, which SQLAlchemy's isolation-level setter
    uses directly: run the function now and settle its future."""

    def put_nowait(self, item: tuple[asyncio.Future[Any] | None, Callable[[], Any]]) -> None:
        future, function = item
        try:
            result = function()
        except BaseException as exc:
            if future is not None:
                future.set_exception(exc)
            return
        if future is not None:
            future.set_result(result)


class Connection:
    """The part of ``aiosqlite.Connection`` that SQLAlchemy's dialect uses."""

    def __init__(self, conn: sqlite3.Connection, timeout: float, counts: WorkCounts | None = None):
        self._conn = conn
        #: statements, commits and thread hand-offs on this connection (saga.work)
        self.counts = counts if counts is not None else WorkCounts()
        self._connection: sqlite3.Connection | None = conn  # checked before commit/rollback
        self._tx = _Inline()
        self._busy_ms = int(timeout * 1000)
        #: a transaction opened with :meth:`begin`, not by SQLAlchemy: a transaction SQLAlchemy
        #: begins meanwhile (a statement of the handler's) joins it instead of issuing a BEGIN
        self.outer = False

    def lock_now(self, cursor: sqlite3.Cursor, sql: str) -> bool:
        """Run ``sql`` (a BEGIN that takes the write lock) if the lock is free right now;
        False, with nothing done, if it is not (the caller then waits for it in a thread)."""
        self._conn.execute("PRAGMA busy_timeout=0")
        try:
            cursor.execute(sql)
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                return False
            raise
        finally:
            self._conn.execute(f"PRAGMA busy_timeout={self._busy_ms}")
        return True

    def begin_now(self, immediate: bool) -> bool:
        """Open a transaction directly, without a statement through SQLAlchemy (a tenth of a
        short transaction's CPU); False when the write lock is taken: then the caller issues
        ``BEGIN IMMEDIATE`` as a statement, which waits for the lock in a thread."""
        self.counts.statements += 1
        if not immediate:
            self._conn.execute("BEGIN")
            return True
        return self.lock_now(self._conn.cursor(), "BEGIN IMMEDIATE")

    async def begin(self) -> None:
        """``BEGIN IMMEDIATE`` outside SQLAlchemy (:mod:`saga.store.lease`): inline when the
        write lock is free, else waiting for it in a thread. Ends with :meth:`commit` or
        :meth:`rollback`."""
        if not self.begin_now(True):
            self.counts.handoffs += 1
            await in_thread(self._conn.execute, "BEGIN IMMEDIATE")
        self.outer = True

    @property
    def raw(self) -> sqlite3.Connection:
        """The sqlite3 connection itself, for a whole transaction run in a worker thread
        (:mod:`saga.store.sqlite_batch`) while the pool lends this connection out."""
        return self._conn

    def set_synchronous(self, level: str) -> None:
        """``PRAGMA synchronous`` for the transactions that follow (not inside one)."""
        self._conn.execute(f"PRAGMA synchronous={level}")

    @property
    def isolation_level(self) -> str | None:
        return self._conn.isolation_level

    def cursor(self) -> Cursor:
        return Cursor(self._conn.cursor(), self)

    async def execute(self, sql: str, parameters: Sequence[Any] | None = None) -> Cursor:
        return await self.cursor().execute(sql, parameters)

    @property
    def joins(self) -> bool:
        """Whether a transaction SQLAlchemy begins now joins one opened by :meth:`begin`."""
        return self.outer and self._conn.in_transaction

    async def commit(self) -> None:
        self.outer = False
        if self._conn.in_transaction:
            self.counts.statements += 1
            self.counts.transactions += 1
            self.counts.handoffs += 1
            await in_thread(self._conn.commit)

    async def rollback(self) -> None:
        self.outer = False
        if self._conn.in_transaction:
            self.counts.statements += 1
        self._conn.rollback()

    async def create_function(self, *args: Any, **kwargs: Any) -> None:
        self._conn.create_function(*args, **kwargs)

    async def close(self) -> None:
        if self._connection is not None:
            self._connection = None
            self._conn.close()

    def stop(self) -> None:
        if self._connection is not None:
            self._connection = None
            self._conn.close()


def connect(path: str, *, timeout: float, counts: WorkCounts | None = None) -> Callable[[], Any]:
    """An ``async_creator`` for ``create_async_engine``: a new connection to ``path``, its
    work counted in ``counts``."""

    async def create() -> Connection:
        conn = await asyncio.to_thread(
            sqlite3.connect,
            path,
            timeout=timeout,
            isolation_level=None,  # BEGIN is issued by the engine's "begin" listener
            check_same_thread=False,
        )
        return Connection(conn, timeout, counts)

    return create
