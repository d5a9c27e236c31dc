"""The checkout saga for ``saga bench --step-timeout``: the same steps with a longer timeout.

With thousands of sagas in flight a command can wait in its queue longer than the checkout's
3-second step timeout; it then times out, is re-sent and finally compensated, and the extra
messages slow everything further. That measures the timeout policy, not the machinery. This
registry (``SAGA_DEFINITIONS=saga_tools.bench.definitions:registry``) keeps every step of the
checkout and only sets the timeout from ``SAGA_BENCH_STEP_TIMEOUT`` (seconds).
"""

from __future__ import annotations

import dataclasses
import os
from datetime import timedelta

from saga import Registry, SagaDefinition
from saga_demo.checkout import CHECKOUT, PARTICIPANTS

__all__ = ["registry"]

STEP_TIMEOUT_ENV = "SAGA_BENCH_STEP_TIMEOUT"


def registry() -> Registry:
    timeout = timedelta(seconds=float(os.environ.get(STEP_TIMEOUT_ENV, "3")))
    steps = tuple(dataclasses.replace(step, timeout=timeout) for step in CHECKOUT.steps)
    checkout = SagaDefinition(CHECKOUT.name, CHECKOUT.version, list(steps))
    return Registry([checkout], participants=PARTICIPANTS)
