"""Batch operator actions: retry, abort or resolve every saga a filter matches.

A batch is not a new kind of change: it submits, for each saga, the same operator event a
single ``POST /api/sagas/{id}/<action>`` submits, so the pure engine decides each one on the
saga's state at that moment (an action the state does not accept is skipped and reported, and
writes nothing), the history records each with the actor and the reason, and the version check
of every write keeps two batches (on one orchestrator or on several sharing PostgreSQL) from
applying an action twice: the second one is decided again on the state the first produced,
and refused.

The selection is re-checked saga by saga just before acting, so a saga that no longer matches
the filter (it was retried meanwhile, its failure changed) is skipped, never acted on. A run
answers at once with a batch id; its progress and per-saga results live in this orchestrator's
memory (the most recent :data:`KEPT` batches), while each action's record is the saga's history.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal
from uuid import UUID

import structlog
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from saga.admin.models import CAUSE_KINDS, at_step, root_cause
from saga.admin.times import parse_time
from saga.core.engine import operator_refusal
from saga.core.errors import ConcurrencyError, MessageError, UnknownSagaError
from saga.core.state import HistoryEntry, OperatorAction, SagaState, SagaStatus
from saga.orchestrator.runtime import Outcome
from saga.ports import SagaFilter
from saga.store.faults import describe_error

if TYPE_CHECKING:
    from saga.orchestrator.service import OrchestratorService

__all__ = [
    "KEPT",
    "MAX_BATCH",
    "BatchFilter",
    "BatchItem",
    "BatchPreview",
    "BatchProgress",
    "BatchRequest",
    "BatchResult",
    "Batches",
    "SelectionChangedError",
]

log = structlog.get_logger("saga.admin")

#: sagas one batch may act on at most: a larger ``limit`` or ``saga_ids`` is a 422
MAX_BATCH = 1000
#: finished batches whose results ``GET /api/sagas/batch/{id}`` still answers
KEPT = 100
#: actions in flight at once: enough to fill a group commit, few enough to leave room for replies
_CONCURRENCY = 32
#: sagas read per query while looking for matches (the reason filter is applied in Python)
_PAGE = 500
#: sagas examined at most while selecting, so a reason matching nothing cannot scan forever
_SCAN_MAX = 50 * _PAGE

Action = Literal["retry", "abort", "resolve"]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BatchFilter(_Model):
    """The list's filters (``GET /api/sagas``) plus ``reason``; every one given must match."""

    status: list[SagaStatus] = Field(default_factory=list, description="any of these")
    name: str | None = Field(None, min_length=1, max_length=100)
    key: str | None = Field(None, min_length=1, max_length=200)
    since: str | None = Field(
        None, max_length=64, description="created at or after: an age (30m, 1h, 2d, 1w) or ISO"
    )
    until: str | None = Field(None, max_length=64, description="created before: an age or ISO")
    q: str | None = Field(None, max_length=36, description="a saga id, or the start of one")
    reason: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="a piece of the saga's failure or root cause (its detail or the "
        "participant's error), case ignored, e.g. `undeliverable_address`",
    )

    @field_validator("since", "until")
    @classmethod
    def _time(cls, value: str | None) -> str | None:
        if value is not None and value.strip():
            parse_time(value)  # ValueError: the forms that work, as the list says
        return value

    @field_validator("q")
    @classmethod
    def _id_start(cls, value: str | None) -> str | None:
        if value:
            SagaFilter(id_prefix=value)  # ValueError: not a saga id or the start of one
        return value or None

    def empty(self) -> bool:
        return not self.status and all(
            v is None for v in (self.name, self.key, self.since, self.until, self.q, self.reason)
        )


