"""Whether a database error is the database's fault (down, locked, full, contended) or the
statement's: a message that failed because of the first is retried for as long as it lasts, one
that failed because of the second may be poison (:mod:`saga.messaging.poison`).

An error comes either wrapped by SQLAlchemy (``DBAPIError``, the driver's error as ``orig``) or,
from the paths that run straight on asyncpg's connection (the orchestrator's PostgreSQL batch,
:mod:`saga.store.sql`), as asyncpg raised it: each question answers both alike.
"""

from __future__ import annotations

import asyncio
import sqlite3

import asyncpg
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from saga.core.errors import ConcurrencyError

__all__ = [
    "UnusableConnectionError",
    "database_fault",
    "database_reachable",
    "describe_error",
    "rolled_back",
    "stale_connection",
]

#: SQLite primary result codes that describe the database, not the statement
_SQLITE_FAULTS = frozenset(
    {
        "SQLITE_BUSY",
        "SQLITE_LOCKED",
        "SQLITE_FULL",
        "SQLITE_IOERR",
        "SQLITE_READONLY",
        "SQLITE_CANTOPEN",
        "SQLITE_NOMEM",
        "SQLITE_PROTOCOL",
        "SQLITE_NOLFS",
    }
)
#: PostgreSQL SQLSTATE classes (and codes) that describe the server, not the statement:
#: connection, insufficient resources (disk full, too many connections), operator intervention
#: (shutdown, cannot connect now), system error (I/O), transaction rollback (serialization,
#: deadlock), lock not available, read-only transaction (a standby)
_PG_FAULT_CLASSES = ("08", "53", "57", "58", "40")
_PG_FAULT_CODES = frozenset({"55P03", "25006"})


#: SQLSTATEs of a transaction the server rolled back to resolve a conflict between
#: transactions: a deadlock, a serialization failure. Nothing of it was written, and the same
#: transaction run again at once most likely goes through.
_PG_ROLLED_BACK = frozenset({"40P01", "40001"})

#: SQLSTATEs after which the server has closed the session (it was terminated, the server shuts
#: down or crashed), besides class 08 (connection exception)
_PG_CLOSED = frozenset({"57P01", "57P02", "57P03"})


class UnusableConnectionError(Exception):
    """A pooled connection failed the ``BEGIN`` of a transaction run straight on the driver:
    nothing was sent of the transaction and the connection was given up. The server closing
    an idle connection (``pg_terminate_backend``, a restart) leaves asyncpg a message it can
    only report as a protocol error (``InternalClientError``) until it sees the socket closed,
    which neither SQLAlchemy's test (``is_closed()``) nor the error's type tells apart."""


def rolled_back(exc: BaseException) -> bool:
    """True when ``exc`` (or what caused it) is PostgreSQL breaking a deadlock or a
    serialization conflict: the transaction did nothing and is worth running again now."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        for candidate in (current, getattr(current, "orig", None)):
            if getattr(candidate, "sqlstate", None) in _PG_ROLLED_BACK:
                return True
        current = current.__cause__ or current.__context__
    return False


def stale_connection(exc: BaseException) -> bool:
    """True when ``exc`` came from a pooled connection that turned out dead (the server
    restarted, a proxy dropped it): SQLAlchemy (or the raw path, see :func:`_closed_by_asyncpg`)
    has thrown it away, and the next checkout gets a new one. The pools do not ping every
    connection they hand out (a round trip per transaction); a transaction that hits a dead
    one is run again instead."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, sa.exc.DBAPIError) and current.connection_invalidated:
            return True
        if _closed_by_asyncpg(current):
            return True
        current = current.__cause__ or current.__context__
    return False


def _closed_by_asyncpg(exc: BaseException) -> bool:
    """An error asyncpg raised (not wrapped) that means its connection is closed: what
    SQLAlchemy's dialect tests (``is_closed()`` after the error) to invalidate a connection.
    The raw path invalidates the connection on any such error, so the next run gets a new one.
    A refused connect is not one: it comes from the pool's connect, wrapped."""
    if isinstance(exc, UnusableConnectionError):
        return True
    if isinstance(exc, asyncpg.exceptions.InterfaceError):
        return "connection is closed" in str(exc)
    if isinstance(exc, asyncpg.PostgresError):
        sqlstate = getattr(exc, "sqlstate", None) or ""
        return sqlstate.startswith("08") or sqlstate in _PG_CLOSED
    return isinstance(exc, ConnectionResetError | ConnectionAbortedError | BrokenPipeError)


def database_fault(exc: BaseException) -> bool:
    """True when ``exc`` (or what caused it) says the database is unavailable or contended,
    rather than that this one message cannot be applied."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if _is_fault(current):
            return True
        orig = current.orig if isinstance(current, sa.exc.DBAPIError) else None
        if isinstance(orig, BaseException) and _is_fault(orig):
            return True
        current = current.__cause__ or current.__context__
    return False


def _is_fault(exc: BaseException) -> bool:
    if isinstance(exc, OSError | TimeoutError):  # connection refused or reset, I/O, timeouts
        return True
    if isinstance(exc, ConcurrencyError):  # other writers kept winning: contention, not poison
        return True
    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, asyncpg.exceptions.InterfaceError | UnusableConnectionError):
        return True  # the first as SQLAlchemy's InterfaceError, raw
    if isinstance(
        exc,
        sa.exc.OperationalError
        | sa.exc.InterfaceError
        | sa.exc.DisconnectionError
        | sa.exc.TimeoutError,
    ):
        return True
    if isinstance(exc, sqlite3.Error):
        name = getattr(exc, "sqlite_errorname", "") or ""
        primary = "_".join(name.split("_")[:2])  # SQLITE_IOERR_WRITE -> SQLITE_IOERR
        return isinstance(exc, sqlite3.OperationalError) or primary in _SQLITE_FAULTS
    sqlstate = getattr(exc, "sqlstate", None)
    if isinstance(sqlstate, str):
        return sqlstate.startswith(_PG_FAULT_CLASSES) or sqlstate in _PG_FAULT_CODES
    return False


async def database_reachable(engine: AsyncEngine, *, timeout: float = 5.0) -> bool:  # noqa: ASYNC109
    """Whether ``SELECT 1`` succeeds within ``timeout`` seconds."""
    try:
        async with asyncio.timeout(timeout), engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))
    except Exception:
        return False
    return True


def describe_error(exc: BaseException) -> str:
    """``Type: message`` of the error, the driver's own for a database error: SQLAlchemy's text
    would add the statement and its parameters, which may hold message content."""
    if isinstance(exc, sa.exc.DBAPIError) and exc.orig is not None:
        exc = exc.orig
        if exc.__cause__ is not None:  # an async driver's own error, under SQLAlchemy's adapter
            exc = exc.__cause__
    return f"{type(exc).__name__}: {exc}"
