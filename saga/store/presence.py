"""This instance's presence on PostgreSQL, so others can take over its claims the moment it dies.

Several orchestrator instances share one database. Each claims the outbox rows it publishes and
the due timers it fires (``claimed_until``, a few seconds ahead) so the others leave them alone.
A claim with only a time on it outlives a killed instance: its commands wait unsent until the
claim runs out, and meanwhile their steps' deadlines pass. So every claim also names its
instance (``claimed_by``), and each instance holds a session-level advisory lock on its number
for as long as it lives, on a connection of its own. PostgreSQL releases that lock the moment
the session ends: the process was killed (the kernel closes its socket), it exited, or its
connection broke. A claim whose instance holds no lock is free at once; the time on it remains
for what PostgreSQL cannot see (an instance cut off from the broker but not from the database).

The locks live in the two-key advisory space under :data:`LOCK_CLASS`, one per instance number,
visible to every session of the database in ``pg_locks``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random

import sqlalchemy as sa
import structlog
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

__all__ = ["LOCK_CLASS", "Presence", "live_instances"]

log = structlog.get_logger("saga.store")

#: the first key of every instance's advisory lock ("sagI" in ASCII)
LOCK_CLASS = 0x73616749

_pg_locks = sa.table(
    "pg_locks",
    sa.column("locktype", sa.Text),
    sa.column("database", sa.Integer),
    sa.column("classid", sa.BigInteger),
    sa.column("objid", sa.BigInteger),
    sa.column("objsubid", sa.Integer),
    sa.column("granted", sa.Boolean),
)
_pg_database = sa.table("pg_database", sa.column("oid", sa.Integer), sa.column("datname", sa.Text))


def live_instances() -> sa.ScalarSelect[int]:
    """The numbers of the instances alive now: those whose advisory lock is held."""
    here = (
        sa.select(_pg_database.c.oid)
        .where(_pg_database.c.datname == sa.func.current_database())
        .scalar_subquery()
    )
    return (
        sa.select(sa.cast(sa.cast(_pg_locks.c.objid, sa.Text), sa.BigInteger))
        .where(_pg_locks.c.locktype == "advisory")
        .where(_pg_locks.c.database == here)
        .where(sa.cast(sa.cast(_pg_locks.c.classid, sa.Text), sa.BigInteger) == LOCK_CLASS)
        .where(_pg_locks.c.objsubid == 2)
        .where(_pg_locks.c.granted)
        .scalar_subquery()
    )


class Presence:
    """Holds this instance's advisory lock on a connection of its own, and takes it again if
    that connection breaks (under a new number if need be: claims under the old one are then
    free, which only means another instance may publish them too; receivers dedupe)."""

    #: seconds between checks that the lock's connection is still alive
    CHECK_EVERY = 2.0

    def __init__(self, engine: AsyncEngine):
        self._engine = engine
        self._connection: AsyncConnection | None = None
        self._task: asyncio.Task[None] | None = None
        #: this instance's number (1 .. 2**31-1), known after start()
        self.instance: int = 0

    async def start(self) -> None:
        await self._lock()
        self._task = asyncio.create_task(self._watch(), name="saga-presence")

    async def _lock(self) -> None:
        connection = await self._engine.connect()
        try:
            for _ in range(100):
                number = self.instance or random.randint(1, 2**31 - 1)
                taken = await connection.scalar(
                    sa.text("SELECT pg_try_advisory_lock(:class, :number)"),
                    {"class": _signed(LOCK_CLASS), "number": number},
                )
                await connection.commit()  # the lock is the session's, not the transaction's
                if taken:
                    self.instance = number
                    self._connection = connection
                    return
                self.instance = 0  # held by another session: draw again
            raise RuntimeError("no free instance number for the presence lock")
        except BaseException:
            with contextlib.suppress(Exception):
                await connection.close()
            raise

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.CHECK_EVERY)
            try:
                assert self._connection is not None
                await self._connection.scalar(sa.text("SELECT 1"))
                await self._connection.commit()
            except Exception as exc:
                log.warning("presence_lost", instance=self.instance, error=repr(exc))
                await self._drop()
                try:
                    await self._lock()
                    log.info("presence_restored", instance=self.instance)
                except Exception as again:
                    log.warning("presence_restore_failed", error=repr(again))

    async def _drop(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        await self._drop()  # the session ends: PostgreSQL releases the lock


def _signed(value: int) -> int:
    """An int4 key as PostgreSQL's signed integer takes it."""
    return value - 2**32 if value >= 2**31 else value
