"""A PostgreSQL restart leaves dead connections in the pool; the next batch still commits.

The store's pool does not ping every connection it hands out (that is a round trip per
transaction). A batch that gets a connection the server has closed fails; the batch (run
straight on asyncpg's connection) throws the connection away and the group commit runs the
batch again at once on a fresh one, so no message goes back to its queue for it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
import sqlalchemy as sa

from saga.messaging.group import GroupCommit
from saga.ports import Change, CommitResult
from saga.store import sql as sql_module
from saga.store.sql import SqlStore
from tests.conftest import require_postgres
from tests.store.test_store_contract import change_for, started

pytestmark = pytest.mark.postgres


@pytest.fixture
async def store(unique: str) -> AsyncIterator[SqlStore]:
    sql = SqlStore(require_postgres(), schema=f"saga_stale_{unique}", pool_size=3)
    _note_connections(sql)
    await sql.migrate()
    try:
        yield sql
    finally:
        _OPENED.pop(id(sql), None)
        await sql.drop_schema()
        await sql.close()


#: server pids of the connections each store of these tests opened, by ``id(store)``
_OPENED: dict[int, list[int]] = {}


def _note_connections(store: SqlStore) -> None:
    """Remember the server pid of every connection ``store``'s engines open."""
    pids = _OPENED.setdefault(id(store), [])

    def opened(dbapi_connection: Any, _record: Any) -> None:
        pids.append(int(dbapi_connection.driver_connection.get_server_pid()))

    for engine in {store._write, store._read}:
        sa.event.listen(engine.sync_engine, "connect", opened)


async def _terminate_opened(url: str, store: SqlStore) -> int:
    """Close, server side, the connections ``store`` opened (and no one else's: other work may
    share the database); how many were still open."""
    pids = _OPENED.get(id(store), [])
    admin = SqlStore(url, schema=store.schema)
    try:
        async with admin._write.connect() as conn:
            killed = await conn.scalar(
                sa.text(
                    "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) "
                    "FROM unnest(CAST(:pids AS integer[])) AS pid"
                ),
                {"pids": pids},
            )
    finally:
        await admin.close()
    return int(killed or 0)


async def test_a_batch_on_a_connection_the_server_closed_runs_again_and_commits(
    store: SqlStore,
) -> None:
    async def apply(changes: Sequence[Change]) -> list[CommitResult]:
        return await store.commit(changes)

    group: GroupCommit[Change, CommitResult] = GroupCommit(apply)
    assert await group.submit(change_for(started("warm"), None)) is CommitResult.APPLIED
    assert await _terminate_opened(require_postgres(), store) >= 1
    # the pool still holds the killed connection: the first run fails on it, the second not
    assert await group.submit(change_for(started("after"), None)) is CommitResult.APPLIED
    assert group.batches == 2


async def test_a_look_up_on_a_connection_the_server_closed_answers_from_a_fresh_one(
    store: SqlStore,
) -> None:
    """Sagas are read straight on a pooled connection's driver: a dead one is given up and
    the read made again, as before, through SQLAlchemy."""
    made = started("look-up")
    assert await store.commit([change_for(made, None)]) == [CommitResult.APPLIED]
    store._states.clear()
    assert await store.load(made.state.saga_id) == made.state  # a pooled connection now
    assert await _terminate_opened(require_postgres(), store) >= 1
    assert await store.load(made.state.saga_id) == made.state
    assert await store.load_many([made.state.saga_id]) == {made.state.saga_id: made.state}


async def test_a_read_that_hangs_gives_up_its_connection_and_is_made_again(
    store: SqlStore, monkeypatch: pytest.MonkeyPatch, given_up: list[object]
) -> None:
    """Look-ups are read one at a time, so a read straight on the driver is bounded: one that
    outlasts it (here a slow statement; a connection the network left half-open alike) gives
    its connection up and is made again through SQLAlchemy on another."""
    monkeypatch.setattr(sql_module, "_PG_READ_TIMEOUT", 0.05)
    rows = await store._read_pg("SELECT pg_sleep(0.3) IS NULL AS slept, $1::int AS n", 7)
    assert [(r["slept"], r["n"]) for r in rows] == [(False, 7)]
    assert len(given_up) == 1  # the first try timed out; the second, through SQLAlchemy, did not
    assert store._read.pool.checkedout() == 0  # nothing left out of the pool
