"""``profile_decide`` (the orchestrator's CPU per event in one process) runs and counts the
work it measures: every checkout decided and committed. Never asserts on speed."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from saga_tools.bench.profile_decide import measure
from saga_tools.bench.stack import temporary_database
from tests.conftest import require_postgres


async def test_every_checkout_is_decided_and_committed(tmp_path: Path) -> None:
    measured = await measure(20, 5, warmup=5, data_dir=tmp_path)
    report = measured.as_dict()
    assert measured.events == 20 * 5, report  # the start and four replies of each checkout
    assert measured.batches >= 1 and measured.statements > 0, report
    assert measured.cpu_s > 0 and measured.outside_s > 0, report


@pytest.mark.postgres
async def test_two_instances_on_postgresql_decide_every_checkout(tmp_path: Path) -> None:
    name = f"saga_profile_{uuid.uuid4().hex[:12]}"
    async with temporary_database(require_postgres(), name) as url:
        measured = await measure(20, 5, warmup=5, data_dir=tmp_path, database_url=url, instances=2)
    report = measured.as_dict()
    assert report["database"] == "postgresql" and report["instances"] == 2, report
    # a conflict between the instances decides an event again: never fewer
    assert measured.events >= 20 * 5 and measured.batches >= 2, report
