"""The orchestrator's application core: load, decide, commit, with group commit.

Every inbound event (a start, a reply, a due timer, an operator action) goes through
:meth:`Orchestrator.submit`. Events that arrive while a commit is in flight are decided one after
another against the freshest state and written in ONE transaction; each keeps its own version
check and inbox entry, so the batch is all-or-nothing per event, not per batch. Decisions are
the pure :func:`saga.core.engine.decide`; this module only does the loading and writing around
it, which is why the in-memory harness and the RabbitMQ service share it unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any
from uuid import UUID

import structlog
from opentelemetry import context as otel_context

from contracts.envelope import ReplyEnvelope
from saga.core.definition import Registry, SagaDefinition
from saga.core.engine import decide
from saga.core.errors import ConcurrencyError, MessageError, UnknownSagaError
from saga.core.ids import command_id, saga_id_for_key
from saga.core.state import (
    JSON,
    Event,
    HistoryEntry,
    HistoryKind,
    OperatorAbort,
    OperatorResolve,
    OperatorRetry,
    SagaState,
    Started,
    TimerFired,
    Transition,
)
from saga.orchestrator.codec import COMMANDS_EXCHANGE, REPLY_QUEUE, encode_command, reply_event
from saga.ports import Change, Clock, CommitResult, Store, SystemClock
from saga.store.faults import database_fault
from saga.telemetry import Metrics, Tracing, attempt_ended, span_id_for

__all__ = ["Orchestrator", "Outcome", "Result"]

log = structlog.get_logger("saga.orchestrator.runtime")

_MAX_CONFLICT_RETRIES = 20


class Outcome(StrEnum):
    APPLIED = "applied"  # the saga changed
    IGNORED = "ignored"  # recorded in the history with the reason, state unchanged
    DUPLICATE = "duplicate"  # this message was applied before; nothing to do


@dataclass(frozen=True, slots=True)
class Result:
    outcome: Outcome
    state: SagaState
    transition: Transition | None = None


@dataclass(slots=True)
class _Item:
    saga_id: UUID
    event: Event
    inbox_id: UUID | None
    definition: SagaDefinition | None  # known for a start; looked up from the state otherwise
    future: asyncio.Future[Result]
    trace: otel_context.Context  # the submitter's, for the span of this event's commit
    conflicts: int = 0


class Orchestrator:
    """Applies events to sagas; the transport and the relay live outside it."""

    def __init__(
        self,
        registry: Registry,
        store: Store,
        *,
        clock: Clock | None = None,
        reply_to: str = REPLY_QUEUE,
        commands_exchange: str = COMMANDS_EXCHANGE,
        max_batch: int = 128,
        on_commit: Callable[[], None] | None = None,
        tracing: Tracing | None = None,
        metrics: Metrics | None = None,
        database_system: str = "sqlite",
    ):
        self.registry = registry
        self.store = store
        self.clock: Clock = clock or SystemClock()
        self.reply_to = reply_to
        self.commands_exchange = commands_exchange
        self.max_batch = max_batch
        self.on_commit = on_commit  # wakes the relay right after outbox rows were committed
        self.tracing = tracing if tracing is not None else Tracing()
        self.metrics = metrics
        self.database_system = database_system
        self._pending: list[_Item] = []
        self._draining: asyncio.Task[None] | None = None
        self.batches = 0  # commits made, for tests and metrics
        self.events = 0  # events decided

    # --- public entry points -------------------------------------------------------------

    async def start(
        self,
        name: str,
        input: Mapping[str, JSON],
        *,
        key: str | None = None,
        version: int | None = None,
        inbox_id: UUID | None = None,
        trace_parent: Mapping[str, Any] | None = None,
    ) -> SagaState:
        """Start a saga, or return the one already started with this ``key``.

        Its trace continues ``trace_parent`` (a carrier such as a message's headers) or the
        current span; without either it is the root of a new trace."""
        definition = self.registry.get(name, version)
        saga_id = saga_id_for_key(name, key) if key is not None else uuid.uuid4()
        existing = await self.store.load(saga_id)
        if existing is not None:
            return existing
        trace = self.tracing.saga_trace(definition.name, trace_parent)
        result = await self.submit(
            saga_id,
            Started(saga_id, dict(input), key, trace),
            inbox_id=inbox_id,
            definition=definition,
        )
        return result.state

    async def handle_reply(self, reply: ReplyEnvelope) -> Result:
        """Apply a participant's reply; raises :class:`MessageError` for an unknown saga."""
        return await self.submit(reply.saga_id, reply_event(reply), inbox_id=reply.message_id)

    async def fire_due_timers(self, limit: int = 500) -> int:
        """Fire every deadline that has passed; returns how many changed a saga."""
        due = await self.store.due_timers(self.clock.now(), limit)
        results = await asyncio.gather(
            *(self.submit(t.saga_id, TimerFired(t.timer_id)) for t in due),
            return_exceptions=True,
        )
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, MessageError):
                raise r
        return sum(1 for r in results if isinstance(r, Result) and r.outcome is Outcome.APPLIED)

    async def retry(self, saga_id: UUID, *, actor: str, reason: str) -> Result:
        return await self.submit(saga_id, OperatorRetry(actor, reason))

    async def abort(self, saga_id: UUID, *, actor: str, reason: str) -> Result:
        return await self.submit(saga_id, OperatorAbort(actor, reason))

    async def resolve(
        self,
        saga_id: UUID,
        *,
        actor: str,
        reason: str,
        data: Mapping[str, JSON] | None = None,
    ) -> Result:
        return await self.submit(saga_id, OperatorResolve(actor, reason, dict(data or {})))

    async def get(self, saga_id: UUID) -> SagaState:
        state = await self.store.load(saga_id)
        if state is None:
            raise UnknownSagaError(f"no saga with id {saga_id}")
        return state

    async def history(self, saga_id: UUID) -> list[HistoryEntry]:
        return await self.store.history(saga_id)

    # --- group commit --------------------------------------------------------------------

    async def submit(
        self,
        saga_id: UUID,
        event: Event,
        *,
        inbox_id: UUID | None = None,
        definition: SagaDefinition | None = None,
    ) -> Result:
        """Queue one event; resolves once its transaction committed."""
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._pending.append(
            _Item(saga_id, event, inbox_id, definition, future, otel_context.get_current())
        )
        if self._draining is None or self._draining.done():
            self._draining = asyncio.create_task(self._drain())
        return await future

    async def drained(self) -> None:
        """Wait until no event is queued or being committed (used on shutdown)."""
        while self._draining is not None and not self._draining.done():
            await asyncio.shield(self._draining)

    async def _drain(self) -> None:
        while self._pending:
            batch = self._pending[: self.max_batch]
            del self._pending[: self.max_batch]
            self._pending[:0] = await self._commit_batch(batch)

    async def _commit_batch(self, batch: list[_Item]) -> list[_Item]:
        """Process ``batch``; returns the items to decide again (version conflicts)."""
        try:
            return await self._process(batch)
        except BaseException as exc:  # the store failed: nothing of this batch is committed
            if isinstance(exc, Exception) and len(batch) > 1 and not database_fault(exc):
                # One event's write failed the shared transaction (a poison message): commit
                # each alone, so only that one fails and its batch-mates go through. Not when
                # the database is down: every one of them would fail alike, one by one.
                retry: list[_Item] = []
                for item in batch:
                    if item.future.done() and not item.future.cancelled():
                        continue  # answered already: its decision failed, nothing to write
                    retry += await self._commit_batch([item])
                return retry
            for item in batch:
                _settle(item, exc)
            if not isinstance(exc, Exception):
                raise
            return []

    async def _process(self, batch: list[_Item]) -> list[_Item]:
        now = self.clock.now()
        loaded = await self.store.load_many(list({item.saga_id: None for item in batch}))
        working: dict[UUID, SagaState | None] = dict(loaded)
        decided: list[tuple[_Item, Change]] = []
        before: list[SagaState | None] = []
        for item in batch:
            state = working.get(item.saga_id)
            try:
                change = self._decide(item, state, now)
            except MessageError as exc:
                _settle(item, exc)
                continue
            except Exception as exc:  # a bug deciding one event must not fail its batch-mates
                _settle(item, MessageError("decide_failed", f"{type(exc).__name__}: {exc}"))
                continue
            if change.transition.applied:
                working[item.saga_id] = change.transition.state
            decided.append((item, change))
            before.append(state)
            self.events += 1
        if not decided:
            return []
        began = time.time_ns()
        results = await self.store.commit([change for _, change in decided])
        ended = time.time_ns()
        self.batches += 1
        wrote_outbox = any(
            r in (CommitResult.APPLIED, CommitResult.RECORDED) and c.outbox
            for (_, c), r in zip(decided, results, strict=True)
        )
        if wrote_outbox and self.on_commit is not None:
            self.on_commit()  # first: the relay must hear of rows even if a caller is gone
        retry: list[_Item] = []
        for (item, change), result, prior in zip(decided, results, before, strict=True):
            self.tracing.database(self.database_system, item.trace, began, ended, len(decided))
            if result is CommitResult.APPLIED:
                self._observe(prior, change.transition)
            if result is CommitResult.CONFLICT:
                if isinstance(item.event, Started):
                    existing = await self.store.load(item.saga_id)
                    if existing is not None:
                        _settle(item, Result(Outcome.DUPLICATE, existing))
                        continue
                item.conflicts += 1
                if item.conflicts > _MAX_CONFLICT_RETRIES:
                    _settle(item, ConcurrencyError(f"saga {item.saga_id} kept changing under us"))
                else:
                    retry.append(item)
            elif result is CommitResult.DUPLICATE:
                _settle(item, Result(Outcome.DUPLICATE, change.transition.state))
            else:
                outcome = Outcome.APPLIED if result is CommitResult.APPLIED else Outcome.IGNORED
                _settle(item, Result(outcome, change.transition.state, change.transition))
        return retry

    def _decide(self, item: _Item, state: SagaState | None, now: datetime) -> Change:
        if state is None and not isinstance(item.event, Started):
            raise MessageError("unknown_saga", f"no saga with id {item.saga_id}")
        if state is not None:
            try:
                definition = self.registry.get(state.name, state.definition_version)
            except UnknownSagaError as exc:
                raise MessageError("unknown_definition", str(exc)) from exc
        else:
            assert item.definition is not None
            definition = item.definition
        transition = decide(definition, state, item.event, now)
        outbox = tuple(
            encode_command(
                c,
                now=now,
                reply_to=self.reply_to,
                exchange=self.commands_exchange,
                headers=Tracing.command_headers(transition.state, c.message_id),
            )
            for c in transition.commands
        )
        return Change(
            transition,
            expected_version=None if state is None else state.version,
            inbox_id=item.inbox_id,
            outbox=outbox,
        )

    def _observe(self, before: SagaState | None, transition: Transition) -> None:
        """Spans, metrics and log lines of a committed transition: after the commit, so they
        report only what is durable."""
        after = transition.state
        end = after.updated_at
        ended = attempt_ended(before, transition)
        if ended is not None and before is not None:
            outcome, detail = ended
            self.tracing.end_attempt(before, end, outcome, detail)
            if self.metrics is not None:
                self.metrics.attempt(before, outcome, end)
        if self.metrics is not None:
            self.metrics.transition(before, transition)
        finished = after.status.is_terminal and (before is None or not before.status.is_terminal)
        if finished:
            self.tracing.end_saga(after, end)
        debug = log.is_enabled_for(logging.DEBUG)
        for entry in transition.history:
            if entry.kind in _QUIET and not debug:
                continue
            (log.debug if entry.kind in _QUIET else log.info)(
                entry.kind.value,
                saga_id=str(after.saga_id),
                saga_name=after.name,
                step=entry.step,
                direction=None if entry.direction is None else entry.direction.value,
                attempt=entry.attempt,
                detail=entry.detail,
                **_message_fields(after, entry),
            )


