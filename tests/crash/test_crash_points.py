"""Crash the orchestrator at each fault point mid-run, restart it, and check nothing broke.

For every crash point: a scripted participant and the orchestrator run as subprocesses, ~30 sagas
with known outcomes are started, the orchestrator SIGKILLs itself at the n-th pass through the
point, and a restart without the fault must finish every saga with exactly its expected status:
no command lost, no saga transition applied twice, no effect doubled at the participant.
Duplicate deliveries to the participant are allowed (at-least-once); they are counted and
reported.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime
from typing import Any

import pytest

from saga.core.state import HistoryEntry, HistoryKind, SagaState, SagaStatus
from saga.faults import ORCHESTRATOR_POINTS
from saga.store.sql import SqlStore
from tests.crash.conftest import CrashEnv
from tests.crash.helpers import (
    Planned,
    Proc,
    all_queues,
    base_env,
    orchestrator_env,
    plan,
    publish_starts,
    queue_depths,
    read_log,
    wait_exit,
    wait_for_output,
)

SAGAS = 32
WAVES = 4
WAVE_GAP = 0.3
STARTUP_TIMEOUT = 30.0
CRASH_TIMEOUT = 30.0
FINISH_TIMEOUT = 60.0
QUIET_TIMEOUT = 15.0

# The n-th pass through each point kills the process. A fault-free run of this workload passes
# each point roughly: commits with outbox rows ~40, relay flushes (one batch of publishes each)
# ~35, replies ~120 (group commit makes the first two fewer on a slower machine). About a third
# of the way in, the first waves are done, later ones half-way, the last not started yet.
CRASH_AFTER = {
    "after_commit_before_publish": 12,
    "after_publish_before_confirm": 12,
    "after_confirm_before_mark": 10,
    "after_reply_commit_before_ack": 40,
}
assert set(CRASH_AFTER) == set(ORCHESTRATOR_POINTS), "a crash point is not covered"

TERMINAL_KINDS = (HistoryKind.COMPLETED, HistoryKind.COMPENSATED, HistoryKind.FAILED)


def _start_orchestrator(env: CrashEnv, name: str, fault: tuple[str, int] | None = None) -> Proc:
    return env.processes.spawn(
        name,
        ["-m", "saga", "run", "--migrate"],
        orchestrator_env(
            database_url=env.database_url,
            rabbitmq_url=env.rabbitmq_url,
            prefix=env.prefix,
            fault=fault,
        ),
    )


async def _start_responder(env: CrashEnv) -> Proc:
    proc = env.processes.spawn(
        "responder",
        [
            "-m",
            "tests.support.responder",
            env.rabbitmq_url,
            env.prefix,
            str(env.responder_log),
        ],
        base_env(),
    )
    await wait_for_output(proc, "ready", within=STARTUP_TIMEOUT)
    return proc


async def _load(env: CrashEnv, planned: list[Planned]) -> dict[Any, SagaState]:
    store = SqlStore(env.database_url)
    try:
        return await store.load_many([p.saga_id for p in planned])
    finally:
        await store.close()


def _progress(planned: list[Planned], states: dict[Any, SagaState]) -> str:
    counts = Counter(
        states[p.saga_id].status.value if p.saga_id in states else "NOT_STARTED" for p in planned
    )
    return ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))


async def _wait_all_terminal(
    env: CrashEnv, planned: list[Planned], orchestrator: Proc
) -> dict[Any, SagaState]:
    deadline = time.monotonic() + FINISH_TIMEOUT
    while True:
        states = await _load(env, planned)
        if all(p.saga_id in states and states[p.saga_id].status.is_terminal for p in planned):
            return states
        if not orchestrator.alive() or time.monotonic() > deadline:
            stuck = [
                f"  {p.key}: "
                + (
                    "never started"
                    if p.saga_id not in states
                    else f"{states[p.saga_id].status.value} step={states[p.saga_id].current} "
                    f"{states[p.saga_id].direction.value} attempt={states[p.saga_id].attempt} "
                    f"phase={states[p.saga_id].phase.value}"
                )
                for p in planned
                if p.saga_id not in states or not states[p.saga_id].status.is_terminal
            ]
            why = "the restarted orchestrator died" if not orchestrator.alive() else "timeout"
            pytest.fail(
                f"{why}: {len(stuck)} of {len(planned)} sagas not terminal after "
                f"{FINISH_TIMEOUT:g}s ({_progress(planned, states)}):\n"
                + "\n".join(stuck[:20])
                + f"\n{env.processes.describe()}",
                pytrace=False,
            )
        await asyncio.sleep(0.2)


async def _wait_quiet(env: CrashEnv) -> None:
    """Wait until the outbox is empty and no command or reply waits in a queue, so the
    participant's log holds every delivery (late duplicates included) before it is checked."""
    store = SqlStore(env.database_url)
    try:
        deadline = time.monotonic() + QUIET_TIMEOUT
        while True:
            outbox, _ = await store.outbox_stats(datetime.now(UTC))
            depths = await queue_depths(env.rabbitmq_url, all_queues(env.prefix))
            busy = {q: d for q, d in depths.items() if not q.endswith(".dlq") and d[0] != 0}
            if outbox == 0 and not busy:
                break
            if time.monotonic() > deadline:
                pytest.fail(
                    f"not quiet after {QUIET_TIMEOUT:g}s: {outbox} outbox rows unsent, "
                    f"queues with messages {busy}\n{env.processes.describe()}",
                    pytrace=False,
                )
            await asyncio.sleep(0.2)
    finally:
        await store.close()
    await asyncio.sleep(0.5)  # a delivery being handled is unacked, not in the queue count
    dead = {q: d[0] for q, d in depths.items() if q.endswith(".dlq") and d[0] != 0}
    assert not dead, f"messages were dead-lettered: {dead}\n{env.processes.describe()}"


