"""Schema versions: applied in order by `migrate`, and checked at start."""

import asyncio
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from saga.core.definition import SagaDefinition, Step
from saga.core.engine import decide
from saga.core.errors import ConfigError
from saga.core.state import ReplySucceeded, Started
from saga.store.schema import HEAD, MIGRATIONS, sagas, schema_version
from saga.store.sql import SqlStore, _row_from_state
from tests.conftest import require_postgres


async def test_a_database_behind_head_is_refused_until_migrated(tmp_path: Path) -> None:
    store = SqlStore(f"sqlite+aiosqlite:///{tmp_path / 'saga.db'}")
    try:
        with pytest.raises(ConfigError, match="schema is at version 0"):
            await store.setup()
        assert await store.migrate() == [v for v, _, _ in MIGRATIONS]
        await store.setup()
        # pretend the database was made by the first release: undo every later migration
        async with store._write.begin() as conn:
            await conn.execute(schema_version.delete().where(schema_version.c.version > 1))
            await conn.execute(sa.text("DROP INDEX IF EXISTS ix_saga_inbox_received"))
            await conn.execute(sa.text("ALTER TABLE saga_instances DROP COLUMN sent_at"))
            await conn.execute(
                sa.text("ALTER TABLE saga_instances DROP COLUMN timer_claimed_until")
            )
            await conn.execute(sa.text("ALTER TABLE saga_outbox DROP COLUMN claimed_until"))
            await conn.execute(sa.text("ALTER TABLE saga_instances DROP COLUMN lanes"))
            await conn.execute(sa.text("ALTER TABLE saga_instances DROP COLUMN expires_at"))
        with pytest.raises(ConfigError, match=f"at version 1, this saga needs {HEAD}"):
            await store.setup()
        assert await store.migrate() == [v for v, _, _ in MIGRATIONS if v > 1]
        assert await store.migrate() == []
        await store.setup()
        async with store._read.connect() as conn:
            indexes, columns = await conn.run_sync(
                lambda c: (
                    {i["name"] for i in sa.inspect(c).get_indexes("saga_inbox")},
                    {col["name"] for col in sa.inspect(c).get_columns("saga_instances")},
                )
            )
        assert "ix_saga_inbox_received" in indexes
        assert {"sent_at", "timer_claimed_until", "lanes", "expires_at"} <= columns
    finally:
        await store.close()


async def test_a_saga_stored_before_groups_and_deadlines_migrates_and_continues(
    tmp_path: Path,
) -> None:
    """A database at version 5 holding a saga in flight: after migrations 6 (span records) and
    7 (group lanes, the saga's deadline) the saga loads as it was (no lanes, no deadline of its
    own) and goes on exactly as before."""
    definition = SagaDefinition(
        "order",
        1,
        [
            Step(
                "reserve", participant="stock", action="stock.reserve", compensation="stock.release"
            ),
            Step("charge", participant="pay", action="pay.charge", compensation="pay.refund"),
        ],
    )
    path = tmp_path / "saga.db"
    store = SqlStore(f"sqlite+aiosqlite:///{path}")
    at = datetime(2030, 1, 1, tzinfo=UTC)
    try:
        await store.migrate()
        async with store._write.begin() as conn:  # back to version 5, as the release before
            await conn.execute(schema_version.delete().where(schema_version.c.version > 5))
            await conn.execute(sa.text("ALTER TABLE saga_instances DROP COLUMN lanes"))
            await conn.execute(sa.text("ALTER TABLE saga_instances DROP COLUMN expires_at"))
        started = decide(definition, None, Started(uuid.uuid4(), {"n": 1}), at)
        row = {
            k: v
            for k, v in _row_from_state(started.state).items()
            if k not in ("lanes", "expires_at")
        }
        async with store._write.begin() as conn:  # the row as the release before wrote it
            await conn.execute(sagas.insert(), row)  # only the columns given are written
        assert await store.migrate() == [6, 7]
        await store.setup()
        loaded = await store.load(started.state.saga_id)
        assert loaded == started.state
        assert loaded is not None and loaded.lanes == () and loaded.expires_at is None
        assert loaded.awaiting is not None
        reply = ReplySucceeded(loaded.awaiting, "stock", {"id": "r-1"})
        again = decide(definition, started.state, reply, at)
        assert decide(definition, loaded, reply, at) == again
        [sent] = again.commands
        assert sent.step == "charge"
    finally:
        await store.close()


async def test_postgres_in_its_own_schema_is_migrated_from_the_first_release(unique: str) -> None:
    """The ALTER TABLE of later migrations names the store's schema, not the search path's."""
    store = SqlStore(require_postgres(), schema=f"saga_mig_{unique}")
    try:
        await store.migrate()
        async with store._write.begin() as conn:
            await conn.execute(schema_version.delete().where(schema_version.c.version > 1))
            for table, column in (
                ("saga_instances", "sent_at"),
                ("saga_instances", "timer_claimed_until"),
                ("saga_outbox", "claimed_until"),
                ("saga_instances", "lanes"),
                ("saga_instances", "expires_at"),
            ):
                await conn.execute(
                    sa.text(f'ALTER TABLE "saga_mig_{unique}".{table} DROP COLUMN {column}')
                )
        assert await store.migrate() == [v for v, _, _ in MIGRATIONS if v > 1]
        await store.setup()
        async with store._read.connect() as conn:
            columns = await conn.run_sync(
                lambda c: {
                    col["name"]
                    for col in sa.inspect(c).get_columns(
                        "saga_instances", schema=f"saga_mig_{unique}"
                    )
                }
            )
        assert {"sent_at", "timer_claimed_until", "lanes", "expires_at"} <= columns
    finally:
        await store.drop_schema()
        await store.close()


async def test_instances_migrating_at_once_take_turns(unique: str) -> None:
    """`saga run --migrate` on several replicas at once: one migrates, the others find it done."""
    schema = f"saga_race_{unique}"
    stores = [SqlStore(require_postgres(), schema=schema) for _ in range(3)]
    try:
        applied = await asyncio.gather(*(s.migrate() for s in stores))
        assert sorted(applied, key=len) == [[], [], [v for v, _, _ in MIGRATIONS]]
        await stores[0].setup()
    finally:
        await stores[0].drop_schema()
        for s in stores:
            await s.close()
