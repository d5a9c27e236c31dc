"""The whole demo on the in-memory broker: no RabbitMQ involved, same outcomes."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest

from saga.core.state import SagaStatus, StepStatus
from saga.orchestrator.service import OrchestratorService
from saga_demo import demo
from saga_demo.demo import MEMORY_BANNER, run_demo
from saga_tools.chaos.node import free_port


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
    steps = {o.scenario.label: {s.name: s.status for s in o.state.steps} for o in outcomes}
    # a failure in one branch of the parallel group undoes the other branch and the order
    assert steps["out of stock"] == {
        "create_order": StepStatus.COMPENSATED,
        "charge_payment": StepStatus.COMPENSATED,
        "reserve_inventory": StepStatus.FAILED,
        "schedule_shipping": StepStatus.PENDING,
    }
    assert steps["declined payment"] == {
        "create_order": StepStatus.COMPENSATED,
        "charge_payment": StepStatus.FAILED,
        "reserve_inventory": StepStatus.COMPENSATED,
        "schedule_shipping": StepStatus.PENDING,
    }
    # digital goods alone: charged, neither reserved nor shipped
    assert steps["digital goods, nothing to ship"] == {
        "create_order": StepStatus.SUCCEEDED,
        "charge_payment": StepStatus.SUCCEEDED,
        "reserve_inventory": StepStatus.SKIPPED,
        "schedule_shipping": StepStatus.SKIPPED,
    }


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


async def test_after_the_demo_an_operator_finds_the_sagas_and_fixes_the_stuck_one(
    tmp_path: Path,
) -> None:
    """What ``scripts/demo --serve`` offers: the dashboard's API sees the declined payment and
    why it compensated, and one retry fixes the checkout whose refund kept failing."""
    port, token = free_port(), secrets.token_hex(16)
    seen: dict[str, Any] = {}

    async def operator(
        result: Any, orchestrator: OrchestratorService, services: Mapping[str, Any]
    ) -> None:
        stuck = await demo.stuck_checkout(orchestrator, services, "stuck-test")
        state = await orchestrator.orchestrator.get(stuck)
        seen["stuck"] = (state.status, state.stuck_step)
        headers = {"Authorization": f"Bearer {token}", "X-Saga-Actor": "ops"}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=headers) as api:
            listed = (await api.get("/api/sagas", params={"status": "COMPENSATED"})).json()
            seen["why"] = {s["failure"] for s in listed["items"]}
            answer = await api.post(f"/api/sagas/{stuck}/retry", json={"reason": "gateway back"})
            assert answer.status_code == 200, answer.text
            for _ in range(200):
                state = await orchestrator.orchestrator.get(stuck)
                if state.status.is_terminal:
                    break
                await asyncio.sleep(0.1)
        seen["after"] = state.status
        refunds = [r for r in await services["payment"].ledger.history() if r["saga_id"] == stuck]
        seen["refunds"] = [r["command_type"] for r in refunds if r["direction"] == "compensation"]

    await run_demo(
        data_dir=tmp_path / "demo",
        database_url=None,
        broker="memory",
        quiet=True,
        admin=(port, token),
        hold=operator,
    )
    assert seen["stuck"] == (SagaStatus.FAILED, "charge_payment")
    assert any("insufficient_funds" in (why or "") for why in seen["why"]), seen["why"]
    assert seen["after"] is SagaStatus.COMPENSATED
    assert seen["refunds"] == ["payment.refund"]  # applied once, after the retry