def _check_history(p: Planned, entries: list[HistoryEntry]) -> list[str]:
    problems: list[str] = []
    kinds = Counter(e.kind for e in entries)
    terminal = {k: kinds[k] for k in TERMINAL_KINDS if kinds[k]}
    expected_terminal = HistoryKind(p.kind.status.value.lower())  # completed / compensated
    if terminal != {expected_terminal: 1}:
        problems.append(f"terminal history entries {terminal}, expected {{{expected_terminal}: 1}}")
    if kinds[HistoryKind.STARTED] != 1:
        problems.append(f"{kinds[HistoryKind.STARTED]} started entries")
    per_step = Counter((e.kind, e.step) for e in entries)
    for (kind, step), n in per_step.items():
        if kind in (HistoryKind.STEP_SUCCEEDED, HistoryKind.STEP_COMPENSATED) and n > 1:
            problems.append(f"{kind.value} for step {step} applied {n} times")
    sent = Counter(
        (e.step, e.direction, e.attempt) for e in entries if e.kind is HistoryKind.COMMAND_SENT
    )
    problems += [f"command {key} sent {n} times" for key, n in sent.items() if n > 1]
    succeeded = {e.step for e in entries if e.kind is HistoryKind.STEP_SUCCEEDED}
    # a compensated saga's last action is the one that failed
    done = p.kind.actions if p.kind.status is SagaStatus.COMPLETED else p.kind.actions[:-1]
    want_succeeded = set(done)
    if succeeded != want_succeeded:
        problems.append(f"steps succeeded {sorted(succeeded)}, expected {sorted(want_succeeded)}")
    compensated = [e.step for e in entries if e.kind is HistoryKind.STEP_COMPENSATED]
    if compensated != list(p.kind.compensations):
        problems.append(f"steps compensated {compensated}, expected {list(p.kind.compensations)}")
    return problems


def _check_participant(p: Planned, records: list[dict[str, Any]]) -> list[str]:
    problems: list[str] = []
    actions = {r["step"] for r in records if r["direction"] == "action"}
    if actions != set(p.kind.actions):
        problems.append(f"participant got actions {sorted(actions)}, expected {p.kind.actions}")
    first_compensation: list[str] = []
    for r in records:
        if r["direction"] == "compensation" and r["step"] not in first_compensation:
            first_compensation.append(r["step"])
    if first_compensation != list(p.kind.compensations):
        problems.append(
            f"participant got compensations in order {first_compensation}, "
            f"expected {list(p.kind.compensations)}"
        )
    effects: Counter[str] = Counter()
    keys: dict[str, str] = {}
    for r in records:
        name = r["step"] if r["direction"] == "action" else f"{r['step']}~undo"
        keys[r["idempotency_key"]] = name
        if r.get("new_effect"):
            effects[r["idempotency_key"]] += 1
    doubled = {keys[k]: n for k, n in effects.items() if n > 1}
    if doubled:
        problems.append(f"effects applied more than once: {doubled}")
    applied = sorted(keys[k] for k in effects)
    if applied != sorted(p.kind.effects):
        problems.append(f"effects applied {applied}, expected {sorted(p.kind.effects)}")
    return problems


