"""Poison messages: one whose handling keeps failing is dead-lettered after a bounded number of
deliveries, instead of being handed back to its queue forever.

A failed delivery counts against the message only when the failure looks like the message's
own: the error is not one the database raises about itself (locked, full, disconnected, shutting
down, out of resources, contended), and a ``SELECT 1`` on the database succeeds. A database outage
therefore never dead-letters a healthy message: it is handed back and retried for as long as the
outage lasts. (SQLite answers ``SELECT 1`` even when it is locked or its disk is full, which is
why the error itself is looked at as well.)

Counts live in memory, per message id, and at most ``capacity`` of them (the oldest are
forgotten first). A restart forgets them, so a poison message may be tried up to
``max_deliveries`` times per process start, and with several consumers each counts its own.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from saga.errors import ConcurrencyError

__all__ = [
    "PoisonGuard",
    "database_fault",
    "database_reachable",
    "delivery_key",
    "describe_error",
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


def delivery_key(message_id: str | None, body: bytes) -> str:
    """What failed deliveries are counted under: the message id, or a digest of the body."""
    return message_id or "sha256:" + hashlib.sha256(body).hexdigest()


class PoisonGuard:
    """Counts failed deliveries per message and says when one has had enough."""

    def __init__(
        self,
        max_deliveries: int,
        probe: Callable[[], Awaitable[bool]],
        *,
        capacity: int = 10_000,
        probe_ttl: float = 1.0,
    ):
        if max_deliveries < 1:
            raise ValueError("max_deliveries must be at least 1")
        self.max_deliveries = max_deliveries
        self._probe = probe
        self._capacity = capacity
        self._probe_ttl = probe_ttl
        self._failures: OrderedDict[str, int] = OrderedDict()
        self._probe_lock = asyncio.Lock()
        self._probed: tuple[float, bool] | None = None  # (monotonic time, result)

    async def failed(self, key: str, exc: BaseException) -> int:
        """Record a failed delivery of ``key``; returns how many have counted so far (this one
        not included when the database is at fault)."""
        if database_fault(exc) or not await self._database_up():
            return self._failures.get(key, 0)
        count = self._failures.pop(key, 0) + 1
        self._failures[key] = count
        while len(self._failures) > self._capacity:
            self._failures.popitem(last=False)
        return count

    def exhausted(self, count: int) -> bool:
        return count >= self.max_deliveries

    def settled(self, key: str) -> None:
        """The message was acked or dead-lettered: forget it."""
        self._failures.pop(key, None)

    async def _database_up(self) -> bool:
        """One probe at a time, its answer shared for ``probe_ttl`` seconds: a burst of failures
        (a whole prefetch window) costs one ``SELECT 1``."""
        async with self._probe_lock:
            now = time.monotonic()
            if self._probed is None or now - self._probed[0] > self._probe_ttl:
                self._probed = (now, await self._probe())
            return self._probed[1]
