"""Every process starts within a bounded time or exits 2 saying why, and stops on SIGTERM at any
stage of its start-up, whatever its connection is doing.

Each process (the orchestrator, one participant, ``saga-service all``) reaches the shared broker
through a :class:`~saga_tools.chaos.proxy.TcpProxy` whose :class:`StageFault` watches the AMQP
frames it sends and, at one stage of start-up (the TCP accept, the handshake, opening a channel,
declaring the topology, attaching a consumer):

* **cuts the connection once**: a cut during the handshake ends the process with status 2 and
  one line (nothing is running yet, and a supervisor restarts it); a cut after the handshake is
  repaired by the link, and the process starts on the next connection;
* **holds it silent, then SIGTERM**: the start in progress is cancelled, the process closes what
  it opened and exits 0 within a few seconds;
* **holds it silent for good**: the process exits 2 once ``SAGA_START_TIMEOUT`` passes, naming
  the step it was waiting on;
* **cuts every connection**: the same, with the last failure named.

Each case asserts the stage was really reached, so a fault that never fired cannot pass.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from saga_tools.chaos.proxy import StageFault, TcpProxy
from saga_tools.chaos.runner import until
from tests.conftest import RABBITMQ_URL, require_rabbitmq
from tests.crash.helpers import REPO, base_env, delete_topology

pytestmark = pytest.mark.rabbitmq

HANDSHAKE = ("connect", "start-ok", "tune-ok", "open")
AFTER_HANDSHAKE = ("channel", "exchange", "queue", "bind", "qos", "consume")
#: seconds a process may take to exit after SIGTERM (SAGA_SHUTDOWN_TIMEOUT is 5 here)
STOP_BOUND = 8.0
#: seconds a healthy start may take on this machine (imports, database, broker)
START_BOUND = 20.0
#: seconds from spawning a process whose start cannot finish to its exit, past its start
#: timeout: imports on a loaded machine, then at most the cancelled start's grace (5 s), the
#: stop (SAGA_SHUTDOWN_TIMEOUT, 5 s here) and the leftover tasks' (3 s)
EXIT_BOUND = 25.0
CONCURRENCY = 4  # processes at a time: each case is mostly waiting


@dataclass(frozen=True)
class Kind:
    name: str
    args: tuple[str, ...]
    started: str  # the log event that says it started
    count: int = 1  # how many times it is logged (saga-service all: once per service)


KINDS = {
    "orchestrator": Kind("orchestrator", ("-m", "saga", "run"), "orchestrator_started"),
    "participant": Kind("participant", ("-m", "saga_demo", "inventory"), "participant_started"),
    "all-services": Kind("all-services", ("-m", "saga_demo", "all"), "participant_started", 4),
}


class Run:
    """One process of ``kind`` behind its own proxy, output in files."""

    def __init__(self, kind: Kind, directory: Path, proxy: TcpProxy, start_timeout: float):
        self.kind = kind
        #: a prefix of its own: the broker is shared with other runs, and its topology is
        #: deleted when the case ends (delete_topology)
        self.prefix = f"stg-{uuid.uuid4().hex[:8]}-{directory.name}"
        directory.mkdir(parents=True)
        self.out = directory / "out.log"
        env = base_env()
        env.update(
            SAGA_RABBITMQ_URL=proxy.url(RABBITMQ_URL),
            SAGA_PREFIX=self.prefix,
            SAGA_DATA_DIR=str(directory),
            SAGA_DATABASE_URL=f"sqlite+aiosqlite:///{directory / 'saga.db'}",
            SAGA_DEFINITIONS="tests.support.sagas:registry",
            SAGA_AUTO_MIGRATE="true",
            SAGA_START_TIMEOUT=str(start_timeout),
            SAGA_SHUTDOWN_TIMEOUT="5",
        )
        with self.out.open("wb") as out:
            self.popen = subprocess.Popen(
                [sys.executable, *kind.args],
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def started(self) -> bool:
        return self.output().count(f'"{self.kind.started}"') >= self.kind.count

    def errors(self) -> list[str]:
        return [line for line in self.output().splitlines() if line.startswith("error:")]

    async def exit_code(self, within: float) -> int | None:
        await until(lambda: self.popen.poll() is not None, within)
        return self.popen.poll()

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(5)


async def _case(
    kind: Kind, mode: str, stage: str, directory: Path, start_timeout: float = 30.0
) -> str | None:
    """Run one case; None when the process behaved, else what went wrong and its output."""
    fault = StageFault(
        stage,
        action="reset" if mode in ("cut", "cut-always") else "hold",
        times=1 if mode == "cut" else None,
    )
    async with TcpProxy("127.0.0.1", _port()) as proxy:
        proxy.stage = fault
        run = Run(kind, directory, proxy, start_timeout)
        try:
            problem = await _judge(run, mode, stage, fault, start_timeout)
        finally:
            run.kill()
            await delete_topology(RABBITMQ_URL, run.prefix)
    if problem is None:
        return None
    tail = "\n".join(run.output().splitlines()[-15:])
    return f"{kind.name} / {mode} at {stage}: {problem}\n{tail}"


async def _judge(
    run: Run, mode: str, stage: str, fault: StageFault, start_timeout: float
) -> str | None:
    if mode == "cut":
        if stage in HANDSHAKE:  # nothing runs yet: exit 2 with one line
            code = await run.exit_code(EXIT_BOUND)
            if code != 2:
                return f"exit code {code}, expected 2"
            if fault.reached < 1:
                return "the stage was never reached"
            lines = run.errors()
            if len(lines) != 1 or "cannot reach RabbitMQ" not in lines[0]:
                return f"expected one line saying it cannot reach RabbitMQ, got {lines}"
            return None
        if not await until(lambda: run.started() or run.popen.poll() is not None, START_BOUND):
            return f"not started within {START_BOUND:g}s of one cut"
        if not run.started():
            return f"exited {run.popen.poll()} instead of starting after one cut"
        if fault.reached < 1:
            return "the stage was never reached"
        return await _terminate(run, "after starting")
    if mode == "term":  # held at the stage, then SIGTERM
        if not await until(lambda: fault.held >= 1 or run.popen.poll() is not None, 15):
            return "the stage was never reached"
        if run.popen.poll() is not None:
            return f"exited {run.popen.poll()} before the stage"
        await asyncio.sleep(0.3)
        return await _terminate(run, "held at the stage")
    # held for good, or cut every time: exit 2 once the start deadline passes, naming the step
    code = await run.exit_code(start_timeout + EXIT_BOUND)
    if code != 2:
        return f"exit code {code} {start_timeout + EXIT_BOUND:g}s in, expected 2"
    if fault.reached < 1:
        return "the stage was never reached"
    lines = run.errors()
    if len(lines) != 1:
        return f"expected one error line, got {lines}"
    if stage in HANDSHAKE and mode == "hold":
        expected = ["did not start within", "connecting to RabbitMQ"]
    elif stage in HANDSHAKE:
        expected = ["cannot reach RabbitMQ"]
    else:
        expected = ["did not start within", "SAGA_START_TIMEOUT"]
    if mode == "cut-always" and stage not in HANDSHAKE:
        expected.append("last failure: the connection was lost")
    missing = [text for text in expected if text not in lines[0]]
    return f"the error line lacks {missing}: {lines[0]}" if missing else None


async def _terminate(run: Run, when: str) -> str | None:
    run.popen.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    code = await run.exit_code(STOP_BOUND)
    if code is None:
        return f"still running {STOP_BOUND:g}s after SIGTERM ({when})"
    if code != 0:
        return f"exit code {code} after SIGTERM ({when}), expected 0"
    if "Traceback" in run.output():
        return "a traceback in its output"
    took = time.monotonic() - sent
    return None if took <= STOP_BOUND else f"took {took:.1f}s to stop"


def _port() -> int:
    from urllib.parse import urlsplit  # noqa: PLC0415

    return urlsplit(RABBITMQ_URL).port or 5672


async def _all(cases: Sequence[Awaitable[str | None]]) -> None:
    gate = asyncio.Semaphore(CONCURRENCY)

    async def gated(case: Awaitable[str | None]) -> str | None:
        async with gate:
            return await case

    problems = [p for p in await asyncio.gather(*(gated(c) for c in cases)) if p]
    assert not problems, f"{len(problems)} of {len(cases)} cases failed:\n\n" + "\n\n".join(
        problems
    )


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize(
    "mode",
    [
        pytest.param("cut", id="a cut ends in a start or exit 2"),
        pytest.param("term", id="SIGTERM while held stops it with 0"),
    ],
)
async def test_every_start_up_stage(kind: str, mode: str, tmp_path: Path) -> None:
    require_rabbitmq()
    stages = HANDSHAKE + AFTER_HANDSHAKE
    await _all([_case(KINDS[kind], mode, s, tmp_path / f"s{n}") for n, s in enumerate(stages)])


async def test_a_start_that_cannot_finish_exits_2_naming_its_step(tmp_path: Path) -> None:
    """Held at a stage, or cut at every attempt, past SAGA_START_TIMEOUT."""
    require_rabbitmq()
    cases = [
        _case(KINDS[kind], mode, stage, tmp_path / f"d{n}{m}", start_timeout=3.0)
        for n, kind in enumerate(KINDS)
        for m, (mode, stage) in enumerate(
            [("hold", "open"), ("hold", "queue"), ("hold", "consume"), ("cut-always", "exchange")]
        )
    ]
    await _all(cases)
