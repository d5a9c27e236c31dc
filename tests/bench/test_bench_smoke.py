"""``saga bench`` end to end on a few dozen sagas: the JSON it prints and that every saga ended.

Never asserts on speed: the machines running the tests are shared and their speed varies.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import require_rabbitmq

SAGA = Path(sys.executable).parent / "saga"
REPO = Path(__file__).resolve().parents[2]


def run_bench(*args: str) -> dict[str, object]:
    env = {**os.environ, "SAGA_RABBITMQ_URL": require_rabbitmq()}
    done = subprocess.run(
        [str(SAGA), "bench", "--json", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    doc: dict[str, object] = json.loads(done.stdout)
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
    latency = doc["latency_ms"]
    assert isinstance(latency, dict) and set(latency) == {"p50", "p95", "p99", "max"}
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"]
    assert isinstance(doc["sagas_per_s"], float) and doc["sagas_per_s"] > 0
    cpu = doc["cpu_ms_per_saga"]
    assert isinstance(cpu, dict)
    assert {"orchestrator", "order", "payment", "inventory", "shipping"} <= set(cpu)
    assert isinstance(doc["orchestrator_peak_rss_mib"], float)
    assert set(doc["outbox"]) == {"max_rows", "max_lag_ms"}  # type: ignore[arg-type]
    ceiling = doc["ceiling"]
    assert isinstance(ceiling, dict)
    assert ceiling["round_trips"] == 200 and ceiling["concurrency"] == 8
    assert ceiling["round_trips_per_s"] > 0 and ceiling["ratio"] > 0
    assert doc["crash"] is None
