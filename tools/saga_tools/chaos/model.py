"""What a checkout's input implies, by the demo services' own rules, and the checks of a run.

``predict`` says how one checkout ends given the services' state when it runs: the step that
fails first (and why) or none. The checkout charges and reserves in parallel, so a refusal of
either member leaves the other to run, answer and be undone; a checkout of digital goods alone
skips the reservation and the shipping.

``replay`` re-derives, from each service's ledger in the order
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
    "PHYSICAL_ONLY",
    "STEPS",
    "UNIT",
    "Expectation",
    "World",
    "check_run",
    "conserved",
    "contended",
    "physical",
    "predict",
    "replay",
    "total",
]

STEPS = tuple(s.name for s in CHECKOUT.steps)
ORDER, PAYMENT, INVENTORY, SHIPPING = STEPS
#: the position of each step's unit in the run: the members of the parallel group share one
UNIT = {s.name: CHECKOUT.unit_first[i] for i, s in enumerate(CHECKOUT.steps)}
#: the steps that run only when the checkout has a physical line
PHYSICAL_ONLY = (INVENTORY, SHIPPING)
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


def physical(checkout: Input) -> bool:
    """Whether the checkout holds a line to reserve and ship (digital lines are neither)."""
    return any(not i.get("digital", False) for i in checkout["items"])


def quantities(checkout: Input) -> Counter[str]:
    """The units the checkout reserves: its physical lines'."""
    return Counter(
        {i["sku"]: int(i["quantity"]) for i in checkout["items"] if not i.get("digital", False)}
    )


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

    succeeded: tuple[str, ...]  # steps whose action took effect, in step order
    failed_step: str | None = None
    reason: str | None = None
    transient: bool = False  # the failure was retryable until the budget ran out: not recorded
    flaky: bool = False  # the charge fails transiently once, then succeeds
    skipped: tuple[str, ...] = ()  # conditional steps that do not run: nothing sent
    #: other members of the group refused too, with their reasons: FAILED, nothing to undo;
    #: whichever answered first is the saga's failure
    also_failed: tuple[tuple[str, str], ...] = ()
    #: members whose outcome depends on timing: the flaky charge, when its sibling fails while
    #: it retries, is stopped in its backoff (undone: nothing to undo), or awaited (its failed
    #: attempt ends it: FAILED), or charged by its next attempt first (then refunded)
    uncertain: tuple[str, ...] = ()

    @property
    def status(self) -> SagaStatus:
        return SagaStatus.COMPLETED if self.failed_step is None else SagaStatus.COMPENSATED

    @property
    def failed(self) -> tuple[str, ...]:
        """Every step that failed for good, in step order."""
        if self.failed_step is None:
            return ()
        others = (s for s, _ in self.also_failed)
        return tuple(sorted((self.failed_step, *others), key=STEPS.index))

    def ledger_trace(self, undone: Iterable[str] = ()) -> list[tuple[str, str, str, str | None]]:
        """(step, direction, outcome, reason) of every final reply the services must record,
        in the order they must record them: actions unit by unit (the members of a unit in
        step order, see :func:`in_trace_order`), compensations newest first; ``undone`` adds
        steps compensated without having taken effect (a member stopped in its backoff)."""
        trace: list[tuple[str, str, str, str | None]] = [
            (s, "action", "success", None) for s in self.succeeded
        ]
        if self.failed_step is not None and not self.transient:
            trace.append((self.failed_step, "action", "failure", self.reason))
            trace += [(s, "action", "failure", r) for s, r in self.also_failed]
        trace = in_trace_order(trace)
        if self.failed_step is not None:
            undo = sorted({*self.succeeded, *undone}, key=STEPS.index, reverse=True)
            trace += [(s, "compensation", "success", None) for s in undo]
        return trace


