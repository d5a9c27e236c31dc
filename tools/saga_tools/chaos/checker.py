"""The soak's checker: reads what a run left behind and counts every broken promise.

Like a Jepsen queue checker it never trusts the system's own view alone: the orchestrator's
database says what it decided, each service's ledger and business tables say what was really
done, and the plan says what was asked. The counters that must be 0:

* **lost**: a planned saga missing or not terminal, an outbox row never sent, an injected
  malformed message that is nowhere to be found;
* **unexpected**: a saga, a ledger row or a dead letter that nobody asked for;
* **double effects**: a step applied twice, or a transition recorded twice;
* **order violations**: actions out of step order (the members of the parallel group, the charge
  and the reservation, in either order), compensations not newest first, an effect applied
  after its compensation;
* **money drift / stock drift**: balances or reservations that differ from the effects the
  ledgers and the orchestrator agree on;
* **invariant violations**: a terminal state inconsistent with its steps, or an outcome
  different from the plan's with no timeout in its history to explain it.

A saga that ends differently from the plan because a fault timed a step out (a service down
longer than the step's retry budget) is not wrong: it is counted as *diverged by timeout*.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any
from uuid import UUID

from saga.core.state import HistoryEntry, HistoryKind, SagaState, SagaStatus, StepStatus
from saga_demo.inventory import ReservationStatus
from saga_demo.order import OrderStatus
from saga_demo.payment import CUSTOMERS, PaymentStatus
from saga_demo.shipping import ShipmentStatus
from saga_tools.chaos.model import COMMANDS, STEPS, UNIT, quantities, total
from saga_tools.chaos.plan import ChaosPlan, expectation

__all__ = ["COUNTERS", "DeadLetter", "Evidence", "Report", "check"]

COUNTERS = (
    "lost",
    "unexpected",
    "double_effects",
    "order_violations",
    "money_drift",
    "stock_drift",
    "invariant_violations",
)

#: step statuses whose effect must still be in place at the end
_EFFECT_KEPT = {StepStatus.SUCCEEDED, StepStatus.COMPENSATING}
_NAMES = {str(v): k for k, v in CUSTOMERS.items()}


@dataclass(frozen=True)
class DeadLetter:
    queue: str
    message_id: str | None
    reason: str | None


@dataclass
class Evidence:
    """Everything the run left behind, read back after it went quiet."""

    plan: ChaosPlan
    states: Mapping[UUID, SagaState]
    histories: Mapping[UUID, list[HistoryEntry]]
    orchestrator_outbox: int
    service_outboxes: Mapping[str, int]
    replies_given: Mapping[str, int]
    rows: Sequence[Mapping[str, Any]]  # every ledger_processed row, with its ``service``
    payments: Sequence[Mapping[str, Any]]
    reservations: Sequence[Mapping[str, Any]]
    orders: Sequence[Mapping[str, Any]]
    shipments: Sequence[Mapping[str, Any]]
    balances: Mapping[str, Decimal]  # by customer name
    reserved: Mapping[str, int]  # units reserved by SKU
    reserved_before: Mapping[str, int]
    dead_letters: Sequence[DeadLetter]
    faults: Mapping[str, int] = field(default_factory=dict)  # injected, by kind
    forged: Sequence[str] = ()  # message ids of the malformed messages published
    duplicates_published: int = 0


@dataclass
class Report:
    seed: int
    sagas: int
    expected: dict[str, int]
    actual: dict[str, int]
    faults: dict[str, int]
    messages: dict[str, Any]
    diverged_by_timeout: list[str]
    violations: dict[str, list[str]]

    @property
    def counts(self) -> dict[str, int]:
        return {name: len(self.violations.get(name, [])) for name in COUNTERS}

    @property
    def ok(self) -> bool:
        return not any(self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "sagas": self.sagas,
            "ok": self.ok,
            "expected": self.expected,
            "actual": self.actual,
            "faults": self.faults,
            "messages": self.messages,
            "diverged_by_timeout": len(self.diverged_by_timeout),
            "counts": self.counts,
            "violations": {k: v[:50] for k, v in self.violations.items() if v},
        }

    def render(self) -> str:
        lines = [f"chaos soak, seed {self.seed}: {self.sagas} sagas"]
        states = sorted(set(self.expected) | set(self.actual))
        lines.append("  terminal state     expected   actual")
        lines += [
            f"  {s:<18} {self.expected.get(s, 0):>8} {self.actual.get(s, 0):>8}" for s in states
        ]
        lines.append(f"  diverged by a timeout (allowed): {len(self.diverged_by_timeout)}")
        lines.append(
            "  faults injected: "
            + (", ".join(f"{k} {v}" for k, v in sorted(self.faults.items())) or "none")
        )
        lines.append(
            "  messages: "
            + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in self.messages.items())
        )
        for name in COUNTERS:
            lines.append(f"  {name.replace('_', ' '):<22} {self.counts[name]}")
            lines += [f"      {v}" for v in self.violations.get(name, [])[:10]]
        lines.append("  RESULT: " + ("PASS" if self.ok else "FAIL"))
        return "\n".join(lines)


def check(ev: Evidence) -> Report:
    v: dict[str, list[str]] = {name: [] for name in COUNTERS}
    world = ev.plan.world()
    planned = {s.saga_id: s for s in ev.plan.sagas}
    expected = {sid: expectation(world, s) for sid, s in planned.items()}
    rows_by_saga: dict[UUID, list[Mapping[str, Any]]] = defaultdict(list)
    for row in sorted(ev.rows, key=lambda r: (r["processed_at"], r["service"], r["id"])):
        rows_by_saga[row["saga_id"]].append(row)

    # --- lost and unexpected ---------------------------------------------------------
    for sid in planned:
        state = ev.states.get(sid)
        if state is None:
            v["lost"].append(f"{sid}: never started")
        elif not state.status.is_terminal:
            v["lost"].append(f"{sid}: still {state.status.value} at step {state.current}")
    if ev.orchestrator_outbox:
        v["lost"].append(f"orchestrator outbox still holds {ev.orchestrator_outbox} messages")
    for service, n in ev.service_outboxes.items():
        if n:
            v["lost"].append(f"{service} outbox still holds {n} replies")
    v["unexpected"] += [f"{sid}: a saga nobody started" for sid in set(ev.states) - set(planned)]
    v["unexpected"] += [
        f"{sid}: ledger rows of an unknown saga" for sid in set(rows_by_saga) - set(planned)
    ]
    forged = set(ev.forged)
    dead_ids = {d.message_id for d in ev.dead_letters}
    v["unexpected"] += [
        f"dead letter {d.message_id} in {d.queue} ({d.reason}): not an injected one"
        for d in ev.dead_letters
        if d.message_id not in forged
    ]
    v["lost"] += [
        f"injected message {m} is not in any dead-letter queue" for m in forged - dead_ids
    ]

    # --- each saga: its history, its ledgers, its outcome ---------------------------------
    diverged: list[str] = []
    for sid, saga in planned.items():
        state = ev.states.get(sid)
        if state is None or not state.status.is_terminal:
            continue
        history = ev.histories.get(sid, [])
        rows = rows_by_saga.get(sid, [])
        _check_history(sid, history, v)
        _check_ledger(sid, rows, v)
        _check_state(sid, state, v)
        want = expected[sid]
        timed_out = any(e.kind is HistoryKind.STEP_TIMED_OUT for e in history)
        text = ""
        if state.status.value != want.status:
            text = (
                f"{sid} ({saga.kind}): {state.status.value}, planned {want.status}; "
                f"failure: {state.failure}"
            )
        elif want.failed_compensation is not None and state.stuck_step != want.failed_compensation:
            text = f"{sid}: FAILED at {state.stuck_step}, planned at {want.failed_compensation}"
        if text:
            (diverged if timed_out else v["invariant_violations"]).append(text)

    _check_money(ev, planned, v)
    _check_stock(ev, planned, v)
    _check_other_effects(ev, planned, v)
    _check_ledgers_match_effects(ev, planned, v)

    history_kinds = Counter(e.kind for h in ev.histories.values() for e in h)
    reasons = Counter(d.reason or "(broker)" for d in ev.dead_letters)
    messages = {
        "commands_sent": history_kinds[HistoryKind.COMMAND_SENT],
        "replies_given": sum(ev.replies_given.values()),
        "retries": history_kinds[HistoryKind.RETRY_SCHEDULED],
        "timeouts": history_kinds[HistoryKind.STEP_TIMED_OUT],
        "duplicates_injected": ev.duplicates_published,
        "ignored_by_orchestrator": history_kinds[HistoryKind.IGNORED],
        "malformed_injected": len(forged),
        "dead_lettered": len(ev.dead_letters),
        "dead_letter_reasons": dict(sorted(reasons.items())),
    }
    return Report(
        seed=ev.plan.seed,
        sagas=len(planned),
        expected=dict(sorted(Counter(e.status for e in expected.values()).items())),
        actual=dict(
            sorted(Counter(ev.states[s].status.value for s in planned if s in ev.states).items())
        ),
        faults=dict(sorted(ev.faults.items())),
        messages=messages,
        diverged_by_timeout=diverged,
        violations=v,
    )


def _check_history(sid: UUID, history: Sequence[HistoryEntry], v: dict[str, list[str]]) -> None:
    succeeded = [e.step for e in history if e.kind is HistoryKind.STEP_SUCCEEDED]
    compensated = [e.step for e in history if e.kind is HistoryKind.STEP_COMPENSATED]
    for name, seen in (("succeeded", succeeded), ("compensated", compensated)):
        twice = [s for s, n in Counter(seen).items() if n > 1]
        if twice:
            v["double_effects"].append(f"{sid}: history records {twice} {name} twice")
    order = [UNIT[s] for s in succeeded if s in STEPS]
    if order != sorted(order):
        v["order_violations"].append(f"{sid}: steps succeeded in order {succeeded}")
    undo = [STEPS.index(s) for s in compensated if s in STEPS]
    if undo != sorted(undo, reverse=True):
        v["order_violations"].append(f"{sid}: compensated in order {compensated}, not newest first")
    terminal = [
        e
        for e in history
        if e.kind in (HistoryKind.COMPLETED, HistoryKind.COMPENSATED, HistoryKind.FAILED)
    ]
    if len(terminal) != 1 and not any(e.kind is HistoryKind.OPERATOR for e in history):
        v["double_effects"].append(f"{sid}: {len(terminal)} terminal transitions in history")


def _check_ledger(sid: UUID, rows: Sequence[Mapping[str, Any]], v: dict[str, list[str]]) -> None:
    """The services' final answers, in the order they gave them."""
    applied: Counter[tuple[str, str]] = Counter()
    undone_at: dict[str, int] = {}
    actions: list[int] = []
    compensations: list[int] = []
    for i, row in enumerate(rows):
        step, direction = COMMANDS[row["command_type"]]
        if row["outcome"] != "success":
            continue
        applied[(step, direction)] += 1
        if direction == "action":
            actions.append(UNIT[step])
            if step in undone_at:
                v["order_violations"].append(f"{sid}: {step} applied after its compensation")
        else:
            compensations.append(STEPS.index(step))
            undone_at[step] = i
    twice = [f"{s}/{d}" for (s, d), n in applied.items() if n > 1]
    if twice:
        v["double_effects"].append(f"{sid}: the services applied {twice} more than once")
    if actions != sorted(actions):
        v["order_violations"].append(
            f"{sid}: the services applied actions in order "
            f"{[COMMANDS[r['command_type']][0] for r in rows if r['outcome'] == 'success']}"
        )
    if compensations != sorted(compensations, reverse=True):
        v["order_violations"].append(
            f"{sid}: the services compensated in order {[STEPS[i] for i in compensations]}"
        )


