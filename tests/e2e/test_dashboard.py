"""The dashboard in a real headless Chromium (Debian's package, driven with Playwright) against
the real orchestrator and services after a small demo run: the list shows the sagas, a
compensated saga's page shows its compensations newest first, the definitions page draws the
steps, and the retry button on a stuck saga moves it to COMPENSATED.

Screenshots go to ``test-artifacts/dashboard/`` (or ``$SAGA_TEST_ARTIFACTS``).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from saga.core.state import SagaStatus
from saga.protocol.envelope import StartSaga
from saga.transport.topology import Topology
from saga_demo import inventory
from saga_tools.chaos.node import free_port
from tests.crash.helpers import REPO
from tests.e2e.stack import (
    PARIS,
    SERVICES,
    TOKYO,
    Stack,
    checkout,
    queue_depths,
    saga_id,
    submit,
)

ARTIFACTS = Path(os.environ.get("SAGA_TEST_ARTIFACTS", REPO / "test-artifacts")) / "dashboard"


def chromium() -> str:
    path = os.environ.get("SAGA_TEST_CHROMIUM") or shutil.which("chromium")
    if not path:
        pytest.fail(
            "Chromium is not installed: apt-get install chromium (scripts/test does it), or "
            "set SAGA_TEST_CHROMIUM to a Chromium executable",
            pytrace=False,
        )
    return path


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        try:
            yield b
        finally:
            await b.close()


async def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


async def test_find_a_compensated_saga_and_fix_a_stuck_one_in_the_dashboard(
    stack: Stack, browser: Browser, tmp_path: Path
) -> None:
    port, token = free_port(), secrets.token_hex(16)
    prefix = stack.prefix
    keys = {name: f"{prefix}-{n}" for n, name in enumerate(("happy", "declined", "tokyo", "stuck"))}
    stuck = saga_id(keys["stuck"])
    # The refund of the "stuck" checkout fails (transiently) as many times as its retry budget
    # allows, so its compensation gives up and the saga is FAILED; a retry then succeeds.
    plan = tmp_path / "faults.json"
    plan.write_text(
        json.dumps(
            {
                "faults": [
                    {
                        "saga_id": str(stuck),
                        "command_type": "payment.refund",
                        "mode": "transient",
                        "times": 10,
                    },
                ]
            }
        )
    )
    stack.data_dir.mkdir(parents=True, exist_ok=True)
    procs = [
        stack.processes.spawn(
            "orchestrator",
            ["saga", "run", "--migrate"],
            stack.orchestrator_env(SAGA_ADMIN_PORT=str(port), SAGA_ADMIN_TOKEN=token),
        ),
        *(
            stack.processes.spawn(
                s,
                ["saga-service", s],
                stack.service_env(
                    None, **({"SAGA_FAULT_PLAN": str(plan)} if s == "payment" else {})
                ),
            )
            for s in SERVICES
        ),
    ]
    await stack.started(procs)
    ids = await submit(
        stack,
        [
            checkout("alice", [(inventory.BOOK, 1)], PARIS),
            checkout("bob", [(inventory.LAMP, 1)]),  # declined: bob's balance is too low
            checkout("alice", [(inventory.BOOK, 1)], TOKYO),  # not served: compensated
            checkout("carol", [(inventory.BOOK, 1)], TOKYO),  # its refund gets stuck
        ],
    )
    states = await stack.wait_terminal(list(ids), within=90, watch=procs)
    tokyo = saga_id(keys["tokyo"])
    assert states[tokyo].status is SagaStatus.COMPENSATED
    assert states[stuck].status is SagaStatus.FAILED, states[stuck]

    page = await browser.new_page(viewport={"width": 1280, "height": 900})
    base = f"http://127.0.0.1:{port}"
    await page.goto(f"{base}/")  # redirects to /ui/ and asks for the token
    await expect(page.locator("#login")).to_be_visible()
    await page.fill("#token", "wrong-token")
    await page.click("#login-submit")
    await expect(page.locator("#login-error")).to_contain_text("wrong token")
    await page.fill("#token", token)
    await page.fill("#actor", "ops-ann")
    await page.click("#login-submit")

    # the overview counts what the store holds
    await expect(page.locator('[data-count="COMPENSATED"] .n')).to_have_text("2")
    await expect(page.locator('[data-count="FAILED"] .n')).to_have_text("1")
    await expect(page.locator("#by-saga")).to_contain_text("checkout")
    await shot(page, "1-overview")

    # the list shows every saga; filtering by status narrows it
    await page.goto(f"{base}/ui/#/sagas")
    for sid in ids:
        await expect(page.locator(f'tr[data-saga="{sid}"]')).to_be_visible()
    await shot(page, "2-list")
    await page.check('input[name="status"][value="FAILED"]')
    await page.click("#filters button")
    await expect(page.locator("#saga-list tbody tr")).to_have_count(1)
    await expect(page.locator(f'tr[data-saga="{stuck}"]')).to_be_visible()

    # a compensated saga: why, and its compensations newest first
    await page.goto(f"{base}/ui/#/saga/{tokyo}")
    await expect(page.locator("#failure")).to_contain_text("schedule_shipping")
    compensated = page.locator('#timeline li[data-kind="step_compensated"]')
    await expect(compensated).to_have_count(3)
    assert await compensated.evaluate_all("items => items.map(i => i.dataset.step)") == [
        "reserve_inventory",
        "charge_payment",
        "create_order",
    ]
    assert "compensation" in (await compensated.first.get_attribute("class") or "")
    await shot(page, "3-compensated-saga")

    # the stuck saga: retry asks for a reason, and the saga ends COMPENSATED
    await page.goto(f"{base}/ui/#/saga/{stuck}")
    await expect(page.locator("h1 .badge")).to_have_text("FAILED")
    await expect(page.locator("#stuck")).to_have_text("charge_payment")
    await shot(page, "4-stuck-saga")
    await page.click("#retry")
    await expect(page.locator("#act")).to_be_visible()
    await page.fill("#act-reason", "payment gateway fixed")
    await page.click("#act-submit")
    await expect(page.locator("h1 .badge")).to_have_text("COMPENSATED", timeout=30_000)
    operator = page.locator('#timeline li[data-kind="operator"]')
    await expect(operator).to_contain_text("payment gateway fixed")
    await expect(operator).to_contain_text("ops-ann")
    await shot(page, "5-retried-saga")

    # definitions are drawn: four steps, three compensations (shipping's is undone too)
    await page.goto(f"{base}/ui/#/definitions")
    diagram = page.locator('[data-definition="checkout"] svg')
    await expect(diagram.locator("g[data-step]")).to_have_count(4)
    await expect(diagram.locator("g[data-compensation]")).to_have_count(4)
    await shot(page, "6-definitions")

    await page.goto(f"{base}/ui/#/contracts")
    await expect(page.locator('[data-channel="replies"]')).to_contain_text("order.create.reply")
    await shot(page, "7-contracts")

    final = await stack.states([stuck])
    assert final[stuck].status is SagaStatus.COMPENSATED
    history = (await stack.histories([stuck]))[stuck]
    assert any(h.actor == "ops-ann" and "payment gateway fixed" in h.detail for h in history)


async def _publish_raw(url: str, queue: str, body: bytes, message_id: str) -> None:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        message = aio_pika.Message(body, content_type="application/json", message_id=message_id)
        await channel.default_exchange.publish(message, routing_key=queue)
    finally:
        await connection.close()


async def test_dead_letters_page_lists_them_and_discards_one(
    stack: Stack, browser: Browser
) -> None:
    """A malformed command on payment's queue and a start of an unknown saga on the
    orchestrator's are listed with their reasons; discarding one (behind a confirmation with
    a reason) takes it off its queue, and the other stays."""
    port, token = free_port(), secrets.token_hex(16)
    stack.data_dir.mkdir(parents=True, exist_ok=True)
    procs = [
        stack.processes.spawn(
            "orchestrator",
            ["saga", "run", "--migrate"],
            stack.orchestrator_env(SAGA_ADMIN_PORT=str(port), SAGA_ADMIN_TOKEN=token),
        ),
        stack.processes.spawn("payment", ["saga-service", "payment"], stack.service_env(None)),
    ]
    await stack.started(procs)
    topology = Topology(prefix=stack.prefix)
    malformed, unknown = str(uuid.uuid4()), str(uuid.uuid4())
    start = StartSaga(
        schema_version=1, message_id=uuid.UUID(unknown), saga_name="nosuch", key="k", input={}
    )
    await _publish_raw(stack.rabbitmq_url, topology.command_queue("payment"), b'{"oops', malformed)
    await _publish_raw(
        stack.rabbitmq_url, topology.start_queue, start.model_dump_json().encode(), unknown
    )

    page = await browser.new_page(viewport={"width": 1280, "height": 900})
    base = f"http://127.0.0.1:{port}"
    await page.goto(f"{base}/ui/#/dead-letters")
    await page.fill("#token", token)
    await page.fill("#actor", "ops-dora")
    await page.click("#login-submit")
    rows = page.locator("#dlq-list tr[data-dead-letter]")
    for _ in range(50):  # dead-lettering takes a moment: refresh until both are there
        if await rows.count() == 2:
            break
        await page.wait_for_timeout(200)
        await page.click("#dlq-refresh")
    await expect(rows).to_have_count(2)
    bad = page.locator(f'tr[data-dead-letter="{malformed}"]')
    await expect(bad).to_contain_text("invalid_json")
    await expect(bad).to_contain_text(topology.command_queue("payment"))
    await expect(page.locator(f'tr[data-dead-letter="{unknown}"]')).to_contain_text(
        "unknown_saga_name"
    )
    await bad.locator("[data-dlq-show]").click()
    await expect(page.locator("#dlq-body")).to_have_text('{"oops')
    await shot(page, "8-dead-letters")

    await bad.locator('[data-dlq-act="discard"]').click()
    await expect(page.locator("#dlq-act")).to_be_visible()
    await page.click("#dlq-act-submit")  # no reason: the form does not submit
    await expect(page.locator("#dlq-act")).to_be_visible()
    await page.fill("#dlq-act-reason", "a test message, nothing to redo")
    await page.click("#dlq-act-submit")
    await expect(page.locator("#dlq-result")).to_contain_text(f"discarded {malformed}")
    await expect(page.locator("#dlq-result")).to_contain_text("ops-dora")
    await expect(rows).to_have_count(1)
    await expect(page.locator(f'tr[data-dead-letter="{unknown}"]')).to_be_visible()
    depths = await queue_depths(stack.rabbitmq_url, stack.prefix)
    assert depths[topology.dead_letter_queue(topology.command_queue("payment"))] == 0
    assert depths[topology.dead_letter_queue(topology.start_queue)] == 1
