"""The saga list the admin API pages through, on every store: the same order (ties on
created_at broken by id), the same keyset pages and the same filters in memory, on SQLite and
on PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from saga.core.definition import SagaDefinition, Step
from saga.core.engine import decide
from saga.core.state import ReplyFailed, SagaState, SagaStatus, Started
from saga.ports import Change, CommitResult, SagaFilter, Store
from saga.store.memory import MemoryStore
from saga.store.sql import SqlStore
from tests.conftest import require_postgres

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
DEF = SagaDefinition(
    "order", 1, [Step("charge", participant="pay", action="pay.charge", compensatable=False)]
)
OTHER = SagaDefinition(
    "refund", 1, [Step("refund", participant="pay", action="pay.refund", compensatable=False)]
)


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, unique: str
) -> AsyncIterator[Store]:
    if request.param == "memory":
        yield MemoryStore()
        return
    if request.param == "sqlite":
        sql = SqlStore(f"sqlite+aiosqlite:///{tmp_path / 'saga.db'}")
    else:
        sql = SqlStore(require_postgres(), schema=f"saga_filters_{unique}")
    await sql.migrate()
    try:
        yield sql
    finally:
        await sql.drop_schema()
        await sql.close()


async def create(
    store: Store, at: datetime, *, key: str | None = None, d: SagaDefinition = DEF
) -> SagaState:
    t = decide(d, None, Started(uuid.uuid4(), {}, key), at)
    assert await store.commit([Change(t, expected_version=None)]) == [CommitResult.APPLIED]
    return t.state


async def decline(store: Store, s: SagaState) -> SagaState:
    assert s.awaiting is not None
    t = decide(DEF, s, ReplyFailed(s.awaiting, "pay", "declined"), s.created_at)
    assert await store.commit([Change(t, expected_version=s.version)]) == [CommitResult.APPLIED]
    return t.state


def position(s: SagaState) -> tuple[datetime, uuid.UUID]:
    return (s.created_at, s.saga_id)


async def pages(store: Store, query: SagaFilter) -> list[list[SagaState]]:
    found: list[list[SagaState]] = []
    start_after = None
    while True:
        page = await store.list_sagas(
            SagaFilter(**{**_fields(query), "start_after": start_after})  # type: ignore[arg-type]
        )
        if not page:
            return found
        found.append(page)
        start_after = position(page[-1])


def _fields(query: SagaFilter) -> dict[str, object]:
    return {name: getattr(query, name) for name in SagaFilter.__dataclass_fields__}


async def test_keyset_pages_cover_everything_once_in_both_orders(store: Store) -> None:
    # six created in the same instant: their ids alone order them
    sagas = [await create(store, T0) for _ in range(6)]
    sagas += [await create(store, T0 + timedelta(seconds=i)) for i in (-2, -1, 1, 2)]
    oldest_first = sorted(sagas, key=position)

    for newest_first in (True, False):
        expected = list(reversed(oldest_first)) if newest_first else oldest_first
        got = await pages(store, SagaFilter(limit=3, newest_first=newest_first))
        assert [len(p) for p in got] == [3, 3, 3, 1]
        assert [s.saga_id for p in got for s in p] == [s.saga_id for s in expected]
        # the older by-id anchor gives the same pages
        second = await store.list_sagas(
            SagaFilter(limit=3, newest_first=newest_first, after=got[0][-1].saga_id)
        )
        assert second == got[1]


async def test_filters_combine(store: Store) -> None:
    early = await create(store, T0 - timedelta(hours=2), key="a")
    ended = await decline(store, await create(store, T0 - timedelta(hours=1), key="b"))
    late = await create(store, T0, key="c")
    refund = await create(store, T0 + timedelta(hours=1), key="a", d=OTHER)

    async def ids(**fields: object) -> set[uuid.UUID]:
        found = await store.list_sagas(SagaFilter(**fields))  # type: ignore[arg-type]
        return {s.saga_id for s in found}

    assert ended.status is SagaStatus.COMPENSATED
    running = {early.saga_id, late.saga_id, refund.saga_id}
    assert await ids(statuses=frozenset({SagaStatus.RUNNING})) == running
    assert await ids(
        statuses=frozenset({SagaStatus.RUNNING, SagaStatus.COMPENSATED})
    ) == running | {ended.saga_id}
    assert await ids(status=SagaStatus.COMPENSATED) == {ended.saga_id}
    both = frozenset({SagaStatus.FAILED, SagaStatus.COMPLETED})
    assert await ids(status=SagaStatus.RUNNING, statuses=both) == set()  # both must hold
    assert await ids(name="refund") == {refund.saga_id}
    assert await ids(key="a") == {early.saga_id, refund.saga_id}
    assert await ids(key="a", name="order") == {early.saga_id}
    assert await ids(since=T0 - timedelta(hours=1)) == {ended.saga_id, late.saga_id, refund.saga_id}
    assert await ids(until=T0) == {early.saga_id, ended.saga_id}  # until is exclusive
    assert await ids(since=T0, until=T0 + timedelta(hours=1)) == {late.saga_id}

    full = str(late.saga_id)
    assert await ids(id_prefix=full) == {late.saga_id}
    assert await ids(id_prefix=full.upper().replace("-", "")) == {late.saga_id}
    for length in (1, 4, 9, 20):
        prefix = full.replace("-", "")[:length]
        every = (early, ended, late, refund)
        assert await ids(id_prefix=prefix) == {
            s.saga_id for s in every if s.saga_id.hex.startswith(prefix)
        }
    assert await ids(id_prefix="0" * 32) == set()


@pytest.mark.parametrize("bad", ["xyz", "g", "0" * 33, "12 34"])
def test_an_id_prefix_must_be_hex(bad: str) -> None:
    with pytest.raises(ValueError, match="not a saga id"):
        SagaFilter(id_prefix=bad)
