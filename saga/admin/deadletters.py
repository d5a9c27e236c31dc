"""Dead letters as the admin API shows them: which dead-letter queues the deployment has, what
each holds, and replaying or discarding them, every action logged with who did it and why.

The broker work (holding a queue without losing its order, replay with a confirm before the
ack) is :mod:`saga.transport.deadletters`; this module picks the queues, applies the filters
and writes the audit lines.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal
from uuid import UUID

import structlog
from fastapi import HTTPException

from saga.admin.models import (
    DeadLetterActionResult,
    DeadLetterDetail,
    DeadLetterFilter,
    DeadLetterPage,
    DeadLetterQueueView,
    DeadLetterSettled,
    DeadLetterSummary,
)
from saga.core.definition import Registry
from saga.transport.broker import AmqpBroker
from saga.transport.deadletters import DeadLetter, DeadLetterError, DeadLetterQueues, Hold
from saga.transport.topology import Topology

if TYPE_CHECKING:
    from saga.orchestrator.service import OrchestratorService

__all__ = ["SCAN_LIMIT", "SHOW_BYTES", "DeadLetters", "Match", "dead_letter_queues"]

log = structlog.get_logger("saga.admin")

#: messages read from the front of one dead-letter queue at most, per request
SCAN_LIMIT = 1000
#: bytes of a body shown at most
SHOW_BYTES = 64 * 1024

Action = Literal["replay", "discard"]


def dead_letter_queues(topology: Topology, registry: Registry) -> dict[str, str]:
    """Every dead-letter queue the orchestrator and the registered participants declare, each
    with the queue whose rejects it holds: the replies, the start requests, and each
    participant's commands."""
    participants = sorted(
        {s.participant for d in registry.all() for s in d.steps} | set(registry.participants or ())
    )
    sources = [
        topology.reply_queue,
        topology.start_queue,
        *(topology.command_queue(p) for p in participants),
    ]
    return {topology.dead_letter_queue(q): q for q in sources}


@dataclass(frozen=True, slots=True)
class Match:
    """The criteria of a listing or a bulk action, resolved: all given must hold."""

    reason: str | None = None
    saga_id: UUID | None = None
    since: datetime | None = None
    until: datetime | None = None
    id: str | None = None

    @classmethod
    def of(cls, f: DeadLetterFilter) -> Match:
        return cls(f.reason, f.saga_id, _utc(f.since), _utc(f.until))

    def __call__(self, letter: DeadLetter) -> bool:
        if self.id is not None and letter.id != self.id:
            return False
        if self.reason is not None and letter.reason != self.reason:
            return False
        if self.saga_id is not None and letter.saga_id != str(self.saga_id):
            return False
        if self.since is not None or self.until is not None:
            at = letter.dead_lettered_at
            if at is None:
                return False
            if self.since is not None and at < self.since:
                return False
            if self.until is not None and at >= self.until:
                return False
        return True


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def summary(letter: DeadLetter, now: datetime, copies: int = 1) -> DeadLetterSummary:
    return DeadLetterSummary(
        id=letter.id,
        dead_letter_queue=letter.dead_letter_queue,
        queue=letter.queue,
        reason=letter.reason,
        detail=letter.detail,
        saga_id=UUID(letter.saga_id) if letter.saga_id else None,
        message_id=letter.message_id,
        message_type=letter.message_type,
        dead_lettered_at=letter.dead_lettered_at,
        age_s=letter.age_s(now),
        size=len(letter.body),
        replays=letter.replays,
        copies=copies,
    )


def shown_body(body: bytes) -> tuple[str, Literal["json", "text", "base64"], bool]:
    """The body for people: indented JSON, else text, else base64; at most SHOW_BYTES of it."""
    clipped = len(body) > SHOW_BYTES
    if not clipped:
        try:
            return json.dumps(json.loads(body), indent=2, ensure_ascii=False), "json", False
        except (ValueError, UnicodeDecodeError):
            pass
    part = body[:SHOW_BYTES]
    try:
        return part.decode("utf-8"), "text", clipped
    except UnicodeDecodeError as exc:
        if clipped and exc.start >= len(part) - 3:  # a character cut in two by the limit
            return part[: exc.start].decode("utf-8"), "text", clipped
    return base64.b64encode(part).decode(), "base64", clipped