def _check_state(sid: UUID, state: SagaState, v: dict[str, list[str]]) -> None:
    statuses = {s.name: s.status for s in state.steps}
    bad = ""
    if state.status is SagaStatus.COMPLETED:
        if any(s not in (StepStatus.SUCCEEDED, StepStatus.SKIPPED) for s in statuses.values()):
            bad = "COMPLETED with a step neither SUCCEEDED nor SKIPPED"
    elif state.status is SagaStatus.COMPENSATED:
        if any(s in _EFFECT_KEPT or s is StepStatus.RUNNING for s in statuses.values()):
            bad = "COMPENSATED with a step still in effect"
    elif state.status is SagaStatus.FAILED and (
        state.stuck_step is None or state.stuck_step not in (state.failure or "")
    ):
        bad = f"FAILED without naming its step (stuck {state.stuck_step})"
    if bad:
        v["invariant_violations"].append(f"{sid}: {bad}: {statuses}")


def _kept(state: SagaState | None, step: str) -> bool | None:
    """Whether the orchestrator knows ``step``'s effect is in place (True), knows it is not
    (False), or cannot know: a compensation that failed for good may or may not have undone
    an action whose reply it never saw (None)."""
    if state is None:
        return False
    status = state.step(step).status
    if status is StepStatus.SUCCEEDED:
        return True
    if status in (
        StepStatus.PENDING,
        StepStatus.FAILED,
        StepStatus.COMPENSATED,
        StepStatus.SKIPPED,
    ):
        return False
    return None


