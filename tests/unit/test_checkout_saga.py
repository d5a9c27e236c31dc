"""The checkout saga's definition and payload builders, in the in-memory harness."""

from decimal import Decimal
from uuid import uuid4

from saga import SagaStatus
from saga.protocol.envelope import CommandEnvelope, parse_data
from saga.testing import Harness, fail, ok
from saga_demo.checkout import CHECKOUT, checkout_input, registry
from saga_demo.contracts.inventory import ReserveStock
from saga_demo.contracts.payment import ChargePayment

ADDRESS = {"name": "A", "street": "Main St 1", "city": "Berlin", "postal_code": "10115",
           "country": "DE"}  # fmt: skip
UNDO = ["shipping.cancel", "inventory.release", "payment.refund", "order.cancel"]


def harness() -> Harness:
    h = Harness(registry())
    h.on("order.create", lambda c: ok(order_id=str(uuid4()), total="39.80"))
    h.on("payment.charge", lambda c: ok(payment_id=str(uuid4()), amount="39.80",
                                        balance_after="10.00"))  # fmt: skip
    h.on("inventory.reserve", lambda c: ok(reservation_id=str(uuid4())))
    h.on("shipping.schedule", lambda c: ok(shipment_id=str(uuid4()), carrier="DHL"))
    for command in UNDO:
        h.on(command, lambda c: ok(nothing_to_undo=False))
    return h


def saga_input() -> dict[str, object]:
    return checkout_input(uuid4(), [("BOOK-1", 2, Decimal("19.90"))], ADDRESS)  # type: ignore[return-value]


async def test_payloads_are_valid_contracts_keyed_by_the_saga_id() -> None:
    h = harness()
    saga = await h.run("checkout", saga_input())  # type: ignore[arg-type]
    assert saga.status is SagaStatus.COMPLETED
    by_type: dict[str, CommandEnvelope] = {c.command_type: c for c in h.delivered}
    charge = parse_data(ChargePayment, by_type["payment.charge"].payload)
    assert charge.amount == Decimal("39.80")  # the total the order service replied with
    assert charge.order_ref == saga.saga_id
    reserve = parse_data(ReserveStock, by_type["inventory.reserve"].payload)
    assert [(i.sku, i.quantity) for i in reserve.items] == [("BOOK-1", 2)]


async def test_failure_at_the_last_step_compensates_in_reverse() -> None:
    h = harness()
    h.on("shipping.schedule", lambda c: fail("undeliverable_address"))
    saga = await h.run("checkout", saga_input())  # type: ignore[arg-type]
    assert saga.status is SagaStatus.COMPENSATED
    assert h.commands(saga.saga_id)[-3:] == UNDO[1:]


def test_shape() -> None:
    assert [s.name for s in CHECKOUT.steps] == [
        "create_order", "charge_payment", "reserve_inventory", "schedule_shipping"]  # fmt: skip
    assert CHECKOUT.pivot_index is None
    assert all(s.compensation for s in CHECKOUT.steps)
