"""Fixtures of the crash tests: a private prefix, a SQLite file, tracked subprocesses."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import require_rabbitmq
from tests.crash.helpers import Processes, delete_topology


@dataclass
class CrashEnv:
    rabbitmq_url: str
    prefix: str
    database_url: str
    directory: Path
    processes: Processes

    @property
    def responder_log(self) -> Path:
        return self.directory / "responder.jsonl"


@pytest.fixture
async def crash_env(tmp_path: Path, unique: str) -> AsyncIterator[CrashEnv]:
    """Teardown kills every subprocess first, then deletes the prefix's queues and exchanges."""
    url = require_rabbitmq()
    env = CrashEnv(
        rabbitmq_url=url,
        prefix=f"crash-{unique}",
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'saga.db'}",
        directory=tmp_path,
        processes=Processes(tmp_path),
    )
    try:
        yield env
    finally:
        try:
            env.processes.stop_all()
        finally:
            await delete_topology(url, env.prefix)
