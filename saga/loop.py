"""The event loop of the long-running processes: uvloop when it is installed.

uvloop runs the same asyncio code on a loop written in Cython. On the checkout benchmark it cut
the CPU spent per message in every process (the orchestrator, each service, the broker ceiling's
clients) by roughly a sixth, most of it in the loop's own bookkeeping and socket calls; see
docs/benchmarks.md. ``SAGA_EVENT_LOOP=asyncio`` keeps the standard loop (to compare, or where
uvloop is unavailable); ``uvloop`` insists on it.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

from saga.core.errors import ConfigError

__all__ = ["run"]

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on the loop ``SAGA_EVENT_LOOP`` chooses (auto, uvloop, asyncio)."""
    choice = os.environ.get("SAGA_EVENT_LOOP", "auto").lower()
    if choice not in ("auto", "uvloop", "asyncio"):
        main.close()
        raise ConfigError(f"SAGA_EVENT_LOOP={choice!r}: use auto, uvloop or asyncio")
    if choice != "asyncio":
        try:
            import uvloop  # noqa: PLC0415 - optional, and only the processes need it
        except ImportError:
            if choice == "uvloop":
                main.close()
                raise ConfigError("SAGA_EVENT_LOOP=uvloop but uvloop is not installed") from None
        else:
            return uvloop.run(main)
    return asyncio.run(main)
