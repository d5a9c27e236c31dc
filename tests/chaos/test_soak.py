"""The chaos soak, short: the real stack on a private RabbitMQ node, every kind of fault, and
the checker's verdict. Plans that once failed are replayed from ``regressions/``.

``saga chaos run --sagas 5000`` is the long version (docs/reliability.md has its latest report).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from saga_tools.chaos.checker import COUNTERS
from saga_tools.chaos.plan import CLUSTER_KINDS, FAULT_KINDS, ChaosPlan, make_plan
from saga_tools.chaos.runner import run_soak
from tests.conftest import require_postgres

REGRESSIONS = sorted((Path(__file__).parent / "regressions").glob("*.json"))
CI_SEED = 20261122


def _progress(line: str) -> None:
    print(line, flush=True)


def _assert_clean(report_text: str, counts: dict[str, int]) -> None:
    assert set(counts) == set(COUNTERS)
    assert not any(counts.values()), report_text


async def test_a_short_soak_under_every_kind_of_fault_loses_and_doubles_nothing(
    tmp_path: Path,
) -> None:
    plan = make_plan(CI_SEED, 240, rate=20.0, fault_every=1.0)
    kinds = set(FAULT_KINDS) - set(CLUSTER_KINDS)
    assert {f.kind for f in plan.schedule} == kinds, "the CI seed must hit every kind"
    report = await run_soak(plan, tmp_path / "soak", _progress)
    print(report.render())
    _assert_clean(report.render(), report.counts)
    # it was a real soak: the mix ended in every terminal state, and the faults really happened
    assert set(report.actual) == {"COMPLETED", "COMPENSATED", "FAILED"}
    assert sum(report.actual.values()) == 240
    assert sum(report.faults.values()) == len(plan.schedule)
    assert report.messages["malformed_injected"] == report.messages["dead_lettered"] > 0
    # every SIGTERM under load stopped its process by itself, with status 0, in time
    assert report.messages["nemesis_notes"] == 0, report.render()


async def test_a_burst_beyond_the_in_flight_bound_waits_and_nothing_times_out_for_it(
    tmp_path: Path,
) -> None:
    """Overload, short: 400 checkouts offered at 100/s (the stack under faults completes about
    40 a second) to an orchestrator admitting 25 at a time, with a fault every second. The
    excess waits in the start queue; no saga ends differently because a step timed out while
    its command or its reply waited in our own queues. The long version (2 minutes) is in
    docs/reliability.md."""
    plan = make_plan(CI_SEED + 1, 400, rate=100.0, fault_every=1.0, max_in_flight=25)
    report = await run_soak(plan, tmp_path / "soak", _progress)
    print(report.render())
    _assert_clean(report.render(), report.counts)
    assert report.diverged_by_timeout == [], report.render()
    assert sum(report.actual.values()) == 400
    assert report.faults, "no fault was injected"


@pytest.mark.postgres
async def test_a_short_soak_on_a_cluster_with_three_orchestrators_on_postgresql(
    tmp_path: Path,
) -> None:
    """The wide soak, short: three orchestrator instances on one PostgreSQL database and the
    four services on a private 3-node RabbitMQ cluster with quorum queues, each process through
    proxies of its own; besides every other kind of fault, nodes are cut off from the cluster
    (netfilter: the minority node pauses, its clients move) and single processes from the node
    they are on. Nothing lost or doubled, and every saga ends as planned: no step timeout
    changed an outcome. The long version is in docs/reliability.md."""
    plan = make_plan(
        CI_SEED + 2, 300, rate=15.0, fault_every=1.5, nodes=3, instances=3, backend="postgresql"
    )
    assert {f.kind for f in plan.schedule} == set(FAULT_KINDS), "the CI seed must hit every kind"
    targets = {f.target for f in plan.schedule if f.kind in ("kill_orchestrator", "partition")}
    assert any(t.startswith("orchestrator-") for t in targets), plan.schedule
    report = await run_soak(plan, tmp_path / "soak", _progress, require_postgres())
    print(report.render())
    _assert_clean(report.render(), report.counts)
    assert report.diverged_by_timeout == [], report.render()
    assert set(report.actual) == {"COMPLETED", "COMPENSATED", "FAILED"}
    assert sum(report.actual.values()) == 300
    assert sum(report.faults.values()) == len(plan.schedule)
    assert report.faults["partition_nodes"] >= 1
    assert report.messages["malformed_injected"] == report.messages["dead_lettered"] > 0
    assert report.messages["nemesis_notes"] == 0, report.render()


def test_there_are_regression_plans_to_replay() -> None:
    assert REGRESSIONS, "tests/chaos/regressions/ must hold the plans of soaks that once failed"


@pytest.mark.parametrize("path", REGRESSIONS, ids=[p.stem for p in REGRESSIONS])
async def test_a_plan_that_once_failed_now_passes(path: Path, tmp_path: Path) -> None:
    report = await run_soak(ChaosPlan.load(path), tmp_path / "soak", _progress)
    print(report.render())
    _assert_clean(report.render(), report.counts)
