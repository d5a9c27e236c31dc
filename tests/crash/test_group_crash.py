"""kill -9 of the orchestrator while a parallel group is in flight, then a restart.

The orchestrator runs as a process on a SQLite file and SIGKILLs itself right after it committed
the second reply it consumed (the reserve step's, then one member's) and before acking it; the
other member has its command and is held at its participant until the orchestrator is dead.
After the restart the committed reply comes again (never acked) and the held member's answer is
waiting: the saga must end as if nothing had happened (completed, or compensated when the hotel
refuses, before or after the kill), with the participants' ledgers (their ``effects`` rows,
written with each final answer) showing every effect and every compensation exactly once.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from uuid import UUID, uuid4

import pytest

from saga.core.ids import saga_id_for_key
from saga.core.state import HistoryKind, SagaState, SagaStatus, StepStatus
from saga.protocol.envelope import StartSaga
from saga.store.sql import SqlStore
from tests.crash.conftest import CrashEnv
from tests.crash.helpers import Proc, orchestrator_env, publish_starts, wait_exit, wait_for_output
from tests.support.language import Script, running_participants

pytestmark = pytest.mark.rabbitmq

STARTUP = 30.0


def _orchestrator(env: CrashEnv, name: str, fault: tuple[str, int] | None = None) -> Proc:
    variables = orchestrator_env(
        database_url=env.database_url,
        rabbitmq_url=env.rabbitmq_url,
        prefix=env.prefix,
        fault=fault,
    )
    variables["SAGA_DEFINITIONS"] = "tests.support.language:registry"
    return env.processes.spawn(name, ["-m", "saga", "run", "--migrate"], variables)


async def _state(env: CrashEnv, saga_id: UUID) -> SagaState | None:
    store = SqlStore(env.database_url)
    try:
        return await store.load(saga_id)
    finally:
        await store.close()


async def _until(
    condition: Callable[[], bool], what: str, env: CrashEnv, within: float = 20.0
) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}\n{env.processes.describe()}", pytrace=False)
        await asyncio.sleep(0.05)


@dataclass(frozen=True)
class Case:
    held: str  # the member whose command waits at its participant until after the kill
    refused: str | None  # a member whose participant refuses it
    status: SagaStatus
    compensated: tuple[str, ...]
    effects: tuple[str, ...]


CASES = {
    # the hotel answers after the restart: the saga completes
    "completes": Case(
        "gamma.book",
        None,
        SagaStatus.COMPLETED,
        (),
        ("alpha.reserve", "beta.book", "gamma.book", "alpha.confirm"),
    ),
    # the hotel refuses after the restart: the flight and the reserve are undone
    "refused-after": Case(
        "gamma.book",
        "gamma.book",
        SagaStatus.COMPENSATED,
        ("flight", "reserve"),
        ("alpha.reserve", "beta.book", "beta.cancel", "alpha.release"),
    ),
    # the hotel refused before the kill: the restarted orchestrator still awaits the flight
    # before it compensates anything
    "refused-before": Case(
        "beta.book",
        "gamma.book",
        SagaStatus.COMPENSATED,
        ("flight", "reserve"),
        ("alpha.reserve", "beta.book", "beta.cancel", "alpha.release"),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_a_group_in_flight_survives_a_kill_and_each_effect_happens_once(
    crash_env: CrashEnv, case: str
) -> None:
    env, expected = crash_env, CASES[case]
    script = Script()
    script.hold(expected.held)
    if expected.refused is not None:
        script.refuse.add(expected.refused)
    held = "flight" if expected.held == "beta.book" else "hotel"
    replied = "hotel" if held == "flight" else "flight"
    key = f"{env.prefix}-tour"
    saga_id = saga_id_for_key("tour", key)
    async with running_participants(
        env.directory / "participants", env.prefix, env.rabbitmq_url, script
    ) as participants:
        # the 2nd reply committed (the reserve's, then the member's not held) is never acked
        doomed = _orchestrator(env, "doomed", ("after_reply_commit_before_ack", 2))
        await wait_for_output(doomed, "orchestrator_started", within=STARTUP)
        start = StartSaga(
            schema_version=1,
            message_id=uuid4(),
            saga_name="tour",
            key=key,
            input={"insure": False},
        )
        await publish_starts(env.rabbitmq_url, env.prefix, [start])

        code = await wait_exit(doomed, within=30)
        assert code == -9, f"the orchestrator did not crash: {code}\n{doomed.describe()}"
        # killed with the group in flight: both members sent, one answer committed
        await _until(lambda: script.entered[expected.held] == 1, "the held command", env)
        killed = await _state(env, saga_id)
        assert killed is not None
        answered = killed.step(replied).status
        if expected.refused is None or held == "hotel":
            assert killed.status is SagaStatus.RUNNING
            assert answered is StepStatus.SUCCEEDED
        else:
            assert killed.status is SagaStatus.COMPENSATING  # the held flight is awaited
            assert answered is StepStatus.FAILED
        assert killed.step(held).status is StepStatus.RUNNING
        assert [killed.steps[lane.index].name for lane in killed.lanes] == [held]
        script.release(expected.held)  # its answer waits in the reply queue

        survivor = _orchestrator(env, "survivor")
        await wait_for_output(survivor, "orchestrator_started", within=STARTUP)

        async def ended() -> SagaState | None:
            state = await _state(env, saga_id)
            return state if state is not None and state.status.is_terminal else None

        deadline = time.monotonic() + 30
        while (final := await ended()) is None:
            assert survivor.alive() and time.monotonic() < deadline, (
                f"the saga did not end after the restart\n{env.processes.describe()}"
            )
            await asyncio.sleep(0.1)
        store = SqlStore(env.database_url)
        try:
            history = await store.history(saga_id)
        finally:
            await store.close()
        # anything redelivered after the restart would be answered from the ledger by now
        await asyncio.sleep(0.5)
        effects = await participants.effects()
        dead = sum(p.dead_lettered for p in participants.services.values())

    assert final.status is expected.status, final.failure
    compensated = [h.step for h in history if h.kind is HistoryKind.STEP_COMPENSATED]
    assert compensated == list(expected.compensated)
    assert effects == Counter(expected.effects)
    # the reply committed before the kill came again after it: applied once
    answers = [
        h
        for h in history
        if h.step == replied and h.kind in (HistoryKind.STEP_SUCCEEDED, HistoryKind.STEP_FAILED)
    ]
    assert len(answers) == 1
    assert [h.step for h in history if h.kind is HistoryKind.STEP_TIMED_OUT] == []
    assert dead == 0
