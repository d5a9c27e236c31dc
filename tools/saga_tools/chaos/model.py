"""What a checkout's input implies, by the demo services' own rules, and the checks of a run.

``predict`` says how one checkout ends given the services' state when it runs: the step that
fails first (and why) or none. ``replay`` re-derives, from each service's ledger in the order
the service processed its commands, whether each charge and reservation was decided by the
rules against the balance or stock at that moment; so a random, contended mix (the compose
file's ``place-orders``) still has an exact expectation. ``check_run`` then compares the
orchestrator's database and the four services' ledgers with the expectations.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any
from uuid import UUID

from saga.core.state import HistoryEntry, HistoryKind, SagaState, SagaStatus, StepStatus
from saga.participant import ALREADY_COMPENSATED
from saga_demo import inventory, payment, shipping
from saga_demo.checkout import CHECKOUT
from saga_demo.contracts.inventory import InventoryFailure
from saga_demo.contracts.payment import PaymentFailure
from saga_demo.contracts.shipping import ShippingFailure

__all__ = [
    "STEPS",
    "Expectation",
    "World",
    "check_run",
    "conserved",
    "contended",
    "predict",
    "replay",
    "total",
]

STEPS = tuple(s.name for s in CHECKOUT.steps)
ORDER, PAYMENT, INVENTORY, SHIPPING = STEPS
#: (step, direction) of each command type, from the definition itself
COMMANDS = {
    **{s.action: (s.name, "action") for s in CHECKOUT.steps},
    **{s.compensation: (s.name, "compensation") for s in CHECKOUT.steps if s.compensation},
}

Input = Mapping[str, Any]


def total(checkout: Input) -> Decimal:
    return sum(
        (Decimal(i["unit_price"]) * int(i["quantity"]) for i in checkout["items"]),
        Decimal("0.00"),
    )


def quantities(checkout: Input) -> Counter[str]:
    return Counter({i["sku"]: int(i["quantity"]) for i in checkout["items"]})


@dataclass(frozen=True)
class Account:
    balance: Decimal
    limit: Decimal | None
    currency: str
    flaky: bool


@dataclass
class World:
    """The state the services' rules read: accounts, available stock, served countries."""

    accounts: dict[UUID, Account]
    available: dict[str, int]
    countries: frozenset[str]

    @classmethod
    def seeded(cls) -> World:
        """The demo seed, as a fresh service database holds it."""
        return cls(
            accounts={
                a["customer_id"]: Account(
                    a["balance"], a["per_charge_limit"], a["currency"], a["flaky"]
                )
                for a in payment.SEED
            },
            available={s["sku"]: s["on_hand"] - s["reserved"] for s in inventory.SEED},
            countries=frozenset(c["country"] for c in shipping.SEED),
        )

    def with_balances(self, by_name: Mapping[str, Decimal]) -> World:
        accounts = dict(self.accounts)
        for name, balance in by_name.items():
            customer = payment.CUSTOMERS[name]
            accounts[customer] = replace(accounts[customer], balance=balance)
        return World(accounts, dict(self.available), self.countries)

    def with_stock(self, available: Mapping[str, int]) -> World:
        return World(dict(self.accounts), {**self.available, **available}, self.countries)

    def copy(self) -> World:
        return World(dict(self.accounts), dict(self.available), self.countries)

    # --- the rules, as the services apply them ---------------------------------------

    def charge_refused(self, checkout: Input) -> str | None:
        account = self.accounts.get(UUID(checkout["customer_id"]))
        amount = total(checkout)
        if account is None:
            return PaymentFailure.UNKNOWN_CUSTOMER
        if account.currency != checkout["currency"]:
            return PaymentFailure.CURRENCY_MISMATCH
        if account.limit is not None and amount > account.limit:
            return PaymentFailure.LIMIT_EXCEEDED
        if account.balance < amount:
            return PaymentFailure.INSUFFICIENT_FUNDS
        return None

    def reserve_refused(self, checkout: Input) -> str | None:
        wanted = quantities(checkout)
        if any(sku not in self.available for sku in wanted):
            return InventoryFailure.UNKNOWN_SKU
        if any(self.available[sku] < n for sku, n in wanted.items()):
            return InventoryFailure.OUT_OF_STOCK
        return None

    def schedule_refused(self, checkout: Input) -> str | None:
        """Why shipping says no; ``carrier_unreachable`` is the transient that never ends."""
        address = checkout["address"]
        if address["country"] not in self.countries:
            return ShippingFailure.UNDELIVERABLE_ADDRESS
        if address["postal_code"].strip() == "00000" or "nowhere" in address["street"].casefold():
            return ShippingFailure.UNDELIVERABLE_ADDRESS
        if address["city"].strip().casefold() in shipping.SLOW_CITIES:
            return ShippingFailure.CARRIER_UNREACHABLE
        return None

    def charge(self, checkout: Input, sign: int = 1) -> None:
        customer = UUID(checkout["customer_id"])
        account = self.accounts[customer]
        self.accounts[customer] = replace(account, balance=account.balance - sign * total(checkout))

    def reserve(self, checkout: Input, sign: int = 1) -> None:
        for sku, n in quantities(checkout).items():
            self.available[sku] -= sign * n


