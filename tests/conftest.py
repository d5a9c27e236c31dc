"""Shared fixtures: real services, never silently skipped.

Tests that need RabbitMQ or PostgreSQL fail with the command that starts them when they are not
reachable; ``scripts/test`` starts both when they are installed.
"""

from __future__ import annotations

import os
import socket
import uuid

import pytest

RABBITMQ_URL = os.environ.get("SAGA_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
POSTGRES_URL = os.environ.get(
    "SAGA_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def require_rabbitmq() -> str:
    if not _reachable("127.0.0.1", 5672):
        pytest.fail(
            "RabbitMQ is not reachable on 127.0.0.1:5672; start it with "
            "`rabbitmq-server -detached` (scripts/test does this for you)",
            pytrace=False,
        )
    return RABBITMQ_URL


def require_postgres() -> str:
    if not _reachable("127.0.0.1", 5432):
        pytest.fail(
            "PostgreSQL is not reachable on 127.0.0.1:5432; start it with "
            "`pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start` "
            "(scripts/test does this for you)",
            pytrace=False,
        )
    return POSTGRES_URL


@pytest.fixture
def unique() -> str:
    """A short unique suffix for queue, schema and file names of one test."""
    return uuid.uuid4().hex[:10]
