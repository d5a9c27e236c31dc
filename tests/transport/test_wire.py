"""BatchingWriter: frames written in one turn of the loop leave in one socket write; a busy
connection waits a moment for more; drain and close send what is held first."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from saga.transport import wire
from saga.transport.wire import BatchingWriter


class FakeWriter:
    """The StreamWriter under the batching one: records every write it is given."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.closed = False
        self.drained = 0

    def write(self, data: bytes) -> None:
        self.sent.append(data)

    async def drain(self) -> None:
        self.drained += 1

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def batching() -> tuple[BatchingWriter, FakeWriter]:
    under = FakeWriter()
    return BatchingWriter(cast(Any, under)), under


async def test_writes_of_one_turn_leave_together_in_order() -> None:
    writer, under = batching()
    for frame in (b"a", b"b", b"c"):
        writer.write(frame)
    assert under.sent == []  # held until the end of the turn
    await asyncio.sleep(0)
    assert under.sent == [b"abc"]
    assert writer.counts.sends == 1 and writer.writes == 3


async def test_a_lone_write_on_a_quiet_connection_leaves_in_the_same_turn() -> None:
    writer, under = batching()
    writer.write(b"x")
    await asyncio.sleep(0)
    assert under.sent == [b"x"]


async def test_a_busy_connection_waits_a_moment_for_more() -> None:
    writer, under = batching()
    writer.write(b"1")
    await asyncio.sleep(0)  # sent: the connection is busy from now on
    writer.write(b"2")
    await asyncio.sleep(0)
    writer.write(b"3")
    await asyncio.sleep(0)
    assert under.sent == [b"1"]  # 2 and 3 wait for the window
    await asyncio.sleep(wire.WINDOW * 4)
    assert under.sent == [b"1", b"23"]
    await asyncio.sleep(wire.BUSY * 2)  # quiet again
    writer.write(b"4")
    await asyncio.sleep(0)
    assert under.sent == [b"1", b"23", b"4"]


async def test_drain_and_close_send_what_is_held_first() -> None:
    writer, under = batching()
    writer.write(b"frame")
    await writer.drain()
    assert under.sent == [b"frame"] and under.drained == 1
    writer.write(b"close-frame")
    writer.close()
    assert under.sent == [b"frame", b"close-frame"] and under.closed
    writer.write(b"late")
    await asyncio.sleep(wire.WINDOW * 4)
    assert under.sent == [b"frame", b"close-frame"]  # nothing goes to a closed socket


async def test_send_now_leaves_at_once_behind_what_is_held() -> None:
    writer, under = batching()
    writer.write(b"ack")
    writer.send_now(b"publish")  # does not wait for the end of the turn, nor passes the ack
    assert under.sent == [b"ackpublish"]
    await asyncio.sleep(wire.WINDOW * 4)
    assert under.sent == [b"ackpublish"] and writer.counts.sends == 1


async def test_send_now_on_a_busy_connection_waits_for_the_window() -> None:
    writer, under = batching()
    writer.send_now(b"1")  # quiet: at once
    writer.send_now(b"2")  # busy from now on: shares the next send
    writer.write(b"3")
    assert under.sent == [b"1"]
    await asyncio.sleep(wire.WINDOW * 4)
    assert under.sent == [b"1", b"23"]


def test_a_connection_the_link_did_not_open_has_no_writer() -> None:
    class Connection:
        pass

    ours, theirs = Connection(), Connection()
    writer, _ = batching()
    wire.adopt_writer(ours, writer)
    assert wire.writer_of(ours) is writer
    assert wire.writer_of(theirs) is None
