"""The PostgreSQL group commit's bulk path writes exactly what the row-by-row path writes.

A batch goes to PostgreSQL as one statement per kind of row (``SqlStore._commit_bulk_pg``): the
version-checked update is raw SQL over ``unnest`` arrays, so its JSON text, timestamps and
cleared claims must equal what SQLAlchemy writes row by row. The same changes are written both
ways, each into a schema of its own, and every stored row is compared as text; a batch holding
a duplicate or a stale version must fall back and answer exactly as row by row does.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from saga.core.engine import decide
from saga.core.state import ReplySucceeded
from saga.ports import Change, CommitResult, OutboxMessage
from saga.store import sql as sql_module
from saga.store.sql import SqlStore
from tests.conftest import require_postgres
from tests.store.test_store_contract import DEF, change_for, reply_ok, started

pytestmark = pytest.mark.postgres

T0 = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
TABLES = ("saga_instances", "saga_inbox", "saga_history", "saga_outbox")


@pytest.fixture
async def stores(unique: str) -> AsyncIterator[tuple[SqlStore, SqlStore]]:
    made = []
    for kind in ("bulk", "rows"):
        store = SqlStore(require_postgres(), schema=f"saga_pgbulk_{kind}_{unique}")
        await store.migrate()
        store._bulk_pg = kind == "bulk"
        made.append(store)
    try:
        yield made[0], made[1]
    finally:
        for store in made:
            await store.drop_schema()
            await store.close()


async def dump(store: SqlStore) -> dict[str, list[tuple[str, ...]]]:
    """Every row of every table, every value as PostgreSQL prints it."""
    found = {}
    async with store._write.connect() as conn:
        for table in TABLES:
            columns = [
                r[0]
                for r in await conn.execute(
                    sa.text(
                        "SELECT column_name FROM information_schema.columns "
                        "WHERE table_schema = :schema AND table_name = :table "
                        "ORDER BY ordinal_position"
                    ),
                    {"schema": store.schema, "table": table},
                )
            ]
            text = ", ".join(f"{c}::text" for c in columns)
            rows = await conn.execute(sa.text(f'SELECT {text} FROM "{store.schema}".{table}'))
            found[table] = sorted(tuple(map(str, r)) for r in rows)
    return found


def with_outbox(change: Change) -> Change:
    t = change.transition
    message = OutboxMessage(
        message_id=uuid.uuid5(t.state.saga_id, str(t.state.version)),
        saga_id=t.state.saga_id,
        exchange="saga.commands",
        routing_key="stock",
        message_type="stock.reserve",
        body=b'{"n": "\\u00e4"}',
        headers={"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"},
        created_at=T0,
    )
    return Change(t, change.expected_version, inbox_id=change.inbox_id, outbox=(message,))


async def test_a_batch_is_stored_alike_in_bulk_and_row_by_row(
    stores: tuple[SqlStore, SqlStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sql_module, "_now", lambda: T0)  # the inbox's and outbox's clock
    bulk, rows = stores
    sagas = [started(f"key-{i}", at=T0, saga_id=uuid.UUID(int=i + 1)) for i in range(6)]
    answers: list[list[CommitResult]] = []
    for store in stores:
        answers.append(await store.commit([with_outbox(change_for(t, None)) for t in sagas]))
    assert answers[0] == answers[1] == [CommitResult.APPLIED] * 6

    # one reply each, in a scrambled order; later a timer that moves nothing, and a stale one
    moved = [decide(DEF, t.state, reply_ok(t.state), T0 + timedelta(seconds=1)) for t in sagas]
    batch = [
        with_outbox(change_for(m, t.state.version, inbox=uuid.UUID(int=100 + i)))
        for i, (m, t) in enumerate(zip(moved, sagas, strict=True))
    ][::-1]
    for store in stores:
        assert await store.commit(batch) == [CommitResult.APPLIED] * 6
    assert await dump(bulk) == await dump(rows)

    # a duplicate inbox id and a stale version in one batch: both fall back, answer alike
    again = decide(DEF, moved[0].state, reply_ok(moved[0].state), T0 + timedelta(seconds=2))
    stale = decide(DEF, moved[1].state, reply_ok(moved[1].state), T0 + timedelta(seconds=2))
    mixed = [
        change_for(again, moved[0].state.version, inbox=uuid.UUID(int=200)),
        change_for(stale, moved[1].state.version - 1, inbox=uuid.UUID(int=201)),
        change_for(moved[2], sagas[2].state.version, inbox=uuid.UUID(int=102)),  # duplicate
    ]
    results: list[Any] = [await store.commit(mixed) for store in stores]
    expected = [CommitResult.APPLIED, CommitResult.CONFLICT, CommitResult.DUPLICATE]
    assert results[0] == results[1] == expected
    assert await dump(bulk) == await dump(rows)


async def test_several_changes_of_one_saga_in_a_batch_stay_in_bulk(
    stores: tuple[SqlStore, SqlStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The replies of a parallel group's members arrive together: one saga with two changes in
    a batch (and a saga started and moved in the same batch) is one saga row in the bulk
    path, stored as row by row stores it, without falling back; a chain that does not follow
    on still falls back and answers alike."""
    monkeypatch.setattr(sql_module, "_now", lambda: T0)
    bulk, rows = stores
    first = [started(f"key-{i}", at=T0, saga_id=uuid.UUID(int=i + 1)) for i in range(3)]
    for store in stores:
        await store.commit([with_outbox(change_for(t, None)) for t in first])
    t1 = T0 + timedelta(seconds=1)
    one = decide(DEF, first[0].state, reply_ok(first[0].state), t1)
    two = decide(DEF, one.state, reply_ok(one.state), t1)
    other = decide(DEF, first[1].state, reply_ok(first[1].state), t1)
    new = started("key-new", at=t1, saga_id=uuid.UUID(int=50))
    moved_new = decide(DEF, new.state, reply_ok(new.state), t1)
    batch = [
        with_outbox(change_for(one, first[0].state.version, inbox=uuid.UUID(int=300))),
        with_outbox(change_for(other, first[1].state.version, inbox=uuid.UUID(int=301))),
        with_outbox(change_for(new, None)),
        with_outbox(change_for(two, one.state.version, inbox=uuid.UUID(int=302))),
        with_outbox(change_for(moved_new, new.state.version, inbox=uuid.UUID(int=303))),
    ]

    async def row_by_row(*args: Any) -> None:
        raise AssertionError("the bulk path fell back to row by row")

    monkeypatch.setattr(bulk, "_commit", row_by_row)
    assert await bulk.commit(batch) == [CommitResult.APPLIED] * 5
    monkeypatch.undo()
    monkeypatch.setattr(sql_module, "_now", lambda: T0)
    assert await rows.commit(batch) == [CommitResult.APPLIED] * 5
    assert await dump(bulk) == await dump(rows)
    assert (await bulk.load(first[0].state.saga_id)) == two.state

    # a second change decided on a stale first one: not a chain, so row by row decides
    t2 = T0 + timedelta(seconds=2)
    last = first[2].state
    ahead = decide(DEF, last, reply_ok(last), t2)
    stray = decide(DEF, last, reply_ok(last), t2)
    broken = [
        change_for(ahead, last.version, inbox=uuid.UUID(int=400)),
        change_for(stray, last.version, inbox=uuid.UUID(int=401)),
    ]
    results = [await store.commit(broken) for store in stores]
    assert results[0] == results[1] == [CommitResult.APPLIED, CommitResult.CONFLICT]
    assert await dump(bulk) == await dump(rows)


