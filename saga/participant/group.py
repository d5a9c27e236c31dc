"""Group commit: the commands that arrive while a transaction is in flight share the next one.

A participant's cost per command is mostly fixed per transaction (BEGIN, COMMIT with its fsync,
the connection checkout), so committing the commands that queued up meanwhile together raises
throughput without delaying a lone command: a command that finds nothing in flight is committed
at once, alone. Each caller still waits for the commit that holds its own command, so a
message is acked only after its effects are durable. If a shared transaction fails, every
command of it is tried again in a transaction of its own, so one bad command cannot fail the
others that happened to share its batch (unless the database itself is down).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from saga.store.faults import database_fault

__all__ = ["GroupCommit"]

T = TypeVar("T")
R = TypeVar("R")


class GroupCommit(Generic[T, R]):
    """Feeds items to ``apply`` in batches of at most ``max_batch``, one batch at a time.

    ``apply`` runs one transaction for the whole batch and returns one result per item, in
    order; raising means nothing of the batch was committed.
    """

    def __init__(self, apply: Callable[[Sequence[T]], Awaitable[list[R]]], max_batch: int = 128):
        self._apply = apply
        self.max_batch = max_batch
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._draining: asyncio.Task[None] | None = None
        self.batches = 0  # transactions committed, for tests and tuning

    async def submit(self, item: T) -> R:
        """Queue ``item``; returns its result once the transaction holding it committed."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._draining is None or self._draining.done():
            self._draining = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._pending:
            batch = self._pending[: self.max_batch]
            del self._pending[: self.max_batch]
            try:
                results = await self._apply([item for item, _ in batch])
            except Exception as exc:
                if len(batch) == 1 or database_fault(exc):  # down: each alone would fail too
                    for _, future in batch:
                        _settle(future, exc)
                    continue
                for item, future in batch:  # alone, so only the bad one fails
                    try:
                        alone = await self._apply([item])
                    except Exception as single:
                        _settle(future, single)
                    else:
                        self.batches += 1
                        _settle(future, alone[0])
                continue
            except BaseException:  # cancelled: the waiters must not hang
                for _, future in [*batch, *self._pending]:
                    future.cancel()
                self._pending.clear()
                raise
            self.batches += 1
            for (_, future), result in zip(batch, results, strict=True):
                _settle(future, result)


def _settle(future: asyncio.Future[R], outcome: R | BaseException) -> None:
    """Resolve a waiter unless it gave up (its task was cancelled); the commit stands anyway."""
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
