"""Fewer, larger writes to the broker's socket.

aiormq writes every frame set (a publish, an ack) to the socket as soon as its writer task
takes it from the queue: one ``send`` system call, and usually one TCP segment the broker must
read and parse, per message. Under load many frames are written within one turn of the event
loop; :class:`BatchingWriter` holds them until the end of that turn and sends them together, so
a burst of publishes and acks costs one system call instead of dozens, on our side and on the
broker's (on a loopback connection the sender's ``send`` also runs the receiver's TCP work).
A frame written on a quiet connection leaves in the same turn; one written within ``BUSY`` of
the last send waits ``WINDOW`` (half a millisecond) so the frames of the next few turns share
its write: under load that halves the writes again, at a cost well below one fsync.

``drain()`` and ``close()`` send what is held first, so aiormq's flow control and its orderly
close (Connection.Close, after everything else) are unchanged.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

from aiormq.connection import TCPTransportFactory, TLSTransportFactory, TransportFactory
from yarl import URL

from saga.transport.frames import FastFrameReceiver, claim
from saga.work import WorkCounts

__all__ = ["BatchingTransportFactory", "BatchingWriter", "adopt_writer", "writer_of"]

#: a write within this many seconds of the last send finds the connection busy ...
BUSY = 0.002
#: ... and waits this long for more frames to share its send; otherwise it leaves this turn
WINDOW = 0.0005


#: the writer under each aiormq connection the link opened (see :func:`writer_of`)
_WRITERS: weakref.WeakKeyDictionary[Any, BatchingWriter] = weakref.WeakKeyDictionary()


def adopt_writer(connection: Any, writer: BatchingWriter) -> None:
    """Note that ``writer`` sends the frames of ``connection`` (an aiormq connection)."""
    _WRITERS[connection] = writer


def writer_of(connection: Any) -> BatchingWriter | None:
    """The writer of ``connection``, for frames that may skip its write queue (when that queue
    is empty, every frame queued before is already with the writer, so order is kept); None for
    a connection the link did not open."""
    return _WRITERS.get(connection)


class BatchingWriter:
    """The part of :class:`asyncio.StreamWriter` that aiormq uses, sending writes made in one
    turn of the loop together."""

    def __init__(self, writer: asyncio.StreamWriter, counts: WorkCounts | None = None):
        self._writer = writer
        self._held: list[bytes] = []
        self._flush: asyncio.Handle | None = None
        self.counts = counts if counts is not None else WorkCounts()
        self._last = float("-inf")  # loop time of the last send
        #: frame sets written to this writer (each would have been a send without it)
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        self._held.append(data)
        if self._flush is None:
            loop = asyncio.get_running_loop()
            if loop.time() - self._last < BUSY:
                # busy: frames keep coming, so wait a moment for more to share the write
                self._flush = loop.call_later(WINDOW, self.flush)
            else:
                self._flush = loop.call_soon(self.flush)

    def send_now(self, data: bytes) -> None:
        """Send ``data`` at once, with whatever is held ahead of it, if the connection is quiet:
        a publish on its saga's way to the next step
        (:meth:`saga.transport.amqp.Publisher.publish_many`) does not wait for the end of the
        loop's turn, which at one saga in flight runs the acks, metrics and log lines of the
        batch that made it. On a busy connection it waits for the window like any write, so
        the frames of the next few turns still share its send."""
        if asyncio.get_running_loop().time() - self._last < BUSY:
            self.write(data)
            return
        self.writes += 1
        self._held.append(data)
        self.flush()

    def flush(self) -> None:
        """Send what is held now."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if not self._held or self._writer.is_closing():
            self._held.clear()
            return
        held, self._held = self._held, []
        self._last = asyncio.get_running_loop().time()
        self.counts.sends += 1
        self._writer.write(held[0] if len(held) == 1 else b"".join(held))

    async def drain(self) -> None:
        self.flush()
        await self._writer.drain()

    def close(self) -> None:
        self.flush()
        self._writer.close()

    async def wait_closed(self) -> None:
        await self._writer.wait_closed()

    def is_closing(self) -> bool:
        return self._writer.is_closing()

    @property
    def transport(self) -> asyncio.WriteTransport:
        return self._writer.transport

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._writer.get_extra_info(name, default)

    def can_write_eof(self) -> bool:
        return self._writer.can_write_eof()

    def write_eof(self) -> None:
        self.flush()
        self._writer.write_eof()


class BatchingTransportFactory(TransportFactory):
    """aiormq's own TCP or TLS transport, with a :class:`BatchingWriter` in front, read by a
    :class:`~saga.transport.frames.FastFrameReceiver`."""

    def __init__(self, tls: bool, counts: WorkCounts | None = None):
        self._inner: TransportFactory = TLSTransportFactory() if tls else TCPTransportFactory()
        self._counts = counts
        #: the writer of the newest connection (tests)
        self.writer: BatchingWriter | None = None
        #: the frame receiver of the newest connection; its owner calls ``serve`` once the
        #: connection is open
        self.receiver: FastFrameReceiver | None = None

    async def create(
        self, url: URL, **kwargs: Any
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await self._inner.create(url, **kwargs)
        self.writer = BatchingWriter(writer, self._counts)
        self.receiver = claim(reader)
        # aiormq only calls the StreamWriter methods above
        return reader, self.writer  # type: ignore[return-value]
