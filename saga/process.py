"""The process launcher: how every long-running saga process starts and ends.

The orchestrator (``saga run``), a participant (:meth:`saga.participant.Participant.run`) and the
demo's ``saga-service`` all go through :func:`launch`: logging and tracing set up, the event loop
chosen by ``SAGA_EVENT_LOOP``, and one way to end. A configuration problem (a bad setting, an
unreachable broker or database) ends the process with one line on stderr and exit status 2; an
I/O error it could not recover from, with status 1; spans still batched are exported either way.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, NoReturn

from sqlalchemy.exc import SQLAlchemyError

from saga.core.errors import ConfigError
from saga.logs import configure_logging
from saga.loop import run as run_loop
from saga.secrets import redact
from saga.telemetry import configure_tracing

__all__ = ["fail", "launch", "serve"]


def launch(
    service_name: str, main: Callable[[], Coroutine[Any, Any, None]], *, log_level: str = "INFO"
) -> None:
    """Run ``main()`` as this process's program, as ``service_name`` in traces."""
    configure_logging(log_level)
    try:
        provider = configure_tracing(service_name)
    except ConfigError as exc:
        fail(exc, 2)
    try:
        run_loop(main())
    except ConfigError as exc:
        fail(exc, 2)
    except (OSError, SQLAlchemyError) as exc:
        fail(exc, 1)
    finally:
        provider.shutdown()  # export the spans still batched


async def serve(start: Callable[[], Awaitable[None]], stop: Callable[[], Awaitable[None]]) -> None:
    """Run a service until SIGTERM or SIGINT: ``start()``, wait for the signal, ``stop()``.
    ``stop()`` runs however ``start()`` ended, so a start that failed half way still closes
    what it opened before the error goes on up."""
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopped.set)
    try:
        await start()
        await stopped.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await stop()


def fail(exc: BaseException, code: int = 2) -> NoReturn:
    """End the process with ``error: ...`` on one line (secrets redacted) and ``code``."""
    lines = [line.strip() for line in redact(str(exc)).splitlines() if line.strip()]
    head, rest = (lines[0], lines[1:]) if lines else (type(exc).__name__, [])
    print(f"error: {head} {'; '.join(rest)}".rstrip(), file=sys.stderr, flush=True)
    raise SystemExit(code)
