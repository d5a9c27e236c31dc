"""The chaos soak's plan: seeded, saved and loaded exactly, read by the participants, and the
expected end of every kind of planned checkout."""

from __future__ import annotations

import json
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from saga.core.errors import ConfigError
from saga.participant.faults import (
    INJECTED_REFUSAL,
    INJECTED_TRANSIENT,
    InjectedFault,
    load_fault_plan,
)
from saga_demo import inventory, payment
from saga_demo.checkout import CHECKOUT, checkout_input
from saga_demo.cli import SAMPLE_ADDRESSES, SAMPLE_PRICES
from saga_demo.contracts.inventory import InventoryFailure
from saga_demo.contracts.payment import PaymentFailure
from saga_demo.contracts.shipping import ShippingFailure
from saga_tools.chaos.model import STEPS, World, quantities, total
from saga_tools.chaos.plan import (
    CLUSTER_KINDS,
    FAULT_KINDS,
    MIX,
    PLENTY_BALANCE,
    PLENTY_STOCK,
    ChaosPlan,
    PlannedFault,
    PlannedSaga,
    expectation,
    make_plan,
)

ORDER, PAYMENT, INVENTORY, SHIPPING = STEPS
BERLIN = SAMPLE_ADDRESSES[0]
UNDELIVERABLE = SAMPLE_ADDRESSES[3]
SLOWTOWN = {**BERLIN, "city": "Slowtown"}
ACTION_BUDGET = 3  # the checkout's action retry budget (attempts)
COMPENSATION_BUDGET = 10

COMPLETED_KINDS = {"success", "digital_only", "mixed_goods", "flaky_gateway", "transient_action"}
COMPENSATED_KINDS = {
    "member_refused",
    "limit_exceeded",
    "out_of_stock",
    "undeliverable",
    "carrier_unreachable",
    "refused_then_compensation_retried",
}
FAILED_KINDS = {"compensation_fails_for_good", "compensation_refused"}
#: the steps that took effect when a step fails for good: those before it, and its sibling in
#: the parallel group (the charge and the reservation run side by side)
RAN_BY = {
    ORDER: (),
    PAYMENT: (ORDER, INVENTORY),
    INVENTORY: (ORDER, PAYMENT),
    SHIPPING: (ORDER, PAYMENT, INVENTORY),
}


def empty_plan() -> ChaosPlan:
    """A plan with the soak's balances and stock and no sagas: its world is the soak's."""
    return ChaosPlan(
        seed=0,
        sagas=(),
        schedule=(),
        rate=1.0,
        balances={name: str(PLENTY_BALANCE) for name in payment.CUSTOMERS},
        stock={inventory.BOOK: PLENTY_STOCK, inventory.LAMP: PLENTY_STOCK},
    )


@pytest.fixture
def world() -> World:
    return empty_plan().world()


def planned(
    *faults: PlannedFault,
    customer: str = "alice",
    lines: tuple[tuple[str, int], ...] = ((inventory.BOOK, 1),),
    address: dict[str, str] | None = None,
    kind: str = "hand_built",
) -> PlannedSaga:
    items = [(sku, n, SAMPLE_PRICES[sku]) for sku, n in lines]
    return PlannedSaga(
        key=f"test-{kind}",
        input=checkout_input(payment.CUSTOMERS[customer], items, address or dict(BERLIN)),
        faults=faults,
        kind=kind,
    )


# --- the seed decides everything ---------------------------------------------------------------


def test_the_same_seed_gives_the_same_plan() -> None:
    a, b = make_plan(1234, 150), make_plan(1234, 150)
    assert a == b
    assert a.sagas == b.sagas
    assert a.schedule == b.schedule
    assert a.fault_plan() == b.fault_plan()
    assert a.to_json() == b.to_json()


def test_a_different_seed_gives_a_different_plan() -> None:
    a, b = make_plan(1, 150), make_plan(2, 150)
    assert [s.key for s in a.sagas] != [s.key for s in b.sagas]
    assert [s.kind for s in a.sagas] != [s.kind for s in b.sagas]
    assert [s.input for s in a.sagas] != [s.input for s in b.sagas]
    assert a.schedule != b.schedule
    assert a.fault_plan() != b.fault_plan()


def test_keys_and_saga_ids_are_unique() -> None:
    plan = make_plan(99, 400)
    assert len({s.key for s in plan.sagas}) == 400
    assert len({s.saga_id for s in plan.sagas}) == 400


# --- persistence -----------------------------------------------------------------------------