async def test_a_saga_another_instance_moved_stays_out_of_a_bulk_batch_as_row_by_row_leaves_it(
    stores: tuple[SqlStore, SqlStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two instances: the replies of a parallel group's members reach both, so most batches
    hold one saga the other instance has just moved. Its row, once locked, shows a version
    its changes did not expect: those changes are answered as row by row answers them (an
    ignored reply before the stale one recorded, the stale one and every later one CONFLICT)
    and the rest of the batch stays in bulk, stored as row by row stores it."""
    monkeypatch.setattr(sql_module, "_now", lambda: T0)
    bulk, rows = stores
    first = [started(f"key-{i}", at=T0, saga_id=uuid.UUID(int=i + 1)) for i in range(3)]
    t1 = T0 + timedelta(seconds=1)
    elsewhere = decide(DEF, first[0].state, reply_ok(first[0].state, {"id": "other"}), t1)
    for store in stores:
        await store.commit([with_outbox(change_for(t, None)) for t in first])
        # the other instance moves saga 1 on
        assert await store.commit([change_for(elsewhere, first[0].state.version)]) == [
            CommitResult.APPLIED
        ]
    t2 = T0 + timedelta(seconds=2)
    s0, s1 = first[0].state, first[1].state
    ignored = decide(DEF, s0, ReplySucceeded(uuid.uuid4(), "stock", {}), t2)
    assert not ignored.applied
    stale = decide(DEF, s0, reply_ok(s0), t2)
    on_stale = decide(DEF, stale.state, reply_ok(stale.state), t2)
    ignored_after = decide(DEF, stale.state, ReplySucceeded(uuid.uuid4(), "pay", {}), t2)
    fine = decide(DEF, s1, reply_ok(s1), t2)
    batch = [
        with_outbox(change_for(fine, s1.version, inbox=uuid.UUID(int=500))),
        change_for(ignored, s0.version, inbox=uuid.UUID(int=501)),
        with_outbox(change_for(stale, s0.version, inbox=uuid.UUID(int=502))),
        with_outbox(change_for(on_stale, stale.state.version, inbox=uuid.UUID(int=503))),
        change_for(ignored_after, stale.state.version, inbox=uuid.UUID(int=504)),
    ]
    expected = [CommitResult.APPLIED, CommitResult.RECORDED] + [CommitResult.CONFLICT] * 3

    async def row_by_row(*args: Any) -> None:
        raise AssertionError("the bulk path fell back to row by row")

    monkeypatch.setattr(bulk, "_commit", row_by_row)
    assert await bulk.commit(batch) == expected
    monkeypatch.undo()
    monkeypatch.setattr(sql_module, "_now", lambda: T0)
    assert await rows.commit(batch) == expected
    assert await dump(bulk) == await dump(rows)
    assert await bulk.load(s0.saga_id) == elsewhere.state
    assert await bulk.load(s1.saga_id) == fine.state
