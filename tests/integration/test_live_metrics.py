"""The live signals on /metrics, from a real orchestrator and real participants on RabbitMQ:
the store gauges (sagas by status, the oldest one's age), the queue depths, the participants'
handling time and their ``command_handled`` lines; and the shipped alert rules and Grafana
dashboard, whose every expression may use only metrics and labels these processes export."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import subprocess
import urllib.request
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families
from pydantic import JsonValue
from sqlalchemy.ext.asyncio import AsyncConnection

import saga.participant.runtime
from saga.core.state import SagaStatus
from saga.orchestrator.service import OrchestratorService
from saga.participant import Participant, ParticipantSettings
from saga.protocol.envelope import CommandEnvelope
from saga.telemetry import Metrics, MetricsServer
from tests.faults._db_helpers import LogRecorder
from tests.integration.harness import Harness, wait_terminal
from tests.support.sagas import PARTICIPANTS

pytestmark = pytest.mark.rabbitmq

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every sample of a live /metrics by sample name; a family with no sample yet is there
    with an empty list."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        found.setdefault(family.name, [])
        for sample in family.samples:
            found.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return found


def _value(
    scrape: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str
) -> float:
    for have, value in scrape.get(name, []):
        if all(have.get(k) == v for k, v in labels.items()):
            return value
    return -1.0


async def _until(port: int, name: str, want: float, **labels: str) -> None:
    """Wait until a scrape of ``port`` shows ``want`` for the sample, or fail saying what
    it shows."""
    for _ in range(150):
        seen = _value(_scrape(port), name, **labels)
        if seen == want:
            return
        await asyncio.sleep(0.1)
    pytest.fail(f"{name}{labels} is {seen} after 15 s, not {want}")


@asynccontextmanager
async def _participants(
    harness: Harness, tmp_path: Path, names: Iterable[str], metrics: Metrics
) -> AsyncIterator[list[Participant]]:
    """Real participants (the library) answering every command of theirs with success."""
    started: list[Participant] = []
    try:
        for name in names:
            settings = ParticipantSettings(
                data_dir=tmp_path / name, prefix=harness.prefix, rabbitmq_url=harness.rabbitmq_url
            )
            participant = Participant(name, settings, metrics=metrics)

            async def answer(
                conn: AsyncConnection, payload: dict[str, JsonValue], command: CommandEnvelope
            ) -> None:
                return None

            participant.handler(f"{name}.do")(answer)
            participant.handler(f"{name}.undo")(answer)
            await participant.start()
            started.append(participant)
        yield started
    finally:
        for participant in started:
            await participant.stop()


async def test_store_and_queue_gauges_and_participant_signals_are_live(
    harness: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(OrchestratorService, "GAUGE_INTERVAL", 0.1)
    recorder = LogRecorder()
    monkeypatch.setattr(saga.participant.runtime, "log", recorder)
    port = _free_port()
    service = await harness.start_service(metrics_port=port)
    topology = harness.topology
    gamma_queue = topology.command_queue("gamma")
    shared = Metrics()
    async with _participants(harness, tmp_path, ["alpha", "beta"], shared):
        sagas = [await service.start_saga("trip", {"script": {}}) for _ in range(2)]
        # gamma is not running: both sagas wait at their last step, its commands in its queue
        await _until(port, "saga_sagas", 2, saga_name="trip", status="running")
        await _until(port, "saga_queue_messages_ready", 2, queue=gamma_queue)
        scrape = _scrape(port)
        age = _value(scrape, "saga_oldest_age_seconds", saga_name="trip", status="running")
        assert age > 0
        assert _value(scrape, "saga_sagas", saga_name="trip", status="failed") == 0
        async with _participants(harness, tmp_path, ["gamma"], shared):
            finals = await wait_terminal(service, [s.saga_id for s in sagas])
            assert {f.status for f in finals} == {SagaStatus.COMPLETED}
            await _until(port, "saga_sagas", 0, saga_name="trip", status="running")
            await _until(port, "saga_queue_messages_ready", 0, queue=gamma_queue)
            assert _value(_scrape(port), "saga_oldest_age_seconds", status="running") == 0
        await harness.publish(topology.start_queue, b"not json")
        dlq = topology.dead_letter_queue(topology.start_queue)
        await _until(port, "saga_queue_messages_ready", 1, queue=dlq)

    for name in PARTICIPANTS:
        count = shared.registry.get_sample_value(
            "saga_participant_handling_seconds_count",
            {"participant": name, "command_type": f"{name}.do"},
        )
        assert count == 2
    lines = recorder.named("command_handled")
    assert len(lines) == 6
    assert {(line["level"], line["outcome"]) for line in lines} == {("info", "success")}
    ids = {str(s.saga_id) for s in sagas}
    for line in lines:
        assert line["saga_id"] in ids and line["saga_name"] == "trip"
        assert line["command_type"] == f"{line['step']}.do"
        assert line["duration_ms"] > 0


# --- the shipped alert rules and dashboard -----------------------------------------------------

_FUNCTIONS = {
    "sum", "max", "min", "avg", "count", "rate", "increase", "deriv", "irate", "delta",
    "histogram_quantile", "by", "without", "and", "or", "unless", "on", "ignoring",
    "group_left", "group_right", "abs", "clamp_min", "topk", "bottomk", "bool",
}  # fmt: skip
_TARGET_LABELS = {"instance", "job"}  # added by Prometheus at scrape time
_SUFFIXES = ("_bucket", "_count", "_sum")


def _metric_names_and_labels(expr: str) -> tuple[dict[str, set[str]], set[str]]:
    """The metric names of a PromQL expression with the labels each is matched on, and the
    labels it groups by."""
    used: dict[str, set[str]] = {}
    for name, matchers in re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{[^}]*\})?", expr):
        if name in _FUNCTIONS:
            continue
        labels = set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", matchers))
        used.setdefault(name, set()).update(labels)
    grouped: set[str] = set()
    for clause in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        grouped.update(part.strip() for part in clause.split(",") if part.strip())
    return used, grouped


def _strip(expr: str) -> str:
    """Without quoted strings, range selectors, numbers and grouping clauses: what is left
    names metrics, functions and label matchers."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(?:by|without)\s*\([^)]*\)", "", expr)
    return re.sub(r"\b\d+(?:\.\d+)?\b", "", expr)


