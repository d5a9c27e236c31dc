"""`saga run` turns a bad environment into one clear line and exit status 2, never a traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from saga.store.schema import HEAD, MIGRATIONS

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
