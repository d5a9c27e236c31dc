"""The demo: the orchestrator and the four services in one process, a scripted mix of orders,
live progress, and a summary that shows every saga's path and that money and stock add up.

Run it with ``scripts/demo`` (or ``python -m saga_demo.demo``); ``--database-url`` puts the
orchestrator and the services on PostgreSQL instead of SQLite files, and ``--broker memory``
runs everything on an in-process broker with no RabbitMQ (nothing is durable then).
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import shutil
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import aio_pika

from saga.core.errors import ConfigError
from saga.core.ids import saga_id_for_key
from saga.core.state import HistoryEntry, HistoryKind, SagaState, SagaStatus
from saga.logs import configure_logging
from saga.orchestrator.service import OrchestratorService
from saga.participant import Participant
from saga.participant.faults import InjectedFault
from saga.participant.settings import ParticipantSettings, load_participant_settings
from saga.settings import Settings, load_settings
from saga.telemetry import configure_tracing
from saga.transport.broker import Broker
from saga.transport.memory import MemoryBroker
from saga.transport.topology import Topology
from saga_demo import inventory, order, payment, shipping
from saga_demo.checkout import checkout_input, registry
from saga_demo.contracts.payment import REFUND

__all__ = ["MEMORY_BANNER", "SCENARIOS", "BrokerKind", "Scenario", "main", "run_demo"]

BrokerKind = Literal["rabbitmq", "memory"]

MEMORY_BANNER = "in-memory broker: nothing is durable in this mode; use RabbitMQ for anything real"

HOME = {
    "name": "Ann Smith",
    "street": "Main St 1",
    "city": "Berlin",
    "postal_code": "10115",
    "country": "DE",
}
NOWHERE = {
    "name": "Ann Smith",
    "street": "1 Nowhere Lane",
    "city": "Atlantis",
    "postal_code": "00000",
    "country": "DE",
}


@dataclass(frozen=True)
class Scenario:
    label: str
    customer: str
    items: list[tuple[str, int, Decimal]]
    address: Mapping[str, str]
    expected: SagaStatus
    shipping_down: bool = False  # shipping stops consuming until the saga has timed out


SCENARIOS = [
    Scenario("happy path", "alice", [("BOOK-1", 2, Decimal("19.90"))], HOME, SagaStatus.COMPLETED),
    Scenario(
        "declined payment", "bob", [("LAMP-2", 1, Decimal("45.00"))], HOME, SagaStatus.COMPENSATED
    ),
    Scenario(
        "out of stock", "carol", [("RARE-9", 1, Decimal("30.00"))], HOME, SagaStatus.COMPENSATED
    ),
    Scenario(
        "undeliverable address",
        "alice",
        [("BOOK-1", 1, Decimal("19.90"))],
        NOWHERE,
        SagaStatus.COMPENSATED,
    ),
    Scenario(
        "transient failure, retried",
        "dave",
        [("LAMP-2", 1, Decimal("45.00"))],
        HOME,
        SagaStatus.COMPLETED,
    ),
    Scenario(
        "digital goods, nothing to ship",
        "carol",
        [("EBOOK-4", 2, Decimal("9.90"))],
        HOME,
        SagaStatus.COMPLETED,
    ),
    Scenario(
        "shipping does not answer in time",
        "alice",
        [("LAMP-2", 1, Decimal("45.00"))],
        HOME,
        SagaStatus.COMPENSATED,
        shipping_down=True,
    ),
]


@dataclass
class Outcome:
    scenario: Scenario
    state: SagaState
    history: list[HistoryEntry]

    @property
    def ok(self) -> bool:
        return self.state.status is self.scenario.expected


def path(history: list[HistoryEntry]) -> str:
    """Steps and compensations in the order they ran: ``order > payment FAILED | undo order``.
    The charge and the reservation run in parallel, so they show in the order they answered,
    and a member that answers after its sibling failed shows after the ``|``."""
    parts: list[str] = []
    for h in history:
        step = (h.step or "").split("_")[-1]
        if h.kind is HistoryKind.STEP_SUCCEEDED:
            parts.append(step)
        elif h.kind is HistoryKind.STEP_SKIPPED:
            parts.append(f"{step} skipped")
        elif h.kind is HistoryKind.STEP_COMPENSATED:
            parts.append(f"undo {step}")
        elif h.kind is HistoryKind.COMPENSATION_STARTED:
            parts.append("|")
        elif h.kind is HistoryKind.STEP_FAILED and "retryable" not in h.detail:
            parts.append(f"{step} FAILED")
        elif h.kind is HistoryKind.STEP_FAILED:
            parts.append(f"{step} retry")
        elif h.kind is HistoryKind.STEP_TIMED_OUT:
            parts.append(f"{step} timeout")
    return " > ".join(parts).replace("> | >", "|")


async def _snapshot(services: Mapping[str, Participant]) -> dict[str, dict[str, Any]]:
    return {
        "balances": await payment.snapshot(services["payment"].ledger),
        "stock": await inventory.snapshot(services["inventory"].ledger),
    }


def _expected_after(before: dict[str, dict[str, Any]], outcomes: list[Outcome]) -> dict[str, Any]:
    """Only completed checkouts may move money and stock; compensated ones must leave no trace."""
    balances = dict(before["balances"])
    stock = dict(before["stock"])
    for o in outcomes:
        if o.state.status is SagaStatus.COMPLETED:
            total = sum(qty * price for _, qty, price in o.scenario.items)
            balances[o.scenario.customer] -= total
            for sku, qty, _ in o.scenario.items:
                if sku not in inventory.DIGITAL:  # downloads are not stocked
                    stock[sku] -= qty
    return {"balances": balances, "stock": stock}


async def _wait(service: OrchestratorService, ids: list[uuid.UUID], limit: float) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        states = [await service.orchestrator.get(i) for i in ids]
        if all(s.status.is_terminal for s in states):
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"sagas not terminal after {limit:.0f}s")


async def _until_compensating(service: OrchestratorService, saga_id: uuid.UUID) -> None:
    """Wait until the saga gave up on the silent step and began compensating."""
    while (await service.orchestrator.get(saga_id)).status is SagaStatus.RUNNING:  # noqa: ASYNC110
        await asyncio.sleep(0.1)


async def _progress(
    service: OrchestratorService, labels: dict[uuid.UUID, str], started: float
) -> None:
    """Print a line whenever a saga moves to another step or status."""
    seen: dict[uuid.UUID, tuple[str, str]] = {}
    while True:
        for saga_id, label in list(labels.items()):
            s = await service.orchestrator.get(saga_id)
            where = s.steps[min(s.current, len(s.steps) - 1)].name
            now = (s.status.value, "" if s.status.is_terminal else where)
            if seen.get(saga_id) != now:
                seen[saga_id] = now
                arrow = f" at {now[1]}" if now[1] else ""
                print(f"  {time.monotonic() - started:5.1f}s  {label:<46} {now[0]}{arrow}")
        await asyncio.sleep(0.1)


async def run_demo(
    *,
    data_dir: Path,
    database_url: str | None,
    rabbitmq_url: str = "amqp://guest:guest@127.0.0.1:5672/",
    broker: BrokerKind = "rabbitmq",
    quiet: bool = False,
    admin: tuple[int, str] | None = None,
    hold: Callable[[DemoResult, OrchestratorService, Mapping[str, Participant]], Awaitable[None]]
    | None = None,
) -> DemoResult:
    """Run every scenario; returns (outcomes, before, after, expected after).

    ``broker="memory"``: the orchestrator and the services share one in-process MemoryBroker
    and RabbitMQ is not used at all (``rabbitmq_url`` is ignored); nothing is durable then.
    ``admin`` (port, token) serves the admin API and dashboard; ``hold`` runs with the result
    while everything still runs (``--serve`` waits there for Ctrl-C).
    """
    if broker not in ("rabbitmq", "memory"):
        raise ConfigError(f"--broker {broker!r}: use rabbitmq or memory")
    if database_url is None:
        await asyncio.to_thread(_fresh_dir, data_dir)
    prefix = f"demo-{uuid.uuid4().hex[:6]}"
    orch_settings, svc_settings = _settings(prefix, data_dir, database_url, rabbitmq_url, admin)
    shared: Broker | None = MemoryBroker() if broker == "memory" else None
    orchestrator = OrchestratorService(orch_settings, registry(), broker=shared)
    services = {
        m.__name__.split(".")[-1]: m.build(svc_settings)
        for m in (order, payment, inventory, shipping)
    }
    for s in services.values():
        s.broker = shared  # None: each connects to RabbitMQ on start
    labels: dict[uuid.UUID, str] = {}
    progress: asyncio.Task[None] | None = None
    try:
        await orchestrator.start()
        for s in services.values():
            await s.start()
        before = await _snapshot(services)
        started = time.monotonic()
        if not quiet:
            progress = asyncio.create_task(_progress(orchestrator, labels, started))

        async def launch(n: int, sc: Scenario) -> uuid.UUID:
            customer = payment.CUSTOMERS[sc.customer]
            state = await orchestrator.start_saga(
                "checkout", checkout_input(customer, sc.items, sc.address), key=f"{prefix}-{n}"
            )
            labels[state.saga_id] = f"#{n} {sc.label} ({sc.customer})"
            return state.saga_id

        first = [(n, sc) for n, sc in enumerate(SCENARIOS, 1) if not sc.shipping_down]
        ids = {n: await launch(n, sc) for n, sc in first}
        await _wait(orchestrator, list(ids.values()), 60)
        for n, sc in enumerate(SCENARIOS, 1):
            if sc.shipping_down:
                await services["shipping"].pause()
                ids[n] = await launch(n, sc)
                await _until_compensating(orchestrator, ids[n])
                await services["shipping"].resume()
                await _wait(orchestrator, [ids[n]], 90)
        outcomes = [
            Outcome(
                SCENARIOS[n - 1],
                await orchestrator.orchestrator.get(saga_id),
                await orchestrator.orchestrator.history(saga_id),
            )
            for n, saga_id in sorted(ids.items())
        ]
        after = await _snapshot(services)
        result = outcomes, before, after, _expected_after(before, outcomes)
        if progress is not None:
            progress.cancel()
        if hold is not None:
            await hold(result, orchestrator, services)
        return result
    finally:
        if progress is not None:
            progress.cancel()
        await _teardown(orchestrator, services, shared, database_url, rabbitmq_url, prefix)


async def _teardown(
    orchestrator: OrchestratorService,
    services: Mapping[str, Participant],
    shared: Broker | None,
    database_url: str | None,
    rabbitmq_url: str,
    prefix: str,
) -> None:
    """Stop everything; a PostgreSQL run drops its schemas, a RabbitMQ run its queues."""
    for s in services.values():
        await s.stop()
        if database_url is not None:  # each run's service schemas are its own
            await s.ledger.drop()
            await s.ledger.close()
    await orchestrator.stop()
    if shared is not None:
        await shared.close()
    else:
        await _delete_topology(rabbitmq_url, Topology(prefix=prefix), list(services))


async def stuck_checkout(
    orchestrator: OrchestratorService, services: Mapping[str, Participant], key: str
) -> uuid.UUID:
    """A checkout that cannot be delivered and whose refund then keeps failing (the payment
    gateway "is down" for 10 attempts, the compensation's whole budget): it ends FAILED, stuck
    at charge_payment, for an operator to retry once the gateway "is back" (the 11th attempt
    succeeds)."""
    saga_id = saga_id_for_key("checkout", key)
    services["payment"].faults[(saga_id, REFUND)] = InjectedFault("transient", 10)
    customer = payment.CUSTOMERS["carol"]
    await orchestrator.start_saga(
        "checkout",
        checkout_input(customer, [(inventory.BOOK, 1, Decimal("19.90"))], NOWHERE),
        key=key,
    )
    await _wait(orchestrator, [saga_id], 120)
    return saga_id


def _settings(
    prefix: str,
    data_dir: Path,
    database_url: str | None,
    rabbitmq_url: str,
    admin: tuple[int, str] | None,
) -> tuple[Settings, ParticipantSettings]:
    """The demo's settings: short timers and polls, so its seven stories take seconds."""
    orch_settings = load_settings(
        database_url=database_url or f"sqlite+aiosqlite:///{data_dir / 'saga.db'}",
        rabbitmq_url=rabbitmq_url,
        prefix=prefix,
        auto_migrate=True,
        timer_interval=0.05,
        timer_grace=0.2,
        relay_poll_interval=0.5,
        **({"admin_port": admin[0], "admin_token": admin[1]} if admin else {}),
    )
    svc_settings = load_participant_settings(
        rabbitmq_url=rabbitmq_url,
        prefix=prefix,
        data_dir=data_dir,
        services_database_url=database_url,
        relay_poll_interval=0.5,
    )
    return orch_settings, svc_settings


DemoResult = tuple[list["Outcome"], dict[str, Any], dict[str, Any], dict[str, Any]]


def _fresh_dir(path: Path) -> None:
    """Each demo starts from the seed data, so before/after numbers mean something."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)


async def _delete_topology(url: str, topology: Topology, participants: list[str]) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        for q in topology.queues(participants):
            await channel.queue_delete(q.name)
        for e in topology.exchanges():
            await channel.exchange_delete(e.name)


def _banner(text: str) -> str:
    rule = "!" * (len(text) + 8)
    return f"{rule}\n!!  {text}  !!\n{rule}"


def render(
    outcomes: list[Outcome], before: dict[str, Any], after: dict[str, Any], expected: dict[str, Any]
) -> str:
    lines = [
        "",
        f"{'#':<3}{'scenario':<34}{'expected':<13}{'result':<13}steps, then | compensations",
    ]
    for n, o in enumerate(outcomes, 1):
        mark = "ok" if o.ok else "WRONG"
        lines.append(
            f"{n:<3}{o.scenario.label:<34}{o.scenario.expected.value:<13}"
            f"{o.state.status.value + ' ' + mark:<16}{path(o.history)}"
        )
    lines.append("")
    lines.append(f"{'':<3}{'account / sku':<20}{'before':>10}{'after':>10}{'expected':>10}")
    for kind in ("balances", "stock"):
        for key in sorted(before[kind]):
            b, a, e = before[kind][key], after[kind][key], expected[kind][key]
            flag = "" if a == e else "  <-- drift"
            lines.append(f"{'':<3}{key:<20}{b!s:>10}{a!s:>10}{e!s:>10}{flag}")
    good = all(o.ok for o in outcomes) and after == expected
    lines.append("")
    lines.append(
        "every saga reached its expected state; money and stock are conserved"
        if good
        else "MISMATCH: see above"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="saga-demo", description=__doc__)
    parser.add_argument("--data-dir", type=Path, default=Path("demo-data"))
    parser.add_argument(
        "--database-url", default=None, help="postgresql+asyncpg://... (default: SQLite files)"
    )
    parser.add_argument("--rabbitmq-url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument(
        "--broker",
        choices=["rabbitmq", "memory"],
        default="rabbitmq",
        help="memory: an in-process broker, no RabbitMQ needed; nothing is durable",
    )
    parser.add_argument(
        "--serve",
        action="store_true",
        help="keep running after the scenarios, with the dashboard and admin API, until Ctrl-C",
    )
    parser.add_argument("--admin-port", type=int, default=8080, help="with --serve (8080)")
    args = parser.parse_args(argv)
    configure_logging("WARNING")
    try:
        provider = configure_tracing("saga-demo")  # OTEL_TRACES_EXPORTER=otlp: see the traces
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.broker == "memory":
        print("saga demo: orchestrator + order, payment, inventory, shipping in one process")
        print(_banner(MEMORY_BANNER))
    else:
        print("saga demo: orchestrator + order, payment, inventory, shipping over RabbitMQ")
    token = secrets.token_hex(16)
    printed = False

    async def hold(
        result: DemoResult, orchestrator: OrchestratorService, services: Mapping[str, Participant]
    ) -> None:
        """--serve: show the summary, add a stuck saga to fix, keep everything up."""
        nonlocal printed
        print(render(*result))
        printed = True
        url = f"http://127.0.0.1:{args.admin_port}"
        print(f"\nDashboard: {url}/  (token {token})", flush=True)
        print("Preparing one more checkout whose refund keeps failing (about 40 s)...", flush=True)
        stuck = await stuck_checkout(orchestrator, services, f"stuck-{uuid.uuid4().hex[:8]}")
        state = await orchestrator.orchestrator.get(stuck)
        print(
            f"Saga {stuck} is {state.status.value}: {state.failure}\n"
            "The gateway is back now: retry it from its page in the dashboard, or with\n"
            f"  export SAGA_ADMIN_URL={url} SAGA_ADMIN_TOKEN={token}\n"
            f'  .venv/bin/saga retry {stuck} --reason "gateway is back"\n'
            "and it ends COMPENSATED. Ctrl-C stops everything.",
            flush=True,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()

    try:
        outcomes, before, after, expected = asyncio.run(
            run_demo(
                data_dir=args.data_dir,
                database_url=args.database_url,
                rabbitmq_url=args.rabbitmq_url,
                broker=args.broker,
                admin=(args.admin_port, token) if args.serve else None,
                hold=hold if args.serve else None,
            )
        )
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        provider.shutdown()
    if not printed:
        print(render(outcomes, before, after, expected))
    if args.broker == "memory":
        print(_banner(MEMORY_BANNER))
    elif not args.serve:
        print("scripts/demo --serve keeps it running: browse these sagas in the dashboard.")
    return 0 if all(o.ok for o in outcomes) and after == expected else 1


if __name__ == "__main__":
    sys.exit(main())
