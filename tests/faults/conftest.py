"""Fixtures and helpers of the fault-matrix tests: the real stack, with the broker misbehaving.

Every test runs the orchestrator and the four demo services as processes (``saga run``,
``saga-service NAME``) on a private prefix and data directory, reusing the end-to-end tests'
:class:`~tests.e2e.stack.Stack`. The broker is either a private node the test may kill
(:class:`~saga_tools.chaos.node.RabbitNode`, thrown away at teardown) or the shared broker behind
a :class:`~saga_tools.chaos.proxy.TcpProxy` that the test makes slow, silent or rude. The test
itself (publishing starts, reading queue depths, teardown) always talks to the broker directly,
so only the stack's own connections suffer the fault.

Outcomes are checked with :mod:`saga_tools.chaos.model`: each checkout ends as its input implies,
every service's ledger holds exactly the expected commands once, and balances and stock moved by
the completed checkouts only.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from uuid import UUID, uuid5

import pytest

from saga import Registry
from saga.core.state import HistoryKind
from saga_demo import inventory, payment
from saga_demo.checkout import CHECKOUT, PARTICIPANTS
from saga_demo.demo import HOME, NOWHERE
from saga_tools.chaos.model import Run, World, check_run, conserved, contended, predict
from saga_tools.chaos.node import NodeError, RabbitNode
from saga_tools.chaos.proxy import TcpProxy
from tests.conftest import RABBITMQ_URL, require_rabbitmq
from tests.crash.helpers import Proc
from tests.e2e.stack import (
    BIN,
    PARIS,
    PLENTY,
    RICH,
    SERVICES,
    SLOWTOWN,
    TOKYO,
    Group,
    Stack,
    checkout,
    delete_topology,
    leftover_queues,
)

BOOK, LAMP, RARE, EBOOK = inventory.BOOK, inventory.LAMP, inventory.RARE, inventory.EBOOK
#: balances and stock large enough that no mix below depends on the order sagas run in
BALANCES = {"alice": RICH, "carol": RICH, "dave": RICH}  # bob keeps his 20.00
STOCK = {BOOK: PLENTY, LAMP: PLENTY}


# --- a checkout that waits out a broker restart ----------------------------------------

#: How long each command of the patient checkout may wait for its reply. A broker killed and
#: restarted is away for ~10 s here (boot ~6 s on two busy cores, then the clients' reconnect
#: interval), longer than the demo's 3 s x 3 attempts: with those, every saga waiting on a
#: reply at the kill would time out and compensate, which is correct but not what the broker
#: tests are about (nothing lost, nothing applied twice). Three minutes, not one: on a machine
#: shared with other work, a cluster's quorum queues starved of CPU once held replies back for
#: over a minute after the kill, with nothing lost. A message truly lost still times out well
#: within the tests' wait for the sagas to end, and fails them.
PATIENCE = timedelta(minutes=3)

#: The demo checkout with :data:`PATIENCE` as every step's timeout; same name, version,
#: steps, parallel group and conditions otherwise.
PATIENT_CHECKOUT = replace(
    CHECKOUT, steps=tuple(replace(s, timeout=PATIENCE) for s in CHECKOUT.steps)
)


def patient_registry() -> Registry:
    """``SAGA_DEFINITIONS=tests.faults.conftest:patient_registry``."""
    return Registry([PATIENT_CHECKOUT], participants=PARTICIPANTS)


# --- the workload ----------------------------------------------------------------------


def mixed_checkouts(count: int, seed: int) -> list[dict[str, Any]]:
    """``count`` checkouts covering every outcome the rules allow (each kind at least once,
    then mostly successes), none of which depends on the order they run in."""
    rng = random.Random(seed)

    def ok() -> dict[str, Any]:
        who = rng.choice(["alice", "carol", "dave"])
        if who == "carol":  # per-charge limit 50
            return checkout(who, rng.choice([[(BOOK, 2)], [(LAMP, 1)]]), rng.choice([HOME, PARIS]))
        lines = [(BOOK, rng.randint(1, 3)), (LAMP, rng.randint(1, 3))][: rng.randint(1, 2)]
        return checkout(who, lines, rng.choice([HOME, PARIS]))

    kinds: list[tuple[Callable[[], dict[str, Any]], int]] = [
        (ok, 12),
        (lambda: checkout("alice", [(LAMP, 7)]), 1),  # over alice's limit of 300
        (lambda: checkout("bob", rng.choice([[(LAMP, 1)], [(BOOK, 2)]])), 2),  # balance 20
        (lambda: checkout("dave", [(BOOK, 1), (RARE, 1)]), 1),  # RARE-9 is sold out
        (lambda: checkout("alice", [(BOOK, 1)], NOWHERE), 1),
        (lambda: checkout("dave", [(LAMP, 1)], TOKYO), 1),
        (lambda: checkout("carol", [(BOOK, 1)], SLOWTOWN), 1),
        (lambda: checkout(uuid5(payment.CUSTOMERS["alice"], str(rng.random())), [(BOOK, 1)]), 1),
        (lambda: checkout("alice", [(BOOK, 1)], currency="USD"), 1),
        (lambda: checkout("carol", [(EBOOK, 2)], NOWHERE), 1),  # digital: never shipped
    ]
    makers = [make for make, weight in kinds for _ in range(weight)]
    mix = [make() for make, _ in kinds]
    mix += [rng.choice(makers)() for _ in range(count - len(mix))]
    rng.shuffle(mix)
    return mix


def world() -> World:
    return World.seeded().with_balances(BALANCES).with_stock(STOCK)


async def prepare(stack: Stack) -> None:
    """Seed the payment and inventory databases with the balances and stock of :func:`world`."""
    await stack.prepare(balances=BALANCES, on_hand=STOCK)


async def assert_outcomes(
    stack: Stack,
    checkouts: Mapping[UUID, dict[str, Any]],
    before: Mapping[str, Mapping[str, Any]],
    what: str,
    explain: Callable[[Run], str] | None = None,
) -> Run:
    """Each saga as predicted, every ledger exact, money and stock conserved; the run read.
    ``explain`` adds what the test knows of the run to a failure's message."""
    ids = list(checkouts)
    run = Run(
        checkouts=checkouts,
        states=await stack.states(ids),
        histories=await stack.histories(ids),
        rows=await stack.processed(),
    )
    after = await stack.snapshot()
    w = world()
    assert contended(w, checkouts.values()) == [], "the mix's outcomes would depend on ordering"
    expected = {i: predict(w, c) for i, c in checkouts.items()}
    problems = check_run(run, expected) + conserved(checkouts, run.states, before, after)
    if problems:
        extra = "" if explain is None else "\n" + explain(run)
        stack.fail(f"{len(problems)} problems {what}:\n" + "\n".join(problems[:40]) + extra)
    return run


