"""Passwords never reach a log line, an error message or a repr.

The process tests run the real programs with a password in their URLs (PostgreSQL's trust auth
accepts any password, and a wrong RabbitMQ password is refused), capture everything they print,
and look for the secret.
"""

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import pytest
import structlog

from saga.logs import configure_logging
from saga.participant.settings import ParticipantSettings
from saga.secrets import redact, redact_url
from saga.settings import AmqpSettings, load_settings
from saga.transport.amqp import TlsFiles
from tests.conftest import require_postgres, require_rabbitmq
from tests.crash.helpers import delete_topology

ROOT = Path(__file__).resolve().parents[2]
SECRET = "Tr0ub4dor-and-3"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("amqp://app:pw@host:5672/vh", "amqp://app:***@host:5672/vh"),
        ("postgresql+asyncpg://u:p%40ss@db/x", "postgresql+asyncpg://u:***@db/x"),
        ("amqps://:only-secret@h/", "amqps://:***@h/"),
        ("no url here: user:pw@host", "no url here: user:pw@host"),
        ("amqp://guest@host/", "amqp://guest@host/"),
        (
            "two: amqp://a:one@h1/ and postgresql://b:two@h2/db",
            "two: amqp://a:***@h1/ and postgresql://b:***@h2/db",
        ),
    ],
)
def test_redact_masks_every_url_password_and_nothing_else(text: str, expected: str) -> None:
    assert redact(text) == expected
    assert redact_url(text) == expected


def test_settings_reprs_mask_passwords() -> None:
    settings = load_settings(
        rabbitmq_url=f"amqp://app:{SECRET}@broker:5672/",
        database_url=f"postgresql+asyncpg://app:{SECRET}@db/saga",
    )
    service = ParticipantSettings(
        rabbitmq_url=f"amqp://svc:{SECRET}@broker:5672/",
        services_database_url=f"postgresql+asyncpg://svc:{SECRET}@db/x",
    )
    for text in (repr(settings), str(settings), repr(service), str(service)):
        assert SECRET not in text
        assert "***" in text


def test_structlog_and_stdlib_lines_are_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO")
    try:
        structlog.get_logger("t").info("connecting", url=f"amqp://u:{SECRET}@h/")
        logging.getLogger("sqlalchemy.pool").warning(
            "Connection attempt to postgresql://u:%s@h/ failed", SECRET
        )
        try:
            raise OSError(f"cannot open postgresql://u:{SECRET}@db/x")
        except OSError:
            structlog.get_logger("t").exception("boom")
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    err = capsys.readouterr().err
    assert "Connection attempt" in err and "connecting" in err and "boom" in err
    assert SECRET not in err


def test_tls_settings_need_amqps_and_readable_files(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not a certificate")
    with pytest.raises(ValueError, match="amqps://"):
        AmqpSettings(rabbitmq_url="amqp://h/", rabbitmq_ca_file=ca)
    with pytest.raises(ValueError, match="not a readable file"):
        AmqpSettings(rabbitmq_url="amqps://h/", rabbitmq_ca_file=tmp_path / "missing.pem")
    with pytest.raises(ValueError, match="KEY_FILE needs"):
        AmqpSettings(rabbitmq_url="amqps://h/", rabbitmq_key_file=ca)
    settings = AmqpSettings(rabbitmq_url="amqps://h/", rabbitmq_ca_file=ca)
    assert settings.tls == TlsFiles(ca, None, None)


def test_a_tls_context_verifies_the_broker() -> None:
    ctx = TlsFiles().context()
    assert ctx.check_hostname
    assert ctx.verify_mode.name == "CERT_REQUIRED"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGA_")}
    env.update(PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", **extra)
    return env


def test_a_refused_broker_password_is_never_printed(tmp_path: Path) -> None:
    url = require_rabbitmq().replace("guest:guest@", f"guest:{SECRET}@")
    for argv, extra in (
        (
            [sys.executable, "-m", "saga", "run", "--migrate"],
            {
                "SAGA_DEFINITIONS": "saga_demo.checkout:registry",
                "SAGA_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'saga.db'}",
            },
        ),
        ([sys.executable, "-m", "saga_demo", "payment"], {"SAGA_DATA_DIR": str(tmp_path)}),
    ):
        done = subprocess.run(
            argv,
            env=_env(SAGA_RABBITMQ_URL=url, SAGA_PREFIX="secrets", **extra),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )
        out = done.stdout + done.stderr
        assert done.returncode != 0, out
        assert "guest:***@" in out, out
        assert SECRET not in out


def test_a_running_orchestrator_never_prints_its_database_password(
    tmp_path: Path, unique: str
) -> None:
    """PostgreSQL's trust auth lets a password in: the process runs, logs, and is stopped.
    It gets a database of its own, dropped afterwards."""
    database = f"saga_secrets_{unique}"
    admin = require_postgres().replace("postgresql+asyncpg", "postgresql")
    asyncio.run(_admin(admin, f'CREATE DATABASE "{database}"'))
    prefix = f"secrets-{unique}"
    try:
        _run_and_stop(tmp_path, prefix, admin.rsplit("/", 1)[0], database)
    finally:
        asyncio.run(delete_topology(require_rabbitmq(), prefix))
        asyncio.run(_admin(admin, f'DROP DATABASE IF EXISTS "{database}"'))


async def _admin(url: str, statement: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


def _run_and_stop(tmp_path: Path, prefix: str, server: str, database: str) -> None:
    pg = f"{server}/{database}".replace(
        "postgresql://postgres@", f"postgresql+asyncpg://postgres:{SECRET}@"
    )
    log = tmp_path / "out.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "saga", "run", "--migrate"],
            env=_env(
                SAGA_RABBITMQ_URL=require_rabbitmq(),
                SAGA_DATABASE_URL=pg,
                SAGA_DEFINITIONS="saga_demo.checkout:registry",
                SAGA_PREFIX=prefix,
                SAGA_LOG_LEVEL="DEBUG",
            ),
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 60
            while "orchestrator_started" not in log.read_text():
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    out = log.read_text()
    assert "postgres:***@" in out, out
    assert SECRET not in out