def test_save_and_load_round_trip_exactly(tmp_path: Path) -> None:
    plan = make_plan(42, 200, rate=25.0, fault_every=1.5)
    assert any(s.faults for s in plan.sagas)  # the faults are round-tripped too
    path = tmp_path / "plan.json"
    plan.save(path)
    loaded = ChaosPlan.load(path)
    assert loaded == plan
    assert loaded.to_json() == plan.to_json()
    assert loaded.world() == plan.world()
    assert [s.saga_id for s in loaded.sagas] == [s.saga_id for s in plan.sagas]
    assert all(isinstance(f, PlannedFault) for s in loaded.sagas for f in s.faults)
    assert all(isinstance(s.faults, tuple) for s in loaded.sagas)
    assert loaded.duration == plan.duration


def test_load_of_a_saved_plan_keeps_its_expectations(tmp_path: Path) -> None:
    plan = make_plan(5, 120)
    path = tmp_path / "plan.json"
    plan.save(path)
    loaded = ChaosPlan.load(path)
    world, again = plan.world(), loaded.world()
    assert [expectation(world, s) for s in plan.sagas] == [
        expectation(again, s) for s in loaded.sagas
    ]


# --- what the participants read ------------------------------------------------------------


def test_fault_plan_is_what_the_participants_load(tmp_path: Path) -> None:
    plan = make_plan(7, 300)
    path = tmp_path / "faults.json"
    path.write_text(json.dumps(plan.fault_plan()))
    loaded = load_fault_plan(path)

    actions = {s.name: s.action for s in CHECKOUT.steps}
    compensations = {s.name: s.compensation for s in CHECKOUT.steps}
    want: dict[Any, InjectedFault] = {}
    for saga in plan.sagas:
        for f in saga.faults:
            command = (actions if f.direction == "action" else compensations)[f.step]
            want[(saga.saga_id, command)] = InjectedFault(f.mode, f.times)
    assert want  # the plan does inject failures
    assert loaded == want
    # no two faults of a saga land on the same command: none is silently dropped
    assert len(loaded) == sum(len(s.faults) for s in plan.sagas)


def test_fault_plan_maps_each_direction_to_its_command_type() -> None:
    saga = planned(
        PlannedFault(INVENTORY, "action", "refuse"),
        PlannedFault(PAYMENT, "compensation", "transient", 4),
    )
    plan = ChaosPlan(seed=0, sagas=(saga,), schedule=(), rate=1.0)
    assert plan.fault_plan() == {
        "faults": [
            {
                "saga_id": str(saga.saga_id),
                "command_type": "inventory.reserve",
                "mode": "refuse",
                "times": 1,
            },
            {
                "saga_id": str(saga.saga_id),
                "command_type": "payment.refund",
                "mode": "transient",
                "times": 4,
            },
        ]
    }


def test_an_empty_fault_plan_loads_as_empty(tmp_path: Path) -> None:
    path = tmp_path / "faults.json"
    path.write_text(empty_plan().to_json())  # no "faults" key: a plan file is not a fault plan
    with pytest.raises(ConfigError):
        load_fault_plan(path)
    path.write_text(json.dumps(empty_plan().fault_plan()))
    assert load_fault_plan(path) == {}


# --- the workload mix ----------------------------------------------------------------------


def test_the_mix_covers_every_kind() -> None:
    plan = make_plan(2024, 400)
    kinds = Counter(s.kind for s in plan.sagas)
    assert set(kinds) == {k for k, _ in MIX}
    assert kinds.most_common(1)[0][0] == "success"


def test_each_kind_has_its_shape() -> None:
    for saga in make_plan(11, 400).sagas:
        customer = saga.input["customer_id"]
        skus = {i["sku"] for i in saga.input["items"]}
        actions = [f for f in saga.faults if f.direction == "action"]
        compensations = [f for f in saga.faults if f.direction == "compensation"]
        if saga.kind == "flaky_gateway":
            assert customer == str(payment.DAVE)
        elif saga.kind == "limit_exceeded":
            assert customer == str(payment.CAROL)
        elif saga.kind == "out_of_stock":
            assert inventory.RARE in skus
        elif saga.kind == "undeliverable":
            assert saga.input["address"] == dict(UNDELIVERABLE)
        elif saga.kind == "carrier_unreachable":
            assert saga.input["address"]["city"] == "Slowtown"
        elif saga.kind == "digital_only":
            assert skus == {inventory.EBOOK}
            assert all(i["digital"] for i in saga.input["items"])
        elif saga.kind == "mixed_goods":
            assert inventory.EBOOK in skus and skus - {inventory.EBOOK}
        if saga.kind == "member_refused":
            (refusal,) = actions
            assert refusal.step in (PAYMENT, INVENTORY) and refusal.mode == "refuse"
            assert not compensations
        elif saga.kind == "transient_action":
            assert len(actions) == 1 and not compensations
            assert actions[0].mode == "transient" and not actions[0].exhausts
        elif saga.kind in FAILED_KINDS | {"refused_then_compensation_retried"}:
            (refusal,) = actions
            (comp,) = compensations
            assert refusal.mode == "refuse"
            assert comp.step in RAN_BY[refusal.step]  # before it, or beside it
            assert comp.exhausts == (saga.kind in FAILED_KINDS)
        else:
            assert saga.faults == ()


