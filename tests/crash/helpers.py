"""Subprocess and broker plumbing for the crash tests.

The orchestrator and the scripted participant run as real processes, so a crash point's SIGKILL
kills exactly what a power cut of the process would. Every process started here is tracked and
killed at teardown, whatever happened in the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import aio_pika
import aiormq
import pytest

from saga.core.ids import saga_id_for_key
from saga.core.state import SagaStatus
from saga.protocol.envelope import StartSaga
from saga.transport.topology import Topology
from saga_demo.checkout import PARTICIPANTS as DEMO_PARTICIPANTS
from tests.support.sagas import PARTICIPANTS

REPO = Path(__file__).resolve().parents[2]
SAGA_NAME = "trip"


# --- processes ---------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        return _read(self.stdout) + _read(self.stderr)

    def describe(self, lines: int = 30) -> str:
        """Exit status and the tail of both streams, for failure messages."""
        code = self.popen.poll()
        status = "running" if code is None else f"exit code {code}"
        out = "\n".join(_read(self.stdout).splitlines()[-lines:])
        err = "\n".join(_read(self.stderr).splitlines()[-lines:])
        return (
            f"--- {self.name} (pid {self.pid}, {status}) ---\n"
            f"[stdout tail]\n{out or '(empty)'}\n[stderr tail]\n{err or '(empty)'}"
        )


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


@dataclass
class Processes:
    """Starts subprocesses with their output in files and guarantees none outlives the test."""

    directory: Path
    started: list[Proc] = field(default_factory=list)

    def spawn(self, name: str, args: list[str], env: Mapping[str, str]) -> Proc:
        index = len(self.started)
        stdout = self.directory / f"{index:02d}-{name}.out"
        stderr = self.directory / f"{index:02d}-{name}.err"
        with stdout.open("wb") as out, stderr.open("wb") as err:
            popen = subprocess.Popen(
                [sys.executable, *args],
                cwd=REPO,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )
        proc = Proc(name, popen, stdout, stderr)
        self.started.append(proc)
        return proc

    def describe(self) -> str:
        return "\n".join(p.describe() for p in self.started)

    def stop_all(self) -> None:
        for proc in self.started:
            if proc.alive():
                with contextlib.suppress(ProcessLookupError):
                    proc.popen.terminate()
        deadline = time.monotonic() + 5
        for proc in self.started:
            try:
                proc.popen.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.popen.kill()
                proc.popen.wait(timeout=5)


def base_env() -> dict[str, str]:
    """The test's environment without any SAGA_* setting that could leak in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAGA_", "OTEL_"))}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
    )
    env["PYTHONUNBUFFERED"] = "1"
    return env


def orchestrator_env(
    *, database_url: str, rabbitmq_url: str, prefix: str, fault: tuple[str, int] | None = None
) -> dict[str, str]:
    env = base_env()
    env.update(
        SAGA_DATABASE_URL=database_url,
        SAGA_RABBITMQ_URL=rabbitmq_url,
        SAGA_DEFINITIONS="tests.support.sagas:registry",
        SAGA_PREFIX=prefix,
        SAGA_TIMER_INTERVAL="0.05",
        SAGA_RELAY_POLL_INTERVAL="0.2",
    )
    if fault is not None:
        env["SAGA_FAULT_POINT"] = fault[0]
        env["SAGA_FAULT_AFTER"] = str(fault[1])
    return env


async def wait_for_output(proc: Proc, needle: str, *, within: float, context: str = "") -> None:
    """Wait until ``needle`` appears in the process's stdout or stderr; fail if it exits first."""
    deadline = time.monotonic() + within
    while needle not in proc.output():
        if not proc.alive():
            pytest.fail(
                f"{proc.name} exited before printing {needle!r}\n{context}{proc.describe()}",
                pytrace=False,
            )
        if time.monotonic() > deadline:
            pytest.fail(
                f"{proc.name} did not print {needle!r} within {within:g}s\n"
                f"{context}{proc.describe()}",
                pytrace=False,
            )
        await asyncio.sleep(0.05)


async def wait_exit(proc: Proc, *, within: float) -> int | None:
    """The process's return code, or None if it still runs after ``within`` seconds."""
    deadline = time.monotonic() + within
    while proc.alive():
        if time.monotonic() > deadline:
            return None
        await asyncio.sleep(0.05)
    return proc.popen.returncode


# --- broker ------------------------------------------------------------------------------


