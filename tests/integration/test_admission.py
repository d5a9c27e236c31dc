"""Admission control on the real broker: at most SAGA_MAX_IN_FLIGHT sagas run at once; the
starts beyond wait in the start queue, and none is lost."""

from __future__ import annotations

import asyncio
import uuid

from saga.core.ids import saga_id_for_key
from saga.core.state import SagaStatus
from saga.ports import SagaFilter
from saga.protocol.envelope import StartSaga
from tests.integration.harness import Harness, wait_terminal

LIMIT = 3
STARTS = 12


def _start(key: str) -> bytes:
    # alpha answers 1 s late (its timeout is 1.5 s): each saga stays in flight for a while
    request = StartSaga(
        schema_version=1,
        message_id=uuid.uuid4(),
        saga_name="trip",
        key=key,
        input={"script": {"alpha": ["late"]}},
    )
    return request.model_dump_json().encode()


async def test_starts_beyond_the_bound_wait_in_the_start_queue_and_all_complete(
    harness: Harness,
) -> None:
    service = await harness.start_service(max_in_flight=LIMIT)
    await harness.start_responder(late_after=1.0)
    admission = service.orchestrator.admission
    assert admission is not None
    keys = [f"k-{n}-{uuid.uuid4().hex[:6]}" for n in range(STARTS)]
    for key in keys:
        await harness.publish(harness.topology.start_queue, _start(key))

    most_running = 0
    ids = [saga_id_for_key("trip", k) for k in keys]

    async def watch() -> None:
        nonlocal most_running
        while True:
            running = await service.store.list_sagas(
                SagaFilter(status=SagaStatus.RUNNING, limit=100)
            )
            most_running = max(most_running, len(running), admission.in_flight)
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch())
    try:
        finals = await wait_terminal(service, ids, timeout=60)
    finally:
        watcher.cancel()
    assert [f.status for f in finals] == [SagaStatus.COMPLETED] * STARTS
    assert most_running == LIMIT, f"at most {LIMIT} in flight, saw {most_running}"
    assert admission.waited > 0
    assert admission.in_flight == 0
    assert service.dead_lettered == 0