class BatchRequest(_Model):
    """What to act on and why. Without ``saga_ids`` the batch takes the sagas that match the
    filter now (oldest first, up to ``limit``); with them, exactly those ids, each only if it
    still matches the filter."""

    reason: str | None = Field(
        None, max_length=2000, description="goes into each saga's history; needed unless dry_run"
    )
    filter: BatchFilter = Field(default_factory=BatchFilter)
    all: bool = Field(False, description="act on every saga: an empty filter is refused")
    limit: int = Field(100, ge=1, le=MAX_BATCH, description="sagas to act on at most")
    dry_run: bool = Field(
        False, description="answer which sagas and what would happen; act on none"
    )
    saga_ids: list[UUID] | None = Field(
        None,
        max_length=MAX_BATCH,
        description="act on exactly these (the dry run's), each only if it still matches",
    )
    expect: int | None = Field(
        None,
        ge=0,
        description="the number of sagas the dry run showed: when the selection now differs, "
        "409 and nothing is done",
    )

    @field_validator("reason")
    @classmethod
    def _said(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("say why: the reason goes into each saga's history")
        return None if value is None else value.strip()

    @model_validator(mode="after")
    def _complete(self) -> BatchRequest:
        if not self.dry_run and self.reason is None:
            raise ValueError("reason: say why; it goes into each saga's history")
        if self.saga_ids is None and self.filter.empty() and not self.all:
            raise ValueError(
                "filter: give at least one of status, name, key, since, until, q, reason, or "
                'saga_ids, or "all": true to act on every saga'
            )
        return self


class BatchItem(BaseModel):
    """A saga of the selection, as the dry run shows it."""

    saga_id: UUID
    name: str
    status: SagaStatus
    created_at: datetime
    at_step: str | None = Field(description="the step to look at first (as in the list)")
    why: str | None = Field(description="its root cause, or its latest failure")
    allowed: bool = Field(description="whether its state accepts the action now")
    refusal: str | None = Field(None, description="why the engine would refuse it (skipped)")


class BatchPreview(BaseModel):
    """A dry run: what a batch would act on. Nothing was changed."""

    action: Action
    dry_run: Literal[True] = True
    matched: int = Field(description="sagas selected (at most limit)")
    would_apply: int
    would_skip: int
    truncated: bool = Field(description="more sagas match than limit: only the first are shown")
    scanned: int = Field(description="sagas examined to find them")
    items: list[BatchItem] = Field(description="oldest first")
    skipped: list[BatchResult] = Field(
        default_factory=list, description="given saga_ids that no longer match, and why"
    )


class BatchResult(BaseModel):
    saga_id: UUID
    name: str | None
    outcome: Literal["pending", "applied", "skipped", "failed"]
    why: str | None = Field(None, description="why it was skipped or failed")
    status: SagaStatus | None = Field(None, description="the saga's status after the action")


class BatchProgress(BaseModel):
    """A batch run: its progress while it runs, then each saga's outcome."""

    batch_id: UUID
    action: Action
    actor: str
    reason: str
    state: Literal["running", "finished"]
    started_at: datetime
    finished_at: datetime | None
    total: int
    done: int
    applied: int
    skipped: int
    failed: int
    truncated: bool = Field(description="more sagas matched than limit: run it again for the rest")
    results: list[BatchResult] = Field(description="one per saga, in the order acted on")


class SelectionChangedError(Exception):
    """The selection is not the size the caller expected (409)."""


@dataclass
class _Selection:
    states: list[SagaState]
    causes: dict[UUID, list[HistoryEntry]]
    skipped: list[BatchResult] = field(default_factory=list)
    truncated: bool = False
    scanned: int = 0


class _Match:
    """``BatchFilter`` as a predicate on a saga (and its cause history), checked again just
    before each action, and as the store query that finds the candidates."""

    def __init__(self, f: BatchFilter, now: datetime):
        self.f = f
        self.since = _time(f.since, now)
        self.until = _time(f.until, now)
        self.query = SagaFilter(
            statuses=frozenset(f.status),
            name=f.name,
            key=f.key,
            since=self.since,
            until=self.until,
            id_prefix=f.q or None,
        )
        self.needle = None if f.reason is None else f.reason.casefold()

    def mismatch(self, s: SagaState, history: Sequence[HistoryEntry]) -> str | None:
        """Why ``s`` does not match (None when it does)."""
        f = self.f
        if f.status and s.status not in f.status:
            return f"no longer matches the filter: it is {s.status}"
        if f.name is not None and s.name != f.name:
            return f"does not match the filter: it is a {s.name} saga"
        if f.key is not None and s.key != f.key:
            return "does not match the filter: another key"
        if self.since is not None and s.created_at < self.since:
            return "does not match the filter: created before since"
        if self.until is not None and s.created_at >= self.until:
            return "does not match the filter: created at or after until"
        if self.query.id_prefix and not s.saga_id.hex.startswith(self.query.id_prefix):
            return "does not match the filter: another id"
        if self.needle is not None and self.needle not in _why_text(s, history).casefold():
            return f"no longer matches the filter: its failure does not say {self.f.reason!r}"
        return None


def _time(text: str | None, now: datetime) -> datetime | None:
    if text is None or not text.strip():
        return None
    when = parse_time(text, now)
    return when.astimezone(UTC)


def _why_text(s: SagaState, history: Sequence[HistoryEntry]) -> str:
    """What ``reason`` searches: the latest failure and the root cause's words and error."""
    cause = root_cause(history)
    parts = [s.failure or ""]
    if cause is not None:
        parts += [cause.detail, cause.error or ""]
    return "\n".join(parts)


def _why(s: SagaState, history: Sequence[HistoryEntry]) -> str | None:
    cause = root_cause(history)
    return cause.detail if cause is not None else s.failure


@dataclass
class _Run:
    progress: BatchProgress
    task: asyncio.Task[None] | None = None


class Batches:
    """Selects, previews and runs batches for one orchestrator; keeps their progress."""

    def __init__(self, service: OrchestratorService):
        self.service = service
        self._runs: dict[UUID, _Run] = {}

    def _refusal(self, s: SagaState, action: Action) -> str | None:
        try:
            definition = self.service.registry.get(s.name, s.definition_version)
        except UnknownSagaError as exc:
            return str(exc)
        return operator_refusal(definition, s, OperatorAction(action))

    async def _select(self, request: BatchRequest, match: _Match) -> _Selection:
        store = self.service.store
        if request.saga_ids is not None:
            ids = list(dict.fromkeys(request.saga_ids))
            loaded = await store.load_many(ids)
            causes = await store.histories(ids, CAUSE_KINDS)
            picked = _Selection([], causes, scanned=len(ids))
            for saga_id in ids:
                s = loaded.get(saga_id)
                why = "no saga with this id" if s is None else match.mismatch(s, causes[saga_id])
                if s is None or why is not None:
                    name = None if s is None else s.name
                    picked.skipped.append(
                        BatchResult(saga_id=saga_id, name=name, outcome="skipped", why=why)
                    )
                else:
                    picked.states.append(s)
            return picked
        picked = _Selection([], {})
        after: tuple[datetime, UUID] | None = None
        while picked.scanned < _SCAN_MAX:
            query = dataclasses.replace(match.query, start_after=after, limit=_PAGE)
            page = await store.list_sagas(query)
            if not page:
                break
            picked.scanned += len(page)
            causes = await store.histories([s.saga_id for s in page], CAUSE_KINDS)
            for s in page:
                if match.needle is not None and match.mismatch(s, causes[s.saga_id]):
                    continue
                if len(picked.states) == request.limit:
                    picked.truncated = True
                    return picked
                picked.states.append(s)
                picked.causes[s.saga_id] = causes[s.saga_id]
            if len(page) < _PAGE:
                break
            after = (page[-1].created_at, page[-1].saga_id)
        else:
            picked.truncated = True  # examined _SCAN_MAX sagas: there may be more matches
        return picked

    async def preview(self, action: Action, request: BatchRequest) -> BatchPreview:
        match = _Match(request.filter, self.service.orchestrator.clock.now())
        picked = await self._select(request, match)
        items = []
        for s in picked.states:
            refusal = self._refusal(s, action)
            items.append(
                BatchItem(
                    saga_id=s.saga_id,
                    name=s.name,
                    status=s.status,
                    created_at=s.created_at,
                    at_step=at_step(s),
                    why=_why(s, picked.causes.get(s.saga_id, [])),
                    allowed=refusal is None,
                    refusal=refusal,
                )
            )
        allowed = sum(1 for i in items if i.allowed)
        return BatchPreview(
            action=action,
            matched=len(items),
            would_apply=allowed,
            would_skip=len(items) - allowed + len(picked.skipped),
            truncated=picked.truncated,
            scanned=picked.scanned,
            items=items,
            skipped=picked.skipped,
        )

    async def start(
        self, action: Action, request: BatchRequest, *, actor: str, reason: str
    ) -> BatchProgress:
        """Select now, then act in the background; SelectionChangedError when ``expect`` differs."""
        match = _Match(request.filter, self.service.orchestrator.clock.now())
        picked = await self._select(request, match)
        if request.expect is not None and request.expect != len(picked.states):
            raise SelectionChangedError(
                f"the selection is {len(picked.states)} sagas now, not the {request.expect} "
                "expected: the sagas changed since the dry run; run the dry run again"
            )
        results = [
            BatchResult(saga_id=s.saga_id, name=s.name, outcome="pending") for s in picked.states
        ]
        progress = BatchProgress(
            batch_id=uuid.uuid4(),
            action=action,
            actor=actor,
            reason=reason,
            state="running",
            started_at=datetime.now(UTC),
            finished_at=None,
            total=len(results) + len(picked.skipped),
            done=len(picked.skipped),
            applied=0,
            skipped=len(picked.skipped),
            failed=0,
            truncated=picked.truncated,
            results=[*results, *picked.skipped],
        )
        run = _Run(progress)
        self._runs[progress.batch_id] = run
        self._forget_old()
        log.info(
            "operator_batch_started",
            batch_id=str(progress.batch_id),
            action=action,
            actor=actor,
            reason=reason,
            sagas=len(results),
            skipped=len(picked.skipped),
        )
        run.task = asyncio.create_task(self._run(run, match), name=f"batch-{progress.batch_id}")
        return progress.model_copy(deep=True)

    def get(self, batch_id: UUID) -> BatchProgress | None:
        run = self._runs.get(batch_id)
        return None if run is None else run.progress.model_copy(deep=True)

    def _forget_old(self) -> None:
        finished = [k for k, r in self._runs.items() if r.progress.state == "finished"]
        for k in finished[: max(0, len(finished) - KEPT)]:
            del self._runs[k]

    async def _run(self, run: _Run, match: _Match) -> None:
        progress = run.progress
        slots = asyncio.Semaphore(_CONCURRENCY)
        pending = [i for i, r in enumerate(progress.results) if r.outcome == "pending"]

        async def one(index: int) -> None:
            async with slots:
                result = await self._act_one(progress, progress.results[index].saga_id, match)
            progress.results[index] = result
            progress.done += 1
            if result.outcome == "applied":
                progress.applied += 1
            elif result.outcome == "skipped":
                progress.skipped += 1
            else:
                progress.failed += 1

        try:
            await asyncio.gather(*(one(i) for i in pending))
        finally:
            progress.state = "finished"
            progress.finished_at = datetime.now(UTC)
            log.info(
                "operator_batch_finished",
                batch_id=str(progress.batch_id),
                action=progress.action,
                applied=progress.applied,
                skipped=progress.skipped,
                failed=progress.failed,
            )

    async def _act_one(self, progress: BatchProgress, saga_id: UUID, match: _Match) -> BatchResult:
        """The single action's path (``Orchestrator.retry/abort/resolve``), after checking that
        the saga still matches the filter; never raises: each saga gets its outcome."""
        service, action = self.service, progress.action
        actor, reason = progress.actor, progress.reason
        name: str | None = None
        try:
            state = await service.store.load(saga_id)
            if state is None:
                return BatchResult(
                    saga_id=saga_id, name=None, outcome="skipped", why="no saga with this id"
                )
            name = state.name
            causes = (await service.store.histories([saga_id], CAUSE_KINDS))[saga_id]
            mismatch = match.mismatch(state, causes)
            if mismatch is not None:
                return BatchResult(
                    saga_id=saga_id, name=name, outcome="skipped", why=mismatch, status=state.status
                )
            orchestrator = service.orchestrator
            if action == "retry":
                result = await orchestrator.retry(saga_id, actor=actor, reason=reason)
            elif action == "abort":
                result = await orchestrator.abort(saga_id, actor=actor, reason=reason)
            else:
                result = await orchestrator.resolve(saga_id, actor=actor, reason=reason)
        except MessageError as exc:
            outcome: Literal["skipped", "failed"] = (
                "skipped" if exc.reason == "unknown_saga" else "failed"
            )
            return BatchResult(saga_id=saga_id, name=name, outcome=outcome, why=exc.detail)
        except ConcurrencyError as exc:
            return BatchResult(
                saga_id=saga_id, name=name, outcome="failed", why=f"{exc}; try again"
            )
        except Exception as exc:  # the database went away: this saga failed, the batch goes on
            log.warning("operator_batch_action_failed", saga_id=str(saga_id), error=repr(exc))
            return BatchResult(
                saga_id=saga_id, name=name, outcome="failed", why=describe_error(exc)
            )
        log.info(
            "operator_action",
            saga_id=str(saga_id),
            action=action,
            actor=actor,
            reason=reason,
            outcome=result.outcome.value,
            batch_id=str(progress.batch_id),
        )
        if result.outcome is Outcome.APPLIED:
            return BatchResult(
                saga_id=saga_id, name=name, outcome="applied", status=result.state.status
            )
        transition = result.transition
        refused = None if transition is None else transition.refused
        entries = [] if transition is None else [h.detail for h in transition.history]
        why = refused or "; ".join(entries) or f"the saga is {result.state.status}"
        return BatchResult(
            saga_id=saga_id, name=name, outcome="skipped", why=why, status=result.state.status
        )
