"""The dashboard in a real headless Chromium (Debian's package, driven with Playwright) against
the real orchestrator and services after a small demo run: the list shows the sagas, a
compensated saga's page shows its compensations newest first, the definitions page draws the
steps, and the retry button on a stuck saga moves it to COMPENSATED.

Screenshots go to ``test-artifacts/dashboard/`` (or ``$SAGA_TEST_ARTIFACTS``).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shutil
import signal
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from saga.core.state import SagaStatus
from saga.protocol.envelope import StartSaga
from saga.transport.topology import Topology
from saga_demo import inventory
from saga_tools.chaos.node import free_port
from tests.crash.helpers import REPO, Proc
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
from tests.support.responder import Responder

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
    # why it went wrong (shipping to Tokyo), apart from why it is stuck now (the refund)
    await expect(page.locator("#failure")).to_have_text(
        "step schedule_shipping failed: undeliverable_address"
    )
    await expect(page.locator("#stuck-why")).to_contain_text("compensation of charge_payment")
    await shot(page, "4-stuck-saga")
    await page.click("#retry")
    await expect(page.locator("#act")).to_be_visible()
    await page.fill("#act-reason", "payment gateway fixed")
    await page.click("#act-submit")
    await expect(page.locator("h1 .badge")).to_have_text("COMPENSATED", timeout=30_000)
    operator = page.locator('#timeline li[data-kind="operator"]')
    await expect(operator).to_contain_text("payment gateway fixed")
    await expect(operator).to_contain_text("ops-ann")
    # fixed: the root cause stays, the retry is named beside it, the refund's failure is gone
    await expect(page.locator("#failure")).to_have_text(
        "step schedule_shipping failed: undeliverable_address"
    )
    await expect(page.locator("#resolution")).to_contain_text("retried by ops-ann")
    await expect(page.locator("#resolution")).to_contain_text("payment gateway fixed")
    await expect(page.locator("#stuck-why")).to_have_count(0)
    await shot(page, "5-retried-saga")

    # definitions are drawn, both versions of the checkout (version 1 stays registered for
    # the sagas started with it): four steps, four compensations (shipping's is undone too);
    # version 2 with the charge and the reservation in parallel, both conditional on goods
    await page.goto(f"{base}/ui/#/definitions")
    checkouts = page.locator('[data-definition="checkout"]')
    await expect(checkouts).to_have_count(2)
    current = checkouts.filter(has=page.locator("h2", has_text="checkout v2"))
    diagram = current.locator("svg")
    await expect(diagram.locator("g[data-step]")).to_have_count(4)
    await expect(diagram.locator("g[data-compensation]")).to_have_count(4)
    await expect(diagram.locator("g[data-member]")).to_have_count(2)
    await expect(diagram.locator("[data-fork]")).to_have_count(1)
    conditional = diagram.locator('g[data-conditional="true"]')
    assert await conditional.evaluate_all("gs => gs.map(g => g.dataset.step)") == [
        "reserve_inventory",
        "schedule_shipping",
    ]
    await shot(page, "6-definitions")

    await page.goto(f"{base}/ui/#/contracts")
    await expect(page.locator('[data-channel="replies"]')).to_contain_text("order.create.reply")
    await shot(page, "7-contracts")

    final = await stack.states([stuck])
    assert final[stuck].status is SagaStatus.COMPENSATED
    history = (await stack.histories([stuck]))[stuck]
    assert any(h.actor == "ops-ann" and "payment gateway fixed" in h.detail for h in history)


# --- what an on-call engineer found in the dashboard --------------------------------------


@dataclass
class Dashboard:
    """The orchestrator of ``stack`` with its admin API (and the dashboard) on ``port``."""

    stack: Stack
    port: int
    token: str
    env: dict[str, str]
    orchestrator: Proc

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def api(self) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self.token}"}
        return httpx.AsyncClient(base_url=self.base, headers=headers, timeout=15)

    async def start_checkout(self, key: str, checkout_input: dict[str, object]) -> str:
        async with self.api() as client:
            answer = await client.post(
                "/api/sagas", json={"name": "checkout", "input": checkout_input, "key": key}
            )
        assert answer.status_code in (200, 201), answer.text
        return str(answer.json()["saga"]["saga_id"])

    async def wait(self, saga_id: str, status: str, step: str | None = None) -> dict[str, Any]:
        """Poll the API until the saga has ``status`` (and is at ``step``)."""
        deadline = time.monotonic() + 60
        async with self.api() as client:
            while True:
                saga: dict[str, Any] = (await client.get(f"/api/sagas/{saga_id}")).json()
                if saga["status"] == status and (step is None or saga["current_step"] == step):
                    return saga
                if time.monotonic() > deadline:
                    self.stack.fail(f"saga {saga_id} is {saga['status']}, not {status}: {saga}")
                await asyncio.sleep(0.2)

    def restart(self) -> None:
        self.orchestrator = self.stack.processes.spawn(
            "orchestrator", ["saga", "run", "--migrate"], self.env
        )


async def serve(
    stack: Stack, services: tuple[str, ...] = (), plan: Path | None = None, **env: str
) -> Dashboard:
    """The orchestrator with its admin API, and ``services`` (with ``plan`` for payment's and
    order's faults)."""
    port, token = free_port(), secrets.token_hex(16)
    stack.data_dir.mkdir(parents=True, exist_ok=True)
    orchestrator_env = stack.orchestrator_env(
        SAGA_ADMIN_PORT=str(port), SAGA_ADMIN_TOKEN=token, **env
    )
    orchestrator = stack.processes.spawn(
        "orchestrator", ["saga", "run", "--migrate"], orchestrator_env
    )
    faults = {} if plan is None else {"SAGA_FAULT_PLAN": str(plan)}
    procs = [
        orchestrator,
        *(stack.processes.spawn(s, ["saga-service", s], stack.service_env(None, **faults))
          for s in services),
    ]  # fmt: skip
    await stack.started(procs)
    return Dashboard(stack, port, token, orchestrator_env, orchestrator)


async def signed_in(browser: Browser, dash: Dashboard, width: int = 1280) -> Page:
    page = await browser.new_page(viewport={"width": width, "height": 900})
    await page.goto(f"{dash.base}/ui/")
    await page.fill("#token", dash.token)
    await page.fill("#actor", "ops-ann")
    await page.click("#login-submit")
    await expect(page.locator("#login")).to_be_hidden()
    return page


async def buttons(page: Page) -> list[str]:
    return await page.locator("#actions button").all_inner_texts()


async def test_only_the_actions_a_saga_accepts_are_offered_with_their_own_dialog(
    stack: Stack, browser: Browser, tmp_path: Path
) -> None:
    """Shipping is down (its commands wait in its queue, and the timers wait for it), so a
    checkout stays RUNNING at schedule_shipping, and once aborted COMPENSATING at its cancel."""
    prefix = stack.prefix
    stuck_key = f"{prefix}-stuck"
    plan = tmp_path / "faults.json"  # the stuck saga's order cancellation is refused
    stuck_id = str(saga_id(stuck_key))
    plan.write_text(json.dumps({"faults": [
        {"saga_id": stuck_id, "command_type": "order.cancel", "mode": "refuse", "times": 1},
    ]}))  # fmt: skip
    dash = await serve(
        stack, ("order", "payment", "inventory"), plan, SAGA_TIMER_OUTAGE_CREDIT_MAX="600"
    )
    declined = await dash.start_checkout(
        f"{prefix}-declined", checkout("bob", [(inventory.LAMP, 1)])
    )
    stuck = await dash.start_checkout(stuck_key, checkout("bob", [(inventory.LAMP, 1)]))
    waiting = await dash.start_checkout(
        f"{prefix}-waiting", checkout("alice", [(inventory.BOOK, 1)], PARIS)
    )
    await dash.wait(declined, "COMPENSATED")
    await dash.wait(stuck, "FAILED")
    await dash.wait(waiting, "RUNNING", step="schedule_shipping")

    page = await signed_in(browser, dash)

    # the list's step column: where each saga is, or where it turned back
    await page.goto(f"{dash.base}/ui/#/sagas")
    step = 'td[data-col="step"]'
    await expect(page.locator(f'tr[data-saga="{declined}"] {step}')).to_have_text("charge_payment")
    await expect(page.locator(f'tr[data-saga="{stuck}"] {step}')).to_contain_text("create_order")
    await expect(page.locator(f'tr[data-saga="{waiting}"] {step}')).to_have_text(
        "schedule_shipping"
    )

    # FAILED: retry or resolve; only resolving a stuck action asks for the step's output
    await page.goto(f"{dash.base}/ui/#/saga/{stuck}")
    await expect(page.locator("h1 .badge")).to_have_text("FAILED")
    assert await buttons(page) == ["Retry", "Mark resolved"]
    await page.click("#retry")
    await expect(page.locator("#act-reason")).to_be_visible()
    await expect(page.locator("#act-data")).to_be_hidden()
    await page.click('#act-form button[value="cancel"]')
    await page.click("#resolve")
    await expect(page.locator("#act-data")).to_be_visible()
    await page.click('#act-form button[value="cancel"]')
    await expect(page.locator("#act")).to_be_hidden()

    # RUNNING: abort only, and its dialog asks for a reason alone
    await page.goto(f"{dash.base}/ui/#/saga/{waiting}")
    await expect(page.locator("h1 .badge")).to_have_text("RUNNING")
    assert await buttons(page) == ["Abort (compensate now)"]
    await page.click("#abort")
    await expect(page.locator("#act-data")).to_be_hidden()
    await shot(page, "abort-dialog")
    await page.fill("#act-reason", "customer called to cancel")
    await page.click("#act-submit")

    # COMPENSATING (the shipment's cancellation waits for shipping): nothing to offer
    await expect(page.locator("h1 .badge")).to_have_text("COMPENSATING")
    await expect(page.locator("#actions button")).to_have_count(0)
    await expect(page.locator("#actions")).to_contain_text("no operator action applies")

    stack.processes.spawn("shipping", ["saga-service", "shipping"], stack.service_env(None))
    await expect(page.locator("h1 .badge")).to_have_text("COMPENSATED", timeout=30_000)
    await expect(page.locator("#actions button")).to_have_count(0)

    # no history holds a refusal: nothing refused was ever offered
    async with dash.api() as client:
        for sid in (declined, stuck, waiting):
            history = (await client.get(f"/api/sagas/{sid}")).json()["history"]
            assert "rejected" not in {h["kind"] for h in history}

    # the compensated saga's step: where it turned back (the aborted shipment)
    await page.goto(f"{dash.base}/ui/#/sagas")
    await expect(page.locator(f'tr[data-saga="{waiting}"] {step}')).to_have_text(
        "schedule_shipping"
    )


async def test_the_contracts_page_shows_what_each_message_carries(
    stack: Stack, browser: Browser
) -> None:
    dash = await serve(stack)
    page = await signed_in(browser, dash)
    await page.goto(f"{dash.base}/ui/#/contracts")
    replies = page.locator('[data-channel="replies"] tbody tr')
    await expect(replies).to_have_count(8)
    created = page.locator('[data-channel="replies"] tr[data-message="order.create.reply"]')
    await expect(created.locator("td.payload")).to_have_text(
        'ReplyEnvelope + data: OrderCreated when outcome is "success"'
    )
    for text in await page.locator('[data-channel="replies"] td.payload').all_inner_texts():
        assert text.startswith("ReplyEnvelope + data: ") and text.endswith('"success"'), text
    command = page.locator('[data-channel="orderCommands"] tr[data-message="order.create"]')
    await expect(command.locator("td.payload")).to_have_text(
        "CommandEnvelope + payload: CreateOrder"
    )
    start = page.locator('[data-channel="start"] td.payload')
    await expect(start).to_have_text("StartSaga + input: CheckoutInput")
    await shot(page, "contracts")


async def test_a_bad_time_filter_is_shown_at_its_field_and_ages_work(
    stack: Stack, browser: Browser
) -> None:
    dash = await serve(stack)
    saga = await dash.start_checkout(
        f"{stack.prefix}-one", checkout("alice", [(inventory.BOOK, 1)])
    )
    page = await signed_in(browser, dash)
    listed: list[str] = []
    page.on("request", lambda r: listed.append(r.url) if "/api/sagas?" in r.url else None)

    await page.goto(f"{dash.base}/ui/#/sagas")
    await expect(page.locator(f'tr[data-saga="{saga}"]')).to_be_visible()
    await page.fill('#filters input[name="since"]', "yesterday")
    await page.click("#filters button")
    error = page.locator("#filters [data-error-for=since]")
    await expect(error).to_contain_text("yesterday")
    await expect(error).to_contain_text("1w")
    await expect(page.locator('#filters input[name="since"]')).to_have_value("yesterday")
    await expect(page.locator("#filters")).to_be_visible()
    await expect(page.locator("#live")).to_be_hidden()
    await shot(page, "bad-filter")
    asked = len(listed)
    await asyncio.sleep(4.5)  # two refresh periods: a refused filter is not asked again
    assert len(listed) == asked, listed[asked:]

    # an age the CLI takes, kept as typed: the list is the last week's, live
    await page.fill('#filters input[name="since"]', "1w")
    await page.click("#filters button")
    await expect(page.locator(f'tr[data-saga="{saga}"]')).to_be_visible()
    await expect(page.locator("#filters [data-error-for=since]")).to_have_count(0)
    assert "since=1w" in page.url
    await expect(page.locator("#live")).to_be_visible()
    await page.fill('#filters input[name="until"]', "2d")  # created before two days ago: none
    await page.click("#filters button")
    await expect(page.locator("#saga-list")).to_contain_text("no saga matches")


async def test_a_lost_server_marks_the_page_stale_and_it_reconnects(
    stack: Stack, browser: Browser
) -> None:
    dash = await serve(stack)
    saga = await dash.start_checkout(
        f"{stack.prefix}-one", checkout("alice", [(inventory.BOOK, 1)])
    )
    page = await signed_in(browser, dash)
    await page.goto(f"{dash.base}/ui/#/sagas")
    row = page.locator(f'tr[data-saga="{saga}"]')
    await expect(row).to_be_visible()
    await expect(page.locator("#live")).to_have_text("● live")

    dash.orchestrator.popen.send_signal(signal.SIGTERM)
    assert await stack.wait_exit(dash.orchestrator, within=20) == 0
    await expect(page.locator("#live")).to_have_text("● disconnected", timeout=10_000)
    await expect(page.locator("#view")).to_have_attribute("data-stale", "true")
    await expect(row).to_be_visible()  # the last data stays, marked stale
    await expect(page.locator("#view")).not_to_contain_text("Failed to fetch")
    await shot(page, "disconnected")

    dash.restart()  # the same port and database
    await stack.started([dash.orchestrator])
    await expect(page.locator("#live")).to_have_text("● live", timeout=15_000)
    await expect(page.locator("#view")).not_to_have_attribute("data-stale", "true")
    await expect(row).to_be_visible()


async def test_a_phone_wide_screen_scrolls_nothing_sideways_and_the_icon_is_served(
    stack: Stack, browser: Browser
) -> None:
    dash = await serve(stack)
    saga = await dash.start_checkout(
        f"{stack.prefix}-one", checkout("alice", [(inventory.BOOK, 1)])
    )
    failed: list[str] = []
    page = await browser.new_page(viewport={"width": 390, "height": 844})
    page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    await page.goto(f"{dash.base}/ui/")
    await page.fill("#token", dash.token)
    await page.click("#login-submit")
    await expect(page.locator('[data-count="RUNNING"] .n')).to_be_visible()
    pages = {
        "overview": "#/",
        "list": "#/sagas",
        "saga": f"#/saga/{saga}",
        "definitions": "#/definitions",
        "contracts": "#/contracts",
    }
    for name, hash_ in pages.items():
        await page.goto(f"{dash.base}/ui/{hash_}")
        await expect(page.locator("#view h1")).to_be_visible()
        await page.wait_for_load_state("networkidle")
        width = await page.evaluate("document.documentElement.scrollWidth")
        await shot(page, f"narrow-{name}")
        assert width <= 390, f"the {name} page is {width} px wide on a 390 px screen"
    assert failed == [], failed
    # the icon: the one the page names, and /favicon.ico, which browsers ask for by default
    icon = await page.evaluate("document.querySelector('link[rel~=icon]')?.href ?? null")
    assert icon is not None, "the dashboard names no icon, so browsers ask /favicon.ico"
    for url in (icon, f"{dash.base}/favicon.ico"):
        answer = await page.request.get(url)
        assert answer.status == 200, (url, answer.status)
        assert answer.headers["content-type"].startswith("image/"), answer.headers


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


async def test_a_long_retry_run_reads_as_one_row_with_a_pending_card_and_a_gantt(
    stack: Stack, browser: Browser, tmp_path: Path
) -> None:
    """A checkout to Tokyo is turned back, and its refund fails (transiently) on all ten
    attempts of its budget: some thirty history entries that the timeline shows as one row,
    while the pending step's card counts the attempts."""
    key = f"{stack.prefix}-retried"
    retried = str(saga_id(key))
    plan = tmp_path / "faults.json"
    plan.write_text(json.dumps({"faults": [
        {"saga_id": retried, "command_type": "payment.refund", "mode": "transient", "times": 10},
    ]}))  # fmt: skip
    dash = await serve(stack, SERVICES, plan)
    assert (
        await dash.start_checkout(key, checkout("carol", [(inventory.BOOK, 1)], TOKYO)) == retried
    )
    page = await signed_in(browser, dash)
    await page.goto(f"{dash.base}/ui/#/saga/{retried}")

    # while the refund is retried: the card names it, counts its attempts, says what is next
    card = page.locator("#pending")
    await expect(card).to_have_attribute("data-step", "charge_payment", timeout=30_000)
    await expect(card).to_have_attribute("data-direction", "compensation")
    await expect(page.locator("#pending-attempt")).to_have_text(
        re.compile(r"^[3-9] of 10$"), timeout=30_000
    )
    await expect(card).to_contain_text(re.compile("next retry|reply due by"))
    await expect(card).to_contain_text("payment.refund")
    await expect(page.locator("#pending-error")).to_have_text("injected_transient")
    await shot(page, "retry-run-pending")

    # it gives up: stuck, the whole budget used, waiting for an operator who may retry
    await expect(page.locator("h1 .badge")).to_have_text("FAILED", timeout=90_000)
    await expect(page.locator("#pending-attempt")).to_have_text("10 of 10")
    await expect(page.locator("#pending-next")).to_have_text("waits for an operator")
    await expect(page.locator("#pending-actions")).to_have_text("retry, resolve")

    # the ten attempts are one row, closed; it opens to every entry, and closes again
    runs = page.locator("#timeline > li[data-kind=retry_run]")
    await expect(runs).to_have_count(1)
    run = runs.first
    assert (await run.get_attribute("data-step"), await run.get_attribute("data-direction")) == (
        "charge_payment",
        "compensation",
    )
    summary = run.locator(".run-summary")
    await expect(summary).to_contain_text(
        "payment.refund \N{MULTIPLICATION SIGN}10, injected_transient, "
    )
    await expect(summary).to_have_text(re.compile(r" apart$"))
    sent = run.locator(".run-entries > li[data-kind=command_sent]")
    await expect(sent).to_have_count(10)
    await expect(run.locator(".run-entries")).to_be_hidden()
    outside = page.locator(
        "#timeline > li[data-kind=command_sent][data-step=charge_payment]"
        "[data-direction=compensation]"
    )
    await expect(outside).to_have_count(0)
    async with dash.api() as client:
        history = (await client.get(f"/api/sagas/{retried}")).json()["history"]
    rows = await page.locator("#timeline > li").count()
    assert rows <= len(history) - 25, (rows, len(history))
    await run.locator(".run-toggle").click()
    await expect(sent.first).to_be_visible()
    await expect(sent.last).to_be_visible()
    await expect(sent.last).to_contain_text("attempt 10")
    await shot(page, "retry-run-open")
    await run.locator(".run-toggle").click()
    await expect(run.locator(".run-entries")).to_be_hidden()

    # the Gantt: a bar per step and direction that ran; the refund's is last and longest
    bars = page.locator("#gantt [data-bar]")
    actions = page.locator("#gantt [data-bar][data-direction=action]")
    assert await actions.evaluate_all("bs => bs.map(b => b.dataset.step)") == [
        "create_order",
        "charge_payment",
        "reserve_inventory",
        "schedule_shipping",
    ]
    undo = page.locator("#gantt [data-bar][data-direction=compensation]")
    assert sorted(await undo.evaluate_all("bs => bs.map(b => b.dataset.step)")) == [
        "charge_payment",
        "reserve_inventory",
    ]
    shipping = page.locator("#gantt [data-bar][data-step=schedule_shipping]")
    await expect(shipping).to_have_class(re.compile(r"\bfailed\b"))
    refund = page.locator(
        "#gantt [data-bar][data-step=charge_payment][data-direction=compensation]"
    )
    gantt_box, refund_box, shipping_box = [
        await locator.bounding_box() for locator in (page.locator("#gantt"), refund, shipping)
    ]
    assert gantt_box and refund_box and shipping_box
    assert refund_box["x"] > shipping_box["x"]  # the refund ran after shipping failed
    widths = await bars.evaluate_all("bs => bs.map(b => b.getBoundingClientRect().width)")
    assert refund_box["width"] == max(widths) and refund_box["width"] > 0
    for box in await bars.evaluate_all(
        "bs => bs.map(b => { const r = b.getBoundingClientRect(); return [r.left, r.right]; })"
    ):
        assert gantt_box["x"] <= box[0] <= box[1] <= gantt_box["x"] + gantt_box["width"], box
    await shot(page, "retry-run-gantt")

    # on a phone: nothing scrolls sideways, the run opened included
    phone = await signed_in(browser, dash, width=390)
    await phone.goto(f"{dash.base}/ui/#/saga/{retried}")
    await expect(phone.locator("#gantt [data-bar]")).to_have_count(6)
    await phone.locator("#timeline > li[data-kind=retry_run] .run-toggle").click()
    await expect(phone.locator(".run-entries > li[data-kind=command_sent]").last).to_be_visible()
    width = await phone.evaluate("document.documentElement.scrollWidth")
    await shot(phone, "narrow-retry-run")
    assert width <= 390, f"the saga page is {width} px wide on a 390 px screen"


async def test_retry_all_on_the_list_previews_asks_and_reports_each_saga(
    stack: Stack, browser: Browser, tmp_path: Path
) -> None:
    """Two checkouts FAILED (their refund failed as often as its budget allows; the next attempt
    succeeds) and one COMPENSATED:
    "Retry all…" over both statuses shows the three first, changes nothing until confirmed,
    then retries the two FAILED ones and reports the compensated one as skipped."""
    prefix = stack.prefix
    keys = [f"{prefix}-stuck-{n}" for n in range(2)]
    plan = tmp_path / "faults.json"
    plan.write_text(json.dumps({"faults": [
        {"saga_id": str(saga_id(k)), "command_type": "payment.refund", "mode": "transient",
         "times": 10}
        for k in keys
    ]}))  # fmt: skip
    dash = await serve(stack, ("order", "payment", "inventory", "shipping"), plan)
    stuck = [  # Tokyo is not served: each compensates, and its refund gets stuck
        await dash.start_checkout(k, checkout(who, [(inventory.BOOK, 1)], TOKYO))
        for k, who in zip(keys, ("alice", "carol"), strict=True)
    ]
    declined = await dash.start_checkout(
        f"{prefix}-declined", checkout("bob", [(inventory.LAMP, 1)])
    )
    for sid in stuck:
        await dash.wait(sid, "FAILED")
    await dash.wait(declined, "COMPENSATED")
    async with dash.api() as client:
        before = {s: (await client.get(f"/api/sagas/{s}")).json() for s in [*stuck, declined]}

    page = await signed_in(browser, dash)
    await page.goto(f"{dash.base}/ui/#/sagas")
    await expect(page.locator('[data-batch="retry"]')).to_be_disabled()  # no filter: no batch
    await page.goto(f"{dash.base}/ui/#/sagas?status=FAILED&status=COMPENSATED&name=checkout")
    await expect(page.locator(f'tr[data-saga="{declined}"]')).to_be_visible()
    await page.click('[data-batch="retry"]')
    summary = page.locator("#batch-summary")
    await expect(summary).to_have_text("3 sagas match: 2 accept retry, 1 will be skipped")
    await expect(page.locator("#batch-preview tr[data-batch-saga]")).to_have_count(3)
    refused = page.locator(f'#batch-preview tr[data-batch-saga="{declined}"]')
    await expect(refused).to_contain_text("skipped: only a FAILED saga can be retried")
    await expect(page.locator("#batch-submit")).to_have_text("Retry these 3 sagas")
    await shot(page, "batch-preview")
    async with dash.api() as client:  # the preview changed nothing
        for sid, saga in before.items():
            assert (await client.get(f"/api/sagas/{sid}")).json() == saga

    await page.click("#batch-submit")  # no reason yet: the form asks for one, nothing is sent
    await expect(page.locator("#batch-progress")).to_be_hidden()
    await page.fill("#batch-reason", "payment gateway fixed")
    await page.click("#batch-submit")
    count = page.locator("#batch-count")
    await expect(count).to_have_text(
        "finished: 3/3 done (applied 2, skipped 1, failed 0)", timeout=15_000
    )
    result = page.locator(f'#batch-results li[data-batch-result="{declined}"]')
    await expect(result).to_have_attribute("data-outcome", "skipped")
    await expect(result).to_contain_text(
        "only a FAILED saga can be retried; this one is COMPENSATED"
    )
    await expect(page.locator("#batch-results li")).to_have_count(1)
    await shot(page, "batch-result")
    await page.click("#batch-cancel")
    await expect(page.locator("#batch")).to_be_hidden()

    for sid in stuck:
        done = await dash.wait(sid, "COMPENSATED")
        operators = [(h["actor"], h["detail"]) for h in done["history"] if h["kind"] == "operator"]
        assert operators == [("ops-ann", "retry: payment gateway fixed")]
        row = page.locator(f'tr[data-saga="{sid}"] .badge')
        await expect(row).to_have_text("COMPENSATED", timeout=10_000)
    async with dash.api() as client:
        after = (await client.get(f"/api/sagas/{declined}")).json()
    assert after["history"] == before[declined]["history"]


# --- the saga language: parallel groups, conditions, the deadline, the compensation policy --


async def test_parallel_groups_conditions_and_deadlines_are_drawn_and_shown(
    stack: Stack, browser: Browser, tmp_path: Path
) -> None:
    """The fanout saga (tests.support.fanout) on the real orchestrator, its participants the
    scripted responder: one saga waits on both members of its parallel group, its gift step
    skipped; another fails past the group and both members' compensations fail for good, so
    under the continue policy it ends FAILED with two stuck steps."""
    dash = await serve(stack, SAGA_DEFINITIONS="tests.support.fanout:registry")
    responder = Responder(stack.rabbitmq_url, stack.prefix, tmp_path / "responder.jsonl")
    await responder.start()
    try:
        await _language_pages(dash, browser)
    finally:
        await responder.stop()


async def _language_pages(dash: Dashboard, browser: Browser) -> None:
    async with dash.api() as client:

        async def start(key: str, script: dict[str, list[str]]) -> str:
            body = {"name": "fanout", "input": {"script": script}, "key": key}
            answer = await client.post("/api/sagas", json=body)
            assert answer.status_code == 201, answer.text
            return str(answer.json()["saga"]["saga_id"])

        held = await start("held", {"hotel": ["silent"], "flight": ["silent"]})
        stuck = await start(
            "stuck", {"confirm": ["fail"], "hotel~undo": ["fail"], "flight~undo": ["fail"]}
        )
    deadline = time.monotonic() + 60
    while (await dash.wait(held, "RUNNING"))["in_flight"] != ["hotel", "flight"]:
        assert time.monotonic() < deadline, "the group never got both members in flight"
        await asyncio.sleep(0.2)
    failed = await dash.wait(stuck, "FAILED")
    assert failed["stuck_steps"] == ["flight", "hotel"], failed["stuck_steps"]

    page = await signed_in(browser, dash)
    # the definition: the group is one column, its members one above the other between a
    # fork and a join; the conditional step dashed with "if …"; the deadline and the policy
    await page.goto(f"{dash.base}/ui/#/definitions")
    fanout = page.locator('[data-definition="fanout"]')
    svg = fanout.locator("svg")
    await expect(svg.locator("g[data-step]")).to_have_count(5)
    await expect(svg.locator("g[data-member]")).to_have_count(2)
    await expect(svg.locator("[data-fork]")).to_have_count(1)
    await expect(svg.locator("[data-join]")).to_have_count(1)
    boxes = {
        name: await svg.locator(f'g[data-step="{name}"] rect').bounding_box()
        for name in ("reserve", "gift", "hotel", "flight", "confirm")
    }
    x = {name: box["x"] for name, box in boxes.items() if box is not None}
    y = {name: box["y"] for name, box in boxes.items() if box is not None}
    assert x["reserve"] < x["gift"] < x["hotel"] == x["flight"] < x["confirm"], boxes
    assert y["hotel"] != y["flight"], boxes
    conditional = svg.locator('g[data-conditional="true"]')
    await expect(conditional).to_have_count(1)
    await expect(conditional).to_have_attribute("data-step", "gift")
    await expect(conditional).to_contain_text("if …")
    assert await conditional.locator("rect").get_attribute("stroke-dasharray")
    await expect(fanout.locator('[data-fact="deadline"]')).to_contain_text("10 min")
    await expect(fanout.locator('[data-fact="policy"]')).to_contain_text("continue")
    await expect(fanout.locator('tr[data-step-def="hotel"]')).to_contain_text("in parallel")
    await expect(fanout.locator('tr[data-step-def="gift"]')).to_contain_text("if …")
    await shot(page, "language-definition")

    # the saga waiting on its group: both members in flight, the gift skipped, the deadline
    await page.goto(f"{dash.base}/ui/#/saga/{held}")
    card = page.locator("#pending")
    await expect(card.locator("h2")).to_contain_text("hotel")
    await expect(card.locator("h2")).to_contain_text("flight")
    members = card.locator("#in-flight li[data-in-flight]")
    await expect(members).to_have_count(2)
    assert await members.evaluate_all("items => items.map(i => i.dataset.inFlight)") == [
        "hotel",
        "flight",
    ]
    # each member with its own try of its budget and its own reply deadline
    await expect(members.locator("[data-member-attempt]")).to_have_text(["attempt 1 of 1"] * 2)
    await expect(members.locator("[data-member-next]")).to_contain_text(["reply due in"] * 2)
    gift = page.locator('#steps tr[data-step-row="gift"]')
    await expect(gift).to_have_class(re.compile(r"\bskipped\b"))
    await expect(gift).to_contain_text("skipped")
    assert await gift.evaluate("row => getComputedStyle(row.cells[0]).color") != await page.locator(
        '#steps tr[data-step-row="reserve"] td'
    ).first.evaluate("cell => getComputedStyle(cell).color")
    await expect(page.locator('#timeline li[data-kind="step_skipped"]')).to_have_class(
        re.compile(r"\bskipped\b")
    )
    await expect(page.locator('#gantt [data-skipped="gift"]')).to_contain_text("skipped")
    bars = {}
    for name in ("hotel", "flight"):
        bar = page.locator(f'#gantt [data-bar][data-step="{name}"][data-direction="action"]')
        bars[name] = await bar.bounding_box()
    hotel, flight = bars["hotel"], bars["flight"]
    assert hotel is not None and flight is not None
    assert hotel["x"] < flight["x"] + flight["width"] and flight["x"] < hotel["x"] + hotel["width"]
    await expect(page.locator("#expires")).to_be_visible()
    await expect(page.locator("#expires-left")).to_contain_text(re.compile(r"\d min left"))
    await shot(page, "language-in-flight")

    # the saga stuck twice over: every stuck compensation, newest first
    await page.goto(f"{dash.base}/ui/#/saga/{stuck}")
    await expect(page.locator("h1 .badge")).to_have_text("FAILED")
    named = page.locator("#stuck [data-stuck]")
    await expect(named).to_have_count(2)
    assert await named.all_inner_texts() == ["flight", "hotel"]
    stuck_card = page.locator("#pending h2 [data-named]")
    assert await stuck_card.all_inner_texts() == ["flight", "hotel"]
    await shot(page, "language-stuck")

    # and nothing of it scrolls sideways on a phone
    phone = await signed_in(browser, dash, width=390)
    for name, hash_ in {
        "definitions": "#/definitions",
        "held saga": f"#/saga/{held}",
        "stuck saga": f"#/saga/{stuck}",
    }.items():
        await phone.goto(f"{dash.base}/ui/{hash_}")
        await expect(phone.locator("#view h1")).to_be_visible()
        await phone.wait_for_load_state("networkidle")
        width = await phone.evaluate("document.documentElement.scrollWidth")
        await shot(phone, f"language-narrow-{name.replace(' ', '-')}")
        assert width <= 390, f"the {name} page is {width} px wide on a 390 px screen"