async def unfinished(stack: Stack, ids: list[UUID]) -> int:
    """How many of ``ids`` are not terminal yet (not started counts): a fault injected while
    this is 0 would hit an idle stack."""
    states = await stack.states(ids)
    return sum(1 for i in ids if i not in states or not states[i].status.is_terminal)


def summary(run: Run) -> str:
    """Statuses, step timeouts and ignored (duplicate or late) messages of a run."""
    status = Counter(s.status.value for s in run.states.values())
    kinds = Counter(e.kind for h in run.histories.values() for e in h)
    return (
        f"{dict(sorted(status.items()))}; {kinds[HistoryKind.STEP_TIMED_OUT]} step timeouts, "
        f"{kinds[HistoryKind.IGNORED]} duplicate or late messages ignored, "
        f"{len(run.rows)} ledger rows"
    )


# --- starting the stack ----------------------------------------------------------------


async def start_stack(
    stack: Stack,
    url_of: Callable[[str], str],
    *,
    definitions: str = "saga_demo.checkout:registry",
    instances: int = 1,
    **extra: str,
) -> dict[str, Proc]:
    """The orchestrator (``instances`` of it, on PostgreSQL, named ``orchestrator-N``, after one
    ``saga migrate``) and the four services, each connecting to ``url_of(component)``
    (``orchestrator`` or a service name); returns once each logged that it is up."""
    stack.data_dir.mkdir(parents=True, exist_ok=True)
    env = stack.orchestrator_env(
        SAGA_RABBITMQ_URL=url_of("orchestrator"), SAGA_DEFINITIONS=definitions, **extra
    )
    if instances == 1:
        procs = {
            "orchestrator": stack.processes.spawn("orchestrator", ["saga", "run", "--migrate"], env)
        }
    else:
        assert stack.postgres_url is not None, "several instances need PostgreSQL"
        migrate = await asyncio.to_thread(
            subprocess.run,
            [str(BIN / "saga"), "migrate"],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert migrate.returncode == 0, migrate.stderr
        procs = {
            f"orchestrator-{n}": stack.processes.spawn(
                f"orchestrator-{n}",
                ["saga", "run"],
                {**env, "OTEL_SERVICE_NAME": f"orchestrator-{n}"},
            )
            for n in range(1, instances + 1)
        }
    for service in SERVICES:
        env = stack.service_env(SAGA_RABBITMQ_URL=url_of(service), **extra)
        procs[service] = stack.processes.spawn(service, ["saga-service", service], env)
    await stack.started(procs.values())
    return procs


async def _stop(stack: Stack) -> None:
    # in a thread: a proxy in this loop must keep forwarding while the processes drain
    await asyncio.to_thread(stack.processes.stop_all)


# --- fixtures --------------------------------------------------------------------------


@pytest.fixture
async def node(unique: str) -> AsyncIterator[RabbitNode]:
    """A private RabbitMQ node, started; killed and deleted at teardown."""
    rabbit = RabbitNode(f"faults-{unique}")
    try:
        await asyncio.to_thread(rabbit.start)
    except NodeError as exc:
        await asyncio.to_thread(rabbit.close)
        pytest.fail(str(exc), pytrace=False)
    try:
        yield rabbit
    finally:
        await asyncio.to_thread(rabbit.close)


@pytest.fixture
async def node_stack(node: RabbitNode, tmp_path: Path, unique: str) -> AsyncIterator[Stack]:
    """A stack (not started) on the private node; the node goes away with its queues."""
    stack = Stack(
        rabbitmq_url=node.url,
        prefix=f"faults-{unique}",
        directory=tmp_path,
        processes=Group(tmp_path),
    )
    try:
        yield stack
    finally:
        await _stop(stack)


@pytest.fixture
async def proxy() -> AsyncIterator[TcpProxy]:
    """A TCP proxy in front of the shared broker (which nothing here stops)."""
    require_rabbitmq()
    upstream = urlsplit(RABBITMQ_URL)
    tcp = TcpProxy(upstream.hostname or "127.0.0.1", upstream.port or 5672)
    await tcp.start()
    try:
        yield tcp
    finally:
        await tcp.close()


@pytest.fixture
async def proxied_stack(proxy: TcpProxy, tmp_path: Path, unique: str) -> AsyncIterator[Stack]:
    """A stack (not started) on the shared broker, on a private prefix; the test talks to the
    broker directly (``stack.rabbitmq_url``), the processes through ``proxy``. Teardown kills
    the processes, then deletes the prefix's queues and exchanges and checks none is left."""
    url = require_rabbitmq()
    stack = Stack(
        rabbitmq_url=url,
        prefix=f"faults-{unique}",
        directory=tmp_path,
        processes=Group(tmp_path),
    )
    try:
        yield stack
    finally:
        try:
            proxy.blackhole = False
            proxy.latency = 0.0
            await _stop(stack)
        finally:
            await delete_topology(url, stack.prefix)
            left = await leftover_queues(url, stack.prefix)
            assert not left, f"queues left behind: {left}"