def _exported(
    scrapes: Iterable[dict[str, list[tuple[dict[str, str], float]]]],
) -> dict[str, set[str]]:
    """Every metric name a scrape shows (samples and families) with the label names it carries:
    from the samples, and from the code's own declaration for families with none yet."""
    declared: dict[str, set[str]] = {}
    for each in vars(Metrics()).values():
        if isinstance(each, MetricWrapperBase):
            labels = set(each._labelnames)
            name = each._name
            kind = each._type
            names = {name}
            if kind == "counter":
                names.add(f"{name}_total")
            if kind == "histogram":
                names.update(f"{name}{suffix}" for suffix in _SUFFIXES)
                declared[f"{name}_bucket"] = labels | {"le"}
            for n in names:
                declared.setdefault(n, labels)
    exported: dict[str, set[str]] = {}
    for scrape in scrapes:
        for name, samples in scrape.items():
            labels = exported.setdefault(name, set(declared.get(name, set())))
            for have, _ in samples:
                labels.update(have)
            # a family scraped without samples yet: the series names the code declares for it
            for variant in (f"{name}_total", *(f"{name}{suffix}" for suffix in _SUFFIXES)):
                if variant in declared:
                    exported.setdefault(variant, set()).update(declared[variant])
    return exported


def _check(expr: str, exported: dict[str, set[str]], where: str) -> None:
    used, _ = _metric_names_and_labels(_strip(expr))
    _, grouped = _metric_names_and_labels(expr)
    assert used, f"{where}: no metric in {expr!r}"
    allowed = set(_TARGET_LABELS)
    for name, labels in used.items():
        assert name in exported, f"{where}: {name} is not exported (in {expr!r})"
        unknown = labels - exported[name] - _TARGET_LABELS
        assert not unknown, f"{where}: {name} has no label {sorted(unknown)} (in {expr!r})"
        allowed |= exported[name]
    unknown = grouped - allowed
    assert not unknown, f"{where}: grouping by {sorted(unknown)}, which no metric has ({expr!r})"


async def _live_scrapes(harness: Harness, tmp_path: Path) -> list[dict[str, Any]]:
    """/metrics of an orchestrator and of participants after a saga and a dead letter."""
    port = _free_port()
    service = await harness.start_service(metrics_port=port)
    shared = Metrics()
    server = MetricsServer(shared.registry)
    server.start("127.0.0.1", 0)
    try:
        async with _participants(harness, tmp_path, PARTICIPANTS, shared):
            started = await service.start_saga("trip", {"script": {}})
            await wait_terminal(service, [started.saga_id])
            await harness.publish(harness.topology.start_queue, b"not json")
            await _until(port, "saga_dead_lettered_total", 1, reason="invalid_json")
            return [_scrape(port), _scrape(server.port)]
    finally:
        server.stop()


async def test_alert_rules_and_dashboard_use_only_exported_metrics(
    harness: Harness, tmp_path: Path
) -> None:
    exported = _exported(await _live_scrapes(harness, tmp_path))
    for must in ("saga_sagas", "saga_oldest_age_seconds", "saga_queue_messages_ready"):
        assert must in exported

    rules = yaml.safe_load((DOCS / "prometheus-alerts.yml").read_text())
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    assert {a["alert"] for a in alerts} >= {
        "SagaFailed",
        "SagaRunningTooLong",
        "SagaQueueGrowing",
        "SagaDeadLetters",
        "SagaParticipantSlow",
    }
    for alert in alerts:
        _check(alert["expr"], exported, alert["alert"])

    dashboard = json.loads((DOCS / "grafana-dashboard.json").read_text())
    targets = [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p["targets"]]
    assert len(targets) >= len(dashboard["panels"]) > 0
    for title, expr in targets:
        _check(expr, exported, f"panel {title!r}")


def test_the_alert_rules_pass_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail(
            "promtool is not installed: apt-get install prometheus (scripts/test does it)",
            pytrace=False,
        )
    done = subprocess.run(
        [promtool, "check", "rules", str(DOCS / "prometheus-alerts.yml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