@dataclass(frozen=True)
class Expectation:
    """How one checkout must end."""

    succeeded: tuple[str, ...]  # steps whose action took effect, in order
    failed_step: str | None = None
    reason: str | None = None
    transient: bool = False  # the failure was retryable until the budget ran out: not recorded
    flaky: bool = False  # the charge fails transiently once, then succeeds

    @property
    def status(self) -> SagaStatus:
        return SagaStatus.COMPLETED if self.failed_step is None else SagaStatus.COMPENSATED

    def ledger_trace(self) -> list[tuple[str, str, str, str | None]]:
        """(step, direction, outcome, reason) of every final reply the services must record,
        in the order they must record them: actions forward, compensations newest first."""
        trace: list[tuple[str, str, str, str | None]] = [
            (s, "action", "success", None) for s in self.succeeded
        ]
        if self.failed_step is not None and not self.transient:
            trace.append((self.failed_step, "action", "failure", self.reason))
        if self.failed_step is not None:
            trace += [(s, "compensation", "success", None) for s in reversed(self.succeeded)]
        return trace


def predict(
    world: World, checkout: Input, verdicts: Mapping[str, str | None] | None = None
) -> Expectation:
    """The expectation of ``checkout`` in ``world``; ``verdicts`` (step -> refusal reason or
    None) replaces the rules' verdict of a step, e.g. one replayed from a ledger."""
    rules = {
        ORDER: None,
        PAYMENT: world.charge_refused(checkout),
        INVENTORY: world.reserve_refused(checkout),
        SHIPPING: world.schedule_refused(checkout),
    }
    rules.update(verdicts or {})
    account = world.accounts.get(UUID(checkout["customer_id"]))
    flaky = account is not None and account.flaky
    done: list[str] = []
    for step in STEPS:
        refused = rules[step]
        if refused is not None:
            return Expectation(
                tuple(done),
                step,
                str(refused),
                transient=refused == ShippingFailure.CARRIER_UNREACHABLE,
                flaky=flaky and PAYMENT in done,
            )
        done.append(step)
    return Expectation(tuple(done), flaky=flaky)


def contended(world: World, checkouts: Iterable[Input]) -> list[str]:
    """Why the outcome of some checkout could depend on the order they run in (empty: it
    cannot). A customer's charges are order-independent when all that may be charged fits the
    balance, or when no single one does; the same for the units of each SKU."""
    charges: dict[UUID, list[Decimal]] = defaultdict(list)
    units: dict[str, list[int]] = defaultdict(list)
    for c in checkouts:
        if world.charge_refused(c) in (None, PaymentFailure.INSUFFICIENT_FUNDS):
            charges[UUID(c["customer_id"])].append(total(c))
            if world.charge_refused(c) is None and world.reserve_refused(c) in (
                None,
                InventoryFailure.OUT_OF_STOCK,
            ):
                for sku, n in quantities(c).items():
                    units[sku].append(n)
    problems = [
        f"customer {customer}: charges {sum(amounts)} exceed the balance "
        f"{world.accounts[customer].balance} but some fit"
        for customer, amounts in charges.items()
        if sum(amounts) > world.accounts[customer].balance >= min(amounts)
    ]
    problems += [
        f"sku {sku}: {sum(ns)} units wanted, {world.available[sku]} available, some fit"
        for sku, ns in units.items()
        if sum(ns) > world.available[sku] >= min(ns)
    ]
    return problems


