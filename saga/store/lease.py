"""The one writer connection of a SQLite database, held across its transactions.

SQLite runs one write transaction at a time, so a writer engine has a pool of one connection
(:func:`saga.store.sql.sqlite_engine`). Taking that connection from the pool and giving it back
for every transaction (``engine.begin()``) costs more CPU on the loop than the transaction's
own statements: the pool's queue and events, a reset on return, a greenlet switch each way. A
lone command pays it on its way to the reply. :class:`WriterLease` checks the connection out
once and lends it to one user at a time, in the order they ask (an asyncio lock), so every
writer of the database shares it safely: the transactions, the deletes of sent outbox rows and
of exported spans, schema set-up. A second connection (``engine.begin()`` directly) still works,
but waits for SQLite's write lock instead of the lease.

A use that ends with an exception, or leaves a transaction open, gives the connection back to
the pool (which rolls back what was left, and discards a connection it was told is broken), so
the next user starts on a clean one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from saga.store import sqlite_driver

__all__ = ["WriterLease", "write_connection", "write_transaction"]


class WriterLease:
    def __init__(self, engine: AsyncEngine):
        self.engine = engine
        self._lock = asyncio.Lock()
        self._conn: AsyncConnection | None = None
        #: the driver connection under the held connection, for statements run on it directly
        self.driver: sqlite_driver.Connection | None = None
        self.checkouts = 0  # connections taken from the pool (tests)

    def holds(self, conn: AsyncConnection) -> bool:
        """Whether ``conn`` is the connection this lease lends."""
        return conn is self._conn

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[AsyncConnection]:
        """The connection, to this caller alone until the block ends; outside a transaction,
        for a caller that begins and ends its own."""
        async with self._lock:
            conn = await self._take()
            try:
                yield conn
            except BaseException:
                with contextlib.suppress(Exception):  # the error that ended the use goes on up
                    await self._drop()
                raise
            if conn.in_transaction() or (
                self.driver is not None and self.driver.raw.in_transaction
            ):
                await self._drop()  # not for the next user

    @contextlib.asynccontextmanager
    async def begin(self) -> AsyncIterator[AsyncConnection]:
        """A transaction on the connection, committed when the block ends without an error.

        On SQLite the driver opens it (``BEGIN IMMEDIATE``, inline when the lock is free) and
        SQLAlchemy's transaction joins it without a statement of its own: the connection a
        handler is given is in a transaction as SQLAlchemy sees it, so the handler's own
        ``conn.begin()`` is refused as it always was, and cannot end the batch's transaction
        halfway."""
        async with self.connection() as conn:
            driver = self.driver
            if driver is None:
                async with conn.begin():
                    yield conn
                return
            await driver.begin()  # if SQLAlchemy's then fails, connection() rolls it back
            async with conn.begin():  # joins: see sqlite_engine's begin hook
                yield conn

    async def close(self) -> None:
        """Give the connection back to the pool, once its current user is done with it (before
        the engine is disposed)."""
        async with self._lock:
            await self._drop()

    async def _take(self) -> AsyncConnection:
        conn = self._conn
        if conn is None or conn.closed or conn.invalidated:
            if conn is not None:
                with contextlib.suppress(Exception):
                    await self._drop()
            conn = await self.engine.connect()
            driver = (await conn.get_raw_connection()).driver_connection
            self.driver = driver if isinstance(driver, sqlite_driver.Connection) else None
            self._conn = conn
            self.checkouts += 1
        return conn

    async def _drop(self) -> None:
        """Back to the pool, any transaction left on it rolled back."""
        conn, driver, self._conn, self.driver = self._conn, self.driver, None, None
        try:
            if driver is not None:
                await driver.rollback()
        finally:
            if conn is not None:
                await conn.close()


def write_transaction(
    lease: WriterLease | None, engine: AsyncEngine
) -> AbstractAsyncContextManager[AsyncConnection]:
    """A write transaction: on the connection ``lease`` holds (SQLite), else ``engine``'s."""
    return lease.begin() if lease is not None else engine.begin()


def write_connection(
    lease: WriterLease | None, engine: AsyncEngine
) -> AbstractAsyncContextManager[AsyncConnection]:
    """A writer connection outside a transaction, for a caller that runs its own: the one
    ``lease`` holds (SQLite), else one of ``engine``'s."""
    return lease.connection() if lease is not None else engine.connect()
