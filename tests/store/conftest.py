from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.pool.base import _ConnectionFairy

from saga.ports import Store
from saga.store.memory import MemoryStore
from saga.store.sql import SqlStore
from tests.conftest import require_postgres


@pytest.fixture(params=["memory", "sqlite", "postgres"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, unique: str
) -> AsyncIterator[Store]:
    """The same contract suite runs against every store."""
    if request.param == "memory":
        yield MemoryStore()
        return
    async with sql_store(request.param, tmp_path, unique) as sql:
        yield sql


@contextlib.asynccontextmanager
async def sql_store(
    kind: str, tmp_path: Path, unique: str, *, pool_size: int = 5
) -> AsyncIterator[SqlStore]:
    """A migrated SqlStore on a SQLite file (``sqlite``) or in a PostgreSQL schema of its own,
    dropped afterwards."""
    if kind == "sqlite":
        sql = SqlStore(f"sqlite+aiosqlite:///{tmp_path / 'saga.db'}")
    else:
        sql = SqlStore(require_postgres(), schema=f"saga_test_{unique}", pool_size=pool_size)
    await sql.migrate()
    await sql.setup()
    try:
        yield sql
    finally:
        await sql.drop_schema()
        await sql.close()


@pytest.fixture
def given_up(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """The pooled connections invalidated (closed rather than given back)."""
    seen: list[object] = []
    invalidate = _ConnectionFairy.invalidate

    def counting(self: _ConnectionFairy, *args: Any, **kwargs: Any) -> None:
        seen.append(self)
        invalidate(self, *args, **kwargs)

    monkeypatch.setattr(_ConnectionFairy, "invalidate", counting)
    return seen
