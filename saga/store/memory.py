"""The in-memory twin of the SQL store: same contract, nothing survives the process.

Meant for tests and the harness; the orchestrator service refuses it unless asked explicitly.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Sequence
from datetime import UTC, datetime
from uuid import UUID

from saga.core.state import HistoryEntry, HistoryKind, Phase, SagaState
from saga.ports import Change, CommitResult, DueTimer, OutboxMessage, SagaFilter

__all__ = ["MemoryStore"]

#: a later change to the same saga in one batch was decided on top of these, so it must not land
_NOT_WRITTEN = (CommitResult.CONFLICT, CommitResult.DUPLICATE)


class MemoryStore:
    def __init__(self) -> None:
        self._sagas: dict[UUID, SagaState] = {}
        self._order: list[UUID] = []
        self._history: dict[UUID, list[HistoryEntry]] = {}
        self._outbox: dict[UUID, OutboxMessage] = {}
        self._sent: set[UUID] = set()
        self._inbox: dict[UUID, datetime] = {}
        self._keys: set[tuple[str, str]] = set()
        self._lock = asyncio.Lock()

    async def setup(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def load(self, saga_id: UUID) -> SagaState | None:
        return self._sagas.get(saga_id)

    async def load_many(self, saga_ids: Sequence[UUID]) -> dict[UUID, SagaState]:
        return {i: self._sagas[i] for i in saga_ids if i in self._sagas}

    async def commit(self, changes: Sequence[Change]) -> list[CommitResult]:
        async with self._lock:
            results: list[CommitResult] = []
            broken: set[UUID] = set()  # sagas whose earlier change in this batch did not land
            for change in changes:
                saga_id = change.transition.state.saga_id
                if saga_id in broken:
                    results.append(CommitResult.CONFLICT)
                    continue
                result = self._apply(change)
                if change.transition.applied and result in _NOT_WRITTEN:
                    broken.add(saga_id)
                results.append(result)
            return results

    def _apply(self, change: Change) -> CommitResult:
        if change.inbox_id is not None and change.inbox_id in self._inbox:
            return CommitResult.DUPLICATE
        new = change.transition.state
        current = self._sagas.get(new.saga_id)
        if change.transition.applied:
            if change.expected_version is None:
                key = None if new.key is None else (new.name, new.key)
                if current is not None or key in self._keys:
                    return CommitResult.CONFLICT
                if key is not None:
                    self._keys.add(key)
                self._order.append(new.saga_id)
            elif current is None or current.version != change.expected_version:
                return CommitResult.CONFLICT
            self._sagas[new.saga_id] = new
            for message in change.outbox:
                self._outbox.setdefault(message.message_id, message)
        if change.inbox_id is not None:
            self._inbox[change.inbox_id] = datetime.now(UTC)
        self._history.setdefault(new.saga_id, []).extend(change.transition.history)
        return CommitResult.APPLIED if change.transition.applied else CommitResult.RECORDED

    async def due_timers(self, now: datetime, limit: int) -> list[DueTimer]:
        due = [
            DueTimer(s.saga_id, s.awaiting, s.deadline)
            for s in self._sagas.values()
            if s.phase is not Phase.IDLE
            and s.awaiting is not None
            and s.deadline is not None
            and s.deadline <= now
        ]
        due.sort(key=lambda t: t.deadline)
        return due[:limit]

    async def next_deadline(self) -> datetime | None:
        """Earliest armed deadline; lets the harness jump the clock straight to it."""
        deadlines = [
            s.deadline
            for s in self._sagas.values()
            if s.phase is not Phase.IDLE and s.deadline is not None
        ]
        return min(deadlines, default=None)

    async def prune_inbox(self, before: datetime) -> int:
        old = [i for i, at in self._inbox.items() if at < before]
        for i in old:
            del self._inbox[i]
        return len(old)

    async def history(self, saga_id: UUID) -> list[HistoryEntry]:
        return list(self._history.get(saga_id, []))

    async def histories(
        self, saga_ids: Sequence[UUID], kinds: Collection[HistoryKind]
    ) -> dict[UUID, list[HistoryEntry]]:
        return {i: [h for h in self._history.get(i, []) if h.kind in kinds] for i in set(saga_ids)}

    async def pending_outbox(self, limit: int) -> list[OutboxMessage]:
        pending = [m for m in self._outbox.values() if m.message_id not in self._sent]
        return pending[:limit]

    async def mark_sent(self, message_ids: Sequence[UUID]) -> None:
        self._sent.update(message_ids)

    async def list_sagas(self, query: SagaFilter) -> list[SagaState]:
        # the SQL store's order exactly, so one contract suite pages through both alike
        ordered = sorted(
            (self._sagas[i] for i in self._order),
            key=lambda s: (s.created_at, s.saga_id),
            reverse=query.newest_first,
        )
        position = query.start_after
        if position is None and query.after is not None and query.after in self._sagas:
            anchor = self._sagas[query.after]
            position = (anchor.created_at, anchor.saga_id)
        found: list[SagaState] = []
        for s in ordered:
            if position is not None:
                here = (s.created_at, s.saga_id)
                if (here <= position) if not query.newest_first else (here >= position):
                    continue
            if not query.matches(s):
                continue
            found.append(s)
            if len(found) >= query.limit:
                break
        return found
