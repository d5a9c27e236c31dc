"""Fixtures of the end-to-end tests: the real processes on a private prefix.

Teardown kills every process group first, then deletes the prefix's queues and exchanges and
checks that none is left.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.conftest import require_rabbitmq
from tests.e2e.otlp import OtlpReceiver
from tests.e2e.stack import Group, Stack, delete_topology, leftover_queues


@pytest.fixture
async def stack(tmp_path: Path, unique: str) -> AsyncIterator[Stack]:
    url = require_rabbitmq()
    world = Stack(
        rabbitmq_url=url, prefix=f"e2e-{unique}", directory=tmp_path, processes=Group(tmp_path)
    )
    try:
        yield world
    finally:
        try:
            world.processes.stop_all()
        finally:
            await delete_topology(url, world.prefix)
            left = await leftover_queues(url, world.prefix)
            assert not left, f"queues left behind: {left}"


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    """An OTLP/HTTP endpoint for the processes' span exporters, in place of Jaeger."""
    r = OtlpReceiver()
    try:
        yield r
    finally:
        r.close()
