"""Test your own sagas in plain pytest, without RabbitMQ or a database.

:class:`Harness` runs the production :class:`~saga.orchestrator.runtime.Orchestrator` and
engine against the in-memory store and a fake clock. Participants are plain functions from a
command to a reply::

    h = Harness([trip])
    h.on("flights.book", lambda cmd: ok(booking="F1"))
    h.on("hotels.book", lambda cmd: fail("no_rooms"))
    saga = await h.run("trip", {"who": "ann"})
    assert saga.status is SagaStatus.COMPENSATED

Commands go through the real wire encoding (they are parsed back into
:class:`contracts.envelope.CommandEnvelope`), replies through the real reply path, and when
nothing is left to deliver the clock jumps to the next deadline, so timeouts and backoff take no
real time. Operator actions (:meth:`Harness.retry`, :meth:`~Harness.abort`,
:meth:`~Harness.resolve`) go through the same path as the admin API's, a participant registered
with ``twice=True`` has each reply delivered twice (as a broker redelivery would), and the
orchestrator's info lines are kept quiet unless the test configured logging itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import cast
from uuid import UUID

import structlog
from pydantic import JsonValue

from saga.core.definition import Registry, SagaDefinition
from saga.core.ids import reply_id
from saga.core.state import JSON, HistoryEntry, SagaState
from saga.orchestrator.runtime import Orchestrator, Result
from saga.protocol.envelope import CommandEnvelope, ReplyEnvelope
from saga.store.memory import MemoryStore

__all__ = ["FakeClock", "Harness", "Reply", "fail", "ok", "silence"]


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, start: datetime | None = None):
        self._now = start or datetime(2030, 1, 1, tzinfo=UTC)

    def now(self) -> datetime:
        return self._now

    def advance(self, delta: timedelta | float) -> datetime:
        step = delta if isinstance(delta, timedelta) else timedelta(seconds=delta)
        if step < timedelta(0):
            raise ValueError("a FakeClock only moves forward; build a new one to go back")
        self._now += step
        return self._now

    def set(self, when: datetime) -> None:
        self._now = when


@dataclass(frozen=True, slots=True)
class Reply:
    """What a fake participant answers."""

    success: bool
    data: Mapping[str, JSON] = field(default_factory=dict)
    reason: str | None = None
    retryable: bool = False


def ok(**data: JSON) -> Reply:
    """A success reply carrying ``data`` (later steps read it as ``ctx.output(step)``)."""
    return Reply(True, data)


def fail(reason: str, *, retryable: bool = False) -> Reply:
    """A failure reply: final (the saga compensates), or ``retryable`` (it is tried again)."""
    return Reply(False, {}, reason, retryable)


def silence(command: CommandEnvelope) -> None:
    """A participant that never answers: the step times out."""
    return None


Handler = Callable[[CommandEnvelope], Reply | None]


class Harness:
    """An orchestrator with an in-memory store, a fake clock and function participants."""

    def __init__(
        self,
        definitions: Registry | Iterable[SagaDefinition],
        *,
        clock: FakeClock | None = None,
        quiet: bool = True,
    ):
        if quiet and not structlog.is_configured():
            # warnings only: a saga's story is in its history, not on the test's output
            structlog.configure(
                wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING)
            )
        if isinstance(definitions, Registry):
            self.registry = definitions
        else:
            defs = list(definitions)
            participants = {s.participant for d in defs for s in d.steps}
            self.registry = Registry(defs, participants=participants)
        self.clock = clock or FakeClock()
        self.store = MemoryStore()
        self.orchestrator = Orchestrator(self.registry, self.store, clock=self.clock)
        self._handlers: dict[str, Handler] = {}
        self._twice: set[str] = set()
        #: every command delivered to a participant, in order
        self.delivered: list[CommandEnvelope] = []
        #: what each reply delivered came to (applied, ignored, duplicate), in order
        self.outcomes: list[Result] = []

    def on(self, command_type: str, handler: Handler, *, twice: bool = False) -> None:
        """Answer ``command_type`` with ``handler``; return None from it to stay silent.
        ``twice`` delivers each of its replies a second time, the same message, as a broker
        redelivery would: the orchestrator must recognise it and change nothing."""
        self._handlers[command_type] = handler
        if twice:
            self._twice.add(command_type)
        else:
            self._twice.discard(command_type)

    async def start(
        self, name: str, input: Mapping[str, JSON] | None = None, *, key: str | None = None
    ) -> UUID:
        state = await self.orchestrator.start(name, input or {}, key=key)
        return state.saga_id

    async def run(
        self,
        name: str,
        input: Mapping[str, JSON] | None = None,
        *,
        key: str | None = None,
        max_rounds: int = 10_000,
    ) -> SagaState:
        """Start a saga and settle: the returned saga is terminal unless a handler is silent
        forever and retries are unlimited (then ``max_rounds`` stops it)."""
        saga_id = await self.start(name, input, key=key)
        await self.settle(max_rounds=max_rounds)
        return await self.saga(saga_id)

    async def settle(self, *, max_rounds: int = 10_000) -> None:
        """Deliver commands and replies, jumping the clock to each next deadline, until every
        saga is idle."""
        for _ in range(max_rounds):
            if await self.deliver():
                continue
            deadline = await self.store.next_deadline()
            if deadline is None:
                return
            if deadline > self.clock.now():
                self.clock.set(deadline)
            await self.orchestrator.fire_due_timers()
        raise RuntimeError(f"sagas did not settle within {max_rounds} rounds")

    async def deliver(self) -> int:
        """Hand every unsent command to its participant and apply the replies; returns how
        many commands were delivered."""
        pending = await self.store.pending_outbox(10_000)
        await self.store.mark_sent([m.message_id for m in pending])
        for message in pending:
            command = CommandEnvelope.model_validate_json(message.body)
            self.delivered.append(command)
            handler = self._handlers.get(command.command_type)
            if handler is None:
                raise LookupError(
                    f"no participant answers {command.command_type!r}; register one with "
                    f"harness.on({command.command_type!r}, ...) (use silence to time out)"
                )
            reply = handler(command)
            if reply is not None:
                envelope = self.envelope(command, reply)
                for _ in range(2 if command.command_type in self._twice else 1):
                    self.outcomes.append(await self.deliver_reply(envelope))
        return len(pending)

    async def reply(self, command: CommandEnvelope, reply: Reply) -> Result:
        """Send ``reply`` to ``command`` through the same path as a reply from RabbitMQ."""
        return await self.deliver_reply(self.envelope(command, reply))

    async def deliver_reply(self, envelope: ReplyEnvelope) -> Result:
        """Deliver one reply envelope (again, to test a redelivery), through JSON."""
        parsed = ReplyEnvelope.model_validate_json(envelope.model_dump_json())
        return await self.orchestrator.handle_reply(parsed)

    @staticmethod
    def envelope(command: CommandEnvelope, reply: Reply) -> ReplyEnvelope:
        """The reply envelope a participant would send; its id derived from the command's."""
        return ReplyEnvelope(
            schema_version=1,
            message_id=reply_id(command.message_id),
            causation_id=command.message_id,
            saga_id=command.saga_id,
            participant=command.participant,
            command_type=command.command_type,
            outcome="success" if reply.success else "failure",
            reason=None if reply.success else reply.reason,
            detail=None,
            retryable=reply.retryable,
            data=cast(dict[str, JsonValue], dict(reply.data)),
        )

    # --- operator actions, as the admin API and the CLI take them -----------------------

    async def retry(
        self, saga_id: UUID, reason: str = "retried in a test", *, actor: str = "test"
    ) -> SagaState:
        """Retry a FAILED saga's stuck step with a new budget, then settle."""
        await self.orchestrator.retry(saga_id, actor=actor, reason=reason)
        await self.settle()
        return await self.saga(saga_id)

    async def abort(
        self, saga_id: UUID, reason: str = "aborted in a test", *, actor: str = "test"
    ) -> SagaState:
        """Abort a RUNNING saga (before its pivot): compensate what ran, then settle."""
        await self.orchestrator.abort(saga_id, actor=actor, reason=reason)
        await self.settle()
        return await self.saga(saga_id)

    async def resolve(
        self,
        saga_id: UUID,
        reason: str = "resolved in a test",
        *,
        data: Mapping[str, JSON] | None = None,
        actor: str = "test",
    ) -> SagaState:
        """Mark a FAILED saga's stuck step done by hand (an action with output ``data``), and
        carry on from there until the saga settles."""
        await self.orchestrator.resolve(saga_id, actor=actor, reason=reason, data=data)
        await self.settle()
        return await self.saga(saga_id)

    async def advance(self, seconds: float) -> int:
        """Move the clock and fire what became due; returns how many timers acted."""
        self.clock.advance(seconds)
        return await self.orchestrator.fire_due_timers()

    async def saga(self, saga_id: UUID) -> SagaState:
        return await self.orchestrator.get(saga_id)

    async def history(self, saga_id: UUID) -> list[HistoryEntry]:
        return await self.store.history(saga_id)

    def commands(self, saga_id: UUID | None = None) -> list[str]:
        """Command types delivered so far, e.g. ``["flights.book", "flights.cancel"]``."""
        return [c.command_type for c in self.delivered if saga_id is None or c.saga_id == saga_id]
