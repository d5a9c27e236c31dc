"""One AMQP connection at a time, to one node of a list, kept up by a supervisor task.

Why not aio-pika's ``RobustConnection``: it restores channels, queues and consumers inside its
reconnect, and none of those calls has a time limit. A restore the broker never answers (a
``basic.consume`` on a quorum queue whose leader died with the node we were on, while the
survivors elect a new one) leaves the connection up and the consumer gone, for good: a
participant that takes no command again. Here recovery is explicit and bounded:

* :meth:`Link.open` connects to the first node of the list that answers, or raises one
  ConfigError naming every node and why it failed;
* when the connection is lost, the supervisor connects to the next node (round the list, one
  attempt per ``reconnect_interval``) and runs the owner's ``restore`` (declare the topology,
  consume again) with a time limit; an attempt whose restore fails or times out is closed and
  counts as a failed attempt;
* :meth:`Link.reset` throws away a connection that looks healthy but is not (a consumer that
  cannot be re-attached), so the same bounded path rebuilds everything;
* the owner sees :attr:`Link.generation` grow with every new connection, so a channel of a dead
  connection is never mistaken for a live one.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aio_pika
import aiormq
import structlog
from aio_pika.abc import AbstractConnection
from yarl import URL

from saga.core.errors import ConfigError
from saga.secrets import redact_url
from saga.transport.wire import BatchingTransportFactory, adopt_writer
from saga.work import WorkCounts

__all__ = ["Link", "LinkDownError", "note", "own_cancellation", "quietly", "reach_error"]

log = structlog.get_logger("saga.transport.link")


def note(level: str, event: str, **fields: Any) -> None:
    """Log, but never fail: recovery must go on when the log sink is broken (a closed pipe)."""
    with contextlib.suppress(Exception):
        getattr(log, level)(event, **fields)


Restore = Callable[[AbstractConnection, int], Awaitable[None]]

#: what a connection attempt may fail with (the node is down, refuses us, or answers nothing;
#: aiormq ends its frame reader with StopAsyncIteration when the peer closes mid-handshake)
CONNECT_ERRORS = (
    OSError,
    TimeoutError,
    aiormq.exceptions.AMQPError,
    ConnectionError,
    StopAsyncIteration,
)


def own_cancellation() -> bool:
    """Whether the running task itself is being cancelled.

    A connection that dies (a missed heartbeat) fails every future waiting on it with
    CancelledError; that one is a broken connection, to be handled like any other failure,
    while a cancellation of our own task must propagate."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def quietly(awaitable: Awaitable[Any], within: float) -> None:
    """Await ``awaitable`` (a close) for at most ``within`` seconds and ignore how it failed;
    only a cancellation of the caller itself propagates."""
    try:
        await asyncio.wait_for(awaitable, within)
    except asyncio.CancelledError:
        if own_cancellation():
            raise
    except Exception:  # best effort by design
        pass


_NOT_RUNNING = (
    "Is it running? Set SAGA_RABBITMQ_URL to its amqp:// address (several nodes: comma-separated)."
)
_LOGIN_REFUSED = (
    "The credentials were refused (ACCESS_REFUSED): check the user and password in "
    "SAGA_RABBITMQ_URL and that the user may use its vhost."
)
_NO_HANDSHAKE = (
    "It accepted the connection but did not complete the AMQP handshake: check that "
    "SAGA_RABBITMQ_URL names RabbitMQ's AMQP port and vhost, and the broker's log."
)
_LOGIN_ERRORS = (
    aiormq.exceptions.AuthenticationError,
    aiormq.exceptions.ProbableAuthenticationError,
)


def reach_error(
    url: str, failures: Sequence[str], errors: Sequence[BaseException] = ()
) -> ConfigError:
    """The start-up error when no node of ``url`` answered: each node and why, no password, and
    what to check given how they failed (``errors``)."""
    if errors and all(isinstance(e, _LOGIN_ERRORS) for e in errors):
        # it answered: the credentials are wrong, not the address, so no "cannot reach"
        return ConfigError(f"RabbitMQ at {redact_url(url)} refused the login. {_LOGIN_REFUSED}")
    handshake = errors and not all(_refused(e) for e in errors)
    hint = _NO_HANDSHAKE if handshake else _NOT_RUNNING
    return ConfigError(f"cannot reach RabbitMQ at {redact_url(url)}: {'; '.join(failures)}. {hint}")


