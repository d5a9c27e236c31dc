"""The saga language on the real stack: a saga with a parallel group and a conditional step,
and participants built with the participant library whose business table counts every effect.

``tour`` reserves (alpha), books a flight (beta) and a hotel (gamma) in parallel, insures
(alpha, only when the input asks for it) and confirms (alpha). Its variants differ in what the
tests exercise: short member timeouts, the ``continue`` compensation policy, a saga deadline.

Each participant writes one ``effects`` row per handler run, in the transaction that records
its answer in the ledger, so "exactly once" is read from its own database. A :class:`Script`
says, per command type, whether the handler refuses, fails transiently, or waits for a gate the
test opens (so a test decides when a member answers, instead of racing a timer).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import sqlalchemy as sa
from pydantic import JsonValue
from sqlalchemy.ext.asyncio import AsyncConnection

from saga import Parallel, Registry, RetryPolicy, SagaDefinition, Step
from saga.core.state import SagaContext
from saga.participant import BusinessError, Participant, ParticipantSettings, TransientError
from saga.participant.ledger import processed
from saga.protocol.envelope import CommandEnvelope
from tests.support.sagas import PARTICIPANTS

#: (step, participant, action, compensation or None)
STEPS = (
    ("reserve", "alpha", "alpha.reserve", "alpha.release"),
    ("flight", "beta", "beta.book", "beta.cancel"),
    ("hotel", "gamma", "gamma.book", "gamma.cancel"),
    ("insure", "alpha", "alpha.insure", "alpha.uninsure"),
    ("confirm", "alpha", "alpha.confirm", None),
)
COMMAND_TYPES = {
    participant: [t for _, p, a, c in STEPS if p == participant for t in (a, c) if t]
    for participant in PARTICIPANTS
}

_once = RetryPolicy(max_attempts=1)
_fast = RetryPolicy(max_attempts=3, initial_backoff=timedelta(milliseconds=50), jitter=0.1)
_comp = RetryPolicy(max_attempts=2, initial_backoff=timedelta(milliseconds=50), jitter=0.1)


def _insure(ctx: SagaContext) -> bool:
    return bool(ctx.input.get("insure"))


def tour(
    name: str,
    *,
    member_timeout: timedelta = timedelta(seconds=20),
    member_retry: RetryPolicy = _fast,
    deadline: timedelta | None = None,
    on_compensation_failure: str = "halt",
) -> SagaDefinition:
    def step(index: int, **kw: object) -> Step:
        name_, participant, action, compensation = STEPS[index]
        options: dict[str, object] = {
            "timeout": timedelta(seconds=20),
            "retry": _fast,
            "compensation_retry": _comp,
        }
        options.update(kw)
        return Step(
            name_,
            participant=participant,
            action=action,
            compensation=compensation,
            compensatable=compensation is not None,
            **options,  # type: ignore[arg-type]
        )

    return SagaDefinition(
        name,
        1,
        [
            step(0),
            Parallel(
                step(1, timeout=member_timeout, retry=member_retry),
                step(2, timeout=member_timeout, retry=member_retry),
            ),
            step(3, when=_insure),
            step(4),
        ],
        deadline=deadline,
        on_compensation_failure=on_compensation_failure,
    )


TOUR = tour("tour")
#: a member that does not answer within 1.5 s has timed out for good
TOUR_TIMEOUT = tour("tour-timeout", member_timeout=timedelta(seconds=1.5), member_retry=_once)
TOUR_CONTINUE = tour("tour-continue", on_compensation_failure="continue")
#: the whole forward run must end within 2 s; the members' own timeouts are far longer
TOUR_DEADLINE = tour("tour-deadline", deadline=timedelta(seconds=2))
DEFINITIONS = (TOUR, TOUR_TIMEOUT, TOUR_CONTINUE, TOUR_DEADLINE)


def registry() -> Registry:
    """SAGA_DEFINITIONS target of the crash test's orchestrator process."""
    return Registry(list(DEFINITIONS), participants=PARTICIPANTS)


# --- participants ----------------------------------------------------------------------------

metadata = sa.MetaData()
effects = sa.Table(
    "effects",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("saga_id", sa.Uuid, nullable=False),
    sa.Column("command_type", sa.String(64), nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
)


@dataclass
class Script:
    """How the participants answer, by command type; changed by the test while they run."""

    refuse: set[str] = field(default_factory=set)  # BusinessError: a final failure
    transient: set[str] = field(default_factory=set)  # TransientError: retryable, not recorded
    gates: dict[str, asyncio.Event] = field(default_factory=dict)  # wait before answering
    #: command types whose handler has been entered (counting every run)
    entered: Counter[str] = field(default_factory=Counter)

    def hold(self, *command_types: str) -> None:
        for command_type in command_types:
            self.gates[command_type] = asyncio.Event()

    def release(self, *command_types: str) -> None:
        for command_type in command_types:
            self.gates[command_type].set()


def participant(
    name: str, data_dir: Path, prefix: str, rabbitmq_url: str, script: Script
) -> Participant:
    """``name``'s service with a durable SQLite ledger in ``data_dir``."""
    service = Participant(
        name,
        ParticipantSettings(
            data_dir=data_dir,
            prefix=prefix,
            rabbitmq_url=rabbitmq_url,
            relay_poll_interval=0.2,
        ),
        business=metadata,
    )

    async def handle(
        conn: AsyncConnection, payload: dict[str, JsonValue], command: CommandEnvelope
    ) -> dict[str, JsonValue]:
        kind = command.command_type
        script.entered[kind] += 1
        gate = script.gates.get(kind)
        if gate is not None:
            await gate.wait()
        if kind in script.refuse:
            raise BusinessError("refused", f"{kind} refused by the script")
        if kind in script.transient:
            raise TransientError("unavailable", f"{kind} unavailable by the script")
        await conn.execute(
            effects.insert().values(
                saga_id=command.saga_id, command_type=kind, attempt=command.attempt
            )
        )
        return {"done": kind}

    for command_type in COMMAND_TYPES[name]:
        service.handler(command_type)(handle)
    return service


@dataclass
class Participants:
    services: dict[str, Participant]
    script: Script

    async def effects(self) -> Counter[str]:
        """How many times each command type took effect, over every participant's table."""
        found: Counter[str] = Counter()
        for service in self.services.values():
            async with service.ledger.reader.connect() as conn:
                rows = await conn.execute(sa.select(effects.c.command_type))
                found.update(r.command_type for r in rows)
        return found

    async def recorded(self) -> Counter[tuple[str, str]]:
        """The final answers in the ledgers: (command type, outcome) per idempotency key."""
        found: Counter[tuple[str, str]] = Counter()
        for service in self.services.values():
            async with service.ledger.reader.connect() as conn:
                rows = await conn.execute(sa.select(processed.c.command_type, processed.c.outcome))
                found.update((r.command_type, r.outcome) for r in rows)
        return found


@asynccontextmanager
async def running_participants(
    data_dir: Path, prefix: str, rabbitmq_url: str, script: Script | None = None
) -> AsyncIterator[Participants]:
    """alpha, beta and gamma, started on the broker; stopped on the way out (gates opened
    first, so no handler is left waiting)."""
    script = script if script is not None else Script()
    started: dict[str, Participant] = {}
    try:
        for name in PARTICIPANTS:
            service = participant(name, data_dir, prefix, rabbitmq_url, script)
            await service.start()
            started[name] = service
        yield Participants(started, script)
    finally:
        for gate in script.gates.values():
            gate.set()
        for service in started.values():
            await service.stop()
