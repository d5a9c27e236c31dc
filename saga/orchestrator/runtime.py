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
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, cast
from uuid import UUID

import structlog
from opentelemetry import context as otel_context
from opentelemetry.trace import SpanKind
from pydantic import ValidationError
from pydantic_core import PydanticSerializationError, to_json

from saga.core.definition import Registry, SagaDefinition
from saga.core.engine import decide, reply_mismatch
from saga.core.errors import (
    ConcurrencyError,
    FieldError,
    InvalidInputError,
    MessageError,
    UnknownSagaError,
)
from saga.core.ids import command_id, saga_id_for_key
from saga.core.state import (
    JSON,
    Event,
    HistoryEntry,
    HistoryKind,
    OperatorAbort,
    OperatorResolve,
    OperatorRetry,
    Phase,
    ReplyFailed,
    ReplySucceeded,
    SagaState,
    Started,
    TimerFired,
    Transition,
)
from saga.messaging.group import REQUEUE, GroupCommit, Requeue
from saga.orchestrator.admission import Admission
from saga.orchestrator.codec import COMMANDS_EXCHANGE, REPLY_QUEUE, encode_command, reply_event
from saga.ports import Change, Clock, CommitResult, Store, SystemClock
from saga.protocol.envelope import ReplyEnvelope
from saga.telemetry import Metrics, Tracing, attempts_ended, business_attributes, span_id_for

__all__ = ["Orchestrator", "Outcome", "Result", "validated_input"]

log = structlog.get_logger("saga.orchestrator.runtime")

_MAX_CONFLICT_RETRIES = 20
_CONSUMER = SpanKind.CONSUMER.value


