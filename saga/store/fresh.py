"""The outbox as this process knows it, so the relay costs no extra transactions.

Two costs used to come with every relay flush: a read of the outbox table (woken after every
commit) and a transaction of its own to delete the rows the broker confirmed. On a busy
orchestrator or participant the two cost more CPU than the commit that wrote the rows, and the
delete held the single SQLite writer for a whole fsync. So:

* The store keeps a copy of every unsent row it committed and answers ``pending_outbox`` from
  it, exactly as the table would: rows stay until ``mark_sent``, so one that failed to publish
  is offered again. The copy is used only after a read of the table has shown it holds nothing
  else (fewer rows than asked for), and the table is read again at least every
  ``reread_every`` seconds, so rows written by another instance or left by a crash are found.
* Confirmed rows are deleted by the next write transaction the store runs anyway (one more
  statement in it), or by a transaction of their own once the oldest of them has waited
  ``delete_after`` seconds with no write coming. Until then they are left out of reads of the
  table. Half a second: a participant that gets a command every few tens of milliseconds (one
  per saga, sagas one at a time) then folds every delete into its next command's transaction,
  instead of paying a transaction (and an fsync on the single writer, in the next command's
  way) for each; after a crash, at most that much of confirmed rows is sent again. The wait is
  counted from each row's confirm, not from the sweeper's start: a sweeper that woke on a fixed
  beat found the row confirmed just before it and deleted it alone, one extra transaction every
  half second that the next command would have carried.

The table stays the truth: a row is deleted only after its confirm. A crash before the delete
lands re-sends the row, which at-least-once delivery and deduplication by message id allow.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from uuid import UUID

from saga.ports import OutboxMessage

__all__ = ["OutboxCopy"]


class OutboxCopy:
    def __init__(
        self,
        delete: Callable[[list[UUID]], Awaitable[None]],
        *,
        reread_every: float = 1.0,
        delete_after: float = 0.5,
        max_rows: int = 10_000,
    ):
        self._delete = delete  # a transaction of its own, for when no write comes
        self.reread_every = reread_every
        self.delete_after = delete_after
        self.max_rows = max_rows
        self._unsent: dict[UUID, OutboxMessage] = {}
        self._complete = False  # the copy holds every row of the table
        self._read_at = 0.0
        self._to_delete: list[UUID] = []  # confirmed; in no transaction yet
        self._confirmed_at: list[float] = []  # when each of them was confirmed (monotonic)
        self._deleting: set[UUID] = set()  # confirmed; delete not committed yet
        self._sweeper: asyncio.Task[None] | None = None

    # --- rows to send ------------------------------------------------------------------

    def add(self, messages: Iterable[OutboxMessage]) -> None:
        """Rows of a transaction that has committed."""
        for m in messages:
            self._unsent[m.message_id] = m
        if len(self._unsent) > self.max_rows:
            self._unsent.clear()
            self._complete = False

    def pending(self, limit: int) -> list[OutboxMessage] | None:
        """The first ``limit`` unsent rows, or None when the table must be read instead."""
        if not self._complete or time.monotonic() - self._read_at > self.reread_every:
            return None
        return [m for m, _ in zip(self._unsent.values(), range(limit), strict=False)]

    def read(self, rows: Sequence[OutboxMessage], limit: int) -> list[OutboxMessage]:
        """Take in what a read of the table returned; returns the rows not yet sent."""
        unsent = [m for m in rows if m.message_id not in self._deleting]
        for m in unsent:
            self._unsent.setdefault(m.message_id, m)
        self._complete = len(rows) < limit
        self._read_at = time.monotonic()
        return unsent

    def claimed(self, rows: Sequence[OutboxMessage], limit: int) -> list[OutboxMessage]:
        """Take in rows this instance just claimed (several instances on one database): with
        the rows it wrote itself they are everything it has to send, so the copy is complete
        once a claim found fewer rows than asked for."""
        for m in rows:
            if m.message_id not in self._deleting:
                self._unsent.setdefault(m.message_id, m)
        self._complete = len(rows) < limit
        self._read_at = time.monotonic()
        return [m for m, _ in zip(self._unsent.values(), range(limit), strict=False)]

    # --- rows sent -----------------------------------------------------------------------

    def sent(self, message_ids: Sequence[UUID]) -> None:
        """The broker confirmed ``message_ids``: delete them soon."""
        for message_id in message_ids:
            self._unsent.pop(message_id, None)
        self._wait(message_ids, front=False)

    def _wait(self, message_ids: Sequence[UUID], *, front: bool) -> None:
        """Queue ``message_ids`` for a delete, confirmed now."""
        if not message_ids:
            return
        at = [time.monotonic()] * len(message_ids)
        if front:  # given back by a transaction that failed: before the newer ones
            self._to_delete[:0] = message_ids
            self._confirmed_at[:0] = at
        else:
            self._to_delete.extend(message_ids)
            self._confirmed_at.extend(at)
        self._deleting.update(message_ids)
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    def take_deletes(self) -> list[UUID]:
        """Confirmed rows for the caller's write transaction to delete; report its end with
        :meth:`deletes_done`."""
        taken, self._to_delete = self._to_delete[:2000], self._to_delete[2000:]
        del self._confirmed_at[:2000]
        return taken

    def deletes_done(self, message_ids: list[UUID], *, committed: bool) -> None:
        if committed:
            self._deleting.difference_update(message_ids)
        else:
            self._wait(message_ids, front=True)

    async def _sweep(self) -> None:
        """Delete the confirmed rows once the oldest has waited ``delete_after`` seconds for
        a write transaction to take them; ends when none is left."""
        while self._to_delete:
            wait = self._confirmed_at[0] + self.delete_after - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            taken = self.take_deletes()
            try:
                await self._delete(taken)
            except Exception:  # the table keeps them; sent again after a restart at worst
                self.deletes_done(taken, committed=False)
                await asyncio.sleep(1.0)
            else:
                self.deletes_done(taken, committed=True)

    async def close(self) -> None:
        """Delete what is still waiting (best effort) and stop the sweeper."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(BaseException):
                await self._sweeper
        taken = self.take_deletes()
        if taken:
            with contextlib.suppress(Exception):
                await self._delete(taken)
