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
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from saga.store.faults import database_fault

__all__ = ["PoisonGuard", "delivery_key"]


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
