"""The PostgreSQL batch runs straight on asyncpg's connection: its failures are told apart as
they were through SQLAlchemy, and no failure leaves a connection checked out or a transaction
open.

A transaction PostgreSQL rolled back to break a deadlock is run again by the group commit; a
pooled connection that fails its ``BEGIN`` is given up and the batch run again on a fresh
one; a cancelled batch gives its connection up, so the server rolls back what it held.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from saga.core.engine import decide
from saga.messaging.group import GroupCommit
from saga.ports import Change, CommitResult
from saga.store.faults import UnusableConnectionError, rolled_back, stale_connection
from saga.store.sql import SqlStore
from tests.conftest import require_postgres
from tests.store.conftest import sql_store
from tests.store.test_store_contract import DEF, T0, change_for, create, reply_ok

pytestmark = pytest.mark.postgres


@pytest.fixture
async def store(tmp_path: Path, unique: str) -> AsyncIterator[SqlStore]:
    async with sql_store("postgres", tmp_path, unique, pool_size=2) as sql:
        yield sql


def group_for(store: SqlStore) -> GroupCommit[Change, CommitResult]:
    async def apply(changes: Sequence[Change]) -> list[CommitResult]:
        return await store.commit(changes)

    return GroupCommit(apply)


async def other_connection(store: SqlStore) -> Any:
    """A connection of its own (not the store's pool), in the store's schema."""
    url = require_postgres().replace("postgresql+asyncpg://", "postgresql://")
    conn = await asyncpg.connect(url, server_settings={"search_path": store.schema or ""})
    return conn


async def wait_for_lock_wait(conn: Any) -> None:
    """Until another backend of this database waits for a row lock."""
    for _ in range(500):
        waiting = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
        )
        if waiting:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the batch never waited for the row lock")


async def test_a_deadlock_in_the_raw_batch_is_rolled_back_and_run_again(
    store: SqlStore, given_up: list[object]
) -> None:
    """The batch locks saga A then waits for B, which another transaction holds and which then
    asks for A: PostgreSQL breaks the cycle by rolling the batch back (its deadlock check runs
    first: the other side's is set to wait longer). asyncpg's DeadlockDetectedError is a
    rollback, so the group commit runs the batch again, which then commits."""
    first, second = sorted([await create(store), await create(store)], key=lambda s: s.saga_id)
    changes = [
        change_for(decide(DEF, s, reply_ok(s), T0), s.version, inbox=None) for s in (first, second)
    ]
    other = await other_connection(store)
    try:
        await other.execute("SET deadlock_timeout = '10s'")
        transaction = other.transaction()
        await transaction.start()
        await other.execute(
            "SELECT 1 FROM saga_instances WHERE saga_id = $1 FOR UPDATE", second.saga_id
        )
        group = group_for(store)
        batch = asyncio.gather(*(group.submit(c) for c in changes))
        await wait_for_lock_wait(other)  # the batch holds A and waits for B
        # waits for A until the batch is rolled back, then holds it until rolled back itself
        await other.execute(
            "SELECT 1 FROM saga_instances WHERE saga_id = $1 FOR UPDATE", first.saga_id
        )
        await transaction.rollback()
        assert await batch == [CommitResult.APPLIED, CommitResult.APPLIED]
    finally:
        await other.close()
    assert group.rolled_back == 1 and group.batches == 1
    assert given_up == []  # the server answered: the connection went back to the pool
    assert store._write.pool.checkedout() == 0
    loaded = await store.load_many([first.saga_id, second.saga_id])
    assert loaded[first.saga_id].version == first.version + 1
    assert loaded[second.saga_id].version == second.version + 1


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.exceptions.DeadlockDetectedError("deadlock detected"),
        asyncpg.exceptions.SerializationError("could not serialize access"),
    ],
    ids=["deadlock", "serialization"],
)
async def test_a_statement_asyncpg_reports_rolled_back_runs_the_batch_again(
    store: SqlStore,
    given_up: list[object],
    monkeypatch: pytest.MonkeyPatch,
    error: Exception,
) -> None:
    assert rolled_back(error) and not stale_connection(error)
    state = await create(store)
    fetch = asyncpg.Connection.fetch
    raised: list[str] = []

    async def failing_once(self: Any, query: str, *args: Any, **kwargs: Any) -> Any:
        if not raised and "UPDATE" in query:
            raised.append(query)
            raise error
        return await fetch(self, query, *args, **kwargs)

    monkeypatch.setattr(asyncpg.Connection, "fetch", failing_once)
    group = group_for(store)
    moved = decide(DEF, state, reply_ok(state), T0)
    assert await group.submit(change_for(moved, state.version)) is CommitResult.APPLIED
    assert raised and group.rolled_back == 1
    assert given_up == []
    assert store._write.pool.checkedout() == 0
    loaded = await store.load(state.saga_id)
    assert loaded is not None and loaded.version == state.version + 1


async def test_a_connection_that_fails_its_begin_is_given_up_and_the_batch_run_again(
    store: SqlStore, given_up: list[object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection the server closed while it sat in the pool can fail ``BEGIN`` with a
    protocol error (asyncpg saw the server's goodbye, not yet the socket closing): it is a
    dead connection all the same."""
    state = await create(store)
    start = asyncpg.transaction.Transaction.start
    failed: list[bool] = []

    async def failing_once(self: Any) -> None:
        if not failed:
            failed.append(True)
            raise asyncpg.exceptions.InternalClientError(
                "cannot switch to state 15; another operation (2) is in progress"
            )
        await start(self)

    monkeypatch.setattr(asyncpg.transaction.Transaction, "start", failing_once)
    group = group_for(store)
    moved = decide(DEF, state, reply_ok(state), T0)
    assert await group.submit(change_for(moved, state.version)) is CommitResult.APPLIED
    assert failed and len(given_up) == 1
    assert group.rolled_back == 0 and len(given_up) == 1
    assert store._write.pool.checkedout() == 0


async def test_a_begin_that_fails_on_every_connection_fails_the_batch(
    store: SqlStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = await create(store)

    async def failing(self: Any) -> None:
        raise asyncpg.exceptions.InternalClientError("broken")

    monkeypatch.setattr(asyncpg.transaction.Transaction, "start", failing)
    moved = decide(DEF, state, reply_ok(state), T0)
    with pytest.raises(UnusableConnectionError):
        await group_for(store).submit(change_for(moved, state.version))
    assert store._write.pool.checkedout() == 0


async def test_a_cancelled_batch_leaves_no_connection_out_and_no_transaction_open(
    store: SqlStore, given_up: list[object]
) -> None:
    """Cancelled while it waits for a row lock (mid-statement): its connection is given up, so
    the server rolls back what the batch wrote and held; nothing of it stays."""
    state = await create(store)
    other = await other_connection(store)
    try:
        transaction = other.transaction()
        await transaction.start()
        await other.execute(
            "SELECT 1 FROM saga_instances WHERE saga_id = $1 FOR UPDATE", state.saga_id
        )
        moved = decide(DEF, state, reply_ok(state), T0)
        doomed = asyncio.create_task(store.commit([change_for(moved, state.version)]))
        await wait_for_lock_wait(other)
        doomed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await doomed
        assert len(given_up) == 1
        assert store._write.pool.checkedout() == 0
        await transaction.rollback()
        for _ in range(200):  # the server ends the closed connection's backend soon after
            left = await other.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND state LIKE 'idle in transaction%' AND pid <> pg_backend_pid()"
            )
            if not left:
                break
            await asyncio.sleep(0.01)
        assert not left
        # nothing of it was written; the row is free
        await other.execute("SET lock_timeout = '1s'")
        async with other.transaction():
            await other.execute(
                "SELECT 1 FROM saga_instances WHERE saga_id = $1 FOR UPDATE", state.saga_id
            )
    finally:
        await other.close()
    loaded = await store.load(state.saga_id)
    assert loaded is not None and loaded.version == state.version
    assert await store.commit([change_for(moved, state.version)]) == [CommitResult.APPLIED]