class Outcome(StrEnum):
    APPLIED = "applied"  # the saga changed
    IGNORED = "ignored"  # recorded in the history with the reason, state unchanged
    REJECTED = "rejected"  # an operator action the state refuses: nothing written at all
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
        admission: Admission | None = None,
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
        #: the bound on sagas in flight (None: none), see saga.orchestrator.admission
        self.admission = admission
        self._group: GroupCommit[_Item, Result] = GroupCommit(self._process, max_batch)
        self.events = 0  # events decided

    # --- public entry points -------------------------------------------------------------

    async def begin(
        self,
        name: str,
        input: Mapping[str, JSON],
        *,
        key: str | None = None,
        version: int | None = None,
        inbox_id: UUID | None = None,
        trace_parent: Mapping[str, Any] | None = None,
        wait_for_slot: bool = True,
    ) -> Result:
        """Start a saga, or find the one already started with ``key``: the outcome is APPLIED
        when this call started it and DUPLICATE when it existed. The input is checked against
        the definition's input model first: :class:`InvalidInputError`, and nothing is stored.

        With an admission bound, a new saga waits for a slot, or raises
        :class:`~saga.orchestrator.admission.InFlightLimitError` when ``wait_for_slot`` is
        false and every slot is taken. Its trace continues ``trace_parent`` (a carrier such as
        a message's headers) or the current span; without either it is the root of a new
        trace."""
        definition = self.registry.get(name, version)
        checked = validated_input(definition, input)
        saga_id = saga_id_for_key(name, key) if key is not None else uuid.uuid4()
        existing = await self.store.load(saga_id)
        if existing is not None:
            _duplicate_start(existing, inbox_id)
            return Result(Outcome.DUPLICATE, existing)
        if self.admission is None:
            return await self._begin(definition, saga_id, checked, key, inbox_id, trace_parent)
        async with self.admission.slot(wait=wait_for_slot):
            return await self._begin(definition, saga_id, checked, key, inbox_id, trace_parent)

    async def _begin(
        self,
        definition: SagaDefinition,
        saga_id: UUID,
        checked: dict[str, JSON],
        key: str | None,
        inbox_id: UUID | None,
        trace_parent: Mapping[str, Any] | None,
    ) -> Result:
        trace = self.tracing.saga_trace(definition.name, trace_parent)
        return await self.submit(
            saga_id,
            Started(saga_id, checked, key, trace),
            inbox_id=inbox_id,
            definition=definition,
        )

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
        """Start a saga, or return the one already started with this ``key`` (:meth:`begin`)."""
        result = await self.begin(
            name, input, key=key, version=version, inbox_id=inbox_id, trace_parent=trace_parent
        )
        return result.state

    async def handle_reply(self, reply: ReplyEnvelope) -> Result:
        """Apply a participant's reply; raises :class:`MessageError` for an unknown saga."""
        return await self.submit(reply.saga_id, reply_event(reply), inbox_id=reply.message_id)

    async def timers_due(self) -> bool:
        """Whether some deadline has passed: the cheap question the timer loop asks before
        the costlier ones (the broker's queues, the claim of the due timers)."""
        earliest = await self.store.next_deadline()
        return earliest is not None and earliest <= self.clock.now()

    async def fire_due_timers(
        self, limit: int = 500, hold: Mapping[str, float] | None = None
    ) -> int:
        """Fire every deadline that has passed, except the reply deadlines of steps whose
        participant is in ``hold`` (participant -> seconds since its queue's backlog was seen
        gone, 0 while it lasts: the command may have been taken only then) and that has not
        had the step's timeout since; returns how many changed a saga."""
        due = await self.store.due_timers(self.clock.now(), limit)
        if hold and due:
            states = await self.store.load_many([t.saga_id for t in due])
            due = [t for t in due if not self._held(states.get(t.saga_id), t.timer_id, hold)]
        results = await asyncio.gather(
            *(self.submit(t.saga_id, TimerFired(t.timer_id)) for t in due),
            return_exceptions=True,
        )
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, MessageError):
                raise r
        return sum(1 for r in results if isinstance(r, Result) and r.outcome is Outcome.APPLIED)

    def _held(self, state: SagaState | None, timer_id: UUID, hold: Mapping[str, float]) -> bool:
        """Whether this deadline waits for a reply from a participant in ``hold``."""
        if state is None or state.phase is not Phase.AWAITING_REPLY or state.awaiting != timer_id:
            return False  # a backoff's end sends the next attempt: never held
        expires = state.expires_at
        if expires is not None and state.deadline is not None and state.deadline >= expires:
            return False  # the saga's own deadline bounds the whole run, not one reply
        try:
            definition = self.registry.get(state.name, state.definition_version)
        except UnknownSagaError:
            return False
        step = definition.steps[state.current]
        since = hold.get(step.participant)
        return since is not None and since < step.timeout_for(state.direction).total_seconds()

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
        item = _Item(saga_id, event, inbox_id, definition, otel_context.get_current())
        return await self._group.submit(item)

    @property
    def batches(self) -> int:
        """Transactions committed, for tests and metrics."""
        return self._group.batches

    async def drained(self) -> None:
        """Wait until no event is queued or being committed (used on shutdown)."""
        await self._group.drained()

    async def _process(self, batch: Sequence[_Item]) -> list[Result | BaseException | Requeue]:
        """Decide every event of ``batch`` and commit them in one transaction: each answered
        with its result, its error, or REQUEUE after a version conflict."""
        now = self.clock.now()
        loaded = await self.store.load_many(list({item.saga_id: None for item in batch}))
        working: dict[UUID, SagaState | None] = dict(loaded)
        answers: list[Result | BaseException | Requeue] = []
        decided: list[tuple[int, _Item, Change, SagaState | None]] = []
        durable = self.tracing.durable
        for item in batch:
            state = working.get(item.saga_id)
            try:
                change = self._decide(item, state, now)
                if durable is not None:
                    change = self._with_spans(item, state, change)
            except MessageError as exc:
                answers.append(exc)
                continue
            except Exception as exc:  # a bug deciding one event must not fail its batch-mates
                answers.append(MessageError("decide_failed", f"{type(exc).__name__}: {exc}"))
                continue
            self.events += 1
            if change.transition.refused is not None:
                answers.append(self._refused(item, change.transition))
                continue
            if change.transition.applied:
                working[item.saga_id] = change.transition.state
            decided.append((len(answers), item, change, state))
            answers.append(REQUEUE)  # a placeholder until the commit answers
        if not decided:
            return answers
        began = time.time_ns()
        results = await self.store.commit([change for _, _, change, _ in decided])
        ended = time.time_ns()
        wrote_outbox = any(
            r in (CommitResult.APPLIED, CommitResult.RECORDED) and c.outbox
            for (_, _, c, _), r in zip(decided, results, strict=True)
        )
        if wrote_outbox and self.on_commit is not None:
            self.on_commit()  # first: the relay must hear of rows even if a caller is gone
            # one turn of the loop for the relay, woken above, to put the commands on the wire
            # before this batch's spans, metrics, log lines and acks: they are not on a saga's
            # way to its next step, the commands are
            await asyncio.sleep(0)
        recording = self.tracing.recording  # once per batch: it looks the provider up each time
        for (at, item, change, prior), result in zip(decided, results, strict=True):
            if durable is not None and result in (CommitResult.APPLIED, CommitResult.RECORDED):
                for record in change.spans:  # the live process span: its record is committed
                    if record.get("kind") == _CONSUMER:
                        durable.committed(int(record["span"], 16))
            if recording:
                self.tracing.database(self.database_system, item.trace, began, ended, len(decided))
            answers[at] = await self._answer(item, change, prior, result, durable is not None)
        return answers

    def _with_spans(self, item: _Item, prior: SagaState | None, change: Change) -> Change:
        """``change`` with the spans of its work, committed with it so a crash cannot lose
        them: the attempt it ended, the saga's span (provisional at the start, final at the
        end), and the span of the message it consumes."""
        transition = change.transition
        after = transition.state
        records: list[dict[str, Any] | None] = []
        extra: dict[str, Any] = {}
        if transition.applied:
            business = self._business(after)
            for attempt in attempts_ended(prior, transition):
                assert prior is not None
                records.append(
                    self.tracing.attempt_record(prior, attempt, after.updated_at, business)
                )
            finished = after.status.is_terminal and (prior is None or not prior.status.is_terminal)
            if prior is None or finished:
                records.append(self.tracing.saga_record(after, after.updated_at, business))
        if isinstance(item.event, Started):
            saga_id = str(item.saga_id)
            extra = {"saga.id": saga_id, "messaging.message.conversation_id": saga_id}
            extra["saga.outcome"] = "applied"
        elif isinstance(item.event, ReplySucceeded | ReplyFailed):
            extra = {"saga.name": after.name}
            extra["saga.outcome"] = "applied" if transition.applied else "ignored"
        process = self.tracing.process_record(item.trace, time.time_ns(), extra)
        if process is not None:
            records.append(process[0])
        spans = tuple(r for r in records if r is not None)
        return dataclasses.replace(change, spans=spans) if spans else change

    @staticmethod
    def _refused(item: _Item, transition: Transition) -> Result:
        """An operator action the saga's state refuses: nothing to commit (the audit trail
        keeps what happened to the saga, not the buttons tried on it), so it is only logged."""
        event = item.event
        state = transition.state
        log.info(
            "operator_action_refused",
            saga_id=str(item.saga_id),
            saga_name=state.name,
            status=state.status.value,
            action=type(event).__name__,
            actor=getattr(event, "actor", None),
            reason=getattr(event, "reason", None),
            outcome=Outcome.REJECTED.value,
            detail=transition.refused,
        )
        return Result(Outcome.REJECTED, state, transition)

    async def _answer(
        self,
        item: _Item,
        change: Change,
        prior: SagaState | None,
        result: CommitResult,
        spans_committed: bool = False,
    ) -> Result | BaseException | Requeue:
        if result is CommitResult.APPLIED:
            self._observe(prior, change.transition, spans_committed)
        if result is CommitResult.CONFLICT:
            if isinstance(item.event, Started):
                existing = await self.store.load(item.saga_id)
                if existing is not None:
                    _duplicate_start(existing, item.inbox_id)
                    return Result(Outcome.DUPLICATE, existing)
            item.conflicts += 1
            if item.conflicts > _MAX_CONFLICT_RETRIES:
                return ConcurrencyError(f"saga {item.saga_id} kept changing under us")
            return REQUEUE
        if result is CommitResult.DUPLICATE:
            if isinstance(item.event, Started):
                _duplicate_start(change.transition.state, item.inbox_id)
            return Result(Outcome.DUPLICATE, change.transition.state)
        if result is CommitResult.RECORDED and not isinstance(
            item.event, ReplySucceeded | ReplyFailed
        ):  # an ignored reply is logged by its consumer, with the reply's ids
            _log_history(change.transition.state, change.transition.history)
        outcome = Outcome.APPLIED if result is CommitResult.APPLIED else Outcome.IGNORED
        return Result(outcome, change.transition.state, change.transition)

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
        if state is not None and isinstance(item.event, ReplySucceeded | ReplyFailed):
            mismatch = reply_mismatch(definition, state, item.event)
            if mismatch is not None:
                raise MessageError("reply_mismatch", mismatch)
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

    def _business(self, state: SagaState) -> dict[str, Any]:
        """The business attributes of ``state``'s spans (its key, the definition's
        ``span_attributes``); only asked for while spans are recorded."""
        try:
            fields = self.registry.get(state.name, state.definition_version).span_attributes
        except UnknownSagaError:
            fields = ()
        return business_attributes(state, fields)

    def _observe(
        self, before: SagaState | None, transition: Transition, spans_committed: bool = False
    ) -> None:
        """Spans, metrics and log lines of a committed transition: after the commit, so they
        report only what is durable. ``spans_committed``: its spans were written with it
        (:meth:`_with_spans`), and are exported from there."""
        after = transition.state
        end = after.updated_at
        spans = self.tracing.recording and not spans_committed
        business = self._business(after) if spans else None
        for attempt in attempts_ended(before, transition):  # every member of a group too
            assert before is not None
            if spans:
                self.tracing.end_attempt(before, attempt, end, business)
            if self.metrics is not None:
                self.metrics.attempt(after.name, attempt, end)
        if self.metrics is not None:
            self.metrics.transition(before, transition)
        finished = after.status.is_terminal and (before is None or not before.status.is_terminal)
        if finished and spans:
            self.tracing.end_saga(after, end, business)
        if self.admission is not None:
            if finished:
                self.admission.finished(after.saga_id)
            elif before is None:
                self.admission.started(after.saga_id)
        _log_history(after, transition.history)


