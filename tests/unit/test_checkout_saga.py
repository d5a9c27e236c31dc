"""The checkout saga's definition and payload builders, in the in-memory harness."""

import json
from decimal import Decimal
from uuid import uuid4

import pytest

from saga import Registry, SagaStatus
from saga.core.errors import UnknownSagaError
from saga.core.state import HistoryKind, StepStatus
from saga.orchestrator.runtime import Orchestrator
from saga.protocol.envelope import CommandEnvelope, parse_data
from saga.testing import Harness, fail, ok
from saga_demo.checkout import CHECKOUT, CHECKOUT_V1, PARTICIPANTS, checkout_input, registry
from saga_demo.contracts.checkout import CheckoutInput
from saga_demo.contracts.inventory import ReserveStock
from saga_demo.contracts.order import CreateOrder
from saga_demo.contracts.payment import ChargePayment
from saga_demo.contracts.shipping import ScheduleShipment
from saga_demo.inventory import BOOK, EBOOK

ADDRESS = {"name": "A", "street": "Main St 1", "city": "Berlin", "postal_code": "10115",
           "country": "DE"}  # fmt: skip
UNDO = ["shipping.cancel", "inventory.release", "payment.refund", "order.cancel"]
BOOKS = [(BOOK, 2, Decimal("19.90"))]
EBOOKS = [(EBOOK, 1, Decimal("9.90"))]


def harness(definitions: Registry | None = None) -> Harness:
    h = Harness(definitions or registry())
    h.on("order.create", lambda c: ok(order_id=str(uuid4()), total="39.80"))
    h.on("payment.charge", lambda c: ok(payment_id=str(uuid4()), amount="39.80",
                                        balance_after="10.00"))  # fmt: skip
    h.on("inventory.reserve", lambda c: ok(reservation_id=str(uuid4())))
    h.on("shipping.schedule", lambda c: ok(shipment_id=str(uuid4()), carrier="DHL"))
    h.on("order.cancel", lambda c: ok(order_id=str(uuid4()), nothing_to_undo=False))
    h.on("payment.refund", lambda c: ok(payment_id=str(uuid4()), amount="39.80",
                                        nothing_to_undo=False))  # fmt: skip
    h.on("inventory.release", lambda c: ok(reservation_id=str(uuid4()), nothing_to_undo=False))
    h.on("shipping.cancel", lambda c: ok(shipment_id=str(uuid4()), nothing_to_undo=False))
    return h


def saga_input(items: list[tuple[str, int, Decimal]] = BOOKS) -> dict[str, object]:
    return checkout_input(uuid4(), items, ADDRESS)  # type: ignore[return-value]


def sent(h: Harness) -> dict[str, CommandEnvelope]:
    return {c.command_type: c for c in h.delivered}


async def test_payloads_are_valid_contracts_keyed_by_the_saga_id() -> None:
    h = harness()
    saga = await h.run("checkout", saga_input())  # type: ignore[arg-type]
    assert saga.status is SagaStatus.COMPLETED
    assert saga.definition_version == CHECKOUT.version == 2
    by_type = sent(h)
    charge = parse_data(ChargePayment, by_type["payment.charge"].payload)
    assert charge.amount == Decimal("39.80")  # the total the order service replied with
    assert charge.order_ref == saga.saga_id
    reserve = parse_data(ReserveStock, by_type["inventory.reserve"].payload)
    assert [(i.sku, i.quantity) for i in reserve.items] == [("BOOK-1", 2)]


async def test_the_charge_and_the_reservation_leave_together() -> None:
    h = harness()
    saga_id = await h.start("checkout", saga_input())  # type: ignore[arg-type]
    await h.deliver()  # order.create, answered: the group's turn
    waiting = [m.body for m in await h.store.pending_outbox(10)]
    kinds = sorted(CommandEnvelope.model_validate_json(b).command_type for b in waiting)
    assert kinds == ["inventory.reserve", "payment.charge"]  # written in one transition
    state = await h.saga(saga_id)
    assert sorted(lane.index for lane in state.lanes) == [1, 2]  # both in flight at once


@pytest.mark.parametrize(
    ("failing", "reason", "undo"),
    [
        ("payment.charge", "insufficient_funds", ["inventory.release", "order.cancel"]),
        ("inventory.reserve", "out_of_stock", ["payment.refund", "order.cancel"]),
    ],
)
async def test_a_failure_in_either_branch_undoes_the_other_and_the_order(
    failing: str, reason: str, undo: list[str]
) -> None:
    h = harness()
    h.on(failing, lambda c: fail(reason))
    saga = await h.run("checkout", saga_input())  # type: ignore[arg-type]
    assert saga.status is SagaStatus.COMPENSATED
    commands = h.commands(saga.saga_id)
    assert commands[:3] == ["order.create", "payment.charge", "inventory.reserve"]
    assert commands[3:] == undo  # the failed member has nothing to undo; never shipped
    step = "charge_payment" if failing == "payment.charge" else "reserve_inventory"
    assert saga.step(step).status is StepStatus.FAILED
    assert (saga.failure or "").startswith(f"step {step} failed: {reason}")
    assert saga.step("schedule_shipping").status is StepStatus.PENDING


