"""The checkout saga: create order -> charge payment -> reserve stock -> schedule shipping.

Every payload is built with the contract models, so a bad input fails the step with a readable
reason instead of reaching a participant. The order reference of every command is the saga id:
each participant keys its effect (and its compensation's tombstone) on it.

There is no pivot: the shipment is only *scheduled* here, and cancelling a scheduled shipment is
an ordinary compensation. In a shop where shipping dispatches goods at once, ``schedule_shipping``
would be the pivot (``pivot=True``) and a failure after it would be retried, never compensated.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from decimal import Decimal
from typing import Any, cast
from uuid import UUID

from pydantic import JsonValue

from contracts import inventory, order, payment, shipping
from contracts.catalog import PARTICIPANTS
from contracts.common import Contract
from contracts.envelope import dump_data, parse_data
from saga import Registry, RetryPolicy, SagaContext, SagaDefinition, Step
from saga.core.state import JSON

__all__ = ["CHECKOUT", "checkout_input", "registry"]

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


def _payload(model: type[Contract], data: Mapping[str, Any]) -> Mapping[str, JSON]:
    """Validate through the contract model and return its wire form."""
    return cast(Mapping[str, JSON], dump_data(parse_data(model, cast(dict[str, JsonValue], data))))


def _ref(ctx: SagaContext) -> str:
    assert ctx.saga_id is not None
    return str(ctx.saga_id)


def _lines(ctx: SagaContext) -> list[dict[str, Any]]:
    items = cast(list[dict[str, Any]], ctx.input["items"])
    return [{"sku": i["sku"], "quantity": i["quantity"]} for i in items]


def _create_order(ctx: SagaContext) -> Mapping[str, JSON]:
    i = ctx.input
    return _payload(
        order.CreateOrder,
        {
            "order_ref": _ref(ctx),
            "customer_id": i["customer_id"],
            "items": i["items"],
            "currency": i["currency"],
        },
    )


def _cancel_order(ctx: SagaContext) -> Mapping[str, JSON]:
    reason = "checkout compensated"
    return _payload(order.CancelOrder, {"order_ref": _ref(ctx), "reason": reason})


def _charge(ctx: SagaContext) -> Mapping[str, JSON]:
    total = ctx.output("create_order")["total"]
    return _payload(
        payment.ChargePayment,
        {
            "order_ref": _ref(ctx),
            "customer_id": ctx.input["customer_id"],
            "amount": total,
            "currency": ctx.input["currency"],
        },
    )


def _refund(ctx: SagaContext) -> Mapping[str, JSON]:
    return _payload(
        payment.RefundPayment, {"order_ref": _ref(ctx), "customer_id": ctx.input["customer_id"]}
    )


def _reserve(ctx: SagaContext) -> Mapping[str, JSON]:
    return _payload(inventory.ReserveStock, {"order_ref": _ref(ctx), "items": _lines(ctx)})


def _release(ctx: SagaContext) -> Mapping[str, JSON]:
    return _payload(inventory.ReleaseStock, {"order_ref": _ref(ctx)})


def _schedule(ctx: SagaContext) -> Mapping[str, JSON]:
    return _payload(
        shipping.ScheduleShipment,
        {"order_ref": _ref(ctx), "address": ctx.input["address"], "items": _lines(ctx)},
    )


def _cancel_shipment(ctx: SagaContext) -> Mapping[str, JSON]:
    return _payload(shipping.CancelShipment, {"order_ref": _ref(ctx)})


def _step(name: str, participant: str, action: str, build: Any, undo: str, unbuild: Any) -> Step:
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
    )


CHECKOUT = SagaDefinition(
    "checkout",
    1,
    [
        _step("create_order", "order", order.CREATE, _create_order, order.CANCEL, _cancel_order),
        _step("charge_payment", "payment", payment.CHARGE, _charge, payment.REFUND, _refund),
        _step(
            "reserve_inventory",
            "inventory",
            inventory.RESERVE,
            _reserve,
            inventory.RELEASE,
            _release,
        ),
        _step(
            "schedule_shipping",
            "shipping",
            shipping.SCHEDULE,
            _schedule,
            shipping.CANCEL,
            _cancel_shipment,
        ),
    ],
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