async def publish_starts(url: str, prefix: str, starts: Iterable[StartSaga]) -> None:
    """Publish start requests to ``{prefix}.start``: persistent, mandatory, confirmed."""
    queue = Topology(prefix=prefix).start_queue
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        confirms = await asyncio.gather(
            *(
                channel.default_exchange.publish(
                    aio_pika.Message(
                        s.model_dump_json().encode(),
                        message_id=str(s.message_id),
                        content_type="application/json",
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    ),
                    routing_key=queue,
                    mandatory=True,
                )
                for s in starts
            )
        )
        for confirm in confirms:
            assert isinstance(confirm, aiormq.spec.Basic.Ack), f"start not confirmed: {confirm}"


def all_queues(prefix: str) -> list[str]:
    return [q.name for q in Topology(prefix=prefix).queues(PARTICIPANTS)]


async def queue_depths(url: str, names: Iterable[str]) -> dict[str, tuple[int, int]]:
    """(messages ready, consumers) per queue, by passive declare; -1s for a missing queue."""
    found: dict[str, tuple[int, int]] = {}
    connection = await aio_pika.connect(url)
    async with connection:
        for name in names:
            channel = await connection.channel()
            try:
                queue = await channel.declare_queue(name, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                found[name] = (-1, -1)
                continue
            result = queue.declaration_result
            found[name] = (result.message_count or 0, result.consumer_count or 0)
            await channel.close()
    return found


#: every participant whose queues a test's processes may declare: the test sagas' and the demo's
ANY_PARTICIPANTS = (*PARTICIPANTS, *DEMO_PARTICIPANTS)


async def delete_topology(url: str, prefix: str) -> None:
    """Delete every queue and exchange of ``prefix`` (the queues of the test sagas'
    participants and of the demo's: either may have been declared); missing ones are fine."""
    topology = Topology(prefix=prefix)
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        for queue in topology.queues(ANY_PARTICIPANTS):
            await channel.queue_delete(queue.name)
        for spec in topology.exchanges():
            await channel.exchange_delete(spec.name)


# --- the workload ------------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """One kind of saga in the workload and everything the test expects of it."""

    name: str
    script: dict[str, list[str]]
    status: SagaStatus
    actions: tuple[str, ...]  # steps whose action the participant must receive
    compensations: tuple[str, ...]  # steps compensated, in the order they must be compensated
    effects: tuple[str, ...]  # (step or step~undo) with exactly one effect at the participant


# A participant answers every attempt of one idempotency key the same way (as a real one would),
# so "fail" is scripted for every attempt: after a restart a timeout may re-send an action whose
# "fail" reply then arrives too late to count, and a re-sent attempt must fail just the same.
_ALL_FAIL = ["fail", "fail", "fail", "fail"]

KINDS = (
    Kind(
        "ok",
        {},
        SagaStatus.COMPLETED,
        ("alpha", "beta", "gamma"),
        (),
        ("alpha", "beta", "gamma"),
    ),
    Kind(
        "beta-fails",
        {"beta": _ALL_FAIL},
        SagaStatus.COMPENSATED,
        ("alpha", "beta"),
        ("alpha",),
        ("alpha", "alpha~undo"),
    ),
    Kind(
        "gamma-fails",
        {"gamma": _ALL_FAIL},
        SagaStatus.COMPENSATED,
        ("alpha", "beta", "gamma"),
        ("beta", "alpha"),
        ("alpha", "beta", "beta~undo", "alpha~undo"),
    ),
    Kind(
        "beta-retries",
        {"beta": ["retry", "ok"]},
        SagaStatus.COMPLETED,
        ("alpha", "beta", "gamma"),
        (),
        ("alpha", "beta", "gamma"),
    ),
)


@dataclass(frozen=True)
class Planned:
    key: str
    saga_id: UUID
    kind: Kind
    start: StartSaga


def plan(prefix: str, count: int) -> list[Planned]:
    """``count`` sagas cycling through every kind."""
    planned = []
    for i in range(count):
        kind = KINDS[i % len(KINDS)]
        key = f"{prefix}-{kind.name}-{i}"
        start = StartSaga(
            schema_version=1,
            message_id=uuid4(),
            saga_name=SAGA_NAME,
            key=key,
            input={"script": dict(kind.script)},  # type: ignore[dict-item]
        )
        planned.append(Planned(key, saga_id_for_key(SAGA_NAME, key), kind, start))
    return planned


def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
