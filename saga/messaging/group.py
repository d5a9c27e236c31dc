"""Group commit: what arrives while a transaction is in flight shares the next one.

The cost of a transaction is mostly fixed (BEGIN, COMMIT with its fsync, a connection
checkout), so committing together whatever queued up meanwhile raises throughput without
delaying a lone item: an item that finds nothing in flight is committed at once, alone. Each
caller waits for the commit that holds its own item, so a message is acked only after its
effects are durable.

The orchestrator (events on sagas) and every participant (commands on its ledger) use this one
implementation. ``apply`` answers each item of a batch with one of:

* a result, handed to that item's caller;
* an exception, raised to that item's caller only (a decision that failed, a version conflict
  retried too often);
* :data:`REQUEUE`: decide this item again, first in the next batch, on fresh state (a version
  conflict with another writer).

If the shared transaction itself fails, every item of it is tried again in a transaction of its
own, so one bad item cannot fail the others that happened to share its batch, unless the
database is down (:func:`saga.store.faults.database_fault`): then each alone would fail alike.
A transaction the database rolled back to break a deadlock or a serialization conflict with
another writer (PostgreSQL, several instances) did nothing: the batch runs again at once, a few
times, before its items are failed; otherwise every message of the batch would go back to its
queue for a second, long enough for steps to time out. So does a batch that met a dead pooled
connection (the pools do not ping each connection they hand out): if its commit went through
after all, the second run finds its inbox ids and ledger rows and changes nothing.
"""

from __future__ import annotations

import asyncio
import enum
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from saga.store.faults import database_fault, rolled_back, stale_connection

__all__ = ["REQUEUE", "Apply", "GroupCommit", "Requeue"]

T = TypeVar("T")
R = TypeVar("R")


class Requeue(enum.Enum):
    """The type of :data:`REQUEUE`."""

    REQUEUE = "requeue"


REQUEUE = Requeue.REQUEUE

Apply = Callable[[Sequence[T]], Awaitable[Sequence[R | BaseException | Requeue]]]


class GroupCommit(Generic[T, R]):
    """Feeds items to ``apply`` in batches of at most ``max_batch``, one batch at a time.

    ``apply`` runs one transaction for the whole batch and answers each item, in order;
    raising means nothing of the batch was committed.
    """

    #: runs of a batch that the database rolled back (deadlock, serialization) before giving up
    ROLLED_BACK_RUNS = 5
    #: of which at most this many after a dead pooled connection (a server restart leaves a
    #: few in the pool; more means the server is down: the batch fails and waits its turn)
    STALE_RUNS = 2

    def __init__(self, apply: Apply[T, R], max_batch: int = 128):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._apply = apply
        self.max_batch = max_batch
        self.rolled_back = 0  # batches run again after the database rolled them back
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._draining: asyncio.Task[None] | None = None
        self.batches = 0  # transactions committed, for tests, metrics and tuning

    async def submit(self, item: T) -> R:
        """Queue ``item``; returns its answer once the transaction holding it committed."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._draining is None or self._draining.done():
            self._draining = asyncio.create_task(self._drain())
        return await future

    async def drained(self) -> None:
        """Wait until nothing is queued or being committed (used on shutdown)."""
        while self._draining is not None and not self._draining.done():
            await asyncio.shield(self._draining)

    async def _drain(self) -> None:
        while self._pending:
            batch = self._pending[: self.max_batch]
            del self._pending[: self.max_batch]
            try:
                again = await self._commit(batch)
            except BaseException:  # cancelled: no waiter may hang
                for _, future in [*batch, *self._pending]:
                    future.cancel()
                self._pending.clear()
                raise
            self._pending[:0] = again

    async def _commit(
        self, batch: list[tuple[T, asyncio.Future[R]]]
    ) -> list[tuple[T, asyncio.Future[R]]]:
        """Commit ``batch``; returns the items to decide again."""
        try:
            answers = await self._run([item for item, _ in batch])
        except Exception as exc:
            if len(batch) == 1 or database_fault(exc):
                for _, future in batch:
                    _settle(future, exc)
                return []
            again: list[tuple[T, asyncio.Future[R]]] = []
            for pair in batch:  # alone, so only the bad one fails
                again += await self._commit([pair])
            return again
        self.batches += 1
        again = []
        for pair, answer in zip(batch, answers, strict=True):
            if answer is REQUEUE:
                again.append(pair)
            else:
                _settle(pair[1], answer)
        return again

    async def _run(self, items: list[T]) -> Sequence[R | BaseException | Requeue]:
        """``apply``, again while the database rolls the transaction back to break a deadlock
        (after a short random pause, so the two sides do not collide again)."""
        runs = stale = 0
        while True:
            runs += 1
            try:
                return await self._apply(items)
            except Exception as exc:
                if runs >= self.ROLLED_BACK_RUNS:
                    raise
                if stale_connection(exc) and stale < self.STALE_RUNS:
                    stale += 1  # the pool has dropped it: the next run gets a fresh one
                    continue
                if not rolled_back(exc):
                    raise
                self.rolled_back += 1
                await asyncio.sleep(random.uniform(0.002, 0.02) * runs)


def _settle(future: asyncio.Future[R], answer: R | BaseException) -> None:
    """Resolve a waiter unless it gave up (its task was cancelled); the commit stands anyway."""
    if future.done():
        return
    if isinstance(answer, BaseException):
        future.set_exception(answer)
    else:
        future.set_result(answer)
