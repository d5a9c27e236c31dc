"""The checkout saga: create the order, then charge the payment and reserve the stock in
parallel, then schedule the shipping, only when the order holds a physical item.

``CHECKOUT`` (version 2)::

    create_order -> Parallel(charge_payment, reserve_inventory) -> schedule_shipping

The charge and the reservation do not need each other's output, so they are sent together and
the saga moves on when both succeeded. When one of them fails for good, the saga waits for the
other's answer and then undoes it (a refund or a release) before cancelling the order. Digital
lines (``CheckoutLine.digital``) are charged but neither reserved nor shipped: inventory and
shipping see only the physical lines, and a checkout of digital goods alone skips both steps
(recorded as skipped, nothing sent, never compensated).

``CHECKOUT_V1`` is the previous version, four steps in a row. A saga keeps the version it
started with, so version 1 stays registered while checkouts started before the upgrade may
still run; new checkouts start version 2, the newest. Drop it from ``registry`` once none of
them is left.

The saga names its contracts: ``CheckoutInput`` is checked before a checkout is started (a bad
input is refused, nothing stored), and each step names the models of its command payloads and
replies, so every payload is validated before it is sent and ``saga schema export`` publishes
them. The order reference of every command is the saga id: each participant keys its effect
(and its compensation's tombstone) on it.

There is no pivot: the shipment is only *scheduled* here, and cancelling a scheduled shipment is
an ordinary compensation. In a shop where shipping dispatches goods at once, ``schedule_shipping``
would be the pivot (``pivot=True``) and a failure after it would be retried, never compensated.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from datetime import timedelta
from decimal import Decimal
from enum import StrEnum
from typing import Any, cast
from uuid import UUID

from saga import JSON, Parallel, Registry, RetryPolicy, SagaContext, SagaDefinition, Step
from saga.protocol import Contract
from saga_demo.contracts import inventory, order, payment, shipping
from saga_demo.contracts.checkout import CheckoutInput

__all__ = ["CHECKOUT", "CHECKOUT_V1", "PARTICIPANTS", "checkout_input", "has_physical", "registry"]

PARTICIPANTS = ("order", "payment", "inventory", "shipping")

_ACTION_RETRY = RetryPolicy(
    max_attempts=3,
    initial_backoff=timedelta(milliseconds=200),
    max_backoff=timedelta(seconds=2),
)
_COMPENSATION_RETRY = RetryPolicy(
    max_attempts=10,
    initial_backoff=timedelta(milliseconds=500),
    max_backoff=timedelta(seconds=5),
)
_TIMEOUT = timedelta(seconds=3)


def _ref(ctx: SagaContext) -> str:
    assert ctx.saga_id is not None
    return str(ctx.saga_id)


def _items(ctx: SagaContext) -> list[dict[str, JSON]]:
    return cast(list[dict[str, JSON]], ctx.input["items"])


def _lines(ctx: SagaContext) -> list[JSON]:
    """Every line as stock sees it (version 1 reserves and ships them all)."""
    return [{"sku": i["sku"], "quantity": i["quantity"]} for i in _items(ctx)]


def _physical_lines(ctx: SagaContext) -> list[JSON]:
    """The lines that are stocked and shipped; a checkout started by version 1 has no
    ``digital`` flags, and a line without one is physical."""
    return [
        {"sku": i["sku"], "quantity": i["quantity"]}
        for i in _items(ctx)
        if not i.get("digital", False)
    ]


def has_physical(ctx: SagaContext) -> bool:
    """Whether the checkout holds a line to reserve and ship (the condition of both steps)."""
    return any(not i.get("digital", False) for i in _items(ctx))


def _create_order(ctx: SagaContext) -> Mapping[str, JSON]:
    i = ctx.input
    return {
        "order_ref": _ref(ctx),
        "customer_id": i["customer_id"],
        "items": [
            {"sku": line["sku"], "quantity": line["quantity"], "unit_price": line["unit_price"]}
            for line in _items(ctx)
        ],
        "currency": i["currency"],
    }


def _cancel_order(ctx: SagaContext) -> Mapping[str, JSON]:
    return {"order_ref": _ref(ctx), "reason": "checkout compensated"}


def _charge(ctx: SagaContext) -> Mapping[str, JSON]:
    return {
        "order_ref": _ref(ctx),
        "customer_id": ctx.input["customer_id"],
        "amount": ctx.output("create_order")["total"],
        "currency": ctx.input["currency"],
    }


def _refund(ctx: SagaContext) -> Mapping[str, JSON]:
    return {"order_ref": _ref(ctx), "customer_id": ctx.input["customer_id"]}


def _reserve_all(ctx: SagaContext) -> Mapping[str, JSON]:
    return {"order_ref": _ref(ctx), "items": _lines(ctx)}


def _reserve(ctx: SagaContext) -> Mapping[str, JSON]:
    return {"order_ref": _ref(ctx), "items": _physical_lines(ctx)}


def _release(ctx: SagaContext) -> Mapping[str, JSON]:
    return {"order_ref": _ref(ctx)}


def _schedule_all(ctx: SagaContext) -> Mapping[str, JSON]:
    return {"order_ref": _ref(ctx), "address": ctx.input["address"], "items": _lines(ctx)}


def _schedule(ctx: SagaContext) -> Mapping[str, JSON]:
    return {"order_ref": _ref(ctx), "address": ctx.input["address"], "items": _physical_lines(ctx)}


def _cancel_shipment(ctx: SagaContext) -> Mapping[str, JSON]:
    return {"order_ref": _ref(ctx)}


def _step(
    name: str,
    action: str,
    build: Any,
    undo: str,
    unbuild: Any,
    models: tuple[type[Contract], type[Contract], type[Contract], type[Contract]],
    failures: type[StrEnum],
    when: Any = None,
) -> Step:
    participant = action.split(".", 1)[0]
    payload, reply, undo_payload, undo_reply = models
    return Step(
        name,
        participant=participant,
        action=action,
        payload=build,
        compensation=undo,
        compensation_payload=unbuild,
        timeout=_TIMEOUT,
        retry=_ACTION_RETRY,
        compensation_retry=_COMPENSATION_RETRY,
        payload_model=payload,
        reply_model=reply,
        compensation_payload_model=undo_payload,
        compensation_reply_model=undo_reply,
        failures=tuple(f.value for f in failures),
        when=when,
    )


def _create_order_step() -> Step:
    return _step(
        "create_order",
        order.CREATE,
        _create_order,
        order.CANCEL,
        _cancel_order,
        (order.CreateOrder, order.OrderCreated, order.CancelOrder, order.OrderCancelled),
        order.OrderFailure,
    )


def _charge_step() -> Step:
    return _step(
        "charge_payment",
        payment.CHARGE,
        _charge,
        payment.REFUND,
        _refund,
        (
            payment.ChargePayment,
            payment.PaymentCharged,
            payment.RefundPayment,
            payment.PaymentRefunded,
        ),
        payment.PaymentFailure,
    )


def _reserve_step(build: Any, when: Any = None) -> Step:
    return _step(
        "reserve_inventory",
        inventory.RESERVE,
        build,
        inventory.RELEASE,
        _release,
        (
            inventory.ReserveStock,
            inventory.StockReserved,
            inventory.ReleaseStock,
            inventory.StockReleased,
        ),
        inventory.InventoryFailure,
        when,
    )


def _schedule_step(build: Any, when: Any = None) -> Step:
    return _step(
        "schedule_shipping",
        shipping.SCHEDULE,
        build,
        shipping.CANCEL,
        _cancel_shipment,
        (
            shipping.ScheduleShipment,
            shipping.ShipmentScheduled,
            shipping.CancelShipment,
            shipping.ShipmentCancelled,
        ),
        shipping.ShippingFailure,
        when,
    )


CHECKOUT_V1 = SagaDefinition(
    "checkout",
    1,
    [
        _create_order_step(),
        _charge_step(),
        _reserve_step(_reserve_all),
        _schedule_step(_schedule_all),
    ],
    input_model=CheckoutInput,
)
"""The checkout before the parallel group: kept for the sagas started with it."""

CHECKOUT = SagaDefinition(
    "checkout",
    2,
    [
        _create_order_step(),
        Parallel(_charge_step(), _reserve_step(_reserve, when=has_physical)),
        _schedule_step(_schedule, when=has_physical),
    ],
    input_model=CheckoutInput,
)
"""The checkout new sagas start: the charge and the reservation in parallel, shipping only
for physical goods."""


def checkout_input(
    customer_id: UUID,
    items: list[tuple[str, int, Decimal]],
    address: Mapping[str, str],
    currency: str = "EUR",
    digital: Collection[str] = inventory.DIGITAL,
) -> dict[str, JSON]:
    """The saga input for one checkout; amounts travel as decimal strings, and a line whose
    SKU is in ``digital`` (the demo's digital goods by default) is marked digital."""
    lines: list[JSON] = []
    for sku, qty, price in items:
        line: dict[str, JSON] = {"sku": sku, "quantity": qty, "unit_price": f"{price:.2f}"}
        if sku in digital:
            line["digital"] = True
        lines.append(line)
    return {
        "customer_id": str(customer_id),
        "currency": currency,
        "items": lines,
        "address": dict(address),
    }


def registry() -> Registry:
    """The orchestrator's registry (``SAGA_DEFINITIONS=saga_demo.checkout:registry``): both
    versions, so the checkouts started before the upgrade finish on version 1."""
    return Registry([CHECKOUT_V1, CHECKOUT], participants=PARTICIPANTS)
