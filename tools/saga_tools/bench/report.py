"""The benchmark's result: one JSON document for machines, a table for people."""

from __future__ import annotations

import os
import platform
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from saga_tools.bench.ceiling import CeilingResult
from saga_tools.bench.definitions import VERSIONS
from saga_tools.bench.driver import Load, Workload

__all__ = ["percentile", "render_table", "result_document"]

STEPS = 4  # round trips per checkout on the happy path
#: processes of the stack under test (not the bench driver, not the shared broker)
_SERVICE_PROCESSES = ("order", "payment", "inventory", "shipping", "all")


def percentile(values: list[float], q: float) -> float:
    """The ``q`` (0..1) percentile by nearest rank; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))
    return ordered[rank]


def result_document(
    *,
    workload: Workload,
    load: Load,
    database: str,
    services_mode: str,
    prefix: str,
    cpu_s: Mapping[str, float],
    orchestrator_rss_mib: Mapping[str, float],
    ceiling: CeilingResult | None,
    orchestrators: Sequence[str] = ("orchestrator",),
    killed: str | None = None,
    database_commits: int | None = None,
    step_timeout: float | None = None,
    checkout_version: int | None = None,
    sqlite_synchronous: str | None = None,
    work: Mapping[str, Mapping[str, float]] | None = None,
) -> dict[str, Any]:
    """The result; ``cpu_s`` is CPU seconds by process name, ``orchestrators`` the names of the
    orchestrator instances among them (their sum is reported as ``orchestrator``), and
    ``orchestrator_rss_mib`` each instance's peak RSS; ``database_commits`` the transactions
    PostgreSQL committed over the measured part (every process's, the services' included)."""
    statuses = Counter(status for status, _ in load.finals.values())
    latencies = [
        max(at - load.published[key], 0.0) * 1000
        for key, (_, at) in load.finals.items()
        if key in load.published
    ]
    first = min(load.published.values(), default=0.0)
    last = max((at for _, at in load.finals.values()), default=first)
    seconds = max(last - first, 1e-9)
    finished = sum(statuses[s] for s in ("COMPLETED", "COMPENSATED", "FAILED"))
    rate = finished / seconds if finished else 0.0

    def per_saga(cpu_seconds: float) -> float:
        return round(cpu_seconds * 1000 / max(finished, 1), 3)

    # "orchestrator" is every instance together, so the key means the same for one or several
    mine = [name for name in orchestrators if name in cpu_s]
    cpu = dict(cpu_s)
    for name in mine:
        del cpu[name]
    if mine:
        cpu = {"orchestrator": sum(cpu_s[name] for name in mine), **cpu}
    instances = [
        {
            "name": name,
            "cpu_ms_per_saga": per_saga(cpu_s[name]) if name in cpu_s else None,
            "peak_rss_mib": (
                round(orchestrator_rss_mib[name], 1) if name in orchestrator_rss_mib else None
            ),
            "killed": name == killed,
        }
        for name in orchestrators
    ]
    stack_cpu = [v for k, v in cpu.items() if k == "orchestrator" or k in _SERVICE_PROCESSES]
    doc: dict[str, Any] = {
        "schema": 1,
        "config": {
            "sagas": workload.sagas,
            "concurrency": workload.concurrency,
            "rate": workload.rate,
            "fail_rate": workload.fail_rate,
            "fail_step": workload.fail_step if workload.fail_rate else None,
            "warmup": workload.warmup,
            "step_timeout_s": step_timeout,
            "checkout_version": checkout_version or max(VERSIONS),
            "sqlite_synchronous": (sqlite_synchronous or "FULL") if database == "sqlite" else None,
            "database": database,
            "services": services_mode,
            "instances": len(orchestrators),
            "prefix": prefix,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
        },
        "sagas": {
            "total": workload.sagas,
            "completed": statuses["COMPLETED"],
            "compensated": statuses["COMPENSATED"],
            "failed": statuses["FAILED"],
            "unfinished": workload.sagas - finished,
        },
        "all_finished": finished == workload.sagas,
        "seconds": round(seconds, 3),
        "sagas_per_s": round(rate, 1),
        "latency_ms": {
            "p50": round(percentile(latencies, 0.50), 2),
            "p95": round(percentile(latencies, 0.95), 2),
            "p99": round(percentile(latencies, 0.99), 2),
            "max": round(max(latencies, default=0.0), 2),
        },
        "cpu_ms_per_saga": {name: per_saga(seconds_) for name, seconds_ in cpu.items()},
        # the largest instance's peak (the only one's, with one instance)
        "orchestrator_peak_rss_mib": (
            round(max(orchestrator_rss_mib.values()), 1) if orchestrator_rss_mib else None
        ),
        "orchestrators": instances,
        "totals": {
            "orchestrators_cpu_ms_per_saga": per_saga(cpu["orchestrator"])
            if "orchestrator" in cpu
            else None,
            # the sum of each instance's peak: an upper bound of what they held at once
            "orchestrators_peak_rss_mib": (
                round(sum(orchestrator_rss_mib.values()), 1) if orchestrator_rss_mib else None
            ),
            "stack_cpu_ms_per_saga": per_saga(sum(stack_cpu)) if stack_cpu else None,
        },
        "outbox": {
            "max_rows": load.max_outbox_rows,
            "max_lag_ms": round(load.max_outbox_lag_s * 1000, 1),
        },
        # saga_work_total of each process over the measured part, per saga (saga.work)
        "work_per_saga": {
            name: {kind: round(value / max(finished, 1), 2) for kind, value in kinds.items()}
            for name, kinds in (work or {}).items()
        },
        "ceiling": None,
        "crash": None,
        "postgresql": None
        if database_commits is None
        else {
            "commits_per_saga": round(database_commits / max(finished, 1), 2),
            "commits_per_s": round(database_commits / max(load.seconds, 1e-9), 1),
        },
    }
    if ceiling is not None:
        cap = ceiling.rate / STEPS
        doc["ceiling"] = {
            "round_trips": ceiling.round_trips,
            "concurrency": ceiling.concurrency,
            "round_trips_per_s": round(ceiling.rate, 1),
            "sagas_per_s_cap": round(cap, 1),
            "ratio": round(rate / cap, 3) if cap else None,
            "cpu_ms_per_round_trip": round(
                (ceiling.requester_cpu_s + ceiling.responder_cpu_s)
                * 1000
                / max(ceiling.round_trips, 1),
                3,
            ),
        }
    if load.crashed_at is not None and load.restarted_at is not None:
        # terminal times are wall clock; the restart is a monotonic reading: convert it
        restart_wall = first + (load.restarted_at - load.started_at)
        doc["crash"] = {
            "instance": killed,
            "after_s": workload.crash_after,
            "in_flight": load.in_flight_at_crash,
            "restart_s": round(load.restarted_at - load.crashed_at, 2),
            "all_terminal_after_restart_s": round(max(last - restart_wall, 0.0), 2),
        }
    return doc


def render_table(doc: dict[str, Any]) -> str:
    c, s, lat = doc["config"], doc["sagas"], doc["latency_ms"]
    mode = f"rate {c['rate']}/s, " if c["rate"] else ""
    fail = f", {c['fail_rate']:.0%} refused at {c['fail_step']}" if c["fail_rate"] else ""
    rows = [
        ("workload", f"{c['sagas']} checkouts, {mode}{c['concurrency']} in flight{fail}"),
        (
            "database",
            c["database"]
            + (f" (synchronous={c['sqlite_synchronous']})" if c["sqlite_synchronous"] else ""),
        ),
        ("services", c["services"]),
        ("orchestrators", f"{c['instances']} on one database" if c["instances"] > 1 else "1"),
        (
            "sagas",
            f"{s['completed']} completed, {s['compensated']} compensated, {s['failed']} failed, "
            f"{s['unfinished']} unfinished",
        ),
        ("throughput", f"{doc['sagas_per_s']:.1f} sagas/s over {doc['seconds']:.2f} s"),
        ("latency", f"p50 {lat['p50']:.1f} ms, p95 {lat['p95']:.1f} ms, p99 {lat['p99']:.1f} ms"),
    ]
    if doc["ceiling"] is not None:
        ce = doc["ceiling"]
        rows.append(
            (
                "broker ceiling",
                f"{ce['round_trips_per_s']:.0f} round trips/s at {ce['concurrency']} in flight "
                f"-> {ce['sagas_per_s_cap']:.0f} sagas/s cap (/{STEPS})",
            )
        )
        rows.append(("ratio to cap", f"{ce['ratio']:.0%}" if ce["ratio"] is not None else "-"))
    cpu = doc["cpu_ms_per_saga"]
    if cpu:
        many = f"orchestrators ({c['instances']})" if c["instances"] > 1 else "orchestrator"
        rows.append(
            (
                "CPU ms/saga",
                ", ".join(f"{many if k == 'orchestrator' else k} {v:.2f}" for k, v in cpu.items()),
            )
        )
    if len(doc["orchestrators"]) > 1:
        for o in doc["orchestrators"]:
            ms = "-" if o["cpu_ms_per_saga"] is None else f"{o['cpu_ms_per_saga']:.2f}"
            rss = "-" if o["peak_rss_mib"] is None else f"{o['peak_rss_mib']:.0f}"
            note = " (killed and restarted)" if o["killed"] else ""
            rows.append((o["name"], f"CPU {ms} ms/saga, RSS {rss} MiB peak{note}"))
        t = doc["totals"]
        rss_total = (
            "-"
            if t["orchestrators_peak_rss_mib"] is None
            else f"{t['orchestrators_peak_rss_mib']:.0f}"
        )
        rows.append(
            (
                "all orchestrators",
                f"CPU {cpu.get('orchestrator', 0.0):.2f} ms/saga together, "
                f"RSS {rss_total} MiB (sum of peaks)",
            )
        )
    elif doc["orchestrator_peak_rss_mib"] is not None:
        rows.append(("orchestrator RSS", f"{doc['orchestrator_peak_rss_mib']:.0f} MiB peak"))
    if doc["totals"]["stack_cpu_ms_per_saga"] is not None:
        rows.append(
            (
                "stack CPU",
                f"{doc['totals']['stack_cpu_ms_per_saga']:.2f} ms/saga "
                "(orchestrators and services; not the broker, the database or the driver)",
            )
        )
    if doc["postgresql"] is not None:
        pg = doc["postgresql"]
        rows.append(
            (
                "postgresql",
                f"{pg['commits_per_saga']:.1f} commits/saga, {pg['commits_per_s']:.0f} commits/s "
                "(every process, services included)",
            )
        )
    rows.append(
        (
            "outbox",
            f"max {doc['outbox']['max_rows']} rows waiting, "
            f"oldest {doc['outbox']['max_lag_ms']:.0f} ms",
        )
    )
    if doc["crash"] is not None:
        cr = doc["crash"]
        rows.append(
            (
                "kill -9",
                f"{cr['instance']} at {cr['after_s']} s with {cr['in_flight']} in flight; "
                f"restarted in {cr['restart_s']:.1f} s; all terminal "
                f"{cr['all_terminal_after_restart_s']:.1f} s after the restart",
            )
        )
    rows.append(("load average", " ".join(str(x) for x in doc["machine"]["load_average"])))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
