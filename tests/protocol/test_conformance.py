"""`saga conformance` against real participants on RabbitMQ: the four demo services (our
library), a participant in JavaScript written from docs/protocol.md alone, and the same one
with a flaw, which the kit must catch."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
import pytest

from saga.core.errors import ConfigError
from saga.testing.conformance import CASES, Target, run_conformance
from saga.transport.topology import Topology
from saga_demo.payment import ALICE
from tests.conftest import require_rabbitmq
from tests.support.processes import running, tail

NODE_PARTICIPANT = Path(__file__).parent / "node"
ADDRESS = {
    "name": "Ann Smith",
    "street": "Main St 1",
    "city": "Berlin",
    "postal_code": "10115",
    "country": "DE",
}
DEMO: dict[str, tuple[str, dict[str, Any], str, dict[str, Any]]] = {
    "order": (
        "order.create",
        {
            "order_ref": "$saga_id",
            "customer_id": str(ALICE),
            "items": [{"sku": "BOOK-1", "quantity": 1, "unit_price": "19.90"}],
            "currency": "EUR",
        },
        "order.cancel",
        {"order_ref": "$saga_id", "reason": "conformance"},
    ),
    "payment": (
        "payment.charge",
        {"order_ref": "$saga_id", "customer_id": str(ALICE), "amount": "1.00", "currency": "EUR"},
        "payment.refund",
        {"order_ref": "$saga_id", "customer_id": str(ALICE)},
    ),
    "inventory": (
        "inventory.reserve",
        {"order_ref": "$saga_id", "items": [{"sku": "BOOK-1", "quantity": 1}]},
        "inventory.release",
        {"order_ref": "$saga_id"},
    ),
    "shipping": (
        "shipping.schedule",
        {
            "order_ref": "$saga_id",
            "address": ADDRESS,
            "items": [{"sku": "BOOK-1", "quantity": 1}],
        },
        "shipping.cancel",
        {"order_ref": "$saga_id"},
    ),
}


async def wait_for_queue(url: str, queue: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Until the participant has declared its queue (and is consuming it)."""
    deadline = time.monotonic() + 30
    connection = await aio_pika.connect(url)
    async with connection:
        while True:
            assert proc.poll() is None, f"the participant exited:\n{tail(log)}"
            channel = await connection.channel()
            try:
                declared = await channel.declare_queue(queue, passive=True)
                if declared.declaration_result.consumer_count:
                    return
            except aiormq.exceptions.ChannelNotFoundEntity:
                pass
            finally:
                if not channel.is_closed:
                    await channel.close()
            assert time.monotonic() < deadline, f"{queue} not consumed:\n{tail(log)}"
            await asyncio.sleep(0.2)


async def delete_topology(url: str, prefix: str, participants: list[str]) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        for queue in Topology(prefix=prefix).queues(participants):
            await channel.queue_delete(queue.name)
        for exchange in Topology(prefix=prefix).exchanges():
            await channel.exchange_delete(exchange.name)


