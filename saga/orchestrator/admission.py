"""Admission control: at most ``SAGA_MAX_IN_FLIGHT`` sagas running in one orchestrator.

An orchestrator that takes every start it is given turns overload into compensations: its own
outbox, the participants' queues and the reply queue grow without bound, every step waits
longer in them, and steps time out that would have succeeded. With a bound on the sagas in
flight, the queues inside the system stay as long as the bound allows, and the excess waits
where it costs nothing and is durable: in the start queue, on the broker (a start delivered to
us waits unacknowledged for a slot). A start through the admin API gets 429 with Retry-After
instead; an in-process :meth:`~saga.orchestrator.service.OrchestratorService.start_saga` waits.

A saga holds its slot from the commit that started it until a commit in this process makes it
terminal (COMPLETED, COMPENSATED, FAILED). Sagas that were in flight when the process started
(recovered after a restart) hold slots too, so a recovery is not buried under new starts. With
several instances on PostgreSQL a saga this one started may end on another: :meth:`reconcile`
releases those from the store every few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable
from uuid import UUID

import structlog

__all__ = ["Admission", "InFlightLimitError"]

log = structlog.get_logger("saga.orchestrator")


class Admission:
    """Slots for sagas in flight; see the module docstring."""

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError("the in-flight limit is at least 1")
        self.limit = limit
        self._active: set[UUID] = set()
        self._reserved = 0
        self._changed = asyncio.Event()  # set when a slot may have come free
        #: starts that had to wait for a slot, and starts refused (the admin API's 429)
        self.waited = 0
        self.refused = 0

    @property
    def in_flight(self) -> int:
        return len(self._active)

    def full(self) -> bool:
        return len(self._active) + self._reserved >= self.limit

    def active(self) -> list[UUID]:
        return list(self._active)

    @contextlib.asynccontextmanager
    async def slot(self, *, wait: bool = True) -> AsyncIterator[None]:
        """Hold a slot while a start is decided and committed: waits for one (``wait``) or
        raises :class:`InFlightLimitError`. The commit makes it the saga's (:meth:`started`)."""
        if self.full():
            if not wait:
                self.refused += 1
                raise InFlightLimitError(self.limit)
            self.waited += 1
            while self.full():
                self._changed.clear()
                await self._changed.wait()
        self._reserved += 1  # no await since the check: slots are never overbooked
        try:
            yield
        finally:
            self._reserved -= 1
            self._wake()

    def started(self, saga_id: UUID) -> None:
        self._active.add(saga_id)

    def finished(self, saga_id: UUID) -> None:
        if saga_id in self._active:
            self._active.discard(saga_id)
            self._wake()

    def adopt(self, saga_ids: Iterable[UUID]) -> None:
        """Sagas found in flight at start-up (recovered): they hold slots until they end."""
        self._active.update(saga_ids)

    def release(self, saga_ids: Iterable[UUID]) -> None:
        """Sagas the store says have ended (on another instance)."""
        before = len(self._active)
        self._active.difference_update(saga_ids)
        if len(self._active) != before:
            self._wake()

    def _wake(self) -> None:
        if not self.full():
            self._changed.set()


class InFlightLimitError(Exception):
    """Every slot is taken: the start is refused now (the admin API answers 429)."""

    def __init__(self, limit: int):
        super().__init__(
            f"{limit} sagas are in flight (SAGA_MAX_IN_FLIGHT): try again shortly, or start "
            "through the start queue, where a start waits for a slot"
        )
        self.limit = limit
