"""The checkout stack on a 3-node cluster with quorum queues, its busiest node SIGKILLed.

Three orchestrator instances sharing one PostgreSQL database and the four demo services run as
processes with ``SAGA_RABBITMQ_URL`` naming the three private nodes and
``SAGA_QUORUM_QUEUES=true``; they all connect to node 1, the first of the list, which therefore
also leads every queue. Checkouts are published in three waves:
before node 1 is SIGKILLed (while they run), while it is down, and after it was booted again on
its data and rejoined. The test itself talks to node 2 only, which never goes away.

Nothing may be lost or doubled: the processes reconnect to node 2 or 3 by themselves, quorum
queues elect new leaders among the survivors and keep every message they confirmed, and
deliveries unacked at the kill come again and are deduplicated. Each saga must end as its input
implies, each service's ledger must hold each command once, no saga's history may hold a
transition twice, money and stock must have moved by the completed checkouts only
(``saga_tools.chaos.model``), and no step may have timed out: with
3 min step timeouts (``patient_registry``) a timeout would mean a command or a reply went missing
for that long. A failure lists the processes' warnings and, for sagas whose steps timed out,
when each command, timeout and reply came, counted from the kill.

``SAGA_TEST_CLUSTER_SAGAS`` (default 1,000) sets the number of checkouts.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import aiormq
import pytest

from saga.core.state import HistoryKind
from saga_tools.bench.stack import temporary_database
from saga_tools.chaos.cluster import RabbitCluster
from saga_tools.chaos.model import Run
from tests.conftest import require_postgres
from tests.crash.helpers import Proc
from tests.e2e.stack import Group, Stack, applied_twice, submit
from tests.faults.conftest import (
    PATIENCE,
    assert_outcomes,
    mixed_checkouts,
    prepare,
    start_stack,
    summary,
    unfinished,
)

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgres]

SAGAS = int(os.environ.get("SAGA_TEST_CLUSTER_SAGAS", "1000"))
INSTANCES = 3
DOWN_FOR = 5.0  # seconds node 1 stays down before it is booted again, at least


def connections_by_port(cluster: RabbitCluster) -> Counter[int]:
    """Client connections per AMQP port (one port per node), cluster-wide."""
    node = next(n for n in cluster.nodes if n.running())
    rows = json.loads(node.rabbitmqctl("list_connections", "port", "--formatter", "json"))
    return Counter(int(r["port"]) for r in rows)


def quorum_queues(cluster: RabbitCluster, prefix: str) -> dict[str, dict[str, Any]]:
    """Type, leader and members of each queue of ``prefix``."""
    node = next(n for n in cluster.nodes if n.running())
    out = node.rabbitmqctl(
        "list_queues", "name", "type", "leader", "members", "--formatter", "json"
    )
    return {r["name"]: r for r in json.loads(out) if r["name"].startswith(f"{prefix}.")}


async def submit_confirmed(
    stack: Stack, checkouts: list[dict[str, Any]], first: int, within: float = 120
) -> tuple[dict[UUID, dict[str, Any]], int]:
    """:func:`submit`, again until the broker confirms every start (a quorum queue whose leader
    was on the killed node nacks publishes until a new leader is elected, and the relays retry
    theirs the same way); the sagas and the number of tries. Starts are idempotent by key, so
    those of a partly confirmed try that go in again change nothing."""
    deadline = time.monotonic() + within
    tries = 0
    while True:
        tries += 1
        try:
            return await submit(stack, checkouts, first=first), tries
        except (aiormq.exceptions.AMQPError, OSError, AssertionError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.25)


def warnings_by_process(procs: dict[str, Proc]) -> dict[str, dict[str, int]]:
    """How many warning log lines of each event each process wrote."""
    counts: dict[str, dict[str, int]] = {}
    for name, proc in procs.items():
        seen: Counter[str] = Counter()
        for line in proc.output().splitlines():
            if '"level": "warning"' in line or '"level": "error"' in line:
                try:
                    seen[json.loads(line).get("event", "?")] += 1
                except ValueError:
                    seen["(not json)"] += 1
        if seen:
            counts[name] = dict(seen.most_common())
    return counts


def timeline(run: Run, since: datetime, limit: int = 8) -> str:
    """When, in seconds after ``since``, the sagas whose steps timed out sent each command and
    met each timeout, reply and ignored message: whether a message was lost or only late."""
    timed_out = [
        (saga_id, entries)
        for saga_id, entries in run.histories.items()
        if any(e.kind is HistoryKind.STEP_TIMED_OUT for e in entries)
    ]
    if not timed_out:
        return "no step timed out"
    firsts = sorted(
        next(e.at for e in h if e.kind is HistoryKind.STEP_TIMED_OUT) for _, h in timed_out
    )
    lines = [
        f"{len(timed_out)} sagas with a step timeout, the first at "
        f"{(firsts[0] - since).total_seconds():.1f}s and the last at "
        f"{(firsts[-1] - since).total_seconds():.1f}s after the kill"
    ]
    for saga_id, entries in timed_out[:limit]:
        marks = [
            f"{(e.at - since).total_seconds():.1f}s {e.kind.value}"
            f"{'' if e.step is None else ' ' + e.step}"
            f"{'' if e.attempt is None else ' #' + str(e.attempt)}"
            for e in entries
            if e.kind is not HistoryKind.STARTED
        ]
        lines.append(f"{saga_id}: " + ", ".join(marks))
    return "\n".join(lines)


def reconnected_after(procs: dict[str, Proc], since: datetime) -> dict[str, float]:
    """Seconds from ``since`` to each process's first ``amqp_reconnected`` log line after it."""
    delays = {}
    for name, proc in procs.items():
        for line in proc.output().splitlines():
            if '"amqp_reconnected"' not in line:
                continue
            at = datetime.fromisoformat(json.loads(line)["timestamp"].replace("Z", "+00:00"))
            if at >= since:
                delays[name] = (at - since).total_seconds()
                break
    return delays


