"""The in-memory copy of the outbox: answers like the table, and never hides a row from it."""

from __future__ import annotations

import asyncio
import uuid
from uuid import UUID

import pytest

from saga.ports import OutboxMessage
from saga.store import fresh
from saga.store.fresh import OutboxCopy


def message() -> OutboxMessage:
    return OutboxMessage(uuid.uuid4(), uuid.uuid4(), "x", "order", "order.create", b"{}")


def ids(messages: list[OutboxMessage] | None) -> list[UUID] | None:
    return None if messages is None else [m.message_id for m in messages]


async def test_the_table_is_read_until_a_read_shows_it_holds_nothing_more() -> None:
    copy = OutboxCopy(lambda _ids: asyncio.sleep(0))
    a, b = message(), message()
    copy.add([a])
    assert copy.pending(10) is None  # never read: the table may hold rows of a previous run
    assert copy.read([b, a], limit=2) == [b, a]
    assert copy.pending(10) is None  # as many rows as asked for: there may be more
    copy.read([b, a], limit=10)
    assert ids(copy.pending(10)) == [a.message_id, b.message_id]


async def test_rows_stay_until_sent_and_sent_rows_are_left_out_of_reads() -> None:
    deleted: list[list[UUID]] = []

    async def delete(message_ids: list[UUID]) -> None:
        deleted.append(message_ids)

    copy = OutboxCopy(delete, delete_after=0.01)
    a, b = message(), message()
    copy.read([], limit=10)
    copy.add([a, b])
    assert ids(copy.pending(10)) == [a.message_id, b.message_id]
    assert ids(copy.pending(10)) == [a.message_id, b.message_id]  # not sent: offered again
    copy.sent([a.message_id])
    assert ids(copy.pending(10)) == [b.message_id]
    assert copy.read([a, b], limit=10) == [b]  # confirmed, delete not committed yet
    await asyncio.sleep(0.05)
    assert deleted == [[a.message_id]]  # no write came along: deleted on its own
    await copy.close()


async def test_a_write_transaction_takes_the_deletes_and_gives_them_back_on_rollback() -> None:
    copy = OutboxCopy(lambda _ids: asyncio.sleep(0), delete_after=10)
    a = message()
    copy.read([a], limit=10)
    copy.sent([a.message_id])
    taken = copy.take_deletes()
    assert taken == [a.message_id] and copy.take_deletes() == []
    copy.deletes_done(taken, committed=False)
    assert copy.read([a], limit=10) == []  # still being deleted
    taken = copy.take_deletes()
    assert taken == [a.message_id]
    copy.deletes_done(taken, committed=True)
    assert copy.read([a], limit=10) == [a]  # gone from our books: a row still there is real
    await copy.close()


async def test_the_table_is_read_again_after_the_interval() -> None:
    copy = OutboxCopy(lambda _ids: asyncio.sleep(0), reread_every=0.0)
    copy.read([], limit=10)
    await asyncio.sleep(0.001)
    assert copy.pending(10) is None


class _Clock:
    """``time`` as fresh.py reads it, moved by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now


async def test_a_row_waits_its_own_delay_for_a_write_before_it_is_deleted_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The delay runs from each row's confirm: a row confirmed just before the sweeper's
    beat would otherwise be deleted in a transaction of its own, though the next write was
    about to take it."""
    clock = _Clock()
    monkeypatch.setattr(fresh, "time", clock)
    deleted: list[list[UUID]] = []

    async def delete(message_ids: list[UUID]) -> None:
        deleted.append(message_ids)

    copy = OutboxCopy(delete, delete_after=0.05)
    a, b = message(), message()
    copy.read([], limit=10)
    copy.sent([a.message_id])
    await asyncio.sleep(0)  # the sweeper starts, to wake when a is due
    taken = copy.take_deletes()  # a write transaction takes a
    copy.deletes_done(taken, committed=True)
    clock.now = 0.04
    copy.sent([b.message_id])  # confirmed 0.04 s in: due at 0.09
    await asyncio.sleep(0.1)  # the sweeper woke when a would have been due
    assert deleted == []
    clock.now = 0.1
    for _ in range(200):
        if deleted:
            break
        await asyncio.sleep(0.01)
    assert deleted == [[b.message_id]]  # no write came along: deleted on its own
    await copy.close()
