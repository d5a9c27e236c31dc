"""The process launcher: how every long-running saga process starts and ends.

The orchestrator (``saga run``), a participant (:meth:`saga.participant.Participant.run`) and the
demo's ``saga-service`` all go through :func:`launch`: logging and tracing set up, the event loop
chosen by ``SAGA_EVENT_LOOP``, and one way to end. A configuration problem (a bad setting, an
unreachable broker or database) ends the process with one line on stderr and exit status 2; an
I/O error it could not recover from, with status 1; spans still batched are exported either way.

:func:`serve` gives every process the same bounded life cycle:

* start-up has a deadline (``SAGA_START_TIMEOUT``). A start that fails, or is still waiting
  when the deadline passes, ends the process with status 2 and one line naming the step it was
  on (:func:`starting`) and why, after closing whatever it had opened;
* SIGTERM or SIGINT stops the process at any point, start-up included: a start in progress is
  cancelled, then ``stop()`` drains and closes within ``SAGA_SHUTDOWN_TIMEOUT``, and the process
  exits 0. A stop that overruns its time is abandoned (what it had not finished is redelivered
  or resent after the next start) and the process exits 1 saying so.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, NoReturn

import structlog
from sqlalchemy.exc import SQLAlchemyError

from saga.core.errors import ConfigError
from saga.logs import configure_logging
from saga.loop import run as run_loop
from saga.secrets import redact
from saga.telemetry import configure_tracing

__all__ = [
    "Budget",
    "StartError",
    "StopTimeoutError",
    "describe",
    "fail",
    "launch",
    "serve",
    "starting",
]

log = structlog.get_logger("saga.process")

#: seconds a cancelled start gets to close what it opened before the process goes on
CANCEL_GRACE = 5.0


class StartError(ConfigError):
    """The process could not start: the step it was on and why (exit status 2)."""


class StopTimeoutError(Exception):
    """The stop overran SAGA_SHUTDOWN_TIMEOUT and was abandoned (exit status 1)."""


class _Step:
    what = "starting"
    detail: Callable[[], str | None] | None = None

    def __str__(self) -> str:
        more = self.detail() if self.detail is not None else None
        return f"{self.what} (last failure: {more})" if more else self.what


_step = _Step()


def starting(step: str, detail: Callable[[], str | None] | None = None) -> None:
    """Say what start-up is doing now (``connecting to RabbitMQ at ...``): the error when it
    fails or overruns ``SAGA_START_TIMEOUT`` names this step, and what ``detail()`` says went
    wrong last (a connection lost, say)."""
    _step.what, _step.detail = step, detail


class Budget:
    """The time left of a stop's ``SAGA_SHUTDOWN_TIMEOUT``, handed out to its phases in shares
    so that closing the broker and the database always has some left."""

    def __init__(self, seconds: float):
        self._end = asyncio.get_running_loop().time() + seconds

    def left(self) -> float:
        return max(0.0, self._end - asyncio.get_running_loop().time())

    def share(self, fraction: float) -> float:
        """``fraction`` of the time left (at least a tenth of a second)."""
        return max(0.1, self.left() * fraction)


def describe(exc: BaseException) -> str:
    """An exception on one line: its type, and its message when it has one."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


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
    except (OSError, SQLAlchemyError, StopTimeoutError) as exc:
        fail(exc, 1)
    finally:
        provider.shutdown()  # export the spans still batched


async def serve(
    start: Callable[[], Awaitable[None]],
    stop: Callable[[], Awaitable[None]],
    *,
    start_timeout: float | None = None,
    stop_timeout: float | None = None,
) -> None:
    """Run a service until SIGTERM or SIGINT: ``start()``, wait for the signal, ``stop()``.

    ``stop()`` runs however ``start()`` ended, so a start that failed half way still closes
    what it opened before the error goes on up. A signal during ``start()`` cancels it; a start
    still running after ``start_timeout`` seconds, or one that fails, raises StartError."""
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopped.set)
    starting("starting")
    try:
        await _start(start, stopped, start_timeout)
        await stopped.wait()
        log.info("stop_requested")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await _stop(stop, stop_timeout)


async def _start(
    start: Callable[[], Awaitable[None]], stopped: asyncio.Event, within: float | None
) -> None:
    task: asyncio.Future[None] = asyncio.ensure_future(start())
    signalled: asyncio.Future[Any] = asyncio.ensure_future(stopped.wait())
    try:
        done, _ = await asyncio.wait(
            {task, signalled}, timeout=within, return_when=asyncio.FIRST_COMPLETED
        )
    except BaseException:
        task.cancel()
        raise
    finally:
        signalled.cancel()
    if task in done:
        try:
            task.result()
        except ConfigError:
            raise
        except Exception as exc:
            raise StartError(f"could not start ({_step}): {describe(exc)}") from exc
        return
    step = str(_step)
    task.cancel()
    await asyncio.wait({task}, timeout=CANCEL_GRACE)  # its own clean-up, bounded
    if not task.done():
        log.warning("start_not_cancelled", step=step)
    elif not task.cancelled() and task.exception() is not None:
        log.info("start_failed_while_cancelled", error=describe(task.exception() or Exception()))
    if stopped.is_set():
        log.info("stopped_while_starting", step=step)
        return
    raise StartError(f"did not start within {within:g}s (SAGA_START_TIMEOUT), still {step}")


async def _stop(stop: Callable[[], Awaitable[None]], within: float | None) -> None:
    task = asyncio.ensure_future(stop())
    try:
        await asyncio.wait({task}, timeout=within)
    except BaseException:
        task.cancel()
        raise
    if task.done():
        with contextlib.suppress(asyncio.CancelledError):
            if (error := task.exception()) is not None:
                log.warning("stop_failed", error=describe(error))
        return
    log.warning("stop_overran", within=within, waiting_on=_where(task), tasks=_task_stacks())
    task.cancel()
    await asyncio.wait({task}, timeout=1.0)
    raise StopTimeoutError(
        f"did not stop within {within:g}s (SAGA_SHUTDOWN_TIMEOUT); "
        "work not finished is redelivered or resent after the next start"
    )


def _where(task: asyncio.Future[Any]) -> str:
    """Where a task is suspended now: its innermost frame, as file:line function."""
    if not isinstance(task, asyncio.Task):
        return ""
    frames = task.get_stack()
    if not frames:
        return ""
    frame = frames[-1]
    return f"{frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}"


def _task_stacks() -> dict[str, list[str]]:
    """Every task still running and the frames it is suspended in: what a stop waits for."""
    stacks: dict[str, list[str]] = {}
    for task in asyncio.all_tasks():
        if task is asyncio.current_task():
            continue
        stacks[task.get_name()] = [
            f"{f.f_code.co_filename}:{f.f_lineno} {f.f_code.co_name}" for f in task.get_stack()
        ]
    return stacks


def fail(exc: BaseException, code: int = 2) -> NoReturn:
    """End the process with ``error: ...`` on one line (secrets redacted) and ``code``."""
    lines = [line.strip() for line in redact(str(exc)).splitlines() if line.strip()]
    head, rest = (lines[0], lines[1:]) if lines else (type(exc).__name__, [])
    print(f"error: {head} {'; '.join(rest)}".rstrip(), file=sys.stderr, flush=True)
    raise SystemExit(code)
