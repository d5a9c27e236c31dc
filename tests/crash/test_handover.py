"""PostgreSQL, two orchestrator instances: one is SIGKILLed right after committing commands it
never published. The other publishes them as soon as the death is known (the killed instance's
presence lock is gone), not when the 5 s claim runs out, and no step times out meanwhile: a
step's deadline never fires while its command has not left."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from saga.core.state import HistoryKind, SagaStatus
from saga.store.sql import CLAIM, SqlStore
from saga_tools.bench.stack import temporary_database
from tests.conftest import require_postgres, require_rabbitmq
from tests.crash.helpers import (
    Processes,
    base_env,
    delete_topology,
    orchestrator_env,
    plan,
    publish_starts,
    read_log,
    wait_exit,
    wait_for_output,
)

pytestmark = pytest.mark.rabbitmq

SAGAS = 24
STARTUP = 30.0


@pytest.fixture
async def database(unique: str) -> AsyncIterator[str]:
    async with temporary_database(require_postgres(), f"saga_handover_{unique}") as url:
        yield url


async def test_a_killed_instance_s_unsent_commands_are_taken_over_at_once(
    database: str, tmp_path: Path, unique: str
) -> None:
    url = require_rabbitmq()
    prefix = f"handover-{unique}"
    processes = Processes(tmp_path)
    log = tmp_path / "responder.jsonl"
    try:
        responder = processes.spawn(
            "responder", ["-m", "tests.support.responder", url, prefix, str(log)], base_env()
        )
        await wait_for_output(responder, "ready", within=STARTUP)

        def env(fault: tuple[str, int] | None) -> dict[str, str]:
            return orchestrator_env(
                database_url=database, rabbitmq_url=url, prefix=prefix, fault=fault
            )

        survivor = processes.spawn("survivor", ["-m", "saga", "run", "--migrate"], env(None))
        await wait_for_output(survivor, "orchestrator_started", within=STARTUP)
        # dies right after its second commit that wrote commands, before publishing them
        doomed = processes.spawn(
            "doomed", ["-m", "saga", "run"], env(("after_commit_before_publish", 2))
        )
        await wait_for_output(doomed, "orchestrator_started", within=STARTUP)

        planned = [p for p in plan(prefix, SAGAS * 2) if p.kind.name == "ok"][:SAGAS]
        assert len(planned) >= SAGAS // 2, "the crash plan has too few happy sagas"
        await publish_starts(url, prefix, (p.start for p in planned))
        code = await wait_exit(doomed, within=30)
        died = time.monotonic()
        assert code == -9, f"the doomed instance did not crash: {code}\n{processes.describe()}"

        store = SqlStore(database)
        try:
            while True:
                states = await store.load_many([p.saga_id for p in planned])
                if len(states) == len(planned) and all(
                    s.status.is_terminal for s in states.values()
                ):
                    break
                assert time.monotonic() - died < 30, (
                    f"not every saga ended: {Counter(s.status for s in states.values())}\n"
                    f"{processes.describe()}"
                )
                await asyncio.sleep(0.05)
            took = time.monotonic() - died
            histories = {p.saga_id: await store.history(p.saga_id) for p in planned}
        finally:
            await store.close()

        assert {s.status for s in states.values()} == {SagaStatus.COMPLETED}
        timeouts = [
            (p.key, e.step, e.attempt)
            for p in planned
            for e in histories[p.saga_id]
            if e.kind is HistoryKind.STEP_TIMED_OUT
        ]
        assert timeouts == [], f"steps timed out while their commands waited: {timeouts}"
        # the same command may arrive twice (a row published, then taken over before its
        # deletion: at least once, deduped by the participant), but never a second attempt
        retried = [r for r in read_log(log) if r["attempt"] != 1]
        assert not retried, f"commands sent again as new attempts: {retried}"
        assert took < CLAIM.total_seconds() - 1, (
            f"the killed instance's commands waited {took:.1f}s: its claims ran out instead of "
            "being taken over when it died"
        )
    finally:
        processes.stop_all()
        await delete_topology(url, prefix)
