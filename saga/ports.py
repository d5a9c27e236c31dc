"""The runtime's ports: what it needs from a store and a clock, as small interfaces.

Each port has an in-memory twin in the package (:mod:`saga.store.memory`,
:class:`saga.testing.FakeClock`) so sagas can be tested without a broker or a database, and one
contract test suite runs against every implementation.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol
from uuid import UUID

from saga.core.state import HistoryEntry, HistoryKind, SagaState, SagaStatus, Transition

__all__ = [
    "BrokerStats",
    "Change",
    "Clock",
    "CommitResult",
    "DueTimer",
    "OutboxMessage",
    "OutboxSource",
    "SagaFilter",
    "SpanSource",
    "Store",
    "SystemClock",
]


class Clock(Protocol):
    def now(self) -> datetime: ...


class SystemClock:
    """Wall-clock time in UTC. Only the runtime reads it; the engine is handed ``now``."""

    def now(self) -> datetime:
        return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class BrokerStats:
    """A broker connection's health as /metrics shows it: up or not, and how often it had to
    recover (a count that keeps growing means a flapping network or broker)."""

    connected: bool
    reconnects: int = 0
    consumer_repairs: int = 0
    #: the last thing that went wrong with the connection, for a start-up that did not finish
    last_failure: str | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    """A message committed with the state change that caused it, published later by the relay."""

    message_id: UUID
    saga_id: UUID
    exchange: str
    routing_key: str
    message_type: str
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)
    created_at: datetime = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Change:
    """One event's effect, applied all-or-nothing inside a (possibly shared) transaction.

    ``expected_version`` is None when the saga is created. ``inbox_id`` is the id of the
    consumed message; a second change with the same id is refused as a duplicate.
    """

    transition: Transition
    expected_version: int | None
    inbox_id: UUID | None = None
    outbox: tuple[OutboxMessage, ...] = ()
    #: spans of this work (``saga.telemetry.SpanRecord``), written with it when it is written
    #: (applied or recorded) and exported later by a drain; empty unless spans are exported
    spans: tuple[Mapping[str, Any], ...] = ()


class CommitResult(StrEnum):
    APPLIED = "applied"  # state, history and outbox written
    RECORDED = "recorded"  # an ignored event: only its history entry and inbox id written
    DUPLICATE = "duplicate"  # the inbox already held this message id: nothing written
    CONFLICT = "conflict"  # the saga's version moved (or it exists already): nothing written


@dataclass(frozen=True, slots=True)
class DueTimer:
    saga_id: UUID
    timer_id: UUID
    deadline: datetime


@dataclass(frozen=True, slots=True)
class SagaFilter:
    """Which sagas :meth:`Store.list_sagas` returns, ordered by ``(created_at, saga_id)``:
    oldest first, or newest first when ``newest_first`` (what an operator wants to see).

    Paging is by keyset, not offset: ``start_after`` (or the saga ``after``) is the last saga
    of the previous page, so pages never repeat or skip a saga while new ones are created.
    Every filter given must match; ``status`` and ``statuses`` together mean both.
    """

    status: SagaStatus | None = None
    name: str | None = None
    key: str | None = None
    limit: int = 100
    after: UUID | None = None  # keyset paging: the list continues past this saga
    statuses: frozenset[SagaStatus] = frozenset()  # any of these (empty: any status)
    since: datetime | None = None  # created at or after
    until: datetime | None = None  # created before
    #: the start of the saga id in hex (dashes and case ignored); 32 digits is the whole id
    id_prefix: str | None = None
    newest_first: bool = False
    #: keyset paging without a look-up: the (created_at, saga_id) of the previous page's last
    start_after: tuple[datetime, UUID] | None = None

    def __post_init__(self) -> None:
        if self.id_prefix is not None:
            digits = self.id_prefix.replace("-", "").lower()
            if len(digits) > 32 or digits.strip("0123456789abcdef"):
                raise ValueError(f"not a saga id or the start of one: {self.id_prefix!r}")
            object.__setattr__(self, "id_prefix", digits)

    def wanted_statuses(self) -> frozenset[SagaStatus] | None:
        """The statuses allowed, or None for any."""
        if self.status is None:
            return self.statuses or None
        wanted = frozenset({self.status})
        return wanted & self.statuses if self.statuses else wanted

    def id_bounds(self) -> tuple[UUID, UUID] | None:
        """The smallest and largest id starting with ``id_prefix``: a range on the primary
        key, which every backend orders as the 128-bit number (an index serves it)."""
        if self.id_prefix is None:
            return None
        return UUID(self.id_prefix.ljust(32, "0")), UUID(self.id_prefix.ljust(32, "f"))

    def matches(self, s: SagaState) -> bool:
        """Whether ``s`` passes every filter (paging aside)."""
        wanted = self.wanted_statuses()
        bounds = self.id_bounds()
        return (
            (wanted is None or s.status in wanted)
            and (self.name is None or s.name == self.name)
            and (self.key is None or s.key == self.key)
            and (self.since is None or s.created_at >= self.since)
            and (self.until is None or s.created_at < self.until)
            and (bounds is None or bounds[0] <= s.saga_id <= bounds[1])
        )


class OutboxSource(Protocol):
    """What the relay needs: rows to publish, and a way to mark them sent."""

    async def pending_outbox(self, limit: int) -> list[OutboxMessage]: ...

    async def mark_sent(self, message_ids: Sequence[UUID]) -> None: ...


class SpanSource(Protocol):
    """What the span drain needs: committed span records, handed to ``export`` and deleted
    once it returned (at-least-once: a crash in between exports them again)."""

    async def drain_spans(
        self, limit: int, export: Callable[[list[Mapping[str, Any]]], Awaitable[None]]
    ) -> int:
        """Export up to ``limit`` rows of records and delete them; returns how many rows.
        What ``export`` raises goes up, and the rows stay."""


class Store(Protocol):
    """Durable saga state with a transactional outbox and inbox."""

    async def setup(self) -> None:
        """Create or check the schema; fail with a clear message when it is not current."""

    async def close(self) -> None: ...

    async def load(self, saga_id: UUID) -> SagaState | None: ...

    async def load_many(self, saga_ids: Sequence[UUID]) -> dict[UUID, SagaState]:
        """The sagas found among ``saga_ids`` (one query for a whole batch)."""

    async def commit(self, changes: Sequence[Change]) -> list[CommitResult]:
        """Apply ``changes`` in one transaction; each one's result is independent."""

    async def due_timers(self, now: datetime, limit: int) -> list[DueTimer]: ...

    async def next_deadline(self) -> datetime | None:
        """The earliest deadline of any saga, due or not; None when no saga has one."""

    async def history(self, saga_id: UUID) -> list[HistoryEntry]: ...

    async def histories(
        self, saga_ids: Sequence[UUID], kinds: Collection[HistoryKind]
    ) -> dict[UUID, list[HistoryEntry]]:
        """The entries of ``kinds`` of every saga in ``saga_ids``, in order, in one query: what
        a page of the saga list needs to say why each saga went wrong."""

    async def pending_outbox(self, limit: int) -> list[OutboxMessage]: ...

    async def mark_sent(self, message_ids: Sequence[UUID]) -> None: ...

    async def list_sagas(self, query: SagaFilter) -> list[SagaState]: ...

    async def prune_inbox(self, before: datetime) -> int:
        """Forget ids of messages received before ``before``; returns how many.

        Safe once redeliveries are over: a reply that old no longer matches the command its saga
        awaits, so it would be ignored anyway, only without the inbox's shortcut.
        """
