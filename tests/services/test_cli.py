"""Starting the services from the command line: settings errors, and SIGTERM stopping all four."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aio_pika
import pytest

from saga.transport.topology import Topology
from saga_demo.checkout import PARTICIPANTS
from tests.conftest import require_rabbitmq


def _env(tmp_path: Path, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGA_")}
    env["SAGA_DATA_DIR"] = str(tmp_path / "data")
    env.update({f"SAGA_{k.upper()}": v for k, v in settings.items()})
    return env


def _run(tmp_path: Path, *args: str, **settings: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args],
        env=_env(tmp_path, **settings),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("module", ["saga_demo.order", "saga_demo"])
def test_a_bad_setting_exits_2_with_one_line(tmp_path: Path, module: str) -> None:
    args = [module] if module != "saga_demo" else [module, "payment"]
    done = _run(tmp_path, *args, prefetch="0")
    assert done.returncode == 2
    [line] = done.stderr.splitlines()
    assert line.startswith("error: invalid settings: SAGA_PREFETCH:")
    assert not (tmp_path / "data").exists()


def test_an_unreachable_broker_exits_2_with_one_line(tmp_path: Path) -> None:
    done = _run(tmp_path, "saga_demo.shipping", rabbitmq_url="amqp://guest:guest@127.0.0.1:1/")
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1].startswith("error: cannot reach RabbitMQ")


def test_an_unknown_service_is_a_usage_error(tmp_path: Path) -> None:
    done = _run(tmp_path, "saga_demo", "billing")
    assert done.returncode == 2
    assert "billing" in done.stderr


@pytest.mark.rabbitmq
def test_all_runs_the_four_services_and_sigterm_stops_them(tmp_path: Path, unique: str) -> None:
    rabbitmq_url = require_rabbitmq()
    prefix = f"t-{unique}"
    log = tmp_path / "services.log"
    env = _env(tmp_path, rabbitmq_url=rabbitmq_url, prefix=prefix, relay_poll_interval="0.2")
    with log.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "saga_demo", "all"], env=env, stderr=stderr)
    try:
        deadline = time.monotonic() + 30
        while log.read_text().count("participant_started") < 4:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()
        assert sorted(p.name for p in (tmp_path / "data").iterdir() if p.suffix == ".db") == [
            "inventory.db",
            "order.db",
            "payment.db",
            "shipping.db",
        ]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        asyncio.run(_delete_topology(rabbitmq_url, Topology(prefix=prefix)))


async def _delete_topology(url: str, topology: Topology) -> None:
    connection = await aio_pika.connect(url)
    try:
        for queue in topology.queues(PARTICIPANTS):
            with contextlib.suppress(Exception):
                await (await connection.channel()).queue_delete(queue.name)
        for exchange in topology.exchanges():
            with contextlib.suppress(Exception):
                await (await connection.channel()).exchange_delete(exchange.name)
    finally:
        await connection.close()
