"""On PostgreSQL each instance keeps a copy of the sagas in flight, used only while the row still
has the copy's version.

Two stores on one schema stand for two orchestrator instances sharing the database: they take
turns deciding events of the same sagas, each on what its own ``load_many`` / ``load`` returns.
A copy used without checking its version would be the state this instance last wrote, while the
other one has moved the saga on since: the decision would be made on a stale state. The copy
saves decoding the row, never the read: an instance decodes only what the other one changed.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from saga.core.definition import SagaDefinition, Step
from saga.core.engine import decide
from saga.core.state import ReplySucceeded, SagaState, SagaStatus, Started
from saga.ports import CommitResult
from saga.store import sql as sql_module
from saga.store.schema import sagas
from saga.store.sql import SqlStore
from tests.conftest import require_postgres
from tests.store.test_store_contract import DEF, T0, change_for, reply_ok, started

pytestmark = pytest.mark.postgres

FOUR = SagaDefinition(
    "four", 1, [Step(f"s{n}", participant="p", action=f"p.a{n}") for n in range(4)]
)


@pytest.fixture
async def pair(unique: str) -> AsyncIterator[tuple[SqlStore, SqlStore]]:
    schema = f"saga_copies_{unique}"
    first = SqlStore(require_postgres(), schema=schema)
    await first.migrate()
    second = SqlStore(require_postgres(), schema=schema)
    try:
        yield first, second
    finally:
        await second.close()
        await first.drop_schema()
        await first.close()


@pytest.fixture
def decoded(monkeypatch: pytest.MonkeyPatch) -> list[uuid.UUID]:
    """The sagas whose row was decoded into a state, in order."""
    seen: list[uuid.UUID] = []
    original = sql_module._state_from_row

    def counting(row: Any) -> SagaState:
        seen.append(row["saga_id"])
        return original(row)

    monkeypatch.setattr(sql_module, "_state_from_row", counting)
    return seen


async def test_two_instances_taking_turns_never_decide_on_a_stale_copy(
    pair: tuple[SqlStore, SqlStore],
) -> None:
    a, b = pair
    at = T0
    made = [decide(FOUR, None, Started(uuid.uuid4(), {"n": n}, f"k-{n}"), at) for n in range(3)]
    assert await a.commit([change_for(t, None) for t in made]) == [CommitResult.APPLIED] * 3
    truth = {t.state.saga_id: t.state for t in made}
    ids = list(truth)
    assert await b.load_many(ids) == truth  # both instances now hold a copy of version 1
    for turn in range(len(FOUR.steps)):  # a, b, a, b: one step each
        store = (a, b)[turn % 2]
        loaded = await store.load_many(ids)
        assert loaded == truth, f"turn {turn}: decided on a stale copy"
        assert await store.load(ids[0]) == truth[ids[0]]  # a start's or the admin API's
        at += timedelta(seconds=1)
        changes = [
            change_for(decide(FOUR, s, ReplySucceeded(s.awaiting, "p", {}), at), s.version)  # type: ignore[arg-type]
            for s in loaded.values()
        ]
        assert await store.commit(changes) == [CommitResult.APPLIED] * len(changes), turn
        truth.update((c.transition.state.saga_id, c.transition.state) for c in changes)
    assert all(s.status is SagaStatus.COMPLETED for s in truth.values())
    assert await a.load_many(ids) == truth
    assert await b.load_many(ids) == truth


async def test_a_copy_is_decoded_again_only_when_the_other_instance_moved_the_saga(
    pair: tuple[SqlStore, SqlStore], decoded: list[uuid.UUID]
) -> None:
    a, b = pair
    made = [started(f"d-{n}") for n in range(2)]
    assert await a.commit([change_for(t, None) for t in made]) == [CommitResult.APPLIED] * 2
    ids = [t.state.saga_id for t in made]
    assert set(await a.load_many(ids)) == set(ids)
    assert decoded == [], "the instance that wrote the sagas decodes nothing"
    first = await b.load_many(ids)
    assert sorted(decoded) == sorted(ids), "the other instance had no copy: decoded once"
    decoded.clear()
    moved = decide(DEF, first[ids[0]], reply_ok(first[ids[0]]), T0 + timedelta(seconds=1))
    assert await b.commit([change_for(moved, first[ids[0]].version)]) == [CommitResult.APPLIED]
    assert await b.load_many(ids) == {ids[0]: moved.state, ids[1]: first[ids[1]]}
    assert decoded == []
    found = await a.load_many(ids)
    assert found[ids[0]] == moved.state
    assert decoded == [ids[0]], "only the saga the other instance changed is decoded"


async def test_a_conflict_drops_the_copy_and_the_next_read_is_fresh(
    pair: tuple[SqlStore, SqlStore],
) -> None:
    a, b = pair
    t = started("c-1")
    assert await a.commit([change_for(t, None)]) == [CommitResult.APPLIED]
    s = t.state
    mine = decide(DEF, s, reply_ok(s), T0 + timedelta(seconds=1))
    theirs = decide(DEF, s, reply_ok(s, {"id": "theirs"}), T0 + timedelta(seconds=2))
    assert await b.commit([change_for(theirs, s.version)]) == [CommitResult.APPLIED]
    assert await a.commit([change_for(mine, s.version)]) == [CommitResult.CONFLICT]
    assert s.saga_id not in a._states
    assert await a.load(s.saga_id) == theirs.state


async def test_a_copy_of_a_version_the_database_lost_gives_way_to_what_is_read(
    pair: tuple[SqlStore, SqlStore],
) -> None:
    """After a fail-over or a restore the row may be at a lower version than this instance's
    copy: the row read replaces the copy, or the copy would pass for the row once the saga
    is back at the copy's version with other content."""
    a, b = pair
    t = started("lost-1")
    assert await a.commit([change_for(t, None)]) == [CommitResult.APPLIED]
    s = t.state
    mine = decide(DEF, s, reply_ok(s), T0 + timedelta(seconds=1))
    assert await a.commit([change_for(mine, s.version)]) == [CommitResult.APPLIED]
    async with a._write.begin() as conn:  # the database comes back one version behind
        await conn.execute(
            sa.update(sagas).where(sagas.c.saga_id == s.saga_id).values(version=s.version)
        )
    assert (await a.load_many([s.saga_id]))[s.saga_id].version == s.version
    behind = (await b.load_many([s.saga_id]))[s.saga_id]
    theirs = decide(DEF, behind, reply_ok(behind, {"id": "theirs"}), T0 + timedelta(seconds=2))
    assert await b.commit([change_for(theirs, behind.version)]) == [CommitResult.APPLIED]
    assert theirs.state.version == mine.state.version  # the copy's version, other content
    assert await a.load_many([s.saga_id]) == {s.saga_id: theirs.state}


async def test_look_ups_made_while_one_is_read_are_read_together_next(
    pair: tuple[SqlStore, SqlStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Starts check their saga is new one turn of the loop after another: one read of
    look-ups at a time, the rest read together after it, not a connection each meanwhile."""
    a, _ = pair
    made = [started(f"r-{n}") for n in range(6)]
    assert await a.commit([change_for(t, None) for t in made]) == [CommitResult.APPLIED] * 6
    a._states.clear()
    reads: list[int] = []
    gate, reading = asyncio.Event(), asyncio.Event()
    original = a._read_pg

    async def held(sql: str, *args: Any) -> Any:
        reads.append(len(args[0]))
        reading.set()
        if len(reads) == 1:
            await gate.wait()  # the first read is under way until the rest were asked for
        return await original(sql, *args)

    monkeypatch.setattr(a, "_read_pg", held)
    asked = [asyncio.ensure_future(a.load(made[0].state.saga_id))]
    await reading.wait()
    for t in made[1:]:
        asked.append(asyncio.ensure_future(a.load(t.state.saga_id)))
        await asyncio.sleep(0)
    gate.set()
    assert await asyncio.gather(*asked) == [t.state for t in made]
    assert reads == [1, 5]