def verdicts(checks: list[Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for c in checks:
        out.setdefault(c.verdict, []).append(f"{c.case}: {c.expectation} {c.detail}")
    return out


async def test_the_demo_services_conform(tmp_path: Path, unique: str) -> None:
    url = require_rabbitmq()
    prefix = f"conf-{unique}"
    env = {
        **os.environ,
        "SAGA_PREFIX": prefix,
        "SAGA_DATA_DIR": str(tmp_path),
        "SAGA_RABBITMQ_URL": url,
    }
    log = tmp_path / "services.log"
    try:
        with running([sys.executable, "-m", "saga_demo", "all"], env, log) as proc:
            for name in DEMO:
                await wait_for_queue(url, Topology(prefix=prefix).command_queue(name), proc, log)
            for name, (action, payload, undo, undo_payload) in DEMO.items():
                target = Target(name, action, payload, undo, undo_payload, prefix)
                checks = await run_conformance(url, target, within=15)
                found = verdicts(checks)
                assert set(found) == {"PASS"}, f"{name}: {found}"
                assert {c.case for c in checks} == set(CASES)
    finally:
        await delete_topology(url, prefix, list(DEMO))


def _npm_install(tmp_path: Path) -> Path:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.fail(
            "Node.js is needed by the JavaScript participant test: apt-get install nodejs npm",
            pytrace=False,
        )
    target = tmp_path / "node"
    shutil.copytree(NODE_PARTICIPANT, target, ignore=shutil.ignore_patterns("node_modules"))
    done = subprocess.run(
        ["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=target,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"npm install failed:\n{done.stderr[-2000:]}"
    return target


def _kit(url: str, prefix: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable, "-m", "saga", "conformance",
            "--participant", "wallet",
            "--action", "wallet.reserve",
            "--payload", json.dumps({"units": 5}),
            "--compensation", "wallet.release",
            "--prefix", prefix,
            "--timeout", "10",
            *extra,
        ],
        env={**os.environ, "SAGA_RABBITMQ_URL": url},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )  # fmt: skip


async def test_a_javascript_participant_from_the_docs_alone_conforms_and_a_flawed_one_does_not(
    tmp_path: Path, unique: str
) -> None:
    url = require_rabbitmq()
    code = _npm_install(tmp_path)
    for flaws, prefix in (("", f"js-{unique}"), ("no-tombstone", f"jsf-{unique}")):
        log = tmp_path / f"node-{flaws or 'sound'}.log"
        env = {**os.environ, "FLAWS": flaws}
        args = [
            "node",
            str(code / "participant.js"),
            url,
            prefix,
            "wallet",
            str(tmp_path / f"{prefix}.jsonl"),
        ]
        try:
            with running(args, env, log) as proc:
                await wait_for_queue(url, f"{prefix}.cmd.wallet", proc, log)
                done = await asyncio.to_thread(_kit, url, prefix)
        finally:
            await delete_topology(url, prefix, ["wallet"])
        if not flaws:
            assert done.returncode == 0, done.stdout + done.stderr
            assert "wallet: 32 passed, 0 failed, 0 warnings (conforms)" in done.stdout
        else:
            assert done.returncode == 1, done.stdout + done.stderr
            [line] = [row for row in done.stdout.splitlines() if "refused: a failure" in row]
            assert "FAIL" in line and "answered success" in line
            assert "does NOT conform" in done.stdout


async def test_the_kit_refuses_to_run_beside_an_orchestrator(unique: str) -> None:
    """Whatever consumes the reply queue would take the replies the kit waits for."""
    url = require_rabbitmq()
    prefix = f"conf-busy-{unique}"
    broker_topology = Topology(prefix=prefix)
    connection = await aio_pika.connect(url)
    try:
        async with connection:
            channel = await connection.channel()
            for name in (broker_topology.command_queue("flights"), broker_topology.reply_queue):
                for queue in (name, broker_topology.dead_letter_queue(name)):
                    await channel.declare_queue(queue, auto_delete=True)
            replies = await channel.declare_queue(broker_topology.reply_queue, passive=True)

            async def hold(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                await message.nack(requeue=True)

            await replies.consume(hold)
            target = Target("flights", "flights.book", {}, "flights.cancel", {}, prefix)
            with pytest.raises(ConfigError, match=r"consumes .*replies.* orchestrator"):
                await run_conformance(url, target, within=1)
    finally:
        await delete_topology(url, prefix, ["flights"])


async def test_the_kit_says_when_the_participant_is_not_there(unique: str) -> None:
    url = require_rabbitmq()
    target = Target("ghost", "ghost.do", {}, "ghost.undo", {}, f"conf-none-{unique}")
    with pytest.raises(ConfigError, match="does not exist: is the participant running"):
        await run_conformance(url, target, within=1)