def replay(
    world: World, checkouts: Mapping[UUID, Input], rows: Sequence[Mapping[str, Any]]
) -> tuple[dict[UUID, Expectation], list[str]]:
    """Expectations of ``checkouts``, replaying the payment and inventory ledgers in the order
    each service processed its commands; plus every decision that broke the rules."""
    problems: list[str] = []
    charges: dict[UUID, str | None] = {}
    reserves: dict[UUID, str | None] = {}
    state = world.copy()
    for service, verdicts in (("payment", charges), ("inventory", reserves)):
        for row in sorted((r for r in rows if r["service"] == service), key=lambda r: r["id"]):
            checkout = checkouts.get(row["saga_id"])
            if checkout is None:
                problems.append(f"{service} processed a command of unknown saga {row['saga_id']}")
                continue
            _, direction = COMMANDS[row["command_type"]]
            ok = row["outcome"] == "success"
            if direction == "action" and row["reason"] == ALREADY_COMPENSATED:
                # its compensation came first (the step had timed out): refused unapplied,
                # whatever the rules say
                verdicts[row["saga_id"]] = row["reason"]
                continue
            if direction == "action":
                refused = (
                    state.charge_refused(checkout)
                    if service == "payment"
                    else state.reserve_refused(checkout)
                )
                if (refused is None) != ok or (not ok and row["reason"] != refused):
                    problems.append(
                        f"{row['saga_id']}: {row['command_type']} answered {row['outcome']} "
                        f"({row['reason']}), the rules say {refused or 'success'} "
                        f"(state {_relevant(state, checkout, service)})"
                    )
                verdicts[row["saga_id"]] = None if ok else row["reason"]
                if ok:
                    (state.charge if service == "payment" else state.reserve)(checkout)
            elif ok and verdicts.get(row["saga_id"], "-") is None:
                (state.charge if service == "payment" else state.reserve)(checkout, -1)
    expected = {}
    for saga_id, checkout in checkouts.items():
        expected[saga_id] = predict(
            world,
            checkout,
            {
                PAYMENT: charges.get(saga_id, "never_charged"),
                INVENTORY: reserves.get(saga_id, "never_reserved"),
            },
        )
    return expected, problems


def _relevant(world: World, checkout: Input, service: str) -> str:
    if service == "payment":
        return str(world.accounts.get(UUID(checkout["customer_id"])))
    return str({sku: world.available.get(sku) for sku in quantities(checkout)})


# --- the checks of one run -----------------------------------------------------------------


@dataclass
class Run:
    """What a run left behind, read back from the five databases."""

    checkouts: Mapping[UUID, Input]
    states: Mapping[UUID, SagaState]
    histories: Mapping[UUID, list[HistoryEntry]]
    rows: list[dict[str, Any]]  # every service's processed rows, by processed_at


def check_run(run: Run, expected: Mapping[UUID, Expectation]) -> list[str]:
    """Every way the run differs from ``expected``: final state, failure, the steps the
    orchestrator saw succeed and compensated, and the services' ledgers in processed order."""
    by_saga: dict[UUID, list[dict[str, Any]]] = defaultdict(list)
    for row in run.rows:
        by_saga[row["saga_id"]].append(row)
    problems: list[str] = []
    for saga_id, want in expected.items():
        found = _check_one(
            want, run.states.get(saga_id), run.histories.get(saga_id, []), by_saga[saga_id]
        )
        problems += [f"{saga_id} ({_describe(run.checkouts[saga_id])}): {f}" for f in found]
    strangers = set(by_saga) - set(expected)
    if strangers:
        problems.append(f"the services processed commands of unknown sagas {sorted(strangers)}")
    return problems


