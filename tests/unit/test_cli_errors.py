"""`saga run` turns a bad environment into one clear line and exit status 2, never a traceback."""

import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from saga.store.schema import HEAD, MIGRATIONS
from tests.conftest import require_postgres, require_rabbitmq

ROOT = Path(__file__).resolve().parents[2]


def run_saga(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SAGA_")}
    environ.update(env, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "saga", *args],
        env=environ,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"SAGA_DEFINITIONS": ""}, "SAGA_DEFINITIONS is not set"),
        ({"SAGA_DEFINITIONS": "nope"}, "expected module:attribute"),
        ({"SAGA_PREFETCH": "0"}, "SAGA_PREFETCH: Input should be greater than or equal to 1"),
        (
            {"SAGA_RABBITMQ_URL": "amqp://guest:hunter2@127.0.0.1:1/"},
            "cannot reach RabbitMQ at amqp://guest:***@127.0.0.1:1/",
        ),
        ({"SAGA_DATABASE_URL": "sqlite+aiosqlite:///db/saga.db"}, "run `saga migrate`"),
        ({"SAGA_GC_THRESHOLD": "lots"}, "SAGA_GC_THRESHOLD='lots': give a whole number"),
        (
            {"SAGA_DATABASE_URL": "postgresql+asyncpg://postgres@127.0.0.1:1/test"},
            "cannot reach the database at postgresql+asyncpg://postgres@127.0.0.1:1/test",
        ),
    ],
)
def test_bad_environment_is_one_clear_line(
    tmp_path: Path, env: dict[str, str], expected: str
) -> None:
    env = {"SAGA_DEFINITIONS": "tests.support.sagas:registry", **env}
    args = ("run", "--migrate") if "SAGA_RABBITMQ_URL" in env else ("run",)
    result = run_saga(tmp_path, *args, **env)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert "hunter2" not in result.stderr + result.stdout


def test_migrate_then_version(tmp_path: Path) -> None:
    url = "sqlite+aiosqlite:///saga.db"
    first = run_saga(tmp_path, "migrate", SAGA_DATABASE_URL=url)
    assert first.returncode == 0, first.stderr
    every = [v for v, _, _ in MIGRATIONS]
    assert f"schema at version {HEAD} (applied {every})" in first.stdout
    again = run_saga(tmp_path, "migrate", SAGA_DATABASE_URL=url)
    assert again.stdout.strip() == f"schema at version {HEAD}"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one line a failed start prints: nothing before it (no log line, no traceback)."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines
    return lines[0]


#: every way to start with a database: each must fail the same way
_STARTS = {
    "run": ("run",),
    "run --migrate": ("run", "--migrate"),
    "SAGA_AUTO_MIGRATE=true run": ("run",),
    "migrate": ("migrate",),
}


@pytest.mark.postgres
@pytest.mark.parametrize("fault", ["closed port", "no such database"])
def test_a_database_that_cannot_be_opened_is_the_same_one_line_for_every_start(
    tmp_path: Path, fault: str
) -> None:
    """`saga run --migrate` and SAGA_AUTO_MIGRATE=true printed a traceback (or a line unlike
    the one of plain `saga run`) on an unreachable PostgreSQL or a missing database."""
    base = require_postgres().rsplit("/", 1)[0]
    if fault == "closed port":
        url = f"postgresql+asyncpg://postgres@127.0.0.1:{_closed_port()}/test"
        expected = [f"cannot reach the database at {url}: ", "is it running?", "SAGA_DATABASE_URL"]
    else:
        url = f"{base}/saga_no_such_database_{uuid.uuid4().hex[:8]}"
        missing = url.rsplit("/", 1)[1]
        expected = [
            f'cannot reach the database at {url}: database "{missing}" does not exist; ',
            "create that database, or point SAGA_DATABASE_URL at one that exists",
        ]
    lines = {}
    for name, args in _STARTS.items():
        env = {"SAGA_DEFINITIONS": "tests.support.sagas:registry", "SAGA_DATABASE_URL": url}
        if name.startswith("SAGA_AUTO_MIGRATE"):
            env["SAGA_AUTO_MIGRATE"] = "true"
        lines[name] = _error_line(run_saga(tmp_path, *args, **env))
    assert len(set(lines.values())) == 1, lines
    line = lines["run"]
    for text in expected:
        assert text in line
    assert "sqlalche.me" not in line


@pytest.mark.rabbitmq
def test_a_broker_that_cannot_be_reached_or_refuses_the_login_is_one_line(
    tmp_path: Path,
) -> None:
    """A closed port says nothing listens; a wrong password says the credentials were refused
    and which setting to change, not "Is it running?"; neither prints a log line first."""
    right = require_rabbitmq()
    assert "guest:guest@" in right
    wrong = right.replace("guest:guest@", "guest:hunter2@")
    closed = f"amqp://guest:hunter2@127.0.0.1:{_closed_port()}/"
    env = {
        "SAGA_DEFINITIONS": "tests.support.sagas:registry",
        "SAGA_DATABASE_URL": "sqlite+aiosqlite:///saga.db",
    }
    nothing = _error_line(run_saga(tmp_path, "run", "--migrate", SAGA_RABBITMQ_URL=closed, **env))
    assert nothing.startswith(f"error: cannot reach RabbitMQ at {closed.replace('hunter2', '***')}")
    assert "Is it running?" in nothing
    refused = _error_line(run_saga(tmp_path, "run", "--migrate", SAGA_RABBITMQ_URL=wrong, **env))
    assert refused == (
        f"error: RabbitMQ at {wrong.replace('hunter2', '***')} refused the login. The "
        "credentials were refused (ACCESS_REFUSED): check the user and password in "
        "SAGA_RABBITMQ_URL and that the user may use its vhost."
    )
    assert "hunter2" not in nothing + refused