@pytest.mark.rabbitmq
@pytest.mark.parametrize("point", ORCHESTRATOR_POINTS)
async def test_crash_point_recovers_exactly(
    point: str, crash_env: CrashEnv, record_property: Any
) -> None:
    env = crash_env
    planned = plan(env.prefix, SAGAS)
    await _start_responder(env)

    crashing = _start_orchestrator(env, "orchestrator-faulty", (point, CRASH_AFTER[point]))
    await wait_for_output(crashing, "orchestrator_started", within=STARTUP_TIMEOUT)
    # in waves, so at the crash some sagas are done, some half-way and some not started
    per_wave = -(-SAGAS // WAVES)
    for wave in range(WAVES):
        await publish_starts(
            env.rabbitmq_url,
            env.prefix,
            (p.start for p in planned[wave * per_wave : (wave + 1) * per_wave]),
        )
        await asyncio.sleep(WAVE_GAP)

    code = await wait_exit(crashing, within=CRASH_TIMEOUT)
    at_crash = await _load(env, planned)
    assert code == -9, (
        f"the orchestrator was to SIGKILL itself at pass {CRASH_AFTER[point]} through {point}, "
        f"but it {'still runs' if code is None else f'exited with {code}'} after "
        f"{CRASH_TIMEOUT:g}s (sagas: {_progress(planned, at_crash)})\n{env.processes.describe()}"
    )
    unfinished = [
        p
        for p in planned
        if p.saga_id not in at_crash or not at_crash[p.saga_id].status.is_terminal
    ]
    assert unfinished, (
        f"every saga finished before the crash at {point}: the crash was not mid-run; "
        "lower CRASH_AFTER"
    )
    progress_at_crash = _progress(planned, at_crash)

    restarted = _start_orchestrator(env, "orchestrator-restarted")
    await wait_for_output(restarted, "orchestrator_started", within=STARTUP_TIMEOUT)
    states = await _wait_all_terminal(env, planned, restarted)
    await _wait_quiet(env)

    store = SqlStore(env.database_url)
    try:
        histories = {p.saga_id: await store.history(p.saga_id) for p in planned}
    finally:
        await store.close()
    log = read_log(env.responder_log)
    by_saga: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in log:
        by_saga[record["saga_id"]].append(record)

    problems: list[str] = []
    for p in planned:
        state = states[p.saga_id]
        found = []
        if state.status is not p.kind.status:
            found.append(
                f"status {state.status.value}, expected {p.kind.status.value} "
                f"(failure: {state.failure})"
            )
        found += _check_history(p, histories[p.saga_id])
        found += _check_participant(p, by_saga.get(str(p.saga_id), []))
        problems += [f"{p.key} ({p.saga_id}): {f}" for f in found]
    strangers = set(by_saga) - {str(p.saga_id) for p in planned}
    if strangers:
        problems.append(f"participant got commands for unknown sagas {sorted(strangers)}")

    deliveries = Counter(r["message_id"] for r in log)
    duplicates = sum(n - 1 for n in deliveries.values() if n > 1)
    redelivered = sum(1 for r in log if r.get("redelivered"))
    entries = [e for h in histories.values() for e in h]
    timeouts = sum(1 for e in entries if e.kind is HistoryKind.STEP_TIMED_OUT)
    ignored = sum(1 for e in entries if e.kind is HistoryKind.IGNORED)
    record_property("participant_commands", len(log))
    record_property("participant_duplicates", duplicates)
    record_property("participant_redelivered", redelivered)
    record_property("sagas_at_crash", progress_at_crash)
    record_property("step_timeouts", timeouts)
    record_property("ignored_messages", ignored)
    print(
        f"\n[{point}] crash after {CRASH_AFTER[point]} passes; sagas at crash: "
        f"{progress_at_crash}; participant got {len(log)} commands, {duplicates} duplicate "
        f"deliveries (same message id), {redelivered} flagged redelivered; history: "
        f"{timeouts} step timeouts, {ignored} ignored duplicate/late messages or stale timers"
    )
    assert not problems, (
        f"{len(problems)} problems after crashing at {point}:\n"
        + "\n".join(problems[:40])
        + f"\n{env.processes.describe()}"
    )


@pytest.mark.rabbitmq
async def test_second_orchestrator_on_same_sqlite_refuses_to_start(crash_env: CrashEnv) -> None:
    env = crash_env
    first = _start_orchestrator(env, "orchestrator-first")
    await wait_for_output(first, "orchestrator_started", within=STARTUP_TIMEOUT)

    second = _start_orchestrator(env, "orchestrator-second")
    code = await wait_exit(second, within=STARTUP_TIMEOUT)
    assert code == 2, f"the second orchestrator did not refuse to start\n{env.processes.describe()}"
    message = second.stderr.read_text()
    assert "another orchestrator" in message, message
    assert f"pid {first.pid}" in message, message
    assert "Traceback" not in message, message
    assert first.alive(), f"the first orchestrator died\n{first.describe()}"
