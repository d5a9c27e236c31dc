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

__all__ = ["ProxyStats", "TcpProxy"]

_CHUNK = 64 * 1024


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
        try:
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
            pumps = [
                asyncio.create_task(self._read(reader, up)),
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
        self, reader: asyncio.StreamReader, queue: asyncio.Queue[tuple[float, bytes]]
    ) -> None:
        """Stamp each chunk with the time it is due; returns at EOF once all of it was sent.

        A sender task per direction sends each chunk when due, so latency delays every chunk
        by the same amount without limiting throughput."""
        with contextlib.suppress(ConnectionError, OSError):
            while True:
                await self._open.wait()  # blackholed: stop reading, let TCP back up
                data = await reader.read(_CHUNK)
                if not data:
                    break
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
