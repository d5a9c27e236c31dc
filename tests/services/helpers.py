"""Commands as the orchestrator would send them, and a participant on a real database."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from saga.core.ids import idempotency_key
from saga.participant import Participant, ParticipantSettings
from saga.participant.ledger import Ledger
from saga.protocol.envelope import CommandEnvelope, Direction, dump_data
from saga.protocol.types import Contract
from saga_demo.checkout import registry
from tests.conftest import require_postgres

#: the demo's command types, with the step and participant of each
COMMANDS = {c.command_type: c for c in registry().commands()}


def command(
    command_type: str, payload: Contract, saga_id: uuid.UUID, *, attempt: int = 1
) -> CommandEnvelope:
    """A fresh message of one step of ``saga_id``: the idempotency key is the same for every
    attempt of that step in that direction, the message id new each time."""
    spec = COMMANDS[command_type]
    step = spec.step
    direction: Direction = "action" if spec.compensates is None else "compensation"
    return CommandEnvelope(
        schema_version=1,
        message_id=uuid.uuid4(),
        idempotency_key=idempotency_key(saga_id, step, direction),
        saga_id=saga_id,
        saga_name="checkout",
        step=step,
        direction=direction,
        attempt=attempt,
        participant=spec.participant,
        command_type=command_type,
        reply_to="saga.replies",
        deadline=datetime.now(UTC) + timedelta(seconds=10),
        payload=dump_data(payload),
    )


@asynccontextmanager
async def participant(
    build: Callable[[ParticipantSettings], Participant], tmp_path: Path, backend: str = "sqlite"
) -> AsyncIterator[Participant]:
    """A built, set-up and seeded participant on a SQLite file, or on a PostgreSQL schema of
    its own (named per test, so tests running side by side do not share state)."""
    if backend == "sqlite":
        service = build(ParticipantSettings(data_dir=tmp_path, services_database_url=None))
    else:
        service = build(
            ParticipantSettings(data_dir=tmp_path, services_database_url=require_postgres())
        )
        shared = service.ledger
        service.ledger = Ledger(
            shared.url,
            schema=f"{shared.schema}_{uuid.uuid4().hex[:10]}",
            business=shared.business,
        )
        await shared.close()
    await service.setup_database()
    try:
        yield service
    finally:
        if backend != "sqlite":
            await service.ledger.drop()
        await service.ledger.close()


async def rows(service: Participant, table: sa.Table) -> list[dict[str, Any]]:
    async with service.ledger.reader.connect() as conn:
        result = await conn.execute(sa.select(table))
        return [dict(r._mapping) for r in result]


async def row(service: Participant, table: sa.Table, order_ref: uuid.UUID) -> dict[str, Any] | None:
    async with service.ledger.reader.connect() as conn:
        result = await conn.execute(sa.select(table).where(table.c.order_ref == order_ref))
        found = result.first()
        return None if found is None else dict(found._mapping)