def test_every_kind_ends_as_its_kind_says() -> None:
    plan = make_plan(3, 400)
    world = plan.world()
    for saga in plan.sagas:
        want = expectation(world, saga)
        if saga.kind in COMPLETED_KINDS:
            assert want.status == "COMPLETED", saga
        elif saga.kind in COMPENSATED_KINDS:
            assert want.status == "COMPENSATED", saga
        else:
            assert saga.kind in FAILED_KINDS
            assert want.status == "FAILED", saga
            assert want.failed_compensation is not None


def test_unknown_fault_kinds_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"unknown fault kinds \['meteor'\]"):
        make_plan(1, 10, kinds=("latency", "meteor"))


def test_the_schedule_uses_only_the_chosen_kinds() -> None:
    plan = make_plan(8, 400, rate=40.0, fault_every=0.5, kinds=("latency", "kill_service"))
    assert plan.schedule
    assert {n.kind for n in plan.schedule} <= {"latency", "kill_service"}
    at = [n.at for n in plan.schedule]
    assert at == sorted(at)
    assert at[-1] < plan.duration + 2 * 0.5
    targets = {n.target for n in plan.schedule if n.kind == "kill_service"}
    assert targets <= {"order", "payment", "inventory", "shipping"}
    assert make_plan(8, 50, kinds=()).schedule == ()
    one_node = set(FAULT_KINDS) - set(CLUSTER_KINDS)
    assert {n.kind for n in make_plan(8, 200, fault_every=0.05).schedule} == one_node


def test_a_cluster_plan_targets_nodes_and_instances_and_a_single_node_plan_is_unchanged() -> None:
    wide = make_plan(8, 200, fault_every=0.05, nodes=3, instances=3, backend="postgresql")
    assert {n.kind for n in wide.schedule} == set(FAULT_KINDS)
    assert wide.orchestrators == ("orchestrator-1", "orchestrator-2", "orchestrator-3")
    processes = {*wide.orchestrators, "order", "payment", "inventory", "shipping"}
    for fault in wide.schedule:
        if fault.kind in ("kill_broker", "partition_nodes"):
            assert fault.target in {"node-1", "node-2", "node-3"}, fault
        elif fault.kind == "kill_orchestrator":
            assert fault.target in wide.orchestrators, fault
        elif fault.kind in ("partition", "sigterm", "startup_cut", "db_lock"):
            assert fault.target in processes, fault
    assert ChaosPlan.load_text(wide.to_json()) == wide
    # one node and one orchestrator: the draws of old, so a seed still means what it meant
    narrow = make_plan(8, 200, fault_every=0.05)
    assert narrow.orchestrators == ("orchestrator",)
    assert all(
        n.target == "" for n in narrow.schedule if n.kind in ("kill_orchestrator", "partition")
    )


def test_a_shape_that_cannot_run_is_refused() -> None:
    with pytest.raises(ValueError, match="partition_nodes needs a cluster"):
        make_plan(1, 10, kinds=("partition_nodes",))
    with pytest.raises(ValueError, match="need backend postgresql"):
        make_plan(1, 10, instances=2)
    with pytest.raises(ValueError, match="nodes must be 1"):
        make_plan(1, 10, nodes=2)


# --- how each planned saga must end --------------------------------------------------------


def test_exhausts_is_the_retry_budget() -> None:
    assert not PlannedFault(PAYMENT, "action", "transient", ACTION_BUDGET - 1).exhausts
    assert PlannedFault(PAYMENT, "action", "transient", ACTION_BUDGET).exhausts
    assert PlannedFault(PAYMENT, "action", "refuse").exhausts
    assert not PlannedFault(ORDER, "compensation", "transient", COMPENSATION_BUDGET - 1).exhausts
    assert PlannedFault(ORDER, "compensation", "transient", COMPENSATION_BUDGET).exhausts
    assert PlannedFault(ORDER, "compensation", "refuse").exhausts


