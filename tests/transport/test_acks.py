"""_Acks, the batched acks of one consumer channel, against a recording channel: which frames
go out, and that a multiple ack never settles a delivery that was not acked."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from saga.transport.broker import _Acks
from saga.work import WorkCounts


class Channel:
    """Records the ack and nack frames queued; a nack can be made to fail."""

    def __init__(self) -> None:
        self.frames: list[tuple[str, int, bool]] = []
        self.fail_nack: BaseException | None = None

    async def basic_ack(self, tag: int, multiple: bool = False, wait: bool = True) -> None:
        self.frames.append(("ack", tag, multiple))

    async def basic_nack(
        self, tag: int, multiple: bool = False, requeue: bool = True, wait: bool = True
    ) -> None:
        if self.fail_nack is not None:
            raise self.fail_nack
        self.frames.append(("nack", tag, requeue))


def acks() -> tuple[_Acks, Channel]:
    channel = Channel()
    return _Acks(cast(Any, channel), WorkCounts()), channel


async def test_a_run_of_acks_is_one_multiple_ack_and_the_rest_single() -> None:
    batch, channel = acks()
    for tag in range(1, 7):
        batch.received(tag)
    for tag in (1, 2, 3, 5, 6):  # 4 still being handled
        batch.ack(tag)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert channel.frames == [("ack", 3, True), ("ack", 5, False), ("ack", 6, False)]
    batch.ack(4)
    await batch.drain()
    assert channel.frames[-1] == ("ack", 4, False)


async def test_a_nack_between_acks_is_never_covered_by_a_multiple_ack() -> None:
    batch, channel = acks()
    for tag in (1, 2, 3):
        batch.received(tag)
    batch.ack(1)
    await batch.nack(2, requeue=True)
    batch.ack(3)
    await batch.drain()
    # the nack is queued first; the multiple ack after it settles only what is still open
    assert channel.frames == [("nack", 2, True), ("ack", 3, True)]


@pytest.mark.parametrize("failure", [asyncio.CancelledError(), RuntimeError("channel closed")])
async def test_a_nack_that_was_not_queued_keeps_its_delivery_unsettled(
    failure: BaseException,
) -> None:
    """A nack that never reached the write queue (cancelled while it was full, or the
    channel gone) leaves its delivery open: no multiple ack may settle it, so the broker hands
    it back when the channel closes."""
    batch, channel = acks()
    for tag in (1, 2, 3):
        batch.received(tag)
    channel.fail_nack = failure
    with pytest.raises(type(failure)):
        await batch.nack(1, requeue=True)
    batch.ack(2)
    batch.ack(3)
    await batch.drain()
    assert channel.frames == [("ack", 2, False), ("ack", 3, False)]