@pytest.fixture
async def database(unique: str) -> AsyncIterator[str]:
    """A PostgreSQL database of the test's own, dropped at the end."""
    async with temporary_database(require_postgres(), f"saga_cluster_{unique}") as url:
        yield url


async def test_killing_the_busiest_node_loses_and_doubles_nothing(
    healthy_cluster: RabbitCluster, database: str, tmp_path: Path, unique: str
) -> None:
    cluster = healthy_cluster
    first, survivor = cluster.nodes[0], cluster.nodes[1]
    stack = Stack(
        rabbitmq_url=survivor.url,  # the test's own connections: node 2, never killed
        prefix=f"cluster-{unique}",
        directory=tmp_path,
        processes=Group(tmp_path),
        postgres_url=database,
    )
    try:
        await prepare(stack)
        procs = await start_stack(
            stack,
            lambda _: cluster.urls,
            definitions="tests.faults.conftest:patient_registry",
            instances=INSTANCES,
            SAGA_QUORUM_QUEUES="true",
        )
        queues = quorum_queues(cluster, stack.prefix)
        assert queues and all(q["type"] == "quorum" for q in queues.values()), queues
        assert all(len(q["members"]) == 3 for q in queues.values()), queues
        leaders = Counter(str(q["leader"]) for q in queues.values())
        on_first = connections_by_port(cluster)[first.port]
        assert on_first >= len(procs), f"{on_first} connections on node 1, expected every process"

        before = await stack.snapshot()
        mix = mixed_checkouts(SAGAS, seed=23)
        waves = [
            mix[: SAGAS * 2 // 5],
            mix[SAGAS * 2 // 5 : SAGAS * 7 // 10],
            mix[SAGAS * 7 // 10 :],
        ]
        checkouts = await submit(stack, waves[0])
        ids = list(checkouts)
        # kill once a quarter of the first wave is done: some sagas done, most half-way
        deadline = time.monotonic() + 60
        while (left := await unfinished(stack, ids)) > len(ids) * 3 // 4:
            if time.monotonic() > deadline:
                stack.fail(f"{left} of {len(ids)} sagas unfinished 60s after the start")
            await asyncio.sleep(0.05)

        killed_at, killed_clock = datetime.now(UTC), time.monotonic()
        await asyncio.to_thread(cluster.kill, 0)
        assert left > 0, "every saga finished before the kill: it was not mid-load"
        # the second wave goes in through node 2 while node 1 is down
        during, tries = await submit_confirmed(stack, waves[1], first=len(waves[0]))
        checkouts |= during
        published_during = time.monotonic() - killed_clock
        await asyncio.sleep(max(DOWN_FOR - published_during, 0))
        assert all(p.alive() for p in procs.values()), (
            "a process died with node 1\n" + stack.processes.describe()
        )
        moved = connections_by_port(cluster)
        restart_began = time.monotonic()
        await asyncio.to_thread(cluster.restart, 0)
        restart_took = time.monotonic() - restart_began
        down_for = time.monotonic() - killed_clock

        after, _ = await submit_confirmed(stack, waves[2], first=len(waves[0]) + len(waves[1]))
        checkouts |= after
        await stack.wait_terminal(list(checkouts), 600, watch=list(procs.values()))
        await stack.wait_quiet(within=60)

        def explain(run: Run) -> str:
            delays = reconnected_after(procs, killed_at)
            return (
                f"reconnected after (s): {delays}\n"
                f"warnings: {warnings_by_process(procs)}\n{timeline(run, killed_at)}"
            )

        run = await assert_outcomes(
            stack, checkouts, before, "after node 1 was killed", explain=explain
        )
        twice = applied_twice(run.histories)
        assert not twice, f"{len(twice)} sagas with a transition applied twice:\n" + "\n".join(
            twice[:20]
        )
        assert all(p.alive() for p in procs.values()), stack.processes.describe()

        failover = reconnected_after(procs, killed_at)
        assert set(failover) == set(procs), (
            f"processes that never logged a reconnect after the kill: "
            f"{sorted(set(procs) - set(failover))}"
        )
        renewed = sum(p.output().count('"amqp_publish_channel_renewed"') for p in procs.values())
        timeouts = sum(
            e.kind is HistoryKind.STEP_TIMED_OUT for h in run.histories.values() for e in h
        )
        assert timeouts == 0, (
            f"{timeouts} steps timed out: a message went missing for {PATIENCE}\n" + explain(run)
        )
        worked = [
            name
            for name, proc in procs.items()
            if name.startswith("orchestrator")
            and ('"event": "started"' in proc.output() or '"event": "completed"' in proc.output())
        ]
        assert len(worked) == INSTANCES, f"only {worked} applied events"
        print(
            f"\n{len(checkouts)} checkouts on {INSTANCES} orchestrators in 3 waves of "
            f"{[len(w) for w in waves]}; "
            f"quorum queue leaders before the kill: {dict(leaders)}; "
            f"at the kill: {left} of {len(ids)} unfinished; "
            f"reconnected after (s): { {k: round(v, 2) for k, v in sorted(failover.items())} }; "
            f"connections per port while node 1 was down: {dict(moved)}; "
            f"wave 2 ({len(waves[1])}) confirmed {published_during:.1f}s after the kill "
            f"({tries} tries); "
            f"node 1 down {down_for:.1f}s (booted and rejoined in {restart_took:.1f}s); "
            f"publishing channels renewed after a nack: {renewed}; at the end: {summary(run)}"
        )
    finally:
        await asyncio.to_thread(stack.processes.stop_all)
