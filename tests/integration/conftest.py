"""Fixtures for the broker tests: a harness per test, with its own prefix and database.

``backend`` is ``sqlite`` unless a test parametrizes it indirectly with ``postgres``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import require_postgres, require_rabbitmq
from tests.integration.harness import Harness


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    return str(getattr(request, "param", "sqlite"))


@pytest.fixture
async def harness(backend: str, tmp_path: Path, unique: str) -> AsyncIterator[Harness]:
    """Nothing started yet: tests that need special settings or restarts start things here."""
    rabbitmq_url = require_rabbitmq()
    if backend == "postgres":
        database_url, schema = require_postgres(), f"saga_it_{unique}"
    else:
        database_url, schema = f"sqlite+aiosqlite:///{tmp_path / 'saga.db'}", None
    world = Harness(
        prefix=f"t-{unique}",
        rabbitmq_url=rabbitmq_url,
        database_url=database_url,
        schema=schema,
        log=tmp_path / "responder.jsonl",
    )
    try:
        yield world
    finally:
        await world.cleanup()


@pytest.fixture
async def running(harness: Harness) -> Harness:
    """The orchestrator service and the scripted participant, both started."""
    await harness.start_service()
    await harness.start_responder()
    return harness
