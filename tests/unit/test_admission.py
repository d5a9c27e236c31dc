"""The in-flight bound itself: slots are never overbooked, waiters get freed slots, a refusal
stores nothing and says what to do."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from saga.orchestrator.admission import Admission, InFlightLimitError


async def test_concurrent_starts_never_overbook_and_each_waiter_gets_a_freed_slot() -> None:
    admission = Admission(2)
    inside = 0
    most = 0

    async def start(n: int) -> None:
        nonlocal inside, most
        async with admission.slot():
            inside += 1
            most = max(most, inside + admission.in_flight)
            saga = uuid.UUID(int=n)
            admission.started(saga)  # the commit made it a saga in flight
            inside -= 1
        await asyncio.sleep(0.01 * (n % 3))
        admission.finished(saga)

    await asyncio.wait_for(asyncio.gather(*(start(n) for n in range(20))), 5)
    assert most <= 2
    assert admission.in_flight == 0
    assert admission.waited > 0


async def test_a_full_admission_refuses_without_waiting_and_frees_on_release() -> None:
    admission = Admission(1)
    recovered = uuid.uuid4()
    admission.adopt([recovered])  # a saga in flight at start-up holds its slot
    assert admission.full()
    with pytest.raises(InFlightLimitError, match="SAGA_MAX_IN_FLIGHT"):
        async with admission.slot(wait=False):
            pass
    assert admission.refused == 1
    waiter = asyncio.ensure_future(_enter(admission))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    admission.release([recovered])  # it ended on another instance
    await asyncio.wait_for(waiter, 1)


async def _enter(admission: Admission) -> None:
    async with admission.slot():
        pass
