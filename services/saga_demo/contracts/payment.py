"""The payment service: charges the customer and refunds the charge as compensation."""

from __future__ import annotations

from enum import StrEnum
from typing import Self
from uuid import UUID

from pydantic import model_validator

from saga.protocol import Contract
from saga_demo.contracts.types import Balance, Currency, Money, NonNegativeMoney

__all__ = [
    "CHARGE",
    "PARTICIPANT",
    "REFUND",
    "ChargePayment",
    "PaymentCharged",
    "PaymentFailure",
    "PaymentRefunded",
    "RefundPayment",
]

PARTICIPANT = "payment"
CHARGE = "payment.charge"
REFUND = "payment.refund"


class PaymentFailure(StrEnum):
    """Business reasons ``payment.charge`` can fail with."""

    INSUFFICIENT_FUNDS = "insufficient_funds"
    LIMIT_EXCEEDED = "limit_exceeded"
    UNKNOWN_CUSTOMER = "unknown_customer"
    CURRENCY_MISMATCH = "currency_mismatch"
    PAYMENT_CANCELLED = "payment_cancelled"  # refunded (or refund ran first); late charge refused
    GATEWAY_TIMEOUT = "gateway_timeout"  # transient: sent with retryable=true


class ChargePayment(Contract):
    """Payload of ``payment.charge``; at most one charge exists per ``order_ref``."""

    order_ref: UUID
    customer_id: UUID
    amount: Money
    currency: Currency


class PaymentCharged(Contract):
    payment_id: UUID
    amount: Money
    balance_after: Balance


class RefundPayment(Contract):
    """Payload of ``payment.refund``: refunds whatever was charged for ``order_ref``, if anything.

    It carries no amount, so a refund can never disagree with the charge it undoes.
    """

    order_ref: UUID
    customer_id: UUID


class PaymentRefunded(Contract):
    """``nothing_to_undo`` means no charge existed for the ref, which still counts as success."""

    payment_id: UUID | None
    amount: NonNegativeMoney
    nothing_to_undo: bool

    @model_validator(mode="after")
    def _undo_is_consistent(self) -> Self:
        if self.nothing_to_undo != (self.payment_id is None):
            raise ValueError("payment_id must be null exactly when nothing_to_undo is true")
        if self.nothing_to_undo and self.amount != 0:
            raise ValueError("amount must be 0 when nothing_to_undo is true")
        if not self.nothing_to_undo and self.amount == 0:
            raise ValueError("amount must be positive when a payment was refunded")
        return self