def _disagree(state: SagaState | None, step: str, held: bool) -> bool:
    kept = _kept(state, step)
    return kept is not None and kept != held


def _check_money(ev: Evidence, planned: Mapping[UUID, Any], v: dict[str, list[str]]) -> None:
    before = {name: Decimal(b) for name, b in ev.plan.balances.items()}
    charged: dict[str, Decimal] = defaultdict(Decimal)
    by_ref = {row["order_ref"]: row for row in ev.payments}
    for sid, saga in planned.items():
        row = by_ref.get(sid)
        held = row is not None and row["status"] == PaymentStatus.CHARGED
        if _disagree(ev.states.get(sid), "charge_payment", held):
            v["money_drift"].append(
                f"{sid}: payment {row['status'] if row else 'absent'}, orchestrator says "
                f"{ev.states[sid].step('charge_payment').status.value if sid in ev.states else '-'}"
            )
        if held and row is not None:
            if row["amount"] != total(saga.input):
                v["money_drift"].append(f"{sid}: charged {row['amount']}, not {total(saga.input)}")
            charged[_NAMES[saga.input["customer_id"]]] += row["amount"]
    for name, start in before.items():
        want = start - charged[name]
        if ev.balances.get(name) != want:
            v["money_drift"].append(
                f"balance of {name}: {ev.balances.get(name)}, expected {want} (start {start})"
            )


