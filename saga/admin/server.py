"""The admin API served by uvicorn inside the orchestrator's own event loop.

In-process rather than a separate server: the API reads the live service (its store, its
registry, its broker connection for readiness) and operator actions go through the same
``Orchestrator`` as replies, so they join its group commits instead of racing them.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING

import structlog
import uvicorn

from saga.admin.app import create_app
from saga.core.errors import ConfigError

if TYPE_CHECKING:
    from saga.orchestrator.service import OrchestratorService

__all__ = ["AdminServer"]

log = structlog.get_logger("saga.admin")

_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 5.0


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: SIGTERM belongs to the orchestrator, which stops
    this server as part of its own graceful shutdown."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    def install_signal_handlers(self) -> None:  # uvicorn before 0.29
        return None


def _bind(host: str, port: int) -> socket.socket:
    """Bind here rather than in uvicorn, which exits the process when the port is taken."""
    where = f"{host}:{port}"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise ConfigError(f"SAGA_ADMIN_HOST={host!r}: cannot resolve it: {exc}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"the admin API cannot listen on {where}: {exc.strerror or exc}; another process "
            "has the port (or the address is not this machine's): choose another "
            "SAGA_ADMIN_PORT, or set it to 0 to turn the admin API off"
        ) from None
    return sock


class AdminServer:
    """Serves :func:`saga.admin.app.create_app` on ``admin_host:admin_port``."""

    def __init__(self, service: OrchestratorService):
        self.service = service
        self.port: int | None = None  # the port listened on, once started
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._socket: socket.socket | None = None

    async def start(self) -> None:
        """Return once the server accepts connections; ConfigError if it cannot listen."""
        settings = self.service.settings
        sock = _bind(settings.admin_host, settings.admin_port)
        self._socket = sock
        self.port = int(sock.getsockname()[1])
        config = uvicorn.Config(
            create_app(self.service),
            log_config=None,  # the orchestrator's logging set-up stays as it is
            access_log=False,
            lifespan="off",
            server_header=False,
            timeout_graceful_shutdown=int(_STOP_TIMEOUT),
        )
        server = self._server = _Server(config)
        task = self._task = asyncio.create_task(server.serve(sockets=[sock]), name="saga-admin")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _START_TIMEOUT
        while not server.started:
            if task.done():
                error = None if task.cancelled() else task.exception()
                await self.stop()
                raise ConfigError(f"the admin API did not start: {error!r}")
            if loop.time() > deadline:
                await self.stop()
                raise ConfigError(f"the admin API did not start within {_START_TIMEOUT:g} s")
            await asyncio.sleep(0.01)
        log.info("admin_api_listening", host=settings.admin_host, port=self.port)

    async def stop(self) -> None:
        """Finish the requests in flight (a few seconds at most), then close."""
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            done, _ = await asyncio.wait({self._task}, timeout=_STOP_TIMEOUT * 2)
            if not done:
                self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._socket is not None:
            self._socket.close()
        self._server = self._task = self._socket = None
