"""The event loop of the long-running processes: uvloop when it is installed.

uvloop runs the same asyncio code on a loop written in Cython. On the checkout benchmark it cut
the CPU spent per message in every process (the orchestrator, each service, the broker ceiling's
clients) by roughly a sixth, most of it in the loop's own bookkeeping and socket calls; see
docs/benchmarks.md. ``SAGA_EVENT_LOOP=asyncio`` keeps the standard loop (to compare, or where
uvloop is unavailable); ``uvloop`` insists on it.

:func:`run` also sets the collector's first threshold to ``SAGA_GC_THRESHOLD`` (50,000
allocations of container objects, where CPython's default is 700). A process with a few
hundred sagas in flight holds hundreds of thousands of long-lived objects, and every message
allocates and frees hundreds more, so with the default the young generations were collected
hundreds of times a second and the whole heap every few seconds: 15 % of the orchestrator's CPU
at 200 sagas in flight (docs/benchmarks.md). Cycles are still collected, ~70 times less often;
memory held by cyclic garbage between collections stays a few MiB.

Unlike ``asyncio.run``, :func:`run` does not wait without end for the tasks still running when
the main coroutine returns: they are cancelled and given ``LEFTOVER_GRACE`` seconds, and a task
that outlives that (a library that swallowed its cancellation) is left behind, logged by name,
rather than keeping a stopped process alive.
"""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import structlog

from saga.core.errors import ConfigError

__all__ = ["GC_THRESHOLD", "gc_threshold", "run"]

T = TypeVar("T")

log = structlog.get_logger("saga.loop")

#: seconds the tasks left when the program ends get to finish their cancellation
LEFTOVER_GRACE = 3.0

#: allocations between two collections of the youngest generation, unless SAGA_GC_THRESHOLD
GC_THRESHOLD = 50_000


def gc_threshold() -> int:
    """``SAGA_GC_THRESHOLD``, or :data:`GC_THRESHOLD`; ConfigError unless a whole number from
    100 to 100,000,000."""
    raw = os.environ.get("SAGA_GC_THRESHOLD", "").strip()
    if not raw:
        return GC_THRESHOLD
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 100 <= value <= 100_000_000:
        raise ConfigError(
            f"SAGA_GC_THRESHOLD={raw!r}: give a whole number of allocations from 100 to "
            "100000000 (CPython's own default is 700)"
        )
    return value


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to its end on the loop ``SAGA_EVENT_LOOP`` chooses (auto, uvloop,
    asyncio), then end the tasks it left within LEFTOVER_GRACE seconds."""
    choice = os.environ.get("SAGA_EVENT_LOOP", "auto").lower()
    if choice not in ("auto", "uvloop", "asyncio"):
        main.close()
        raise ConfigError(f"SAGA_EVENT_LOOP={choice!r}: use auto, uvloop or asyncio")
    try:
        threshold = gc_threshold()
    except ConfigError:
        main.close()
        raise
    factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop
    if choice != "asyncio":
        try:
            import uvloop  # noqa: PLC0415 - optional, and only the processes need it
        except ImportError:
            if choice == "uvloop":
                main.close()
                raise ConfigError("SAGA_EVENT_LOOP=uvloop but uvloop is not installed") from None
        else:
            factory = uvloop.new_event_loop
    loop = factory()
    before = gc.get_threshold()
    gc.set_threshold(threshold, *before[1:])
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(main)
    finally:
        try:
            _end_leftovers(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(_bounded(loop.shutdown_default_executor()))
        finally:
            asyncio.set_event_loop(None)
            loop.close()
            gc.set_threshold(*before)  # the process's, for whatever runs after (a tool, a test)


async def _bounded(shutdown: Coroutine[Any, Any, None]) -> None:
    try:
        await asyncio.wait_for(shutdown, LEFTOVER_GRACE)
    except TimeoutError:
        log.warning("executor_threads_left_running", grace=LEFTOVER_GRACE)


def _end_leftovers(loop: asyncio.AbstractEventLoop) -> None:
    tasks = asyncio.all_tasks(loop)
    if not tasks:
        return
    for task in tasks:
        task.cancel()
    loop.run_until_complete(asyncio.wait(tasks, timeout=LEFTOVER_GRACE))
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: an error of a task being torn down is no news
    stuck = sorted(task.get_name() for task in tasks if not task.done())
    if stuck:
        log.warning("tasks_left_running", tasks=stuck, grace=LEFTOVER_GRACE)
