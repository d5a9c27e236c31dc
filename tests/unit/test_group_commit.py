"""Group commit: batching, all-or-nothing per item, and a bad item never failing its batch."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
import sqlalchemy as sa

from saga.messaging.group import REQUEUE, GroupCommit, Requeue


class WriteError(Exception):
    pass


async def test_items_arriving_during_a_commit_share_the_next_one() -> None:
    batches: list[list[int]] = []

    async def apply(items: Sequence[int]) -> list[int]:
        batches.append(list(items))
        await asyncio.sleep(0.01)  # the commit: others queue up meanwhile
        return [i * 10 for i in items]

    group = GroupCommit(apply, max_batch=3)
    first = asyncio.ensure_future(group.submit(0))
    await asyncio.sleep(0.001)  # its commit has begun, alone: a lone item is not held back
    results = await asyncio.gather(*(group.submit(i) for i in range(1, 8)))
    assert await first == 0
    assert results == [i * 10 for i in range(1, 8)]
    assert batches == [[0], [1, 2, 3], [4, 5, 6], [7]]  # at most max_batch per commit
    assert group.batches == 4


async def test_a_failed_batch_is_retried_item_by_item_so_only_the_bad_one_fails() -> None:
    calls: list[list[int]] = []

    async def apply(items: Sequence[int]) -> list[int]:
        calls.append(list(items))
        await asyncio.sleep(0)
        if 2 in items:
            raise WriteError("item 2 cannot be written")
        return list(items)

    group = GroupCommit(apply)
    first = asyncio.ensure_future(group.submit(0))
    await asyncio.sleep(0)
    outcomes = await asyncio.gather(*(group.submit(i) for i in (1, 2, 3)), return_exceptions=True)
    assert await first == 0
    assert outcomes[0] == 1 and isinstance(outcomes[1], WriteError) and outcomes[2] == 3
    assert calls == [[0], [1, 2, 3], [1], [2], [3]]


class DeadlockError(Exception):
    """What asyncpg raises when PostgreSQL breaks a deadlock by rolling this transaction back."""

    sqlstate = "40P01"


async def test_a_batch_the_database_rolled_back_for_a_deadlock_runs_again_at_once() -> None:
    calls: list[list[int]] = []

    async def apply(items: Sequence[int]) -> list[int]:
        calls.append(list(items))
        await asyncio.sleep(0)
        if len(calls) <= 2:
            raise sa.exc.DBAPIError("UPDATE saga_instances", {}, DeadlockError("deadlock detected"))
        return [i * 10 for i in items]

    group = GroupCommit(apply)
    outcomes = await asyncio.gather(*(group.submit(i) for i in (1, 2, 3)))
    assert outcomes == [10, 20, 30]  # nobody saw the deadlock: nothing goes back to a queue
    assert calls == [[1, 2, 3]] * 3
    assert group.rolled_back == 2


async def test_a_batch_rolled_back_every_time_fails_in_the_end() -> None:
    calls = 0

    async def apply(items: Sequence[int]) -> list[int]:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0)
        raise sa.exc.DBAPIError("INSERT INTO saga_inbox", {}, DeadlockError("deadlock detected"))

    group = GroupCommit(apply)
    with pytest.raises(sa.exc.DBAPIError):
        await group.submit(1)
    assert calls == GroupCommit.ROLLED_BACK_RUNS


async def test_when_the_database_is_down_the_batch_fails_whole_without_retries() -> None:
    calls: list[list[int]] = []

    async def apply(items: Sequence[int]) -> list[int]:
        calls.append(list(items))
        await asyncio.sleep(0)
        raise sa.exc.OperationalError("BEGIN", {}, OSError("connection refused"))

    group = GroupCommit(apply)
    first = asyncio.ensure_future(group.submit(0))
    await asyncio.sleep(0)
    outcomes = await asyncio.gather(*(group.submit(i) for i in (1, 2)), return_exceptions=True)
    with pytest.raises(sa.exc.OperationalError):
        await first
    assert all(isinstance(o, sa.exc.OperationalError) for o in outcomes)
    assert calls == [[0], [1, 2]]  # not tried one by one: each would fail the same way


async def test_an_item_answered_with_an_error_fails_alone_and_a_requeued_one_goes_first() -> None:
    calls: list[list[int]] = []
    conflicts = {2: 1}  # item 2 conflicts once, then commits

    async def apply(items: Sequence[int]) -> list[int | BaseException | Requeue]:
        calls.append(list(items))
        await asyncio.sleep(0)
        answers: list[int | BaseException | Requeue] = []
        for i in items:
            if i == 1:
                answers.append(WriteError("item 1 is refused"))
            elif conflicts.get(i, 0) > 0:
                conflicts[i] -= 1
                answers.append(REQUEUE)
            else:
                answers.append(i)
        return answers

    group = GroupCommit(apply)
    first = asyncio.ensure_future(group.submit(0))
    await asyncio.sleep(0)
    outcomes = await asyncio.gather(*(group.submit(i) for i in (1, 2, 3)), return_exceptions=True)
    assert await first == 0
    assert isinstance(outcomes[0], WriteError) and outcomes[1:] == [2, 3]
    assert calls == [[0], [1, 2, 3], [2]]  # the requeued item is decided again, first
    assert group.batches == 3


async def test_drained_waits_for_the_batch_in_flight() -> None:
    done: list[int] = []

    async def apply(items: Sequence[int]) -> list[int]:
        await asyncio.sleep(0.01)
        done.extend(items)
        return list(items)

    group = GroupCommit(apply)
    pending = asyncio.ensure_future(group.submit(7))
    await asyncio.sleep(0)
    await group.drained()
    assert done == [7] and await pending == 7
