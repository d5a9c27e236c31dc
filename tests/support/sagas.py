"""Saga definitions used by the integration and crash tests (SAGA_DEFINITIONS target)."""

from __future__ import annotations

from datetime import timedelta

from saga import Registry, RetryPolicy, SagaDefinition, Step

PARTICIPANTS = ("alpha", "beta", "gamma")

_fast = RetryPolicy(max_attempts=3, initial_backoff=timedelta(milliseconds=50), jitter=0.1)
_comp = RetryPolicy(max_attempts=4, initial_backoff=timedelta(milliseconds=50), jitter=0.1)

TRIP = SagaDefinition(
    "trip",
    1,
    [
        Step(
            name,
            participant=name,
            action=f"{name}.do",
            compensation=f"{name}.undo",
            timeout=timedelta(seconds=1.5),
            retry=_fast,
            compensation_retry=_comp,
        )
        for name in PARTICIPANTS
    ],
)


def registry() -> Registry:
    return Registry([TRIP], participants=PARTICIPANTS)