def in_trace_order(
    trace: Sequence[tuple[str, str, str, str | None]],
) -> list[tuple[str, str, str, str | None]]:
    """``trace`` with each run of actions of one unit in step order: the members of a parallel
    group answer in any order, everything else keeps the order it was recorded in."""
    out: list[tuple[str, str, str, str | None]] = []
    run: list[tuple[str, str, str, str | None]] = []
    for row in trace:
        if run and (row[1] != "action" or UNIT[row[0]] != UNIT[run[0][0]]):
            out += sorted(run, key=lambda r: STEPS.index(r[0]))
            run = []
        if row[1] == "action":
            run.append(row)
        else:
            out.append(row)
    return out + sorted(run, key=lambda r: STEPS.index(r[0]))


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
    skipped = () if physical(checkout) else PHYSICAL_ONLY
    done: list[str] = []
    for unit in sorted(set(UNIT.values())):
        members = [s for s in STEPS if UNIT[s] == unit and s not in skipped]
        refused = [(s, rules[s]) for s in members if rules[s] is not None]
        if refused:
            step, reason = refused[0]
            others = [s for s in members if rules[s] is None]
            uncertain = tuple(s for s in others if s == PAYMENT and flaky)
            return Expectation(
                tuple(done + [s for s in others if s not in uncertain]),
                step,
                str(reason),
                transient=reason == ShippingFailure.CARRIER_UNREACHABLE,
                flaky=flaky and PAYMENT in done,
                skipped=tuple(s for s in skipped if UNIT[s] <= unit),  # the rest: PENDING
                also_failed=tuple((s, str(r)) for s, r in refused[1:]),
                uncertain=uncertain,
            )
        done += members
    return Expectation(tuple(done), flaky=flaky and PAYMENT in done, skipped=skipped)


def contended(world: World, checkouts: Iterable[Input]) -> list[str]:
    """Why the outcome of some checkout could depend on the order they run in (empty: it
    cannot). A customer's charges are order-independent when all that may be charged fits the
    balance, or when no single one does; the same for the units of each SKU."""
    charges: dict[UUID, list[Decimal]] = defaultdict(list)
    units: dict[str, list[int]] = defaultdict(list)
    for c in checkouts:  # the charge and the reservation run side by side: both may hold
        if world.charge_refused(c) in (None, PaymentFailure.INSUFFICIENT_FUNDS):
            charges[UUID(c["customer_id"])].append(total(c))
        if physical(c) and world.reserve_refused(c) in (None, InventoryFailure.OUT_OF_STOCK):
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
        charged = charges.get(saga_id, "never_charged")
        account = world.accounts.get(UUID(checkout["customer_id"]))
        if saga_id not in charges and reserves.get(saga_id) and account and account.flaky:
            charged = None  # stopped while it retried, as its sibling failed: ``uncertain``
        expected[saga_id] = predict(
            world,
            checkout,
            {PAYMENT: charged, INVENTORY: reserves.get(saga_id, "never_reserved")},
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
    succeeded = [e.step for e in history if e.kind is HistoryKind.STEP_SUCCEEDED]
    # a member the timing decides took effect when the orchestrator saw it succeed
    took_effect = tuple(
        s for s in STEPS if s in want.succeeded or (s in want.uncertain and s in succeeded)
    )
    if want.failed_step is not None:
        prefixes = [f"step {s} failed: " for s in want.failed]
        prefixes[want.failed.index(want.failed_step)] += str(want.reason)
        if not any((state.failure or "").startswith(p) for p in prefixes):
            problems.append(f"failure {state.failure!r}, expected it to start with {prefixes}")
        for s in want.failed:
            if state.step(s).status is not StepStatus.FAILED:
                problems.append(f"step {s} is {state.step(s).status}")
        for s in took_effect:
            if state.step(s).status is not StepStatus.COMPENSATED:
                problems.append(f"step {s} is {state.step(s).status.value}, not COMPENSATED")
        for s in want.uncertain:
            if state.step(s).status not in (StepStatus.COMPENSATED, StepStatus.FAILED):
                problems.append(f"step {s} is {state.step(s).status.value}")
    for s in want.skipped:
        if state.step(s).status is not StepStatus.SKIPPED:
            problems.append(f"step {s} is {state.step(s).status.value}, not SKIPPED")
    units = [UNIT.get(s or "", -1) for s in succeeded]  # in unit order, a group's in any
    if units != sorted(units) or sorted(map(str, succeeded)) != sorted(took_effect):
        problems.append(f"history: steps succeeded {succeeded}, expected {list(took_effect)}")
    compensated = [e.step for e in history if e.kind is HistoryKind.STEP_COMPENSATED]
    undone = {s for s in want.uncertain if state.step(s).status is StepStatus.COMPENSATED}
    undo = (
        sorted(set(took_effect) | undone, key=STEPS.index, reverse=True) if want.failed_step else []
    )
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
    expected = replace(want, succeeded=took_effect).ledger_trace(undone)
    if in_trace_order(trace) != expected:
        problems.append(
            "service ledgers, by processed_at: "
            + " > ".join(f"{s}/{d}/{o}{f'({r})' if r else ''}" for s, d, o, r in trace)
            + "; expected "
            + " > ".join(f"{s}/{d}/{o}{f'({r})' if r else ''}" for s, d, o, r in expected)
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
