"""The soak's checker on small synthetic runs: a consistent run passes with every counter at 0,
and each kind of broken promise planted in it moves exactly the counter that names it."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID, uuid4

import pytest

from saga.core.state import (
    Direction,
    HistoryEntry,
    HistoryKind,
    Phase,
    SagaContext,
    SagaState,
    SagaStatus,
    StepState,
    StepStatus,
)
from saga.participant.faults import INJECTED_REFUSAL
from saga_demo import inventory, payment
from saga_demo.checkout import CHECKOUT, checkout_input
from saga_demo.cli import SAMPLE_ADDRESSES, SAMPLE_PRICES
from saga_demo.contracts.inventory import InventoryFailure
from saga_demo.inventory import ReservationStatus
from saga_demo.order import OrderStatus
from saga_demo.payment import PaymentStatus
from saga_demo.shipping import ShipmentStatus
from saga_tools.chaos.checker import COUNTERS, DeadLetter, Evidence, Report, check
from saga_tools.chaos.model import PHYSICAL_ONLY, STEPS, UNIT, physical, quantities, total
from saga_tools.chaos.plan import (
    PLENTY_BALANCE,
    PLENTY_STOCK,
    ChaosPlan,
    PlannedFault,
    PlannedSaga,
)

ORDER, PAYMENT, INVENTORY, SHIPPING = STEPS
STEP = {s.name: s for s in CHECKOUT.steps}
T0 = datetime(2024, 1, 1, tzinfo=UTC)
FORGED = "forged-0001"

# --- the planned sagas ---------------------------------------------------------------------


def saga(
    name: str, kind: str, customer: str, lines: list[tuple[str, int]], *faults: PlannedFault
) -> PlannedSaga:
    items = [(sku, n, SAMPLE_PRICES[sku]) for sku, n in lines]
    return PlannedSaga(
        key=f"chaos-test-{name}",
        input=checkout_input(payment.CUSTOMERS[customer], items, SAMPLE_ADDRESSES[0]),
        faults=faults,
        kind=kind,
    )


#: planned COMPLETED: alice buys a book
DONE = saga("done", "success", "alice", [(inventory.BOOK, 1)])
#: planned COMPENSATED: bob's rare book is out of stock, so his charge is refunded
UNDONE = saga("undone", "out_of_stock", "bob", [(inventory.BOOK, 1), (inventory.RARE, 1)])
#: planned FAILED: the reservation is refused, then the refund of bob's lamp too
STUCK = saga(
    "stuck",
    "compensation_refused",
    "bob",
    [(inventory.LAMP, 1)],
    PlannedFault(INVENTORY, "action", "refuse"),
    PlannedFault(PAYMENT, "compensation", "refuse"),
)
#: planned COMPLETED: carol's e-books, charged and neither reserved nor shipped
DIGITAL = saga("digital", "digital_only", "carol", [(inventory.EBOOK, 2)])
#: planned COMPENSATED: alice's charge is refused, the lamp reserved beside it is released
REFUSED = saga(
    "refused",
    "member_refused",
    "alice",
    [(inventory.LAMP, 1)],
    PlannedFault(PAYMENT, "action", "refuse"),
)
#: a saga nobody planned
STRANGER = saga("stranger", "success", "carol", [(inventory.BOOK, 2)])


def plan(*sagas: PlannedSaga) -> ChaosPlan:
    return ChaosPlan(
        seed=17,
        sagas=sagas,
        schedule=(),
        rate=10.0,
        balances={name: str(PLENTY_BALANCE) for name in payment.CUSTOMERS},
        stock={inventory.BOOK: PLENTY_STOCK, inventory.LAMP: PLENTY_STOCK},
    )


# --- a run, simulated the way the orchestrator and the services would leave it ------------------


@dataclass
class Run:
    """What a run left behind, in mutable form; ``evidence()`` hands it to the checker."""

    plan: ChaosPlan
    clock: Iterator[int] = field(default_factory=itertools.count)
    states: dict[UUID, SagaState] = field(default_factory=dict)
    histories: dict[UUID, list[HistoryEntry]] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    orders: dict[UUID, dict[str, Any]] = field(default_factory=dict)
    payments: dict[UUID, dict[str, Any]] = field(default_factory=dict)
    reservations: dict[UUID, dict[str, Any]] = field(default_factory=dict)
    shipments: dict[UUID, dict[str, Any]] = field(default_factory=dict)
    balances: dict[str, Decimal] = field(default_factory=dict)
    reserved: Counter[str] = field(default_factory=Counter)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    forged: list[str] = field(default_factory=list)
    orchestrator_outbox: int = 0
    service_outboxes: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.balances = {name: Decimal(b) for name, b in self.plan.balances.items()}
        self.reserved = Counter(dict.fromkeys((inventory.BOOK, inventory.LAMP, inventory.RARE), 0))
        self.service_outboxes = dict.fromkeys(("order", "payment", "inventory", "shipping"), 0)

    def now(self) -> datetime:
        return T0 + timedelta(milliseconds=next(self.clock))

    def evidence(self) -> Evidence:
        return Evidence(
            plan=self.plan,
            states=dict(self.states),
            histories={k: list(v) for k, v in self.histories.items()},
            orchestrator_outbox=self.orchestrator_outbox,
            service_outboxes=dict(self.service_outboxes),
            replies_given=dict(Counter(r["service"] for r in self.rows)),
            rows=list(self.rows),
            payments=list(self.payments.values()),
            reservations=list(self.reservations.values()),
            orders=list(self.orders.values()),
            shipments=list(self.shipments.values()),
            balances=dict(self.balances),
            reserved=dict(self.reserved),
            reserved_before={inventory.BOOK: 0, inventory.LAMP: 0, inventory.RARE: 0},
            dead_letters=list(self.dead_letters),
            forged=list(self.forged),
        )

    # --- one saga, step by step ------------------------------------------------------------

    def simulate(
        self,
        planned: PlannedSaga,
        *,
        fail_at: str | None = None,
        reason: str | None = None,
        timed_out: bool = False,
        stuck_at: str | None = None,
    ) -> None:
        """Run ``planned``: its actions succeed up to ``fail_at``, which is refused with
        ``reason`` (or times out), and its sibling in the parallel group still runs; then the
        compensations run newest first until ``stuck_at``, whose compensation is refused. A
        checkout without a physical line skips the reservation and the shipping."""
        sid = planned.saga_id
        history = self.histories.setdefault(sid, [])
        status = dict.fromkeys(STEPS, StepStatus.PENDING)

        def note(kind: HistoryKind, step: str | None = None, detail: str = "") -> None:
            history.append(HistoryEntry(self.now(), kind, detail or kind.value, step))

        note(HistoryKind.STARTED)
        done: list[str] = []
        for step in STEPS:
            failed = fail_at is not None and status[fail_at] is not StepStatus.PENDING
            if failed and UNIT[step] != UNIT[fail_at or ""]:
                break  # the unit failed: nothing after it runs
            if step in PHYSICAL_ONLY and not physical(planned.input):
                note(HistoryKind.STEP_SKIPPED, step)
                status[step] = StepStatus.SKIPPED
                continue
            note(HistoryKind.COMMAND_SENT, step)
            if step == fail_at:
                if timed_out:
                    for _ in range(STEP[step].retry.max_attempts or 1):
                        note(HistoryKind.STEP_TIMED_OUT, step)
                    status[step] = StepStatus.TIMED_OUT
                else:
                    self.row(sid, step, "action", "failure", reason)
                    note(HistoryKind.STEP_FAILED, step, f"{step} failed: {reason}")
                    status[step] = StepStatus.FAILED
                continue
            self.row(sid, step, "action", "success")
            self.apply(planned, step)
            note(HistoryKind.STEP_SUCCEEDED, step)
            status[step] = StepStatus.SUCCEEDED
            done.append(step)

        failure: str | None = None
        stuck: str | None = None
        if fail_at is None:
            final = SagaStatus.COMPLETED
            note(HistoryKind.COMPLETED)
        else:
            failure = (
                f"{fail_at} timed out 3 times; its outcome is unknown"
                if timed_out
                else f"step {fail_at} failed: {reason}"
            )
            final = SagaStatus.COMPENSATED
            note(HistoryKind.COMPENSATION_STARTED)
            undo = sorted([*done, fail_at] if timed_out else done, key=STEPS.index)
            for step in reversed(undo):
                status[step] = StepStatus.COMPENSATING
                if step == stuck_at:
                    self.row(sid, step, "compensation", "failure", INJECTED_REFUSAL)
                    note(HistoryKind.COMPENSATION_FAILED, step)
                    final, stuck = SagaStatus.FAILED, step
                    failure = f"compensation of {step} failed (not retryable): {INJECTED_REFUSAL}"
                    break
                self.row(sid, step, "compensation", "success")
                self.undo(planned, step)
                note(HistoryKind.STEP_COMPENSATED, step)
                status[step] = StepStatus.COMPENSATED
            note(HistoryKind[final.name])

        self.states[sid] = state(planned, final, status, failure=failure, stuck_step=stuck)

    def row(
        self, sid: UUID, step: str, direction: str, outcome: str, reason: str | None = None
    ) -> dict[str, Any]:
        command = STEP[step].action if direction == "action" else STEP[step].compensation
        row = {
            "id": len(self.rows) + 1,
            "service": STEP[step].participant,
            "saga_id": sid,
            "command_type": command,
            "outcome": outcome,
            "reason": reason,
            "processed_at": self.now(),
        }
        self.rows.append(row)
        return row

    def apply(self, planned: PlannedSaga, step: str) -> None:
        sid, checkout = planned.saga_id, planned.input
        if step == ORDER:
            self.orders[sid] = {"order_ref": sid, "status": OrderStatus.CREATED}
        elif step == PAYMENT:
            self.payments[sid] = {
                "order_ref": sid,
                "customer_id": UUID(checkout["customer_id"]),
                "amount": total(checkout),
                "status": PaymentStatus.CHARGED,
            }
            self.balances[customer_name(planned)] -= total(checkout)
        elif step == INVENTORY:
            self.reservations[sid] = {"order_ref": sid, "status": ReservationStatus.RESERVED}
            self.reserved.update(quantities(checkout))
        else:
            self.shipments[sid] = {"order_ref": sid, "status": ShipmentStatus.SCHEDULED}

    def undo(self, planned: PlannedSaga, step: str) -> None:
        """The compensation: undo the effect, or leave a tombstone if there was none."""
        sid, checkout = planned.saga_id, planned.input
        if step == ORDER:
            self.orders[sid] = {"order_ref": sid, "status": OrderStatus.CANCELLED}
        elif step == PAYMENT:
            row = self.payments.get(sid)
            if row is None:
                self.payments[sid] = {"order_ref": sid, "status": PaymentStatus.TOMBSTONE}
            else:
                row["status"] = PaymentStatus.REFUNDED
                self.balances[customer_name(planned)] += row["amount"]
        elif step == INVENTORY:
            if sid in self.reservations:
                self.reserved.subtract(quantities(checkout))
                self.reservations[sid]["status"] = ReservationStatus.RELEASED
            else:
                self.reservations[sid] = {"order_ref": sid, "status": ReservationStatus.TOMBSTONE}
        else:
            was = self.shipments.get(sid)
            self.shipments[sid] = {
                "order_ref": sid,
                "status": ShipmentStatus.TOMBSTONE if was is None else ShipmentStatus.CANCELLED,
            }

    def forge(self, message_id: str = FORGED) -> None:
        """A malformed message the nemesis published, dead-lettered as it must be."""
        self.forged.append(message_id)
        self.dead_letters.append(DeadLetter("saga.dlq", message_id, "malformed"))

    # --- planting violations ---------------------------------------------------------------

    def restate(self, planned: PlannedSaga, **changes: Any) -> None:
        self.states[planned.saga_id] = replace(self.states[planned.saga_id], **changes)

    def set_step(self, planned: PlannedSaga, step: str, status: StepStatus) -> None:
        old = self.states[planned.saga_id]
        steps = tuple(replace(s, status=status) if s.name == step else s for s in old.steps)
        self.restate(planned, steps=steps)

    def rows_of(self, planned: PlannedSaga) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["saga_id"] == planned.saga_id]

    def ledger_row(self, planned: PlannedSaga, command_type: str) -> dict[str, Any]:
        (row,) = (r for r in self.rows_of(planned) if r["command_type"] == command_type)
        return row

    def forget(self, planned: PlannedSaga) -> None:
        """As if ``planned`` had never been started: no trace of it anywhere."""
        sid = planned.saga_id
        if sid in self.payments and self.payments[sid]["status"] == PaymentStatus.CHARGED:
            self.balances[customer_name(planned)] += self.payments[sid]["amount"]
        reservation = self.reservations.get(sid)
        if reservation is not None and reservation["status"] == ReservationStatus.RESERVED:
            self.reserved.subtract(quantities(planned.input))
        for table in (self.orders, self.payments, self.reservations, self.shipments):
            table.pop(sid, None)
        self.rows = [r for r in self.rows if r["saga_id"] != sid]
        del self.states[sid], self.histories[sid]


def customer_name(planned: PlannedSaga) -> str:
    return next(n for n, c in payment.CUSTOMERS.items() if str(c) == planned.input["customer_id"])


def state(
    planned: PlannedSaga,
    status: SagaStatus,
    steps: dict[str, StepStatus],
    *,
    failure: str | None = None,
    stuck_step: str | None = None,
) -> SagaState:
    touched = [i for i, s in enumerate(STEPS) if steps[s] is not StepStatus.PENDING]
    return SagaState(
        saga_id=planned.saga_id,
        name=CHECKOUT.name,
        definition_version=CHECKOUT.version,
        status=status,
        steps=tuple(
            StepState(
                name,
                s,
                attempts=int(s is not StepStatus.PENDING),
                compensation_attempts=int(s in (StepStatus.COMPENSATED, StepStatus.COMPENSATING)),
            )
            for name, s in steps.items()
        ),
        context=SagaContext(input=dict(planned.input), saga_id=planned.saga_id),
        current=min(touched) if status is not SagaStatus.COMPLETED else len(STEPS) - 1,
        direction=Direction.ACTION if status is SagaStatus.COMPLETED else Direction.COMPENSATION,
        attempt=1,
        tries=1,
        phase=Phase.IDLE,
        awaiting=None,
        deadline=None,
        version=len(STEPS) * 2,
        created_at=T0,
        updated_at=T0,
        key=planned.key,
        failure=failure,
        stuck_step=stuck_step,
    )


def consistent_run() -> Run:
    """One COMPLETED, one COMPENSATED and one FAILED saga, each as planned, and one forged
    message dead-lettered: nothing to report."""
    run = Run(plan(DONE, UNDONE, STUCK))
    run.simulate(DONE)
    run.simulate(UNDONE, fail_at=INVENTORY, reason=InventoryFailure.OUT_OF_STOCK)
    run.simulate(STUCK, fail_at=INVENTORY, reason=INJECTED_REFUSAL, stuck_at=PAYMENT)
    run.forge()
    return run


def only(report: Report, counter: str) -> list[str]:
    """Asserts ``counter`` is the one counter that moved; returns its violations."""
    moved = {name: n for name, n in report.counts.items() if n}
    assert set(moved) == {counter}, report.violations
    assert not report.ok
    return report.violations[counter]


# --- a consistent run ------------------------------------------------------------------------


def test_the_consistent_run_is_what_it_claims() -> None:
    run = consistent_run()
    assert [run.states[s.saga_id].status for s in (DONE, UNDONE, STUCK)] == [
        SagaStatus.COMPLETED,
        SagaStatus.COMPENSATED,
        SagaStatus.FAILED,
    ]
    assert run.states[STUCK.saga_id].stuck_step == PAYMENT
    # what the services hold: alice's book charged and reserved, bob's lamp still charged
    assert run.balances["alice"] == PLENTY_BALANCE - Decimal("19.90")
    assert run.balances["bob"] == PLENTY_BALANCE - Decimal("45.00")
    assert run.reserved == Counter({inventory.BOOK: 1, inventory.LAMP: 0, inventory.RARE: 0})
    assert [(r["command_type"], r["outcome"]) for r in run.rows_of(UNDONE)] == [
        ("order.create", "success"),
        ("payment.charge", "success"),
        ("inventory.reserve", "failure"),
        ("payment.refund", "success"),
        ("order.cancel", "success"),
    ]


def test_a_consistent_run_passes() -> None:
    report = check(consistent_run().evidence())
    assert report.ok, report.violations
    assert report.counts == dict.fromkeys(COUNTERS, 0)
    assert report.diverged_by_timeout == []
    assert report.sagas == 3
    assert report.expected == {"COMPENSATED": 1, "COMPLETED": 1, "FAILED": 1}
    assert report.actual == report.expected
    assert report.messages["malformed_injected"] == 1
    assert report.messages["dead_lettered"] == 1
    assert "RESULT: PASS" in report.render()
    assert report.to_dict()["ok"] is True


def test_an_empty_run_of_an_empty_plan_passes() -> None:
    assert check(Run(plan()).evidence()).ok


def language_run() -> Run:
    """A checkout of digital goods alone, and one whose charge is refused while the
    reservation beside it succeeds: both as planned."""
    run = Run(plan(DIGITAL, REFUSED))
    run.simulate(DIGITAL)
    run.simulate(REFUSED, fail_at=PAYMENT, reason=INJECTED_REFUSAL)
    return run


def test_a_conditional_and_a_parallel_checkout_as_planned_pass() -> None:
    run = language_run()
    digital = {s.name: s.status for s in run.states[DIGITAL.saga_id].steps}
    assert digital[INVENTORY] is digital[SHIPPING] is StepStatus.SKIPPED
    assert [r["command_type"] for r in run.rows_of(DIGITAL)] == ["order.create", "payment.charge"]
    assert [(r["command_type"], r["outcome"]) for r in run.rows_of(REFUSED)] == [
        ("order.create", "success"),
        ("payment.charge", "failure"),
        ("inventory.reserve", "success"),
        ("inventory.release", "success"),
        ("order.cancel", "success"),
    ]
    report = check(run.evidence())
    assert report.ok, report.violations
    assert report.expected == report.actual == {"COMPENSATED": 1, "COMPLETED": 1}


def test_the_members_of_the_group_may_answer_in_either_order() -> None:
    run = consistent_run()
    charge = run.ledger_row(DONE, "payment.charge")
    reserve = run.ledger_row(DONE, "inventory.reserve")
    charge["processed_at"], reserve["processed_at"] = (
        reserve["processed_at"],
        charge["processed_at"],
    )
    history = run.histories[DONE.saga_id]
    first, second = (
        i
        for i, e in enumerate(history)
        if e.kind is HistoryKind.STEP_SUCCEEDED and e.step in (PAYMENT, INVENTORY)
    )
    history[first], history[second] = history[second], history[first]
    report = check(run.evidence())
    assert report.ok, report.violations


def test_a_reservation_behind_a_skipped_step_is_stock_drift() -> None:
    run = language_run()
    run.reservations[DIGITAL.saga_id] = {
        "order_ref": DIGITAL.saga_id,
        "status": ReservationStatus.RESERVED,
    }
    run.reserved[inventory.BOOK] += 1
    violations = only(check(run.evidence()), "stock_drift")
    assert any("reservation RESERVED, orchestrator says SKIPPED" in v for v in violations)


# --- lost ----------------------------------------------------------------------------------


def test_a_saga_never_started_is_lost() -> None:
    run = consistent_run()
    run.forget(DONE)
    (violation,) = only(check(run.evidence()), "lost")
    assert str(DONE.saga_id) in violation


def test_a_saga_not_terminal_is_lost() -> None:
    run = consistent_run()
    run.restate(DONE, status=SagaStatus.RUNNING)
    (violation,) = only(check(run.evidence()), "lost")
    assert "still RUNNING" in violation


def test_an_unsent_outbox_row_is_lost() -> None:
    run = consistent_run()
    run.orchestrator_outbox = 1
    only(check(run.evidence()), "lost")
    run = consistent_run()
    run.service_outboxes["payment"] = 2
    only(check(run.evidence()), "lost")


def test_a_forged_message_not_dead_lettered_is_lost() -> None:
    run = consistent_run()
    run.forged.append("forged-0002")
    (violation,) = only(check(run.evidence()), "lost")
    assert "forged-0002" in violation


# --- unexpected ----------------------------------------------------------------------------


def test_an_unplanned_saga_is_unexpected() -> None:
    run = consistent_run()
    run.simulate(STRANGER)  # carol's two books, charged and reserved
    report = check(run.evidence())
    assert report.counts == {
        **dict.fromkeys(COUNTERS, 0),
        "unexpected": 2,  # the saga itself and its ledger rows
        "money_drift": 1,  # carol's balance moved though no planned saga charged her
        "stock_drift": 1,  # two more books reserved than the plan accounts for
    }
    assert all(str(STRANGER.saga_id) in v for v in report.violations["unexpected"])


def test_an_unplanned_saga_state_alone_is_unexpected() -> None:
    run = consistent_run()
    run.states[STRANGER.saga_id] = state(
        STRANGER, SagaStatus.COMPLETED, dict.fromkeys(STEPS, StepStatus.SUCCEEDED)
    )
    (violation,) = only(check(run.evidence()), "unexpected")
    assert "nobody started" in violation


def test_ledger_rows_of_an_unknown_saga_are_unexpected() -> None:
    run = consistent_run()
    run.row(uuid4(), ORDER, "action", "failure", "spoofed")
    (violation,) = only(check(run.evidence()), "unexpected")
    assert "ledger rows" in violation


def test_a_dead_letter_that_was_not_forged_is_unexpected() -> None:
    run = consistent_run()
    run.dead_letters.append(DeadLetter("payment.commands.dlq", "real-0001", "rejected"))
    (violation,) = only(check(run.evidence()), "unexpected")
    assert "real-0001" in violation


# --- double effects ------------------------------------------------------------------------


def test_an_action_applied_twice_is_a_double_effect() -> None:
    run = consistent_run()
    charge = run.ledger_row(DONE, "payment.charge")
    run.rows.append({**charge, "id": len(run.rows) + 1})  # same processed_at: still in order
    (violation,) = only(check(run.evidence()), "double_effects")
    assert "charge_payment/action" in violation


def test_a_compensation_applied_twice_is_a_double_effect() -> None:
    run = consistent_run()
    refund = run.ledger_row(UNDONE, "payment.refund")
    run.rows.append({**refund, "id": len(run.rows) + 1})
    (violation,) = only(check(run.evidence()), "double_effects")
    assert "charge_payment/compensation" in violation


def test_a_step_compensated_twice_in_history_is_a_double_effect() -> None:
    run = consistent_run()
    history = run.histories[UNDONE.saga_id]
    i = next(i for i, e in enumerate(history) if e.kind is HistoryKind.STEP_COMPENSATED)
    history.insert(i + 1, history[i])
    (violation,) = only(check(run.evidence()), "double_effects")
    assert "compensated twice" in violation


def test_a_step_succeeded_twice_in_history_is_a_double_effect() -> None:
    run = consistent_run()
    history = run.histories[DONE.saga_id]
    i = next(i for i, e in enumerate(history) if e.kind is HistoryKind.STEP_SUCCEEDED)
    history.insert(i + 1, history[i])
    only(check(run.evidence()), "double_effects")


def test_two_terminal_transitions_are_a_double_effect() -> None:
    run = consistent_run()
    history = run.histories[DONE.saga_id]
    history.append(history[-1])
    (violation,) = only(check(run.evidence()), "double_effects")
    assert "2 terminal transitions" in violation


# --- order violations ------------------------------------------------------------------------


def test_compensations_not_newest_first_in_the_ledger_are_an_order_violation() -> None:
    run = consistent_run()
    refund = run.ledger_row(UNDONE, "payment.refund")
    cancel = run.ledger_row(UNDONE, "order.cancel")
    refund["processed_at"], cancel["processed_at"] = cancel["processed_at"], refund["processed_at"]
    (violation,) = only(check(run.evidence()), "order_violations")
    assert "compensated in order ['create_order', 'charge_payment']" in violation


def test_an_action_applied_after_its_compensation_is_an_order_violation() -> None:
    run = consistent_run()
    charge = run.ledger_row(UNDONE, "payment.charge")
    refund = run.ledger_row(UNDONE, "payment.refund")
    charge["processed_at"] = refund["processed_at"] + timedelta(microseconds=1)
    (violation,) = only(check(run.evidence()), "order_violations")
    assert "charge_payment applied after its compensation" in violation


def test_actions_out_of_step_order_in_the_ledger_are_an_order_violation() -> None:
    run = consistent_run()
    create = run.ledger_row(DONE, "order.create")
    charge = run.ledger_row(DONE, "payment.charge")
    create["processed_at"], charge["processed_at"] = charge["processed_at"], create["processed_at"]
    (violation,) = only(check(run.evidence()), "order_violations")
    assert "applied actions in order ['charge_payment', 'create_order'" in violation


def test_history_out_of_step_order_is_an_order_violation() -> None:
    run = consistent_run()
    history = run.histories[DONE.saga_id]
    succeeded = [i for i, e in enumerate(history) if e.kind is HistoryKind.STEP_SUCCEEDED]
    first, second = succeeded[:2]  # create_order, then charge_payment
    history[first], history[second] = history[second], history[first]
    (violation,) = only(check(run.evidence()), "order_violations")
    assert "steps succeeded in order ['charge_payment', 'create_order'" in violation


def test_history_compensating_oldest_first_is_an_order_violation() -> None:
    run = consistent_run()
    history = run.histories[UNDONE.saga_id]
    first, second = (i for i, e in enumerate(history) if e.kind is HistoryKind.STEP_COMPENSATED)
    history[first], history[second] = history[second], history[first]
    (violation,) = only(check(run.evidence()), "order_violations")
    assert "not newest first" in violation


# --- money drift ---------------------------------------------------------------------------


def test_a_balance_off_by_a_cent_is_money_drift() -> None:
    run = consistent_run()
    run.balances["alice"] -= Decimal("0.01")
    (violation,) = only(check(run.evidence()), "money_drift")
    assert "balance of alice" in violation


def test_an_untouched_customer_balance_off_is_money_drift() -> None:
    run = consistent_run()
    run.balances["dave"] += Decimal("0.01")
    only(check(run.evidence()), "money_drift")


def test_a_charge_kept_for_a_compensated_saga_is_money_drift() -> None:
    run = consistent_run()
    run.payments[UNDONE.saga_id]["status"] = PaymentStatus.CHARGED
    violations = only(check(run.evidence()), "money_drift")
    assert any("payment CHARGED, orchestrator says COMPENSATED" in v for v in violations)


def test_a_charge_refunded_behind_a_completed_saga_is_money_drift() -> None:
    run = consistent_run()
    run.payments[DONE.saga_id]["status"] = PaymentStatus.REFUNDED
    run.balances["alice"] = PLENTY_BALANCE
    violation, *also = only(check(run.evidence()), "money_drift")
    assert "payment REFUNDED, orchestrator says SUCCEEDED" in violation
    # the service's ledger disagrees with its table too
    assert all("ledger says" in a for a in also)


def test_a_charge_of_the_wrong_amount_is_money_drift() -> None:
    run = consistent_run()
    run.payments[DONE.saga_id]["amount"] = Decimal("19.91")
    run.balances["alice"] = PLENTY_BALANCE - Decimal("19.91")
    (violation,) = only(check(run.evidence()), "money_drift")
    assert "charged 19.91, not 19.90" in violation


# --- stock drift ---------------------------------------------------------------------------


def test_reserved_units_off_are_stock_drift() -> None:
    run = consistent_run()
    run.reserved[inventory.LAMP] += 1
    (violation,) = only(check(run.evidence()), "stock_drift")
    assert f"reserved {inventory.LAMP}: 1, expected 0" in violation


def test_a_reservation_released_behind_a_completed_saga_is_stock_drift() -> None:
    run = consistent_run()
    run.reservations[DONE.saga_id]["status"] = ReservationStatus.RELEASED
    run.reserved[inventory.BOOK] = 0
    violation, *also = only(check(run.evidence()), "stock_drift")
    assert "reservation RELEASED, orchestrator says SUCCEEDED" in violation
    # the service's ledger disagrees with its table too
    assert all("ledger says" in a for a in also)


def test_a_reservation_kept_for_a_compensated_saga_is_stock_drift() -> None:
    run = diverged_run(timed_out=True)  # the book was reserved, then released
    assert check(run.evidence()).ok
    run.reservations[DONE.saga_id]["status"] = ReservationStatus.RESERVED
    run.reserved.update(quantities(DONE.input))
    violation, *also = only(check(run.evidence()), "stock_drift")
    assert "reservation RESERVED, orchestrator says COMPENSATED" in violation

    # --- invariant violations ------------------------------------------------------------------
    # the service's ledger disagrees with its table too
    assert all("ledger says" in a for a in also)


def test_a_completed_saga_with_a_compensated_step_is_an_invariant_violation() -> None:
    run = consistent_run()
    run.set_step(DONE, SHIPPING, StepStatus.COMPENSATED)
    run.shipments[DONE.saga_id]["status"] = ShipmentStatus.CANCELLED  # so only the state lies
    violation, *also = only(check(run.evidence()), "invariant_violations")
    assert "COMPLETED with a step neither SUCCEEDED nor SKIPPED" in violation
    # the service's ledger disagrees with its table too
    assert all("ledger says" in a for a in also)


def test_a_compensated_saga_with_a_step_in_effect_is_an_invariant_violation() -> None:
    run = consistent_run()
    run.set_step(UNDONE, ORDER, StepStatus.SUCCEEDED)
    run.orders[UNDONE.saga_id]["status"] = OrderStatus.CREATED
    violation, *also = only(check(run.evidence()), "invariant_violations")
    assert "COMPENSATED with a step still in effect" in violation
    # the service's ledger disagrees with its table too
    assert all("ledger says" in a for a in also)


def test_a_failed_saga_not_naming_its_step_is_an_invariant_violation() -> None:
    run = consistent_run()
    run.restate(STUCK, failure="something went wrong")
    (violation,) = only(check(run.evidence()), "invariant_violations")
    assert "FAILED without naming its step" in violation


def test_a_failed_saga_stuck_at_another_step_is_an_invariant_violation() -> None:
    run = Run(plan(STUCK))
    run.simulate(STUCK, fail_at=INVENTORY, reason=INJECTED_REFUSAL, stuck_at=ORDER)
    assert run.ledger_row(STUCK, "payment.refund")["outcome"] == "success"  # undone this time
    (violation,) = only(check(run.evidence()), "invariant_violations")
    assert f"FAILED at {ORDER}, planned at {PAYMENT}" in violation


def test_an_order_effect_the_orchestrator_disowns_is_an_invariant_violation() -> None:
    run = consistent_run()
    run.orders[UNDONE.saga_id]["status"] = OrderStatus.CREATED
    violation, *also = only(check(run.evidence()), "invariant_violations")
    assert "create_order effect CREATED disagrees" in violation
    # the service's ledger disagrees with its table too
    assert all("ledger says" in a for a in also)


def diverged_run(*, timed_out: bool) -> Run:
    """The consistent run, but the checkout planned to complete was compensated: shipping
    never answered (``timed_out``) or, with no timeout in its history, refused it."""
    run = Run(plan(DONE, UNDONE, STUCK))
    if timed_out:
        run.simulate(DONE, fail_at=SHIPPING, timed_out=True)
    else:
        run.simulate(DONE, fail_at=SHIPPING, reason="undeliverable_address")
    run.simulate(UNDONE, fail_at=INVENTORY, reason=InventoryFailure.OUT_OF_STOCK)
    run.simulate(STUCK, fail_at=INVENTORY, reason=INJECTED_REFUSAL, stuck_at=PAYMENT)
    run.forge()
    return run


def test_an_outcome_unlike_the_plan_is_an_invariant_violation() -> None:
    run = diverged_run(timed_out=False)
    assert run.states[DONE.saga_id].status is SagaStatus.COMPENSATED
    report = check(run.evidence())
    (violation,) = only(report, "invariant_violations")
    assert "COMPENSATED, planned COMPLETED" in violation
    assert report.diverged_by_timeout == []


def test_an_outcome_unlike_the_plan_after_a_timeout_only_diverges() -> None:
    run = diverged_run(timed_out=True)
    assert run.states[DONE.saga_id].status is SagaStatus.COMPENSATED
    assert run.states[DONE.saga_id].step(SHIPPING).status is StepStatus.COMPENSATED
    report = check(run.evidence())
    assert report.ok, report.violations
    assert report.counts == dict.fromkeys(COUNTERS, 0)
    (diverged,) = report.diverged_by_timeout
    assert str(DONE.saga_id) in diverged and "planned COMPLETED" in diverged
    assert report.to_dict()["diverged_by_timeout"] == 1
    assert report.messages["timeouts"] == 3


@pytest.mark.parametrize("counter", COUNTERS)
def test_every_counter_is_rendered(counter: str) -> None:
    text = check(consistent_run().evidence()).render()
    assert f"{counter.replace('_', ' ')}" in text
