"""The whole demo on the in-memory broker: no RabbitMQ involved, same outcomes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from services import demo
from services.demo import MEMORY_BANNER, run_demo


async def test_the_demo_runs_on_the_memory_broker(tmp_path: Path) -> None:
    outcomes, before, after, expected = await run_demo(
        data_dir=tmp_path / "demo",
        database_url=None,
        rabbitmq_url="amqp://guest:guest@127.0.0.1:1/",  # nothing listens there: unused
        broker="memory",
        quiet=True,
    )
    assert [o.scenario.label for o in outcomes] == [s.label for s in demo.SCENARIOS]
    for o in outcomes:
        assert o.state.status is o.scenario.expected, (o.scenario.label, demo.path(o.history))
    assert after == expected
    assert after != before  # the completed checkouts did move money and stock


def test_main_says_nothing_is_durable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    seen: dict[str, Any] = {}

    async def fake(
        **kwargs: Any,
    ) -> tuple[list[Any], dict[str, Any], dict[str, Any], dict[str, Any]]:
        seen.update(kwargs)
        empty = {"balances": {}, "stock": {}}
        return [], empty, empty, empty

    monkeypatch.setattr(demo, "run_demo", fake)
    assert demo.main(["--broker", "memory", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert MEMORY_BANNER in out
    assert MEMORY_BANNER == (
        "in-memory broker: nothing is durable in this mode; use RabbitMQ for anything real"
    )
    assert seen["broker"] == "memory"
