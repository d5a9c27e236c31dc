"""The order service: creates the order record and cancels it as compensation."""

from __future__ import annotations

from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Self
from uuid import UUID

from pydantic import AfterValidator, Field, model_validator

from saga.protocol import Contract
from saga_demo.contracts.types import (
    MAX_AMOUNT,
    Currency,
    Money,
    Quantity,
    ShortText,
    Sku,
    unique_skus,
)

__all__ = [
    "CANCEL",
    "CREATE",
    "PARTICIPANT",
    "CancelOrder",
    "CreateOrder",
    "OrderCancelled",
    "OrderCreated",
    "OrderFailure",
    "OrderLine",
]

PARTICIPANT = "order"
CREATE = "order.create"
CANCEL = "order.cancel"


class OrderFailure(StrEnum):
    """Business reasons ``order.create`` can fail with."""

    INVALID_ORDER = "invalid_order"
    ORDER_CANCELLED = "order_cancelled"  # the compensation ran first; a late create is refused


class OrderLine(Contract):
    sku: Sku
    quantity: Quantity
    unit_price: Money


class CreateOrder(Contract):
    """Payload of ``order.create``; the order is keyed by ``order_ref``, so a resend is harmless."""

    order_ref: UUID
    customer_id: UUID
    items: Annotated[
        list[OrderLine], Field(min_length=1, max_length=50), AfterValidator(unique_skus)
    ]
    currency: Currency

    @property
    def total(self) -> Decimal:
        return sum((line.unit_price * line.quantity for line in self.items), Decimal("0.00"))

    @model_validator(mode="after")
    def _total_is_chargeable(self) -> Self:
        # The total is charged later as Money; an order that cannot be charged is invalid here.
        if self.total > MAX_AMOUNT:
            raise ValueError(f"order total must not exceed {MAX_AMOUNT}")
        return self


class OrderCreated(Contract):
    order_id: UUID
    total: Money


class CancelOrder(Contract):
    """Payload of ``order.cancel``, the compensation of ``order.create``."""

    order_ref: UUID
    reason: ShortText


class OrderCancelled(Contract):
    """``nothing_to_undo`` means no order existed for the ref, which still counts as success."""

    order_id: UUID | None
    nothing_to_undo: bool

    @model_validator(mode="after")
    def _undo_is_consistent(self) -> Self:
        if self.nothing_to_undo != (self.order_id is None):
            raise ValueError("order_id must be null exactly when nothing_to_undo is true")
        return self
