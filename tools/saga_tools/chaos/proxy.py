"""A TCP proxy that misbehaves on demand, placed between the stack's processes and a broker.

There is no toxiproxy package in Debian, and the faults the tests need are few, so this runs in
the caller's own asyncio loop (``await proxy.start()`` ... ``await proxy.close()``) with knobs
that take effect at once, for live connections too:

* ``latency``: seconds added to every chunk, each direction. Chunks are delayed, not
  serialised, so throughput stays what it was (a long link, not a thin one).
* ``blackhole``: new connections are accepted and held, existing ones stall; nothing is
  forwarded either way and nothing is closed, as when a network path silently drops packets.
  Clearing it forwards whatever waited, and held connections then reach the upstream.
* :meth:`TcpProxy.drop_connections`: reset (RST) every live connection, both sides, as a
  crashed middlebox or a broker-side disconnect does.
* ``stage``: a :class:`StageFault` that reads the AMQP frames a client sends and, at a stage of
  its start-up (the TCP accept, the handshake, opening a channel, declaring the topology,
  attaching a consumer), resets the connection or holds it silent before the broker sees that
  frame; for the next ``times`` connections, or every one.

Counters say what happened (``connections``, ``active``, ``bytes_up``, ``bytes_down``,
``drops``), so a test can check the clients really reconnected rather than sat idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from dataclasses import dataclass, field

__all__ = ["STAGES", "ProxyStats", "StageFault", "TcpProxy"]

_CHUNK = 64 * 1024

#: the start-up stages a :class:`StageFault` can cut at: the first frame of each that a client
#: sends, as AMQP (class id, method id); ``connect`` is the TCP accept itself, before any byte
STAGES: dict[str, tuple[int, int] | None] = {
    "connect": None,
    "start-ok": (10, 11),  # the handshake: credentials
    "tune-ok": (10, 31),
    "open": (10, 40),  # the handshake's last step: the vhost
    "channel": (20, 10),  # the first thing after the handshake
    "confirm": (85, 10),
    "exchange": (40, 10),  # the topology
    "queue": (50, 10),
    "bind": (50, 20),
    "qos": (60, 10),  # a consumer being attached
    "consume": (60, 20),
}

_PROTOCOL_HEADER = 8  # b"AMQP\x00\x00\x09\x01"


@dataclass
class StageFault:
    """At ``stage`` (a key of :data:`STAGES`), ``reset`` the connection (RST), ``close`` it (FIN,
    as a peer that hangs up) or ``hold`` it (nothing forwarded either way, nothing closed), for
    the next ``times`` connections (None: every one). The frame that reaches the stage is never
    forwarded, so the broker has not seen it."""

    stage: str
    action: str = "reset"
    times: int | None = None
    hits: int = 0  # connections it was armed for
    reached: int = 0  # connections that reached the stage (and were cut or held there)
    held: int = 0  # connections held at the stage

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"unknown stage {self.stage!r}: one of {', '.join(STAGES)}")
        if self.action not in ("reset", "close", "hold"):
            raise ValueError(f"unknown action {self.action!r}: reset, close or hold")

    def armed(self) -> bool:
        return self.times is None or self.hits < self.times


class _FrameWatch:
    """Follows the frames a client sends to find the first method of a stage."""

    def __init__(self, method: tuple[int, int]):
        self.method = method
        self._buffer = b""
        self._start = 0  # the stream offset of the buffer's first byte
        self._received = 0  # bytes of the stream seen so far
        self._header_left = _PROTOCOL_HEADER

    def reached(self, data: bytes) -> int | None:
        """Where in ``data`` (the next chunk of the client's stream) the stage's method frame
        begins, or None when the stage is not in it."""
        chunk_start = self._received
        self._received += len(data)
        self._buffer += data
        if self._header_left:
            skipped = min(self._header_left, len(self._buffer))
            self._buffer = self._buffer[skipped:]
            self._start += skipped
            self._header_left -= skipped
        while len(self._buffer) >= 7:
            kind, size = self._buffer[0], struct.unpack(">I", self._buffer[3:7])[0]
            if kind == 1 and len(self._buffer) < 11:
                return None  # wait for the method's ids
            if kind == 1 and struct.unpack(">HH", self._buffer[7:11]) == self.method:
                return max(0, self._start - chunk_start)
            if len(self._buffer) < 8 + size:
                return None
            self._buffer = self._buffer[8 + size :]
            self._start += 8 + size
        return None


@dataclass
class ProxyStats:
    connections: int = 0  # accepted since start
    upstream_failures: int = 0  # accepted, but the upstream refused or could not be reached
    bytes_up: int = 0  # client -> upstream
    bytes_down: int = 0  # upstream -> client
    drops: int = 0  # connections reset by drop_connections()


@dataclass(eq=False)
class _Link:
    """One client connection and, once the gate lets it through, its upstream connection."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def close(self) -> None:
        """Close both sockets with FIN (a peer that hangs up) and stop its tasks."""
        for writer in (self.client, self.upstream):
            if writer is not None:
                writer.close()
        for task in self.tasks:
            task.cancel()

    def reset(self) -> None:
        """Close both sockets with RST rather than FIN (an abrupt failure) and stop its tasks."""
        for writer in (self.client, self.upstream):
            if writer is not None:
                _rst(writer)
        for task in self.tasks:
            task.cancel()


def _rst(writer: asyncio.StreamWriter) -> None:
    """Abort the connection; SO_LINGER 0 makes the kernel send RST instead of FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class TcpProxy:
    """Forward ``listen_host:port`` to ``upstream_host:upstream_port``, with faults on demand.

    ``port`` is the port it listens on (a free one when 0 is given), known after
    :meth:`start`.
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        connect_timeout: float = 10.0,
    ):
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.listen_host = listen_host
        self.port = listen_port
        self.connect_timeout = connect_timeout
        self.latency = 0.0
        #: a fault at a start-up stage of the next connections (see StageFault)
        self.stage: StageFault | None = None
        self.stats = ProxyStats()
        self._open = asyncio.Event()  # set: forwarding; clear: blackholed
        self._open.set()
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()

    # --- knobs -------------------------------------------------------------------------

    @property
    def blackhole(self) -> bool:
        return not self._open.is_set()

    @blackhole.setter
    def blackhole(self, on: bool) -> None:
        if on:
            self._open.clear()
        else:
            self._open.set()

    @property
    def active(self) -> int:
        """Live client connections."""
        return len(self._links)

    def drop_connections(self) -> int:
        """Reset every live connection; returns how many there were."""
        links = list(self._links)
        for link in links:
            link.reset()
        self._links.clear()
        self.stats.drops += len(links)
        return len(links)

    def url(self, amqp_url: str) -> str:
        """``amqp_url`` (of the upstream) with its host and port replaced by the proxy's."""
        scheme, rest = amqp_url.split("://", 1)
        creds, _, tail = rest.rpartition("@")
        path = tail.split("/", 1)[1] if "/" in tail else ""
        who = f"{creds}@" if creds else ""
        return f"{scheme}://{who}{self.listen_host}:{self.port}/{path}"

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.listen_host, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop listening and reset every connection."""
        if self._server is not None:
            self._server.close()
        tasks = [t for link in self._links for t in link.tasks]
        self.drop_connections()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None

    async def __aenter__(self) -> TcpProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- forwarding --------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats.connections += 1
        link = _Link(writer)
        self._links.add(link)
        me = asyncio.current_task()
        if me is not None:
            link.tasks.add(me)  # so a drop while connecting cancels the connect too
        fault = self.stage if self.stage is not None and self.stage.armed() else None
        if fault is not None:
            fault.hits += 1
        method = STAGES[fault.stage] if fault is not None else None
        try:
            if fault is not None and method is None:  # the stage is the accept itself
                fault.reached += 1
                if fault.action == "reset":
                    _rst(writer)
                    return
                if fault.action == "close":
                    writer.close()
                    return
                fault.held += 1
                await asyncio.Event().wait()  # held until the link is reset or closed
            await self._open.wait()  # a blackhole holds new connections here
            try:
                up_reader, up_writer = await asyncio.wait_for(
                    asyncio.open_connection(self.upstream_host, self.upstream_port),
                    self.connect_timeout,
                )
            except (OSError, TimeoutError):
                self.stats.upstream_failures += 1
                _rst(writer)  # the client sees the refusal as a reset
                return
            link.upstream = up_writer
            up: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
            down: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
            watch = _FrameWatch(method) if fault is not None and method is not None else None
            pumps = [
                asyncio.create_task(self._read(reader, up, watch, fault, link)),
                asyncio.create_task(self._send(up, up_writer, upstream=True)),
                asyncio.create_task(self._read(up_reader, down)),
                asyncio.create_task(self._send(down, writer, upstream=False)),
            ]
            link.tasks.update(pumps)
            # a side at EOF (once its data is sent) or a failed write ends the whole link:
            # half-open AMQP is useless
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            pass
        finally:
            if link in self._links:
                self._links.discard(link)
                for task in link.tasks:
                    if task is not me:
                        task.cancel()
                for w in (link.client, link.upstream):
                    if w is not None:
                        w.transport.abort()

    async def _read(
        self,
        reader: asyncio.StreamReader,
        queue: asyncio.Queue[tuple[float, bytes]],
        watch: _FrameWatch | None = None,
        fault: StageFault | None = None,
        link: _Link | None = None,
    ) -> None:
        """Stamp each chunk with the time it is due; returns at EOF once all of it was sent.

        A sender task per direction sends each chunk when due, so latency delays every chunk
        by the same amount without limiting throughput. With ``watch``, the chunk that reaches
        its stage is not forwarded: the link is reset (``action`` reset) or reads stop for good
        (hold)."""
        with contextlib.suppress(ConnectionError, OSError):
            while True:
                await self._open.wait()  # blackholed: stop reading, let TCP back up
                data = await reader.read(_CHUNK)
                if not data:
                    break
                at = watch.reached(data) if watch is not None else None
                if at is not None:
                    if fault is not None:
                        fault.reached += 1
                    if at:  # what came before the stage reaches the broker
                        queue.put_nowait((time.monotonic() + self.latency, data[:at]))
                        await queue.join()
                    action = fault.action if fault is not None else "hold"
                    if action == "reset" and link is not None:
                        link.reset()
                        self._links.discard(link)
                        return
                    if action == "close" and link is not None:
                        link.close()
                        self._links.discard(link)
                        return
                    if fault is not None:
                        fault.held += 1
                    await asyncio.Event().wait()  # held: silent until reset or closed
                queue.put_nowait((time.monotonic() + self.latency, data))
        await queue.join()

    async def _send(
        self,
        queue: asyncio.Queue[tuple[float, bytes]],
        writer: asyncio.StreamWriter,
        *,
        upstream: bool,
    ) -> None:
        """Send chunks when due; returns (ending the link) when the peer is gone."""
        while True:
            due, data = await queue.get()
            try:
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                await self._open.wait()  # blackholed: hold what was read
                writer.write(data)
                await writer.drain()
            except (ConnectionError, OSError):
                return
            finally:
                queue.task_done()
            if upstream:
                self.stats.bytes_up += len(data)
            else:
                self.stats.bytes_down += len(data)
