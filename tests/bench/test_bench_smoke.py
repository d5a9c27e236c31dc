"""``saga bench`` end to end on a few dozen sagas: the JSON it prints and that every saga ended,
on SQLite and with two orchestrator instances sharing PostgreSQL (one killed mid-run, so the
other must take over its work), and the refusal of a second instance on SQLite.

Never asserts on speed: the machines running the tests are shared and their speed varies.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_postgres, require_rabbitmq

SAGA = Path(sys.executable).parent / "saga"
REPO = Path(__file__).resolve().parents[2]


def _bench(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SAGA_RABBITMQ_URL": require_rabbitmq()}
    return subprocess.run(
        [str(SAGA), "bench", "--json", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def run_bench(*args: str) -> dict[str, Any]:
    done = _bench(*args)
    assert done.returncode == 0, done.stdout + done.stderr
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc


def test_bench_runs_every_saga_to_its_end_and_reports_json() -> None:
    doc = run_bench(
        "--sagas", "30", "--concurrency", "8", "--fail-rate", "0.2", "--fail-step", "payment",
        "--warmup", "4", "--ceiling-round-trips", "200",
    )  # fmt: skip
    assert doc["schema"] == 1
    assert doc["all_finished"] is True
    assert doc["sagas"] == {
        "total": 30,
        "completed": 24,
        "compensated": 6,  # 20 %, refused at the payment step
        "failed": 0,
        "unfinished": 0,
    }
    config = doc["config"]
    assert isinstance(config, dict)
    assert config["database"] == "sqlite" and config["services"] == "separate"
    assert config["checkout_version"] == 2  # the newest
    latency = doc["latency_ms"]
    assert isinstance(latency, dict) and set(latency) == {"p50", "p95", "p99", "max"}
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"]
    assert isinstance(doc["sagas_per_s"], float) and doc["sagas_per_s"] > 0
    cpu = doc["cpu_ms_per_saga"]
    assert isinstance(cpu, dict)
    assert {"orchestrator", "order", "payment", "inventory", "shipping"} <= set(cpu)
    assert isinstance(doc["orchestrator_peak_rss_mib"], float)
    assert set(doc["outbox"]) == {"max_rows", "max_lag_ms"}
    ceiling = doc["ceiling"]
    assert isinstance(ceiling, dict)
    assert ceiling["round_trips"] == 200 and ceiling["concurrency"] == 8
    assert ceiling["round_trips_per_s"] > 0 and ceiling["ratio"] > 0
    assert doc["crash"] is None
    orchestrators = doc["orchestrators"]
    assert isinstance(orchestrators, list) and len(orchestrators) == 1
    assert orchestrators[0]["name"] == "orchestrator" and orchestrators[0]["killed"] is False
    assert orchestrators[0]["cpu_ms_per_saga"] == cpu["orchestrator"]
    assert config["instances"] == 1
    # the work each process reported (saga_work_total): a saga failing at payment sends 5
    # commands (create; charge and reserve in parallel; release, cancel), a completed one 4;
    # every delivery is settled
    work = doc["work_per_saga"]
    assert set(work) == {"orchestrator", "order", "payment", "inventory", "shipping"}, work
    mine = work["orchestrator"]
    assert 4 <= mine["publishes"] <= 5 and mine["deliveries"] == mine["publishes"] + 1, mine
    assert mine["settles"] == mine["deliveries"] and 0 < mine["transactions"] <= 5, mine


def test_bench_runs_the_checkout_version_it_is_given() -> None:
    """Version 1 (the peers' shape: four steps one after another) refused at payment sends 3
    commands (create, charge, cancel) where version 2 sends 5 (its reservation went out beside
    the charge and is released): 24 completed x 4 + 6 refused x 3 = 3.8 per saga, not 4.2."""
    doc = run_bench(
        "--sagas", "30", "--concurrency", "8", "--fail-rate", "0.2", "--fail-step", "payment",
        "--warmup", "4", "--no-ceiling", "--checkout-version", "1",
    )  # fmt: skip
    assert doc["all_finished"] is True
    assert doc["config"]["checkout_version"] == 1
    assert (doc["sagas"]["completed"], doc["sagas"]["compensated"]) == (24, 6)
    mine = doc["work_per_saga"]["orchestrator"]
    assert 3.7 <= mine["publishes"] < 4, mine


@pytest.mark.postgres
def test_bench_runs_two_orchestrators_on_postgresql_and_survives_killing_one() -> None:
    doc = run_bench(
        "--sagas", "48", "--concurrency", "8", "--instances", "2", "--crash-after", "0.5",
        "--database-url", require_postgres(), "--warmup", "4", "--no-ceiling",
    )  # fmt: skip
    assert doc["all_finished"] is True
    assert doc["sagas"] == {
        "total": 48,
        "completed": 48,
        "compensated": 0,
        "failed": 0,
        "unfinished": 0,
    }
    config = doc["config"]
    assert isinstance(config, dict)
    assert config["database"] == "postgresql" and config["instances"] == 2
    orchestrators = doc["orchestrators"]
    assert isinstance(orchestrators, list)
    assert [o["name"] for o in orchestrators] == ["orchestrator-1", "orchestrator-2"]
    assert [o["killed"] for o in orchestrators] == [True, False]
    for o in orchestrators:
        assert o["cpu_ms_per_saga"] > 0 and o["peak_rss_mib"] > 0, o
    cpu = doc["cpu_ms_per_saga"]
    assert isinstance(cpu, dict)
    together = sum(o["cpu_ms_per_saga"] for o in orchestrators)
    assert abs(cpu["orchestrator"] - together) < 0.01  # the key stays the orchestrators' total
    totals = doc["totals"]
    assert isinstance(totals, dict)
    assert totals["orchestrators_peak_rss_mib"] >= doc["orchestrator_peak_rss_mib"]
    assert totals["stack_cpu_ms_per_saga"] > cpu["orchestrator"]
    crash = doc["crash"]
    assert isinstance(crash, dict) and crash["instance"] == "orchestrator-1"


def test_several_instances_are_refused_on_sqlite() -> None:
    done = _bench("--sagas", "10", "--instances", "2")
    assert done.returncode == 2, done.stdout + done.stderr
    said = " ".join(done.stderr.replace("│", " ").split())  # as typer wraps it in a box
    assert "2 orchestrator instances need PostgreSQL" in said, done.stderr
    assert "SQLite allows one orchestrator per file" in said, done.stderr
    assert not done.stdout


def test_bench_with_echo_participants_measures_the_orchestrator_alone() -> None:
    doc = run_bench(
        "--participants", "echo", "--sagas", "30", "--concurrency", "8", "--warmup", "4",
        "--ceiling-round-trips", "200",
    )  # fmt: skip
    assert doc["all_finished"] is True
    assert doc["sagas"]["completed"] == 30
    assert doc["config"]["services"] == "echo"
    cpu = doc["cpu_ms_per_saga"]
    assert {"orchestrator", "order", "payment", "inventory", "shipping"} <= set(cpu)
    assert doc["ceiling"]["ratio"] > 0


def test_bench_with_library_participants_measures_the_participant_library() -> None:
    """The participant library with its durable ledgers and handlers of no work of their own:
    every command goes through its ledger (one transaction and reply per command, counted)."""
    doc = run_bench(
        "--participants", "library", "--sagas", "30", "--concurrency", "8", "--warmup", "4",
        "--no-ceiling",
    )  # fmt: skip
    assert doc["all_finished"] is True
    assert doc["sagas"]["completed"] == 30
    assert doc["config"]["services"] == "library"
    work = doc["work_per_saga"]
    for name in ("order", "payment", "inventory", "shipping"):
        assert doc["cpu_ms_per_saga"][name] > 0
        assert work[name]["publishes"] == 1.0  # one reply per command
        assert work[name]["transactions"] > 0  # its ledger committed them


def test_echo_participants_refuse_what_they_cannot_do() -> None:
    done = _bench("--participants", "echo", "--fail-rate", "0.5", "--sagas", "10")
    assert done.returncode == 2, done.stdout + done.stderr
    said = " ".join(done.stderr.replace("│", " ").split())
    assert "not with --connect, --fail-rate or --services all" in said, done.stderr