def detail(letter: DeadLetter, now: datetime, copies: int) -> DeadLetterDetail:
    body, form, clipped = shown_body(letter.body)
    return DeadLetterDetail(
        **summary(letter, now, copies).model_dump(),
        correlation_id=letter.correlation_id,
        content_type=letter.content_type,
        headers=letter.headers,
        body=body,
        body_format=form,
        body_truncated=clipped,
    )


class DeadLetters:
    """The dead-letter queues of ``service``'s deployment, for the admin API."""

    def __init__(self, service: OrchestratorService):
        self._service = service
        self._queues: DeadLetterQueues | None = None
        self._broker: AmqpBroker | None = None

    def queues(self) -> dict[str, str]:
        return dead_letter_queues(self._service.topology, self._service.registry)

    def pick(self, queue: str | None) -> dict[str, str]:
        """The dead-letter queues ``queue`` names (a queue or its ``.dlq``; None: all); 404 for
        a name that is not the deployment's."""
        every = self.queues()
        if queue is None:
            return every
        for dlq, source in every.items():
            if queue in (dlq, source):
                return {dlq: source}
        raise HTTPException(
            404,
            f"no dead-letter queue {queue!r} in this deployment; its dead-letter queues are: "
            + ", ".join(every),
        )

    def _holder(self) -> DeadLetterQueues:
        broker = self._service.broker
        if broker is None or not broker.is_connected():
            raise HTTPException(503, "no connection to RabbitMQ now; try again in a moment")
        if not isinstance(broker, AmqpBroker):
            raise HTTPException(
                501,
                "dead letters can be read on RabbitMQ only; this orchestrator runs on "
                f"{type(broker).__name__}",
            )
        if self._queues is None or self._broker is not broker:
            self._queues = DeadLetterQueues(broker.link, broker.publish_raw)
            self._broker = broker
        return self._queues

    async def listing(self, queue: str | None, match: Match, limit: int) -> DeadLetterPage:
        """Matching dead letters, oldest first in each queue, one item per id."""
        holder = self._holder()
        now = datetime.now(UTC)
        views: list[DeadLetterQueueView] = []
        items: list[DeadLetterSummary] = []
        truncated = False
        for dlq, source in self.pick(queue).items():
            found: dict[str, tuple[DeadLetter, int]] = {}
            try:
                async with holder.hold(dlq, source) as hold:
                    async for letter in hold.scan(SCAN_LIMIT):
                        if not match(letter):
                            continue
                        first, copies = found.get(letter.id, (letter, 0))
                        found[letter.id] = (first, copies + 1)
                    views.append(DeadLetterQueueView(**_view(hold)))
                    truncated |= not hold.complete
            except DeadLetterError as exc:
                views.append(
                    DeadLetterQueueView(
                        dead_letter_queue=dlq, queue=source, depth=None, scanned=0, error=str(exc)
                    )
                )
                continue
            for letter, copies in found.values():
                if len(items) == limit:
                    truncated = True
                    break
                items.append(summary(letter, now, copies))
        return DeadLetterPage(queues=views, items=items, truncated=truncated)

    async def show(self, queue: str, message: str) -> DeadLetterDetail:
        """One dead letter with its headers and body; 404 when it is not (or no longer) there."""
        holder = self._holder()
        ((dlq, source),) = self.pick(queue).items()
        first: DeadLetter | None = None
        copies = 0
        try:
            async with holder.hold(dlq, source) as hold:
                async for letter in hold.scan(SCAN_LIMIT):
                    if letter.id == message:
                        first, copies = first or letter, copies + 1
                complete = hold.complete
        except DeadLetterError as exc:
            raise HTTPException(503, str(exc)) from None
        if first is None:
            raise _missing(dlq, message, complete)
        return detail(first, datetime.now(UTC), copies)

    async def act(
        self,
        action: Action,
        queue: str | None,
        match: Match,
        limit: int,
        *,
        actor: str,
        reason: str,
    ) -> DeadLetterActionResult:
        """Replay (to the original queue, confirmed, then removed) or discard every matching
        dead letter, up to ``limit`` ids; each one is logged as an audit line."""
        holder = self._holder()
        every = set(self.queues().values())
        settled: list[DeadLetterSettled] = []
        truncated = False
        picked = self.pick(queue)
        for dlq, source in picked.items():
            try:
                async with holder.hold(dlq, source) as hold:
                    truncated |= await self._act_on(
                        hold, holder, action, match, limit, every, settled, actor, reason
                    )
            except DeadLetterError as exc:
                done = ", ".join(f"{s.id} ({s.outcome})" for s in settled) or "nothing"
                raise HTTPException(503, f"{exc}; done before that: {done}") from None
            if len(settled) >= limit:
                break
        if match.id is not None and not settled:
            ((dlq, _),) = picked.items()
            raise _missing(dlq, match.id, not truncated)
        return DeadLetterActionResult(
            action=action,
            actor=actor,
            reason=reason,
            at=datetime.now(UTC),
            messages=settled,
            truncated=truncated,
        )

    async def _act_on(
        self,
        hold: Hold,
        holder: DeadLetterQueues,
        action: Action,
        match: Match,
        limit: int,
        every: Iterable[str],
        settled: list[DeadLetterSettled],
        actor: str,
        reason: str,
    ) -> bool:
        """Act on the matching letters of one hold; True when the queue was not read to its
        end. Copies of one id are one message: replayed once, every copy removed."""
        done: dict[str, int] = {}  # id -> its index in ``settled``
        async for letter in hold.scan(SCAN_LIMIT):
            if not match(letter):
                continue
            if letter.id in done:
                row = settled[done[letter.id]]
                if row.outcome != "refused":
                    await hold.ack(letter)
                    settled[done[letter.id]] = row.model_copy(update={"copies": row.copies + 1})
                continue
            if len(settled) >= limit:
                return True
            why = None
            if action == "replay" and letter.queue not in every:
                why = f"its queue {letter.queue!r} is not one of this deployment's: not sent"
            elif action == "replay":
                await holder.replay(hold, letter)
            else:
                await hold.ack(letter)
            outcome: Literal["replayed", "discarded", "refused"] = (
                "refused" if why else "replayed" if action == "replay" else "discarded"
            )
            done[letter.id] = len(settled)
            settled.append(
                DeadLetterSettled(
                    id=letter.id,
                    dead_letter_queue=letter.dead_letter_queue,
                    queue=letter.queue,
                    message_id=letter.message_id,
                    saga_id=UUID(letter.saga_id) if letter.saga_id else None,
                    dead_letter_reason=letter.reason,
                    copies=1,
                    outcome=outcome,
                    why=why,
                )
            )
            log.info(
                "dead_letter_refused" if why else f"dead_letter_{outcome}",
                action=action,
                actor=actor,
                reason=reason,
                dead_letter_queue=letter.dead_letter_queue,
                queue=letter.queue,
                id=letter.id,
                saga_id=letter.saga_id,
                dead_letter_reason=letter.reason,
                why=why,
            )
        return not hold.complete


def _view(hold: Hold) -> dict[str, object]:
    return {
        "dead_letter_queue": hold.dead_letter_queue,
        "queue": hold.source,
        "depth": hold.depth,
        "scanned": hold.scanned,
    }


def _missing(dlq: str, message: str, complete: bool) -> HTTPException:
    where = dlq if complete else f"the first {SCAN_LIMIT} messages of {dlq}"
    return HTTPException(
        404, f"no dead letter {message!r} in {where} (replayed or discarded already?)"
    )
