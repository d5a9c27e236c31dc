"""One command at a time through the participant library: the fixed cost of a transaction.

A lone saga waits for each participant's reply in turn, so its latency is the sum of each
command's path through a participant, from the delivery to the reply's write, with nothing to
share a transaction or a publish with. This runs the library's participant with handlers of no
work of their own (:mod:`saga_tools.bench.library`, on SQLite with ``synchronous=FULL`` and
uvloop, as ``saga bench`` runs it) in a process of its own on the real RabbitMQ, sends it one
command, waits for the reply, sends the next, and reports the median and 90th percentile wall
time from the publish to the reply's arrival and the participant process's CPU per command.

``--tree`` runs the participant from another source tree (one with ``saga``, ``services`` and
``tools`` in it, e.g. an export of an older commit): given several times, the trees take turns
round by round in one run, so an A/B comparison shares the machine's state::

    python -m saga_tools.bench.lone_participant --tree ../before --tree . --rounds 4
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from saga.core.ids import command_id, idempotency_key
from saga.loop import run as run_loop
from saga.protocol.envelope import CommandEnvelope
from saga.transport.topology import Topology
from saga_tools.bench.library import command_types
from saga_tools.bench.procfs import cpu_seconds

__all__ = ["main"]

PARTICIPANT = "payment"


@dataclass
class Result:
    """What one tree measured, over all of its rounds."""

    latencies: list[float] = field(default_factory=list)  # seconds, per command
    cpu: float = 0.0  # participant CPU seconds over the measured commands
    commands: int = 0


def _command(prefix: str, command_type: str) -> CommandEnvelope:
    saga_id = uuid.uuid4()
    return CommandEnvelope(
        schema_version=1,
        message_id=command_id(saga_id, "charge_payment", "action", 1),
        idempotency_key=idempotency_key(saga_id, "charge_payment", "action"),
        saga_id=saga_id,
        saga_name="checkout",
        step="charge_payment",
        direction="action",
        attempt=1,
        participant=PARTICIPANT,
        command_type=command_type,
        reply_to=Topology(prefix=prefix).reply_queue,
        deadline=datetime.now(UTC) + timedelta(seconds=60),
        payload={},
    )


def _spawn(tree: Path, prefix: str, url: str, data_dir: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(str(tree / p) for p in ("", "services", "tools")),
        "SAGA_PREFIX": prefix,
        "SAGA_RABBITMQ_URL": url,
        "SAGA_DATA_DIR": str(data_dir),
        "SAGA_LOG_LEVEL": "INFO",
        "SAGA_EVENT_LOOP": "uvloop",
    }
    env.pop("SAGA_SERVICES_DATABASE_URL", None)
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "saga_tools.bench.library", PARTICIPANT],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tree,
        )


def _log(log: Path) -> bytes:
    return log.read_bytes()


async def _started(process: subprocess.Popen[bytes], log: Path, within: float = 60) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the participant exited ({process.returncode}):\n{_log(log)!r}")
        if b"participant_started" in _log(log):
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"the participant did not start within {within} s:\n{_log(log)!r}")


async def _round(
    channel: aio_pika.abc.AbstractChannel,
    replies: asyncio.Queue[AbstractIncomingMessage],
    process: subprocess.Popen[bytes],
    prefix: str,
    commands: int,
    warmup: int,
    result: Result,
) -> None:
    command_type = command_types(PARTICIPANT)[0]
    queue = Topology(prefix=prefix).command_queue(PARTICIPANT)
    cpu_before = 0.0
    for n in range(warmup + commands):
        if n == warmup:
            cpu_before = cpu_seconds(process.pid)
        command = _command(prefix, command_type)
        message = aio_pika.Message(
            command.model_dump_json().encode(),
            message_id=str(command.message_id),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        began = time.perf_counter()
        await channel.default_exchange.publish(message, routing_key=queue)
        reply = await asyncio.wait_for(replies.get(), 30)
        took = time.perf_counter() - began
        if n >= warmup:
            result.latencies.append(took)
        await reply.ack()
        await asyncio.sleep(0.002)  # a lone saga: the orchestrator's own turn between commands
    result.cpu += cpu_seconds(process.pid) - cpu_before
    result.commands += commands


async def _run_tree(
    tree: Path, url: str, commands: int, warmup: int, result: Result, data_root: Path
) -> None:
    prefix = f"lone-{uuid.uuid4().hex[:8]}"
    data_dir = data_root / prefix
    data_dir.mkdir()
    log = data_root / f"{prefix}.log"
    process = _spawn(tree, prefix, url, data_dir, log)
    connection = await aio_pika.connect(url)
    try:
        await _started(process, log)
        channel = await connection.channel()  # no confirms: the command's own cost is not measured
        replies: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        reply_queue = await channel.get_queue(Topology(prefix=prefix).reply_queue)
        tag = await reply_queue.consume(replies.put)
        await _round(channel, replies, process, prefix, commands, warmup, result)
        await reply_queue.cancel(tag)
    finally:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(10)
        if process.poll() is None:
            process.kill()
        channel = await connection.channel()
        topology = Topology(prefix=prefix)
        for queue in topology.queues([PARTICIPANT]):
            await channel.queue_delete(queue.name)
        for exchange in topology.exchanges():
            await channel.exchange_delete(exchange.name)
        await connection.close()


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f}"


async def _main(args: argparse.Namespace, trees: list[Path]) -> None:
    results = {tree: Result() for tree in trees}
    with tempfile.TemporaryDirectory(prefix="lone-participant-") as root:
        for round_ in range(args.rounds):
            for tree in trees if round_ % 2 == 0 else list(reversed(trees)):
                await _run_tree(
                    tree, args.url, args.commands, args.warmup, results[tree], Path(root)
                )
                done = results[tree]
                median = _ms(statistics.median(done.latencies))
                print(f"round {round_ + 1} {tree}: median {median} ms", file=sys.stderr)
    print(f"{'tree':<40} {'commands':>8} {'median ms':>10} {'p90 ms':>8} {'CPU ms/cmd':>11}")
    for tree, done in results.items():
        p90 = statistics.quantiles(done.latencies, n=10)[-1]
        print(
            f"{tree!s:<40} {done.commands:>8} {_ms(statistics.median(done.latencies)):>10} "
            f"{_ms(p90):>8} {_ms(done.cpu / done.commands):>11}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", help="a source tree to run the participant from")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--commands", type=int, default=500, help="measured, per round and tree")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument(
        "--url", default=os.environ.get("SAGA_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
    )
    args = parser.parse_args()
    run_loop(_main(args, [Path(t).resolve() for t in (args.tree or ["."])]))


if __name__ == "__main__":
    main()
