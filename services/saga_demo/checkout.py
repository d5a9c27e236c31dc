"""The checkout saga: create order -> charge payment -> reserve stock -> schedule shipping.

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

from collections.abc import Mapping
from datetime import timedelta
from decimal import Decimal
from enum import StrEnum
from typing import Any, cast
from uuid import UUID

from saga import JSON, Registry, RetryPolicy, SagaContext, SagaDefinition, Step
from saga.protocol import Contract
from saga_demo.contracts import inventory, order, payment, shipping
from saga_demo.contracts.checkout import CheckoutInput

__all__ = ["CHECKOUT", "PARTICIPANTS", "checkout_input", "registry"]

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


def _lines(ctx: SagaContext) -> list[JSON]:
    items = cast(list[dict[str, JSON]], ctx.input["items"])
    return [{"sku": i["sku"], "quantity": i["quantity"]} for i in items]


def _create_order(ctx: SagaContext) -> Mapping[str, JSON]:
    i = ctx.input
    return {
        "order_ref": _ref(ctx),
        "customer_id": i["customer_id"],
        "items": i["items"],
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


def _reserve(ctx: SagaContext) -> Mapping[str, JSON]:
    return {"order_ref": _ref(ctx), "items": _lines(ctx)}


def _release(ctx: SagaContext) -> Mapping[str, JSON]:
    return {"order_ref": _ref(ctx)}


def _schedule(ctx: SagaContext) -> Mapping[str, JSON]:
    return {"order_ref": _ref(ctx), "address": ctx.input["address"], "items": _lines(ctx)}


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
    )


CHECKOUT = SagaDefinition(
    "checkout",
    1,
    [
        _step(
            "create_order",
            order.CREATE,
            _create_order,
            order.CANCEL,
            _cancel_order,
            (order.CreateOrder, order.OrderCreated, order.CancelOrder, order.OrderCancelled),
            order.OrderFailure,
        ),
        _step(
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
        ),
        _step(
            "reserve_inventory",
            inventory.RESERVE,
            _reserve,
            inventory.RELEASE,
            _release,
            (
                inventory.ReserveStock,
                inventory.StockReserved,
                inventory.ReleaseStock,
                inventory.StockReleased,
            ),
            inventory.InventoryFailure,
        ),
        _step(
            "schedule_shipping",
            shipping.SCHEDULE,
            _schedule,
            shipping.CANCEL,
            _cancel_shipment,
            (
                shipping.ScheduleShipment,
                shipping.ShipmentScheduled,
                shipping.CancelShipment,
                shipping.ShipmentCancelled,
            ),
            shipping.ShippingFailure,
        ),
    ],
    input_model=CheckoutInput,
)


def checkout_input(
    customer_id: UUID,
    items: list[tuple[str, int, Decimal]],
    address: Mapping[str, str],
    currency: str = "EUR",
) -> dict[str, JSON]:
    """The saga input for one checkout; amounts travel as decimal strings."""
    return {
        "customer_id": str(customer_id),
        "currency": currency,
        "items": [
            {"sku": sku, "quantity": qty, "unit_price": f"{price:.2f}"} for sku, qty, price in items
        ],
        "address": dict(address),
    }


def registry() -> Registry:
    """The orchestrator's registry (``SAGA_DEFINITIONS=saga_demo.checkout:registry``)."""
    return Registry([CHECKOUT], participants=PARTICIPANTS)
