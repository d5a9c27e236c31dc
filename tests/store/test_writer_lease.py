"""A participant's ledger lends its one SQLite writer connection, held across transactions, to
one writer at a time (:mod:`saga.store.lease`): a batch, the outbox's deletes and the span
drain's never interleave on it, a transaction that fails or is cancelled leaves nothing behind,
and a statement through SQLAlchemy's connection is part of the transaction the lease opened."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from saga.participant.ledger import Ledger, outbox, spans
from saga.participant.ledger_sql import SqliteStatements, statements

T0 = datetime(2024, 1, 1, tzinfo=UTC)


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[Ledger]:
    found = Ledger(f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}")
    await found.setup()
    try:
        yield found
    finally:
        await found.close()


def _row(message_id: uuid.UUID) -> dict[str, Any]:
    return {
        "message_id": message_id,
        "saga_id": uuid.uuid4(),
        "routing_key": "replies",
        "message_type": "t.reply",
        "body": b"{}",
        "headers": {},
        "created_at": T0,
    }


async def _outbox_ids(ledger: Ledger) -> set[uuid.UUID]:
    async with ledger.reader.connect() as conn:
        return set(await conn.scalars(sa.select(outbox.c.message_id)))


async def _held(
    ledger: Ledger, inside: asyncio.Event, leave: asyncio.Event, row: uuid.UUID
) -> None:
    """A batch: writes ``row`` and stays in its transaction until ``leave``."""
    async with ledger.begin() as conn:
        await conn.execute(outbox.insert(), [_row(row)])
        inside.set()
        await leave.wait()


async def test_an_outbox_sweep_waits_for_the_batch_holding_the_connection(ledger: Ledger) -> None:
    first, second = uuid.uuid4(), uuid.uuid4()
    async with ledger.begin() as conn:
        await conn.execute(outbox.insert(), [_row(first)])
    inside, leave = asyncio.Event(), asyncio.Event()
    batch = asyncio.create_task(_held(ledger, inside, leave, second))
    await inside.wait()
    sweep = asyncio.create_task(ledger._delete_sent([first, second]))  # the sweeper's delete
    await asyncio.sleep(0.05)
    assert not sweep.done()  # it waits for the lease, not on the connection the batch uses
    assert ledger.engine.pool.checkedout() == 1  # type: ignore[attr-defined]
    leave.set()
    await asyncio.gather(batch, sweep)
    assert await _outbox_ids(ledger) == set()  # the delete ran after the batch committed
    assert ledger.lease is not None and ledger.lease.checkouts == 1


async def test_a_span_drain_waits_for_the_batch_holding_the_connection(ledger: Ledger) -> None:
    async with ledger.begin() as conn:
        await conn.execute(spans.insert(), [{"records": [{"name": "a"}]}])
    inside, leave = asyncio.Event(), asyncio.Event()
    batch = asyncio.create_task(_held(ledger, inside, leave, uuid.uuid4()))
    await inside.wait()
    exported: list[Mapping[str, Any]] = []

    async def export(records: list[Mapping[str, Any]]) -> None:
        exported.extend(records)

    drain = asyncio.create_task(ledger.drain_spans(10, export))
    await asyncio.sleep(0.05)
    assert exported == [{"name": "a"}] and not drain.done()  # read; its delete waits
    leave.set()
    assert (await asyncio.gather(batch, drain))[1] == 1
    async with ledger.reader.connect() as conn:
        assert (await conn.scalar(sa.select(sa.func.count()).select_from(spans))) == 0


async def test_a_failed_transaction_rolls_back_and_the_next_gets_a_clean_connection(
    ledger: Ledger,
) -> None:
    lease = ledger.lease
    assert lease is not None
    lost, kept = uuid.uuid4(), uuid.uuid4()
    with pytest.raises(RuntimeError):
        async with ledger.begin() as conn:
            await conn.execute(outbox.insert(), [_row(lost)])  # through SQLAlchemy
            ledger_sql = await statements(conn, ledger)
            assert isinstance(ledger_sql, SqliteStatements)
            await ledger_sql.delete_sent([lost])
            await conn.execute(outbox.insert(), [_row(lost)])
            raise RuntimeError("the batch fails")
    async with ledger.begin() as conn:
        await conn.execute(outbox.insert(), [_row(kept)])
    assert await _outbox_ids(ledger) == {kept}
    assert lease.checkouts == 2  # the failed one's connection went back to the pool
    with pytest.raises(RuntimeError):  # only the driver's statements: SQLAlchemy began nothing
        async with ledger.begin() as conn:
            await (await statements(conn, ledger)).write(_Rows([_row(lost)]))
            raise RuntimeError("the batch fails")
    assert await _outbox_ids(ledger) == {kept}


async def test_a_cancelled_transaction_leaves_nothing_behind(ledger: Ledger) -> None:
    inside, leave = asyncio.Event(), asyncio.Event()
    batch = asyncio.create_task(_held(ledger, inside, leave, uuid.uuid4()))
    await inside.wait()
    batch.cancel()
    with pytest.raises(asyncio.CancelledError):
        await batch
    kept = uuid.uuid4()
    async with ledger.begin() as conn:
        await conn.execute(outbox.insert(), [_row(kept)])
    assert await _outbox_ids(ledger) == {kept}


async def test_raw_and_sqlalchemy_statements_share_one_transaction(ledger: Ledger) -> None:
    """The lease opens the transaction on the driver and SQLAlchemy's joins it (no second
    BEGIN): raw and SQLAlchemy statements are in one transaction, and one commit ends both."""
    counts = ledger.counts
    before = counts.transactions
    raw, core = uuid.uuid4(), uuid.uuid4()
    async with ledger.begin() as conn:
        ledger_sql = await statements(conn, ledger)
        await ledger_sql.write(_Rows([_row(raw)]))
        assert conn.in_transaction()  # as SQLAlchemy sees it, from the start
        await conn.execute(outbox.insert(), [_row(core)])
    assert counts.transactions == before + 1
    assert await _outbox_ids(ledger) == {raw, core}
    async with ledger.begin() as conn:  # and the next begins afresh on the same connection
        await conn.execute(outbox.delete())
    assert await _outbox_ids(ledger) == set()


async def test_the_engine_itself_still_writes_while_the_lease_holds_the_connection(
    ledger: Ledger,
) -> None:
    async with ledger.begin() as conn:
        await conn.execute(outbox.insert(), [_row(uuid.uuid4())])
    other = uuid.uuid4()
    async with asyncio.timeout(5):  # a spare connection, not the pool's 60 s timeout
        async with ledger.engine.begin() as conn:
            await conn.execute(outbox.insert(), [_row(other)])
    assert other in await _outbox_ids(ledger)


class _Rows:
    def __init__(self, outbox_rows: list[dict[str, Any]]):
        self.processed_rows: list[dict[str, Any]] = []
        self.tombstone_rows: list[dict[str, Any]] = []
        self.reply_rows: list[dict[str, Any]] = []
        self.outbox_rows = outbox_rows
        self.span_rows: list[dict[str, Any]] = []


async def test_a_handler_cannot_end_the_transaction_the_lease_opened(ledger: Ledger) -> None:
    """The connection lent for a batch is in a transaction as SQLAlchemy sees it: a handler's
    own ``begin()`` is refused, so it cannot commit the rows written before it halfway."""
    first, second = uuid.uuid4(), uuid.uuid4()
    with pytest.raises(sa.exc.InvalidRequestError):
        async with ledger.begin() as conn:
            assert conn.in_transaction()
            await conn.execute(outbox.insert(), [_row(first)])
            async with conn.begin():  # what a careless handler might do
                await conn.execute(outbox.insert(), [_row(second)])
    assert await _outbox_ids(ledger) == set()  # the whole batch rolled back, nothing committed
    async with ledger.begin() as conn:
        await conn.execute(outbox.insert(), [_row(first)])
    assert await _outbox_ids(ledger) == {first}