def test_success(world: World) -> None:
    want = expectation(world, planned(lines=((inventory.BOOK, 2), (inventory.LAMP, 2))))
    assert want.status == "COMPLETED"
    assert want.base.succeeded == STEPS
    assert want.base.failed_step is None
    assert want.failed_compensation is None


def test_flaky_gateway_still_completes(world: World) -> None:
    want = expectation(world, planned(customer="dave"))
    assert want.status == "COMPLETED"
    assert want.base.flaky


def test_limit_exceeded_is_refused_at_payment(world: World) -> None:
    want = expectation(world, planned(customer="carol", lines=((inventory.LAMP, 2),)))
    assert want.status == "COMPENSATED"
    assert want.base.failed_step == PAYMENT
    assert want.base.reason == PaymentFailure.LIMIT_EXCEEDED
    assert want.base.succeeded == (ORDER, INVENTORY)  # reserved beside it, then released
    assert not want.base.transient
    assert want.failed_compensation is None


def test_out_of_stock_is_refused_at_inventory(world: World) -> None:
    want = expectation(world, planned(lines=((inventory.BOOK, 1), (inventory.RARE, 1))))
    assert want.status == "COMPENSATED"
    assert want.base.failed_step == INVENTORY
    assert want.base.reason == InventoryFailure.OUT_OF_STOCK
    assert want.base.succeeded == (ORDER, PAYMENT)


def test_undeliverable_is_refused_at_shipping(world: World) -> None:
    want = expectation(world, planned(address=dict(UNDELIVERABLE)))
    assert want.status == "COMPENSATED"
    assert want.base.failed_step == SHIPPING
    assert want.base.reason == ShippingFailure.UNDELIVERABLE_ADDRESS
    assert want.base.succeeded == (ORDER, PAYMENT, INVENTORY)
    assert not want.base.transient


def test_unreachable_carrier_is_a_transient_failure_at_shipping(world: World) -> None:
    want = expectation(world, planned(address=SLOWTOWN))
    assert want.status == "COMPENSATED"
    assert want.base.failed_step == SHIPPING
    assert want.base.transient


@pytest.mark.parametrize("step", STEPS)
def test_a_transient_action_below_its_budget_completes(world: World, step: str) -> None:
    for times in range(1, ACTION_BUDGET):
        want = expectation(world, planned(PlannedFault(step, "action", "transient", times)))
        assert want.status == "COMPLETED"
        assert want.base.failed_step is None


@pytest.mark.parametrize("step", STEPS)
def test_a_transient_action_at_its_budget_compensates(world: World, step: str) -> None:
    saga = planned(PlannedFault(step, "action", "transient", ACTION_BUDGET))
    want = expectation(world, saga)
    assert want.status == "COMPENSATED"
    assert want.base.failed_step == step
    assert want.base.reason == INJECTED_TRANSIENT
    assert want.base.transient  # retried away, so the ledger records no refusal
    assert want.base.succeeded == RAN_BY[step]


@pytest.mark.parametrize("at", [1, 2, 3])
def test_refusal_and_a_compensation_retried_below_budget_compensate(world: World, at: int) -> None:
    for undone in RAN_BY[STEPS[at]]:
        saga = planned(
            PlannedFault(STEPS[at], "action", "refuse"),
            PlannedFault(undone, "compensation", "transient", COMPENSATION_BUDGET - 1),
        )
        want = expectation(world, saga)
        assert want.status == "COMPENSATED"
        assert want.base.failed_step == STEPS[at]
        assert want.base.reason == INJECTED_REFUSAL
        assert not want.base.transient
        assert want.base.succeeded == RAN_BY[STEPS[at]]
        assert want.failed_compensation is None


@pytest.mark.parametrize("at", [1, 2, 3])
def test_a_compensation_exhausting_its_budget_fails_at_that_step(world: World, at: int) -> None:
    for undone in RAN_BY[STEPS[at]]:
        saga = planned(
            PlannedFault(STEPS[at], "action", "refuse"),
            PlannedFault(undone, "compensation", "transient", COMPENSATION_BUDGET),
        )
        want = expectation(world, saga)
        assert want.status == "FAILED"
        assert want.failed_compensation == undone
        assert want.reason is None
        assert want.base.failed_step == STEPS[at]