#: history entries logged at debug only: one per message, the bulk of a healthy saga's story
_QUIET = frozenset({HistoryKind.COMMAND_SENT, HistoryKind.STEP_SUCCEEDED})


def _message_fields(state: SagaState, entry: HistoryEntry) -> dict[str, str]:
    """message_id, trace_id and span_id of a history entry: those of the command attempt it is
    about when it names one, else the saga's own span."""
    message_id = entry.message_id
    if message_id is None and entry.step and entry.direction and entry.attempt:
        message_id = command_id(state.saga_id, entry.step, entry.direction.value, entry.attempt)
    fields = {} if message_id is None else {"message_id": str(message_id)}
    parts = (state.trace or {}).get("traceparent", "").split("-")
    if len(parts) == 4:
        fields["trace_id"] = parts[1]
        fields["span_id"] = parts[2] if message_id is None else f"{span_id_for(message_id):016x}"
    return fields


def _settle(item: _Item, outcome: Result | BaseException) -> None:
    """Resolve a submitter's future, unless it gave up waiting (its task was cancelled): the
    commit happened regardless, and the other events of the batch must still be settled."""
    if item.future.done():
        return
    if isinstance(outcome, BaseException):
        item.future.set_exception(outcome)
    else:
        item.future.set_result(outcome)