def _describe(checkout: Input) -> str:
    names = {str(v): k for k, v in payment.CUSTOMERS.items()}
    items = ", ".join(f"{i['quantity']}x{i['sku']}" for i in checkout["items"])
    where = f"{checkout['address']['city']} {checkout['address']['country']}"
    who = names.get(checkout["customer_id"], checkout["customer_id"][:8])
    return f"{who} {checkout['currency']} {items} to {where}"


def _check_one(
    want: Expectation,
    state: SagaState | None,
    history: list[HistoryEntry],
    rows: list[dict[str, Any]],
) -> list[str]:
    if state is None:
        return ["never started"]
    problems = []
    if state.status is not want.status:
        problems.append(
            f"{state.status.value}, expected {want.status.value}"
            + (f" at {want.failed_step} ({want.reason})" if want.failed_step else "")
            + f"; failure: {state.failure}"
        )
        return problems
    if want.failed_step is not None:
        prefix = f"step {want.failed_step} failed: {want.reason}"
        if not (state.failure or "").startswith(prefix):
            problems.append(f"failure {state.failure!r}, expected it to start with {prefix!r}")
        if state.step(want.failed_step).status is not StepStatus.FAILED:
            problems.append(f"step {want.failed_step} is {state.step(want.failed_step).status}")
        for s in want.succeeded:
            if state.step(s).status is not StepStatus.COMPENSATED:
                problems.append(f"step {s} is {state.step(s).status.value}, not COMPENSATED")
    succeeded = [e.step for e in history if e.kind is HistoryKind.STEP_SUCCEEDED]
    if succeeded != list(want.succeeded):
        problems.append(f"history: steps succeeded {succeeded}, expected {list(want.succeeded)}")
    compensated = [e.step for e in history if e.kind is HistoryKind.STEP_COMPENSATED]
    undo = list(reversed(want.succeeded)) if want.failed_step else []
    if compensated != undo:
        problems.append(f"history: compensated {compensated}, expected {undo}")
    retried = {
        e.step for e in history if e.kind is HistoryKind.STEP_FAILED and "(retryable)" in e.detail
    }
    charged = [
        e.attempt for e in history if e.kind is HistoryKind.STEP_SUCCEEDED and e.step == PAYMENT
    ]
    if want.flaky and charged != [] and charged[0] is not None and charged[0] < 2:
        problems.append(f"history: the flaky charge succeeded at attempt {charged[0]}")
    if want.transient and want.failed_step not in retried:
        problems.append(f"history: {want.failed_step} never failed retryably")
    trace = [
        (*COMMANDS[r["command_type"]], r["outcome"], r["reason"]) for r in rows
    ]  # by processed_at across the four services
    if trace != want.ledger_trace():
        problems.append(
            "service ledgers, by processed_at: "
            + " > ".join(f"{s}/{d}/{o}{f'({r})' if r else ''}" for s, d, o, r in trace)
            + "; expected "
            + " > ".join(
                f"{s}/{d}/{o}{f'({r})' if r else ''}" for s, d, o, r in want.ledger_trace()
            )
        )
    return problems


def conserved(
    checkouts: Mapping[UUID, Input],
    states: Mapping[UUID, SagaState],
    before: Mapping[str, Mapping[str, Any]],
    after: Mapping[str, Mapping[str, Any]],
) -> list[str]:
    """Balances and stock after = before minus the completed checkouts, and nothing else."""
    names = {str(v): k for k, v in payment.CUSTOMERS.items()}
    balances = dict(before["balances"])
    stock = dict(before["stock"])
    for saga_id, checkout in checkouts.items():
        if states[saga_id].status is SagaStatus.COMPLETED:
            balances[names[checkout["customer_id"]]] -= total(checkout)
            for sku, n in quantities(checkout).items():
                stock[sku] -= n
    problems = [
        f"balance of {name}: {after['balances'][name]}, expected {balances[name]} "
        f"(before {before['balances'][name]})"
        for name in sorted(balances)
        if after["balances"][name] != balances[name]
    ]
    problems += [
        f"available {sku}: {after['stock'][sku]}, expected {stock[sku]} "
        f"(before {before['stock'][sku]})"
        for sku in sorted(stock)
        if after["stock"][sku] != stock[sku]
    ]
    return problems