def _refused(exc: BaseException) -> bool:
    """Nothing listens there, nothing answers, or the name does not resolve: no broker there."""
    if isinstance(exc, ConnectionRefusedError | socket.gaierror | TimeoutError):
        return True
    errno = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
    # refused, timed out, no network or route, no such name
    return errno in (111, 110, 101, 113, -2, -3, -5)


class LinkDownError(ConnectionError):
    """No connection to any node right now (the supervisor is still trying)."""


def _shown(url: URL) -> str:
    return redact_url(str(url))


class Link:
    """A connection to one node of ``urls`` at a time; see the module docstring."""

    #: seconds the owner's restore may take on a new connection before the attempt is given up
    RESTORE_TIMEOUT = 15.0

    def __init__(
        self,
        urls: Sequence[str],
        *,
        connect_timeout: float = 10.0,
        reconnect_interval: float = 1.0,
        ssl_context: ssl.SSLContext | None = None,
    ):
        if not urls:
            raise ValueError("no broker URL")
        self.nodes = tuple(URL(u) for u in urls)
        self.connect_timeout = connect_timeout
        self.reconnect_interval = reconnect_interval
        self._ssl_context = ssl_context
        #: publishes, deliveries, settles and socket writes over this link (saga.work)
        self.counts = WorkCounts()
        self._restore: Restore | None = None
        self._index = 0
        self._connection: AbstractConnection | None = None
        self._up = asyncio.Event()
        self._lost = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        #: how many connections this link has had (1 after open); a reconnect increments it
        self.generation = 0
        #: how many times the connection was lost and made again, for tests and metrics
        self.reconnects = 0
        #: consumers the broker dropped on a live connection and that were attached again
        self.consumer_repairs = 0
        #: the last failure to connect or restore (or of a step the owner retried), if any
        self.last_failure: str | None = None

    # --- state ----------------------------------------------------------------------------

    @property
    def node(self) -> str:
        """The node connected to (or tried last), password hidden."""
        return _shown(self.nodes[self._index])

    @property
    def port(self) -> int | None:
        return self.nodes[self._index].port

    def address(self) -> tuple[str, int]:
        """Host and port of the node connected to (or tried last), for span attributes."""
        node = self.nodes[self._index]
        return node.host or "", node.port or (5671 if node.scheme == "amqps" else 5672)

    def is_connected(self) -> bool:
        connection = self._connection
        return (
            self._up.is_set()
            and connection is not None
            and connection.connected.is_set()
            and not connection.is_closed
        )

    def on_restore(self, restore: Restore) -> None:
        """Run ``restore(connection, generation)`` on every new connection before it counts as
        up: what the owner had on the lost one (topology, consumers) is made again there."""
        self._restore = restore

    async def wait(self, within: float) -> tuple[AbstractConnection, int]:
        """The live connection and its generation; LinkDownError when none comes ``within``."""
        if not self.is_connected():
            try:
                await asyncio.wait_for(self._up.wait(), within)
            except TimeoutError:
                raise LinkDownError(
                    f"no connection to RabbitMQ ({self.node}) for {within:g}s"
                ) from None
        connection = self._connection
        if connection is None or connection.is_closed or self._closing:
            raise LinkDownError(f"the connection to RabbitMQ ({self.node}) was just lost")
        return connection, self.generation

    async def next_generation(self, generation: int, within: float) -> None:
        """Wait until a connection newer than ``generation`` is up; LinkDownError when none
        comes ``within`` seconds."""
        loop = asyncio.get_running_loop()
        end = loop.time() + within
        while self.generation <= generation or not self.is_connected():
            if self._closing:
                raise LinkDownError("the connection to RabbitMQ is closing")
            left = end - loop.time()
            if left <= 0:
                raise LinkDownError(f"no new connection to RabbitMQ ({self.node}) for {within:g}s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._up.wait(), min(left, 0.5))
            if self.is_connected() and self.generation <= generation:
                await asyncio.sleep(min(left, 0.05))  # up, but still the old one: not yet lost

    # --- life cycle -----------------------------------------------------------------------

    async def open(self) -> None:
        """Connect to the first node that answers, or ConfigError naming each and why."""
        failures: list[str] = []
        errors: list[BaseException] = []
        for index in range(len(self.nodes)):
            self._index = index
            try:
                connection = await self._connect()
            except CONNECT_ERRORS as exc:
                failures.append(f"{self.node}: {exc!r}" if len(self.nodes) > 1 else repr(exc))
                errors.append(exc)
                continue
            self._adopt(connection)
            self._up.set()
            self._task = asyncio.create_task(self._supervise(), name="amqp-link")
            return
        raise reach_error(",".join(str(n) for n in self.nodes), failures, errors)

    async def reset(self, why: str, generation: int) -> None:
        """Drop connection ``generation`` if it is still the live one: the supervisor makes a
        new one and restores onto it."""
        connection = self._connection
        if connection is None or self._closing or generation != self.generation:
            return
        note("warning", "amqp_connection_reset", node=self.node, reason=why)
        self._up.clear()
        self._lost.set()
        await quietly(connection.close(), 5)

    async def close(self) -> None:
        self._closing = True
        self._up.clear()
        if self._task is not None:
            self._task.cancel()
            await quietly(self._task, 10)
        connection, self._connection = self._connection, None
        if connection is not None:
            await quietly(connection.close(), 5)

    # --- the supervisor -------------------------------------------------------------------

    async def _connect(self) -> AbstractConnection:
        node = self.nodes[self._index]
        connection = aio_pika.Connection(node, ssl_context=self._ssl_context)
        # aio-pika passes its kwargs on to aiormq's Connection (see saga.transport.wire)
        factory = BatchingTransportFactory(tls=str(node).startswith("amqps://"), counts=self.counts)
        connection.kwargs["transport_factory"] = factory
        try:
            await connection.connect(timeout=self.connect_timeout)
        except BaseException:
            await quietly(connection.close(), 5)
            raise
        if factory.receiver is not None and connection.transport is not None:
            # deliveries skip their channel's queue from here on (saga.transport.frames)
            factory.receiver.serve(connection.transport.connection.channels)
        if factory.writer is not None and connection.transport is not None:
            adopt_writer(connection.transport.connection, factory.writer)
        return connection

    def _adopt(self, connection: AbstractConnection) -> None:
        self._connection = connection
        self.generation += 1
        self._lost.clear()

        def lost(_sender: Any, _exc: BaseException | None = None) -> None:
            if self._connection is connection:
                self._up.clear()
                self._lost.set()

        connection.close_callbacks.add(lost)

    async def _supervise(self) -> None:
        while not self._closing:
            try:
                await self._lost.wait()
                self._up.clear()
                note("warning", "amqp_connection_lost", node=self.node)
                if self._connection is not None:  # release what is left of it
                    await quietly(self._connection.close(), 5)
                await self._reconnect()
            except asyncio.CancelledError:
                if own_cancellation():
                    raise
                # a CancelledError of a dying connection's future: a failure like any other
                note("warning", "amqp_supervisor_error", error="cancelled by the connection")
                self._lost.set()
                await asyncio.sleep(self.reconnect_interval)
            except Exception as exc:
                # the supervisor must outlive anything unforeseen: without it the process
                # would stay disconnected for good
                note("error", "amqp_supervisor_error", error=repr(exc))
                self._lost.set()
                await asyncio.sleep(self.reconnect_interval)

    async def _reconnect(self) -> None:
        attempt = 0
        while not self._closing:
            # with several nodes the next one is tried at once after a loss; every later
            # attempt waits, so a broker that is down entirely is not hammered
            if attempt > 0 or len(self.nodes) == 1:
                await asyncio.sleep(self.reconnect_interval)
            attempt += 1
            self._index = (self._index + 1) % len(self.nodes)
            try:
                connection = await self._connect()
            except CONNECT_ERRORS as exc:
                note("info", "amqp_connect_failed", node=self.node, error=repr(exc))
                self.last_failure = f"connecting to {self.node}: {exc!r}"
                continue
            self._adopt(connection)
            try:
                if self._restore is not None:
                    await asyncio.wait_for(
                        self._restore(connection, self.generation), self.RESTORE_TIMEOUT
                    )
            except (Exception, asyncio.CancelledError) as exc:
                if isinstance(exc, asyncio.CancelledError) and own_cancellation():
                    raise
                note("warning", "amqp_restore_failed", node=self.node, error=repr(exc))
                self.last_failure = f"restoring on {self.node}: {exc!r}"
                await quietly(connection.close(), 5)
                continue
            if self._lost.is_set() or not connection.connected.is_set():
                continue  # lost again while restoring
            self.reconnects += 1
            self._up.set()
            note("info", "amqp_reconnected", node=self.node, attempts=attempt)
            return
