"""TLS to the broker: a private RabbitMQ node with a TLS listener and a certificate from a CA
made for the test; the orchestrator's transport and a participant process connect with
``amqps://`` and the CA file, and a client that does not trust that CA is refused."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from saga.core.errors import ConfigError
from saga.transport.amqp import TlsFiles
from saga.transport.broker import AmqpBroker, IncomingMessage
from saga.transport.topology import Topology
from saga_tools.chaos.node import RabbitNode, free_port
from tests.crash.helpers import base_env


def _openssl(*args: str, cwd: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make the test's certificates: apt-get install openssl")
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def certificates() -> Iterator[Path]:
    """A CA and a server certificate for localhost, readable by the broker's user."""
    where = Path(tempfile.mkdtemp(prefix="saga-tls-"))
    where.chmod(0o755)
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-subj", "/CN=saga test CA", "-keyout", "ca.key", "-out", "ca.pem",
        cwd=where,
    )  # fmt: skip
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
        "-keyout", "server.key", "-out", "server.csr",
        cwd=where,
    )  # fmt: skip
    (where / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-extfile", "san.ext", "-out", "server.pem",
        cwd=where,
    )  # fmt: skip
    for f in where.iterdir():
        f.chmod(0o644)
    yield where
    shutil.rmtree(where, ignore_errors=True)


@pytest.fixture(scope="module")
def tls_node(certificates: Path) -> Iterator[tuple[RabbitNode, int]]:
    tls_port = free_port()
    node = RabbitNode(
        extra_config=(
            f"listeners.ssl.default = 127.0.0.1:{tls_port}\n"
            f"ssl_options.cacertfile = {certificates / 'ca.pem'}\n"
            f"ssl_options.certfile = {certificates / 'server.pem'}\n"
            f"ssl_options.keyfile = {certificates / 'server.key'}\n"
            "ssl_options.verify = verify_none\n"
            "ssl_options.fail_if_no_peer_cert = false\n"
        )
    )
    node.start()
    try:
        yield node, tls_port
    finally:
        node.close()


async def test_amqps_with_the_ca_file_carries_messages(
    tls_node: tuple[RabbitNode, int], certificates: Path
) -> None:
    _, port = tls_node
    url = f"amqps://guest:guest@localhost:{port}/"
    broker = await AmqpBroker.connect(url, tls=TlsFiles(ca_file=certificates / "ca.pem"))
    got: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_message(message: IncomingMessage) -> None:
        await got.put(message.body)
        await message.ack()

    try:
        topology = Topology(prefix="tls")
        await broker.declare(topology, ["payment"])
        consumer = await broker.consume(topology.command_queue("payment"), on_message, prefetch=1)
        await broker.publish_raw(
            exchange=topology.commands_exchange,
            routing_key="payment",
            body=b'{"over": "tls"}',
            message_id="m-1",
        )
        assert await asyncio.wait_for(got.get(), timeout=10) == b'{"over": "tls"}'
        await consumer.cancel()
    finally:
        await broker.close()


async def test_a_broker_certificate_from_an_unknown_ca_is_refused(
    tls_node: tuple[RabbitNode, int],
) -> None:
    _, port = tls_node
    with pytest.raises(ConfigError, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
        await AmqpBroker.connect(
            f"amqps://guest:guest@localhost:{port}/", tls=TlsFiles(), connect_timeout=10
        )


def test_a_participant_process_connects_by_its_tls_settings(
    tls_node: tuple[RabbitNode, int], certificates: Path, tmp_path: Path
) -> None:
    _, port = tls_node
    env = base_env()
    env.update(
        SAGA_RABBITMQ_URL=f"amqps://guest:guest@localhost:{port}/",
        SAGA_RABBITMQ_CA_FILE=str(certificates / "ca.pem"),
        SAGA_PREFIX="tls",
        SAGA_DATA_DIR=str(tmp_path),
    )
    log = tmp_path / "payment.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "saga_demo", "payment"],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
        try:
            for _ in range(600):
                if "participant_started" in log.read_text() or proc.poll() is not None:
                    break
                time.sleep(0.1)
            assert "participant_started" in log.read_text(), log.read_text()
        finally:
            proc.terminate()
            proc.wait(30)
