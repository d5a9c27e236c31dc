"""Two orchestrator instances on one PostgreSQL database do not deadlock on each other's batches.

Replies of the same sagas can reach two instances at once (a redelivery after a connection
loss, a duplicate, a timer firing on one instance while the reply lands on the other), so two
transactions may update the same saga rows and insert the same inbox ids. Taken in the order
the messages came, the row locks of two such batches can cross, and PostgreSQL breaks the
cycle by rolling one transaction back: every message in it went back to its queue for a
second, long enough for steps to time out. The store takes its row locks in saga-id order, so
such batches queue behind each other instead; the loser of each saga sees a version conflict.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from saga.core.engine import decide
from saga.ports import Change, CommitResult
from saga.store.sql import SqlStore
from tests.conftest import require_postgres
from tests.store.test_store_contract import DEF, T0, change_for, create, reply_ok

pytestmark = pytest.mark.postgres

SAGAS = 40
ROUNDS = 6


@pytest.fixture
async def two_instances(unique: str) -> AsyncIterator[tuple[SqlStore, SqlStore]]:
    schema = f"saga_lock_order_{unique}"
    first = SqlStore(require_postgres(), schema=schema)
    await first.migrate()
    await first.setup()
    second = SqlStore(require_postgres(), schema=schema)
    await second.setup()
    try:
        yield first, second
    finally:
        await second.close()
        await first.drop_schema()
        await first.close()


async def test_batches_over_the_same_sagas_in_opposite_orders_never_deadlock(
    two_instances: tuple[SqlStore, SqlStore],
) -> None:
    first, second = two_instances
    states = [await create(first) for _ in range(SAGAS)]
    for _ in range(ROUNDS):
        batches: list[list[Change]] = [[], []]
        for state in states:
            moved = decide(DEF, state, reply_ok(state), T0)
            for batch in batches:  # both decide the same step, each on its own delivery
                batch.append(change_for(moved, state.version, inbox=uuid.uuid4()))
        batches[1].reverse()  # the other instance got the messages the other way round
        results = await asyncio.gather(first.commit(batches[0]), second.commit(batches[1]))
        # each saga moved once: one instance applied it, the other saw a version conflict
        for index in range(SAGAS):
            pair = {results[0][index], results[1][SAGAS - 1 - index]}
            assert pair == {CommitResult.APPLIED, CommitResult.CONFLICT}, index
        loaded = await first.load_many([s.saga_id for s in states])
        assert all(loaded[s.saga_id].version == s.version + 1 for s in states)
        states = [loaded[s.saga_id] for s in states]
        if states[0].status.is_terminal:
            states = [await create(first) for _ in range(SAGAS)]
