"""``profile_decide`` (the orchestrator's CPU per event in one process) runs and counts the
work it measures: every checkout decided and committed. Never asserts on speed."""

from __future__ import annotations

from pathlib import Path

from saga_tools.bench.profile_decide import measure


async def test_every_checkout_is_decided_and_committed(tmp_path: Path) -> None:
    measured = await measure(20, 5, warmup=5, data_dir=tmp_path)
    report = measured.as_dict()
    assert measured.events == 20 * 5, report  # the start and four replies of each checkout
    assert measured.batches >= 1 and measured.statements > 0, report
    assert measured.cpu_s > 0 and measured.outside_s > 0, report