@pytest.mark.parametrize("at", [1, 2, 3])
def test_a_refused_compensation_fails_at_that_step(world: World, at: int) -> None:
    for undone in RAN_BY[STEPS[at]]:
        saga = planned(
            PlannedFault(STEPS[at], "action", "refuse"),
            PlannedFault(undone, "compensation", "refuse"),
        )
        want = expectation(world, saga)
        assert want.status == "FAILED"
        assert want.failed_compensation == undone
        assert want.reason == INJECTED_REFUSAL


def test_a_business_refusal_with_a_failing_compensation_fails(world: World) -> None:
    saga = planned(
        PlannedFault(ORDER, "compensation", "refuse"),
        customer="carol",
        lines=((inventory.LAMP, 2),),
    )
    want = expectation(world, saga)
    assert want.status == "FAILED"
    assert want.base.failed_step == PAYMENT
    assert want.base.reason == PaymentFailure.LIMIT_EXCEEDED
    assert want.failed_compensation == ORDER


def test_the_newest_failing_compensation_stops_the_saga(world: World) -> None:
    saga = planned(
        PlannedFault(SHIPPING, "action", "refuse"),
        PlannedFault(ORDER, "compensation", "refuse"),
        PlannedFault(PAYMENT, "compensation", "transient", COMPENSATION_BUDGET),
    )
    assert expectation(world, saga).failed_compensation == PAYMENT


def test_compensation_faults_that_never_run_change_nothing(world: World) -> None:
    # a completed saga compensates nothing; the failed step and the ones after it are never
    # undone
    assert expectation(world, planned(PlannedFault(ORDER, "compensation", "refuse"))).status == (
        "COMPLETED"
    )
    saga = planned(
        PlannedFault(PAYMENT, "action", "refuse"),
        PlannedFault(PAYMENT, "compensation", "refuse"),
        PlannedFault(SHIPPING, "compensation", "refuse"),
    )
    want = expectation(world, saga)
    assert want.status == "COMPENSATED"
    assert want.base.failed_step == PAYMENT


def test_a_refused_member_leaves_its_sibling_to_be_undone(world: World) -> None:
    saga = planned(
        PlannedFault(PAYMENT, "action", "refuse"),
        PlannedFault(INVENTORY, "compensation", "refuse"),
    )
    want = expectation(world, saga)
    assert want.base.succeeded == (ORDER, INVENTORY)
    assert (want.status, want.failed_compensation) == ("FAILED", INVENTORY)


def test_digital_goods_alone_skip_the_reservation_and_the_shipping(world: World) -> None:
    want = expectation(world, planned(lines=((inventory.EBOOK, 2),), address=dict(UNDELIVERABLE)))
    assert want.status == "COMPLETED"  # never asked to ship: the address does not matter
    assert want.base.succeeded == (ORDER, PAYMENT)
    assert want.base.skipped == (INVENTORY, SHIPPING)
    # a refusal planned at a skipped step never happens
    saga = planned(PlannedFault(INVENTORY, "action", "refuse"), lines=((inventory.EBOOK, 1),))
    assert expectation(world, saga).status == "COMPLETED"
    refused = planned(PlannedFault(PAYMENT, "action", "refuse"), lines=((inventory.EBOOK, 1),))
    assert expectation(world, refused).base.succeeded == (ORDER,)
    assert expectation(world, refused).base.skipped == (INVENTORY,)  # shipping: never reached


def test_a_mixed_order_reserves_only_its_physical_lines(world: World) -> None:
    lines = ((inventory.BOOK, 1), (inventory.EBOOK, 2))
    want = expectation(world, planned(lines=lines))
    assert want.status == "COMPLETED" and want.base.skipped == ()
    checkout = planned(lines=lines).input
    assert quantities(checkout) == Counter({inventory.BOOK: 1})
    assert total(checkout) == SAMPLE_PRICES[inventory.BOOK] + 2 * SAMPLE_PRICES[inventory.EBOOK]


def test_an_injected_refusal_comes_before_a_later_business_failure(world: World) -> None:
    saga = planned(PlannedFault(PAYMENT, "action", "refuse"), address=dict(UNDELIVERABLE))
    want = expectation(world, saga)
    assert want.base.failed_step == PAYMENT
    assert want.base.reason == INJECTED_REFUSAL


def test_the_world_has_plenty_of_everything(world: World) -> None:
    assert all(a.balance == PLENTY_BALANCE for a in world.accounts.values())
    assert world.available[inventory.BOOK] == PLENTY_STOCK
    assert world.available[inventory.LAMP] == PLENTY_STOCK
    assert world.available[inventory.RARE] == 0
    assert Decimal(empty_plan().balances["alice"]) == PLENTY_BALANCE
