"""The checkout saga's input: who buys what, in which currency, shipped where."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Self
from uuid import UUID

from pydantic import AfterValidator, Field, model_validator

from saga.protocol import Contract
from saga_demo.contracts.order import OrderLine
from saga_demo.contracts.shipping import Address
from saga_demo.contracts.types import MAX_AMOUNT, Currency, unique_skus

__all__ = ["CheckoutInput", "CheckoutLine"]


class CheckoutLine(OrderLine):
    """One line of a checkout. ``digital`` goods (an e-book, a download) are charged like any
    other line but neither stocked nor shipped: only the physical lines are reserved and
    shipped, and a checkout of digital goods alone skips both steps."""

    digital: bool = False


class CheckoutInput(Contract):
    """Checked before a checkout is started: a bad input is refused with the field that is
    wrong, and no saga is stored, instead of compensating a saga that could never succeed."""

    customer_id: UUID
    currency: Currency
    items: Annotated[
        list[CheckoutLine], Field(min_length=1, max_length=50), AfterValidator(unique_skus)
    ]
    address: Address

    @model_validator(mode="after")
    def _total_is_chargeable(self) -> Self:
        total = sum((line.unit_price * line.quantity for line in self.items), Decimal("0.00"))
        if total > MAX_AMOUNT:
            raise ValueError(f"the order total must not exceed {MAX_AMOUNT}")
        return self