#: history entries logged at debug only: one per message, the bulk of a healthy saga's story
_QUIET = frozenset({HistoryKind.COMMAND_SENT, HistoryKind.STEP_SUCCEEDED})


def _log_history(state: SagaState, history: Sequence[HistoryEntry]) -> None:
    """One line per history entry of a committed transition, under the entry's kind."""
    debug = log.is_enabled_for(logging.DEBUG)
    for entry in history:
        if entry.kind in _QUIET and not debug:
            continue
        (log.debug if entry.kind in _QUIET else log.info)(
            entry.kind.value,
            saga_id=str(state.saga_id),
            saga_name=state.name,
            step=entry.step,
            direction=None if entry.direction is None else entry.direction.value,
            attempt=entry.attempt,
            detail=entry.detail,
            **_message_fields(state, entry),
        )


def _duplicate_start(existing: SagaState, inbox_id: UUID | None) -> None:
    """A start for a saga that exists: nothing is written (the key already found the saga), but
    an operator counting starts must see why a request started nothing."""
    log.info(
        HistoryKind.IGNORED.value,
        saga_id=str(existing.saga_id),
        saga_name=existing.name,
        key=existing.key,
        detail="saga already started",
        **({} if inbox_id is None else {"message_id": str(inbox_id)}),
    )


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


def validated_input(definition: SagaDefinition, input: Mapping[str, JSON]) -> dict[str, JSON]:
    """``input`` as the definition's input model reads it (its JSON form, defaults filled in),
    or InvalidInputError naming every field that does not fit. Without a model, as it is."""
    model = definition.input_model
    if model is None:
        return dict(input)
    try:
        valid = model.model_validate_json(to_json(input))
    except PydanticSerializationError as exc:
        error = FieldError((), f"not a JSON object: {exc}", "invalid_json")
        raise InvalidInputError(definition.name, (error,)) from None
    except ValidationError as exc:
        errors = tuple(
            FieldError(tuple(e["loc"]), e["msg"].removeprefix("Value error, "), e["type"])
            for e in exc.errors(include_url=False, include_input=False, include_context=False)
        )
        raise InvalidInputError(definition.name, errors) from None
    return cast(dict[str, JSON], valid.model_dump(mode="json"))