async def test_failure_at_the_last_step_compensates_in_reverse() -> None:
    h = harness()
    h.on("shipping.schedule", lambda c: fail("undeliverable_address"))
    saga = await h.run("checkout", saga_input())  # type: ignore[arg-type]
    assert saga.status is SagaStatus.COMPENSATED
    assert h.commands(saga.saga_id)[-3:] == UNDO[1:]  # the group newest first, then the order


async def test_digital_goods_alone_are_charged_and_neither_reserved_nor_shipped() -> None:
    h = harness()
    saga = await h.run("checkout", saga_input(EBOOKS))  # type: ignore[arg-type]
    assert saga.status is SagaStatus.COMPLETED
    assert h.commands(saga.saga_id) == ["order.create", "payment.charge"]
    statuses = {s.name: s.status for s in saga.steps}
    assert statuses["reserve_inventory"] is StepStatus.SKIPPED
    assert statuses["schedule_shipping"] is StepStatus.SKIPPED
    skipped = [e.step for e in await h.history(saga.saga_id) if e.kind is HistoryKind.STEP_SKIPPED]
    assert skipped == ["reserve_inventory", "schedule_shipping"]
    order = parse_data(CreateOrder, sent(h)["order.create"].payload)
    assert [line.sku for line in order.items] == [EBOOK]  # the order holds every line


async def test_a_mixed_order_reserves_and_ships_only_its_physical_lines() -> None:
    h = harness()
    saga = await h.run("checkout", saga_input(BOOKS + EBOOKS))  # type: ignore[arg-type]
    assert saga.status is SagaStatus.COMPLETED
    by_type = sent(h)
    reserve = parse_data(ReserveStock, by_type["inventory.reserve"].payload)
    ship = parse_data(ScheduleShipment, by_type["shipping.schedule"].payload)
    assert [line.sku for line in reserve.items] == [line.sku for line in ship.items] == [BOOK]
    order = parse_data(CreateOrder, by_type["order.create"].payload)
    assert sorted(line.sku for line in order.items) == sorted([BOOK, EBOOK])


async def test_a_digital_only_failure_undoes_only_what_ran() -> None:
    h = harness()
    h.on("payment.charge", lambda c: fail("insufficient_funds"))
    saga = await h.run("checkout", saga_input(EBOOKS))  # type: ignore[arg-type]
    assert saga.status is SagaStatus.COMPENSATED
    assert h.commands(saga.saga_id) == ["order.create", "payment.charge", "order.cancel"]
    assert saga.step("reserve_inventory").status is StepStatus.SKIPPED


def test_the_input_marks_digital_lines_and_defaults_to_physical() -> None:
    data = saga_input(BOOKS + EBOOKS)
    assert [i.get("digital") for i in data["items"]] == [None, True]  # type: ignore[attr-defined]
    valid = CheckoutInput.model_validate_json(json.dumps(data))
    assert [line.digital for line in valid.items] == [False, True]


async def test_a_checkout_started_on_version_1_finishes_on_it_after_the_upgrade() -> None:
    """What the docs tell users: keep the old version registered while its sagas run."""
    old = Registry([CHECKOUT_V1], participants=PARTICIPANTS)
    h = harness(old)
    saga_id = await h.start("checkout", saga_input())  # type: ignore[arg-type]
    await h.deliver()  # created; the charge is on its way when the orchestrator is upgraded
    h.registry = registry()
    h.orchestrator = Orchestrator(h.registry, h.store, clock=h.clock)
    await h.settle()
    saga = await h.saga(saga_id)
    assert (saga.status, saga.definition_version) == (SagaStatus.COMPLETED, 1)
    assert h.commands(saga_id) == [
        "order.create", "payment.charge", "inventory.reserve", "shipping.schedule"]  # fmt: skip
    new = await h.run("checkout", saga_input())  # type: ignore[arg-type]
    assert new.definition_version == 2  # new checkouts start the newest version


def test_without_version_1_its_sagas_could_not_go_on() -> None:
    only_new = Registry([CHECKOUT], participants=PARTICIPANTS)
    with pytest.raises(UnknownSagaError):
        only_new.get("checkout", 1)


def test_shape() -> None:
    assert [s.name for s in CHECKOUT.steps] == [
        "create_order", "charge_payment", "reserve_inventory", "schedule_shipping"]  # fmt: skip
    assert CHECKOUT.groups == ((1, 2),)  # the charge and the reservation in parallel
    conditional = [s.name for s in CHECKOUT.steps if s.when is not None]
    assert conditional == ["reserve_inventory", "schedule_shipping"]
    assert CHECKOUT.pivot_index is None
    assert all(s.compensation for s in CHECKOUT.steps)
    assert (CHECKOUT_V1.version, CHECKOUT_V1.groups) == (1, ())
    assert [d.version for d in registry().all()] == [1, 2]
    assert registry().get("checkout") is CHECKOUT