def _check_stock(ev: Evidence, planned: Mapping[UUID, Any], v: dict[str, list[str]]) -> None:
    held: Counter[str] = Counter()
    by_ref = {row["order_ref"]: row for row in ev.reservations}
    step = "reserve_inventory"
    for sid, saga in planned.items():
        row = by_ref.get(sid)
        kept = row is not None and row["status"] == ReservationStatus.RESERVED
        if _disagree(ev.states.get(sid), step, kept):
            v["stock_drift"].append(
                f"{sid}: reservation {row['status'] if row else 'absent'}, orchestrator says "
                f"{ev.states[sid].step(step).status.value if sid in ev.states else '-'}"
            )
        if kept:
            held.update(quantities(saga.input))
    for sku in sorted(set(ev.reserved) | set(held)):
        want = ev.reserved_before.get(sku, 0) + held[sku]
        if ev.reserved.get(sku, 0) != want:
            v["stock_drift"].append(f"reserved {sku}: {ev.reserved.get(sku, 0)}, expected {want}")


def _check_ledgers_match_effects(
    ev: Evidence, planned: Mapping[UUID, Any], v: dict[str, list[str]]
) -> None:
    """Each service's ledger and its business table tell the same story: an effect is in
    place exactly when its action's success is recorded and its compensation's is not."""
    recorded: Counter[tuple[UUID, str, str]] = Counter()
    for row in ev.rows:
        if row["outcome"] == "success":
            step, direction = COMMANDS[row["command_type"]]
            recorded[(row["saga_id"], step, direction)] += 1
    for table, step, live, drift in (
        (ev.orders, "create_order", OrderStatus.CREATED, "invariant_violations"),
        (ev.payments, "charge_payment", PaymentStatus.CHARGED, "money_drift"),
        (ev.reservations, "reserve_inventory", ReservationStatus.RESERVED, "stock_drift"),
        (ev.shipments, "schedule_shipping", ShipmentStatus.SCHEDULED, "invariant_violations"),
    ):
        effects = {r["order_ref"]: r for r in table}
        for sid in planned:
            found = effects.get(sid)
            held = found is not None and found["status"] == live
            ledger = (
                recorded[(sid, step, "action")] > 0 and not recorded[(sid, step, "compensation")]
            )
            if held != ledger:
                v[drift].append(
                    f"{sid}: {step} effect {found['status'] if found else 'absent'}, but its "
                    f"ledger says {'applied' if ledger else 'not applied'}"
                )


def _check_other_effects(
    ev: Evidence, planned: Mapping[UUID, Any], v: dict[str, list[str]]
) -> None:
    for table, step, live in (
        (ev.orders, "create_order", OrderStatus.CREATED),
        (ev.shipments, "schedule_shipping", ShipmentStatus.SCHEDULED),
    ):
        by_ref = {row["order_ref"]: row for row in table}
        for sid in planned:
            row = by_ref.get(sid)
            if _disagree(ev.states.get(sid), step, row is not None and row["status"] == live):
                v["invariant_violations"].append(
                    f"{sid}: {step} effect {row['status'] if row else 'absent'} disagrees with "
                    "the orchestrator"
                )
