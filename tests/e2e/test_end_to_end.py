"""The checkout saga end to end: the orchestrator and the four demo services as real processes.

Each test starts ``saga run --migrate`` and ``saga-service order|payment|inventory|shipping``
(one process each, SQLite files in the test's directory, a private prefix), drives checkouts
through the start queue and then reads the orchestrator's database and the services' ledgers:

* a failure at each step compensates exactly the steps that ran, newest first, in the services'
  own ledgers: a failure in either branch of the parallel group (the charge, the reservation)
  undoes the other branch and the order; a checkout of digital goods alone skips the
  reservation and the shipping; a transient failure is retried; money and stock move only for
  completed checkouts;
* 200 mixed checkouts at once each end as their input implies;
* a service SIGKILLed after committing an effect and before replying, then restarted, applies
  nothing twice.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Mapping
from decimal import Decimal
from typing import Any
from uuid import UUID, uuid5

import pytest

from saga.core.state import HistoryKind, SagaState, SagaStatus
from saga.faults import POINTS
from saga_demo import inventory, order, payment, shipping
from saga_demo.cli import SAMPLE_PRICES
from saga_demo.demo import HOME, NOWHERE
from saga_tools.chaos.model import (
    COMMANDS,
    INVENTORY,
    PAYMENT,
    SHIPPING,
    Expectation,
    Run,
    World,
    check_run,
    conserved,
    contended,
    in_trace_order,
    predict,
)
from tests.e2e.stack import (
    PARIS,
    PLENTY,
    RICH,
    SERVICES,
    SLOWTOWN,
    TOKYO,
    Stack,
    checkout,
    submit,
)

pytestmark = pytest.mark.rabbitmq

FAULT = "participant_after_commit_before_reply"
assert FAULT in POINTS

BOOK, LAMP, RARE, EBOOK = inventory.BOOK, inventory.LAMP, inventory.RARE, inventory.EBOOK
COMMAND_TYPE = {where: command for command, where in COMMANDS.items()}


async def _read_run(stack: Stack, checkouts: dict[UUID, dict[str, Any]]) -> Run:
    ids = list(checkouts)
    return Run(
        checkouts=checkouts,
        states=await stack.states(ids),
        histories=await stack.histories(ids),
        rows=await stack.processed(),
    )


def _assert_no_problems(stack: Stack, what: str, problems: list[str]) -> None:
    if problems:
        stack.fail(f"{len(problems)} problems {what}:\n" + "\n".join(problems[:40]))


def _stats(run: Run) -> str:
    kinds = Counter(e.kind for h in run.histories.values() for e in h)
    status = Counter(s.status.value for s in run.states.values())
    timeouts = Counter(
        (i, e.step)
        for i, h in run.histories.items()
        for e in h
        if e.kind is HistoryKind.STEP_TIMED_OUT
    )
    return (
        f"{dict(sorted(status.items()))}; {kinds[HistoryKind.STEP_TIMED_OUT]} step timeouts "
        f"(at most {max(timeouts.values(), default=0)} of one step), "
        f"{kinds[HistoryKind.IGNORED]} ignored duplicate/late messages, "
        f"{len(run.rows)} ledger rows"
    )


# --- a failure at each step --------------------------------------------------------------

#: label -> (checkout, final status, failing step, reason, every final reply in the ledgers).
#: The charge and the reservation run in parallel, so they are listed in step order and a
#: ledger's rows of the two are compared in that order (``in_trace_order``).
STEP_FAILURES: dict[str, tuple[dict[str, Any], SagaStatus, str | None, str | None, list[str]]] = {
    "happy path": (
        checkout("alice", [(BOOK, 2)]),
        SagaStatus.COMPLETED,
        None,
        None,
        ["order.create", "payment.charge", "inventory.reserve", "shipping.schedule"],
    ),
    "declined payment": (  # the lamp reserved beside it is released
        checkout("bob", [(LAMP, 1)]),
        SagaStatus.COMPENSATED,
        PAYMENT,
        "insufficient_funds",
        [
            "order.create",
            "payment.charge:insufficient_funds",
            "inventory.reserve",
            "inventory.release",
            "order.cancel",
        ],
    ),
    "out of stock": (  # the payment charged beside it is refunded
        checkout("carol", [(RARE, 1)]),
        SagaStatus.COMPENSATED,
        INVENTORY,
        "out_of_stock",
        [
            "order.create",
            "payment.charge",
            "inventory.reserve:out_of_stock",
            "payment.refund",
            "order.cancel",
        ],
    ),
    "undeliverable address": (
        checkout("alice", [(BOOK, 1)], NOWHERE),
        SagaStatus.COMPENSATED,
        SHIPPING,
        "undeliverable_address",
        [
            "order.create",
            "payment.charge",
            "inventory.reserve",
            "shipping.schedule:undeliverable_address",
            "inventory.release",
            "payment.refund",
            "order.cancel",
        ],
    ),
    "transient failure, retried": (
        checkout("dave", [(LAMP, 1)]),
        SagaStatus.COMPLETED,
        None,
        None,
        ["order.create", "payment.charge", "inventory.reserve", "shipping.schedule"],
    ),
    "digital goods only": (  # never reserved nor shipped, whatever the address
        checkout("carol", [(EBOOK, 2)], NOWHERE),
        SagaStatus.COMPLETED,
        None,
        None,
        ["order.create", "payment.charge"],
    ),
    "digital goods, declined": (
        checkout("bob", [(EBOOK, 3)]),
        SagaStatus.COMPENSATED,
        PAYMENT,
        "insufficient_funds",
        ["order.create", "payment.charge:insufficient_funds", "order.cancel"],
    ),
    "physical and digital goods": (  # only the book is reserved and shipped
        checkout("alice", [(BOOK, 1), (EBOOK, 1)]),
        SagaStatus.COMPLETED,
        None,
        None,
        ["order.create", "payment.charge", "inventory.reserve", "shipping.schedule"],
    ),
}


async def test_a_failure_at_each_step_compensates_in_reverse(stack: Stack) -> None:
    procs = await stack.start()
    before = await stack.snapshot()
    labels = list(STEP_FAILURES)
    checkouts = await submit(stack, [STEP_FAILURES[label][0] for label in labels])
    ids = list(checkouts)
    await stack.wait_terminal(ids, 60, watch=list(procs.values()))
    await stack.wait_quiet()
    run = await _read_run(stack, checkouts)
    after = await stack.snapshot()

    # the hand-written expectations, and the model's reading of the same inputs, agree
    world = World.seeded()
    expected = {i: predict(world, c) for i, c in checkouts.items()}
    for label, i in zip(labels, ids, strict=True):
        _, status, step, reason, trace = STEP_FAILURES[label]
        assert (expected[i].status, expected[i].failed_step, expected[i].reason) == (
            status,
            step,
            reason,
        ), label
        rows = [(*COMMANDS[r["command_type"]], r["outcome"], r["reason"]) for r in run.rows]
        ledger = [
            COMMAND_TYPE[(step, direction)] + (f":{why}" if outcome == "failure" else "")
            for step, direction, outcome, why in in_trace_order(
                [row for row, r in zip(rows, run.rows, strict=True) if r["saga_id"] == i]
            )
        ]
        assert ledger == trace, f"{label}: ledgers by processed_at {ledger}, expected {trace}"

    _assert_no_problems(stack, "in the sagas and ledgers", check_run(run, expected))
    _assert_no_problems(
        stack, "in money and stock", conserved(checkouts, run.states, before, after)
    )
    flaky = ids[labels.index("transient failure, retried")]
    first_attempt = [  # dave's card gateway fails the first attempt: retried, then charged
        e.kind
        for e in run.histories[flaky]
        if e.step == PAYMENT
        and e.attempt == 1
        and e.kind in (HistoryKind.STEP_FAILED, HistoryKind.STEP_TIMED_OUT)
    ]
    assert first_attempt in ([HistoryKind.STEP_FAILED], [HistoryKind.STEP_TIMED_OUT]), first_attempt
    failures = [e.detail for e in run.histories[flaky] if e.kind is HistoryKind.STEP_FAILED]
    assert failures in ([], ["charge_payment failed: gateway_timeout (retryable)"]), failures
    charged_at = [
        e.attempt
        for e in run.histories[flaky]
        if e.kind is HistoryKind.STEP_SUCCEEDED and e.step == PAYMENT
    ]
    assert charged_at == [2], charged_at
    charges = [
        r for r in run.rows if r["saga_id"] == flaky and r["command_type"] == "payment.charge"
    ]
    assert len(charges) == 1 and charges[0]["outcome"] == "success", charges
    # before -> after, in the services' own words: alice paid 3 books and an e-book, dave one
    # lamp, carol two e-books; the e-books took no stock
    assert after["balances"] == {
        **before["balances"],
        "alice": before["balances"]["alice"] - 3 * SAMPLE_PRICES[BOOK] - SAMPLE_PRICES[EBOOK],
        "carol": before["balances"]["carol"] - 2 * SAMPLE_PRICES[EBOOK],
        "dave": before["balances"]["dave"] - SAMPLE_PRICES[LAMP],
    }
    assert after["stock"] == {
        **before["stock"],
        BOOK: before["stock"][BOOK] - 3,
        LAMP: before["stock"][LAMP] - 1,
    }
    await _each_effect_and_compensation_once(stack, dict(zip(labels, ids, strict=True)))


async def _each_effect_and_compensation_once(stack: Stack, by_label: dict[str, UUID]) -> None:
    """The services' own tables: one record per order, in the state its story left it, so each
    effect and each compensation happened once; and the conditional steps sent nothing."""
    records = {
        name: {r["order_ref"]: r for r in await stack.rows(name, table)}
        for name, table in (
            ("order", order.orders),
            ("payment", payment.payments),
            ("inventory", inventory.reservations),
            ("shipping", shipping.shipments),
        )
    }

    def status(service: str, label: str) -> str | None:
        record = records[service].get(by_label[label])
        return None if record is None else str(record["status"])

    want = {  # label -> (order, payment, reservation, shipment); None: no record at all
        "happy path": ("CREATED", "CHARGED", "RESERVED", "SCHEDULED"),
        "declined payment": ("CANCELLED", None, "RELEASED", None),
        "out of stock": ("CANCELLED", "REFUNDED", None, None),
        "undeliverable address": ("CANCELLED", "REFUNDED", "RELEASED", None),
        "digital goods only": ("CREATED", "CHARGED", None, None),
        "digital goods, declined": ("CANCELLED", None, None, None),
        "physical and digital goods": ("CREATED", "CHARGED", "RESERVED", "SCHEDULED"),
    }
    found = {
        label: tuple(status(s, label) for s in ("order", "payment", "inventory", "shipping"))
        for label in want
    }
    assert found == want
    mixed = records["inventory"][by_label["physical and digital goods"]]
    assert [line["sku"] for line in mixed["items"]] == [BOOK]  # the e-book was not reserved
    processed = Counter(
        (r["saga_id"], r["command_type"]) for r in await stack.processed() if r["saga_id"]
    )
    assert all(n == 1 for n in processed.values()), processed  # each command applied once
    digital = {by_label["digital goods only"], by_label["digital goods, declined"]}
    services = {command.split(".")[0] for saga_id, command in processed if saga_id in digital}
    assert services == {"order", "payment"}  # nothing was sent to inventory or shipping


# --- 200 mixed checkouts at once ---------------------------------------------------------


def _mix(count: int, seed: int) -> list[dict[str, Any]]:
    """Every outcome the rules allow, on balances and stock large enough that the order the
    checkouts run in cannot change any of them (checked by ``contended``)."""
    rng = random.Random(seed)

    def ok() -> dict[str, Any]:
        who = rng.choice(["alice", "carol", "dave"])
        if who == "carol":  # per-charge limit 50
            lines = rng.choice([[(BOOK, 2)], [(LAMP, 1)], [(BOOK, 1)]])
        else:
            lines = [(BOOK, rng.randint(1, 3)), (LAMP, rng.randint(1, 3))][: rng.randint(1, 2)]
        return checkout(who, lines, rng.choice([HOME, PARIS]))

    kinds = [
        (ok, 10),
        (lambda: checkout("alice", [(LAMP, 7)]), 1),  # 315.00 > the limit of 300
        (lambda: checkout("carol", [(BOOK, 3)]), 1),  # 59.70 > the limit of 50
        (lambda: checkout("bob", rng.choice([[(LAMP, 1)], [(BOOK, 2)]])), 2),  # balance 20
        (lambda: checkout("dave", [(BOOK, 1), (RARE, 1)]), 1),  # RARE-9 is sold out
        (lambda: checkout("alice", [(RARE, 1)]), 1),
        (lambda: checkout("alice", [(BOOK, 1)], NOWHERE), 1),
        (lambda: checkout("dave", [(LAMP, 1)], TOKYO), 1),
        (lambda: checkout("carol", [(BOOK, 1)], SLOWTOWN), 1),
        (lambda: checkout(uuid5(payment.CUSTOMERS["alice"], str(rng.random())), [(BOOK, 1)]), 1),
        (lambda: checkout("alice", [(BOOK, 1)], currency="USD"), 1),
        # digital goods: never reserved nor shipped, so the address does not matter
        (lambda: checkout(rng.choice(["alice", "dave"]), [(EBOOK, 2)], NOWHERE), 1),
        (lambda: checkout("carol", [(BOOK, 1), (EBOOK, 1)], PARIS), 1),
    ]
    makers = [make for make, weight in kinds for _ in range(weight)]
    checkouts = [make() for make, _ in kinds]  # each kind at least once
    checkouts += [rng.choice(makers)() for _ in range(count - len(checkouts))]
    rng.shuffle(checkouts)
    return checkouts


async def test_200_mixed_checkouts_at_once_each_end_as_their_input_implies(
    stack: Stack, record_property: Any
) -> None:
    balances = {"alice": RICH, "carol": RICH, "dave": RICH}  # bob keeps 20.00
    await stack.prepare(balances=balances, on_hand={BOOK: PLENTY, LAMP: PLENTY})
    world = World.seeded().with_balances(balances).with_stock({BOOK: PLENTY, LAMP: PLENTY})
    mix = _mix(200, seed=20240611)
    assert contended(world, mix) == [], "the mix's outcomes would depend on ordering"
    expected_by_input = [predict(world, c) for c in mix]
    outcomes = Counter((e.failed_step, e.reason) for e in expected_by_input)
    assert len(outcomes) >= 8, f"the mix does not cover every outcome: {outcomes}"

    procs = await stack.start()
    before = await stack.snapshot()
    started = time.monotonic()
    checkouts = await submit(stack, mix)
    await stack.wait_terminal(list(checkouts), 120, watch=list(procs.values()))
    elapsed = time.monotonic() - started
    await stack.wait_quiet()
    run = await _read_run(stack, checkouts)
    after = await stack.snapshot()

    expected = dict(zip(checkouts, expected_by_input, strict=True))
    problems = check_run(run, expected)
    problems += conserved(checkouts, run.states, before, after)
    _assert_no_problems(stack, "in 200 mixed checkouts", problems)
    record_property("sagas_per_second", round(len(mix) / elapsed, 1))
    print(f"\n200 checkouts terminal in {elapsed:.1f}s: {_stats(run)}")


# --- a service killed between its commit and its reply -----------------------------------

#: the n-th command handled kills the service; the checkouts arrive in waves, so at the crash some
#: are done, some half-way and some not started
CRASH_AFTER = {"payment": 16, "inventory": 10}
WAVES, WAVE_GAP = 3, 0.7


def _crash_mix(count: int) -> list[dict[str, Any]]:
    rng = random.Random(count)
    plan = [
        lambda: checkout(rng.choice(["alice", "dave"]), [(BOOK, 1), (LAMP, rng.randint(1, 2))]),
        lambda: checkout("carol", [(BOOK, 2)], PARIS),
        lambda: checkout("bob", [(LAMP, 1)]),
        lambda: checkout("alice", [(RARE, 1)]),
        lambda: checkout("dave", [(BOOK, 1)], NOWHERE),
    ]
    return [plan[n % len(plan)]() for n in range(count)]


async def _by_ref(stack: Stack, service: str) -> dict[UUID, dict[str, Any]]:
    table = payment.payments if service == "payment" else inventory.reservations
    return {r["order_ref"]: r for r in await stack.rows(service, table)}


@pytest.mark.parametrize("victim", ["payment", "inventory"])
async def test_a_service_killed_after_its_commit_applies_nothing_twice(
    stack: Stack, victim: str
) -> None:
    balances = {"alice": RICH, "carol": RICH, "dave": RICH}
    await stack.prepare(balances=balances, on_hand={BOOK: PLENTY, LAMP: PLENTY})
    world = World.seeded().with_balances(balances).with_stock({BOOK: PLENTY, LAMP: PLENTY})
    mix = _crash_mix(30)
    assert contended(world, mix) == []

    stack.data_dir.mkdir(parents=True, exist_ok=True)
    orchestrator = stack.spawn_orchestrator()
    procs = {"orchestrator": orchestrator}
    for s in SERVICES:
        fault = (FAULT, CRASH_AFTER[victim]) if s == victim else None
        procs[s] = stack.spawn_service(s, fault=fault, name=f"{s}-faulty" if fault else s)
    await stack.started(procs.values())
    before = await stack.snapshot()
    checkouts: dict[UUID, dict[str, Any]] = {}
    per_wave = len(mix) // WAVES
    for wave in range(WAVES):
        part = mix[wave * per_wave : (wave + 1) * per_wave]
        checkouts |= await submit(stack, part, first=wave * per_wave)
        await asyncio.sleep(WAVE_GAP)

    code = await stack.wait_exit(procs[victim], within=30)
    if code != -9:
        stack.fail(
            f"{victim} was to SIGKILL itself after its {CRASH_AFTER[victim]}th commit, but it "
            + ("still runs" if code is None else f"exited with {code}")
        )
    at_crash = [r for r in await stack.processed() if r["service"] == victim]
    assert at_crash, f"{victim} died with nothing committed\n{stack.processes.describe()}"
    states_at_crash = await stack.states(list(checkouts))
    unfinished = [i for i in checkouts if not _terminal(states_at_crash.get(i))]
    assert unfinished, "every saga finished before the crash: it was not mid-run"
    progress = Counter(
        states_at_crash[i].status.value if i in states_at_crash else "NOT_STARTED"
        for i in checkouts
    )

    procs[victim] = stack.spawn_service(victim, name=f"{victim}-restarted")
    await stack.started([procs[victim]])
    await stack.wait_terminal(list(checkouts), 60, watch=list(procs.values()))
    await stack.wait_quiet()
    run = await _read_run(stack, checkouts)
    after = await stack.snapshot()

    expected = {i: predict(world, c) for i, c in checkouts.items()}
    problems = check_run(run, expected)
    problems += conserved(checkouts, run.states, before, after)
    problems += await _applied_once(stack, victim, run, expected, before)
    _assert_no_problems(stack, f"after {victim} was killed and restarted", problems)
    print(
        f"\n{victim} killed after {len(at_crash)} ledger rows; sagas then "
        f"{dict(sorted(progress.items()))}; at the end {_stats(run)}"
    )


def _terminal(state: SagaState | None) -> bool:
    return state is not None and state.status.is_terminal


async def _applied_once(
    stack: Stack,
    victim: str,
    run: Run,
    expected: Mapping[UUID, Expectation],
    before: Mapping[str, Mapping[str, Any]],
) -> list[str]:
    """Each order_ref charged (reserved) at most once, by the very charge (reservation) the
    orchestrator was told of, and the account (stock) moved by exactly those."""
    problems = []
    ledger = Counter((r["saga_id"], r["command_type"]) for r in run.rows if r["service"] == victim)
    problems += [f"{key} in the ledger {n} times" for key, n in ledger.items() if n > 1]
    records = await _by_ref(stack, victim)
    step = PAYMENT if victim == "payment" else INVENTORY
    key = "payment_id" if victim == "payment" else "reservation_id"
    done = "CHARGED" if victim == "payment" else "RESERVED"
    undone = "REFUNDED" if victim == "payment" else "RELEASED"
    for ref, want in expected.items():
        record = records.get(ref)
        status = None if record is None else record["status"]
        if step not in want.succeeded:
            if status not in (None, "TOMBSTONE"):
                problems.append(f"{ref}: {victim} record {status}, expected none")
            continue
        wanted = done if want.failed_step is None else undone
        if record is None or status != wanted:
            problems.append(f"{ref}: {victim} record {status}, expected {wanted}")
            continue
        told = run.states[ref].context.outputs.get(step, {}).get(key)
        if told != str(record[key]):
            problems.append(
                f"{ref}: the orchestrator was told {key} {told}, the service holds "
                f"{record[key]}: the effect was applied twice"
            )
    if victim == "payment":
        accounts = {r["name"]: r for r in await stack.rows("payment", payment.accounts)}
        for name, customer in payment.CUSTOMERS.items():
            charged = sum(
                (
                    r["amount"]
                    for r in records.values()
                    if r["customer_id"] == customer and r["status"] == "CHARGED"
                ),
                Decimal("0.00"),
            )
            moved = before["balances"][name] - accounts[name]["balance"]
            if moved != charged:
                problems.append(
                    f"{name}: the balance moved by {moved}, the charges held sum to {charged}"
                )
    else:
        stock = {r["sku"]: r for r in await stack.rows("inventory", inventory.stock)}
        reserved: Counter[str] = Counter()
        for r in records.values():
            if r["status"] == "RESERVED":
                for line in r["items"]:
                    reserved[line["sku"]] += int(line["quantity"])
        for sku, row in stock.items():
            if row["reserved"] != reserved[sku]:
                problems.append(
                    f"{sku}: {row['reserved']} units reserved, the reservations hold "
                    f"{reserved[sku]}"
                )
    return problems
