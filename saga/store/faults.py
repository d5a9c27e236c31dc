"""Whether a database error is the database's fault (down, locked, full, contended) or the
statement's: a message that failed because of the first is retried for as long as it lasts, one
that failed because of the second may be poison (:mod:`saga.messaging.poison`)."""

from __future__ import annotations

import asyncio
import sqlite3

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from saga.core.errors import ConcurrencyError

__all__ = [
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
    restarted, a proxy dropped it): SQLAlchemy has thrown it away, and the next checkout gets a
    new one. The pools do not ping every connection they hand out (a round trip per
    transaction); a transaction that hits a dead one is run again instead."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, sa.exc.DBAPIError) and current.connection_invalidated:
            return True
        current = current.__cause__ or current.__context__
    return False


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
