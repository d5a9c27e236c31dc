"""Three orchestrator instances on one PostgreSQL database, one of them killed with SIGKILL and
restarted mid-run: every saga ends as its input implies, no transition is applied twice, no
effect is doubled, nothing is lost (the chaos checker's rules), and every instance did work.

``SAGA_TEST_MULTI_SAGAS`` sets the number of sagas (1,000 by default).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from uuid import UUID

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from saga.core.ids import saga_id_for_key
from saga.core.state import HistoryKind, SagaStatus
from saga.protocol.envelope import StartSaga
from saga.store.schema import sagas
from saga_demo.cli import sample_checkouts
from saga_tools.bench.stack import temporary_database
from saga_tools.chaos.model import Run, World, check_run, conserved, replay
from tests.conftest import require_postgres, require_rabbitmq
from tests.crash.helpers import Proc
from tests.e2e.stack import (
    BIN,
    SERVICES,
    Group,
    Stack,
    applied_twice,
    delete_topology,
    leftover_queues,
)

SAGAS = int(os.environ.get("SAGA_TEST_MULTI_SAGAS", "1000"))
INSTANCES = 3
WINDOW = 60


@pytest.fixture
async def pg_stack(tmp_path: Path, unique: str) -> AsyncIterator[Stack]:
    url = require_rabbitmq()
    async with temporary_database(require_postgres(), f"saga_multi_{unique}") as database:
        world = Stack(
            rabbitmq_url=url,
            prefix=f"multi-{unique}",
            directory=tmp_path,
            processes=Group(tmp_path),
            postgres_url=database,
        )
        try:
            yield world
        finally:
            try:
                world.processes.stop_all()
            finally:
                await delete_topology(url, world.prefix)
                assert not await leftover_queues(url, world.prefix)


async def publish_windowed(
    stack: Stack, starts: list[StartSaga], ids: list[UUID], *, window: int
) -> None:
    """Publish ``starts`` keeping at most ``window`` of them running (as the database says)."""
    engine = create_async_engine(stack.database_url, poolclass=NullPool)
    busy = [SagaStatus.RUNNING.value, SagaStatus.COMPENSATING.value]
    try:
        sent = 0
        while sent < len(starts):
            done = 0
            if sent:
                async with engine.connect() as conn:
                    done = await conn.scalar(
                        sa.select(sa.func.count())
                        .where(sagas.c.saga_id.in_(ids[:sent]))
                        .where(sagas.c.status.not_in(busy))
                    )
            free = window - (sent - int(done or 0))
            if free > 0:
                batch = starts[sent : sent + min(free, 25)]
                await stack.publish(batch)
                sent += len(batch)
            await asyncio.sleep(0.2)
    finally:
        await engine.dispose()


def spawn_instance(stack: Stack, n: int) -> Proc:
    return stack.processes.spawn(
        f"orchestrator-{n}",
        ["saga", "run"],
        stack.orchestrator_env(SAGA_LOG_LEVEL="INFO", OTEL_SERVICE_NAME=f"orchestrator-{n}"),
    )


async def test_three_instances_one_killed_lose_and_double_nothing(pg_stack: Stack) -> None:
    stack = pg_stack
    stack.data_dir.mkdir(parents=True, exist_ok=True)
    # Migrate once, before the instances start, as a deployment would (a job, or the first).
    migrate = await asyncio.to_thread(
        subprocess.run,
        [str(BIN / "saga"), "migrate"],
        env=stack.orchestrator_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert migrate.returncode == 0, migrate.stderr
    instances = {n: spawn_instance(stack, n) for n in range(1, INSTANCES + 1)}
    services = [
        stack.processes.spawn(s, ["saga-service", s], stack.service_env()) for s in SERVICES
    ]
    await stack.started([*instances.values(), *services])
    before = await stack.snapshot()

    starts = sample_checkouts(SAGAS, seed=20261122)
    ids = [saga_id_for_key(s.saga_name, s.key) for s in starts]
    # A window of sagas in flight, as a client would keep: the demo's steps time out after 3 s,
    # and a thousand at once on this machine would time out in the queues (no admission
    # control: they would compensate, safely, but not as their inputs imply).
    publishing = asyncio.create_task(publish_windowed(stack, starts, ids, window=WINDOW))

    # Kill one instance in the middle of the run, then bring it back.
    await asyncio.sleep(6)
    assert not publishing.done(), "the run ended before the kill: raise SAGA_TEST_MULTI_SAGAS"
    victim = instances[1]
    os.killpg(victim.pid, signal.SIGKILL)
    assert await stack.wait_exit(victim, within=10) == -signal.SIGKILL
    await asyncio.sleep(3)
    instances[1] = revived = spawn_instance(stack, 4)
    await stack.started([revived])
    await publishing

    states = await stack.wait_terminal(
        ids, within=max(300, SAGAS / 3), watch=[*instances.values(), *services]
    )
    await stack.wait_quiet(within=60)
    checkouts = {i: dict(states[i].context.input) for i in ids}
    histories = await stack.histories(ids)
    run = Run(checkouts, states, histories, await stack.processed())
    expected, problems = replay(World.seeded(), checkouts, run.rows)
    # As in the chaos soak's checker: a saga one of whose steps timed out (the kill leaves
    # commands unanswered for a few seconds) may end otherwise than its input implies, safely;
    # it is counted, and every other rule still holds for it.
    timed_out = {
        str(i) for i, h in histories.items() if any(e.kind is HistoryKind.STEP_TIMED_OUT for e in h)
    }
    outcome = check_run(run, expected)
    problems += [p for p in outcome if p.split(" ", 1)[0] not in timed_out]
    diverged = len({p.split(" ", 1)[0] for p in outcome} & timed_out)
    problems += conserved(checkouts, states, before, await stack.snapshot())
    problems += applied_twice(histories)
    if problems:
        stack.fail(f"{len(problems)} problems:\n" + "\n".join(problems[:40]))

    # every instance, the killed one too, took part
    by_status = Counter(s.status.value for s in states.values())
    assert sum(by_status.values()) == SAGAS, by_status
    assert diverged <= SAGAS // 10, f"{diverged} sagas diverged by a timeout: {by_status}"
    print(f"{SAGAS} sagas on {INSTANCES} instances, one killed: {dict(by_status)}; "
          f"{len(timed_out)} with a timeout, {diverged} diverged by it")  # fmt: skip
    for proc in (victim, instances[2], instances[3]):
        lines = proc.stderr.read_text()
        assert '"event": "started"' in lines or '"event": "completed"' in lines, (
            f"{proc.name} applied nothing:\n{proc.describe()}"
        )
