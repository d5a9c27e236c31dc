"""The payment service: charges a customer's account and refunds the charge as compensation.

Money is ``Decimal`` end to end: amounts are exact ``Numeric(12, 2)`` values and all arithmetic
happens in Python, never in SQL, so no amount ever passes through a binary float.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from types import MappingProxyType
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection

from saga.participant import (
    BusinessError,
    Ledger,
    Participant,
    ParticipantSettings,
    TransientError,
    UTCDateTime,
)
from saga.protocol import CommandEnvelope
from saga_demo.contracts.payment import (
    CHARGE,
    PARTICIPANT,
    REFUND,
    ChargePayment,
    PaymentCharged,
    PaymentFailure,
    PaymentRefunded,
    RefundPayment,
)

__all__ = [
    "ALICE",
    "BOB",
    "CAROL",
    "CUSTOMERS",
    "DAVE",
    "SEED",
    "Amount",
    "PaymentStatus",
    "accounts",
    "build",
    "charge",
    "metadata",
    "payments",
    "refund",
    "seed",
    "snapshot",
]

_CENT = Decimal("0.01")
_ZERO = Decimal("0.00")


class Amount(sa.TypeDecorator[Decimal]):
    """An exact ``Numeric(12, 2)``: native on PostgreSQL, decimal text on SQLite, where a NUMERIC
    column would hold a binary float. Only ``Decimal`` goes in, so a float is a loud error."""

    impl = sa.Numeric(12, 2)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(sa.String(20))
        return dialect.type_descriptor(sa.Numeric(12, 2))

    def process_bind_param(self, value: Decimal | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if not isinstance(value, Decimal):
            raise TypeError(f"amounts are Decimal, not {type(value).__name__}")
        exact = value.quantize(_CENT)
        if exact != value:
            raise ValueError(f"{value} has more than two decimal places")
        return str(exact) if dialect.name == "sqlite" else exact

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        return None if value is None else Decimal(value).quantize(_CENT)


class PaymentStatus(StrEnum):
    CHARGED = "CHARGED"
    REFUNDED = "REFUNDED"
    #: the refund arrived first: the ref is closed, so a late charge is refused
    TOMBSTONE = "TOMBSTONE"


metadata = sa.MetaData()

accounts = sa.Table(
    "accounts",
    metadata,
    sa.Column("customer_id", sa.Uuid, primary_key=True),
    sa.Column("name", sa.String(64), nullable=False, unique=True),
    sa.Column("balance", Amount, nullable=False),
    sa.Column("currency", sa.String(3), nullable=False),
    sa.Column("per_charge_limit", Amount, nullable=True),  # NULL: no limit
    sa.Column("flaky", sa.Boolean, nullable=False, default=False),
)

payments = sa.Table(
    "payments",
    metadata,
    sa.Column("order_ref", sa.Uuid, primary_key=True),
    sa.Column("payment_id", sa.Uuid, nullable=True),  # NULL for a tombstone
    sa.Column("customer_id", sa.Uuid, nullable=False),
    sa.Column("amount", Amount, nullable=True),
    sa.Column("currency", sa.String(3), nullable=True),
    sa.Column("balance_after", Amount, nullable=True),
    sa.Column("status", sa.String(10), nullable=False),
    sa.Column("charged_at", UTCDateTime, nullable=True),
    sa.Column("refunded_at", UTCDateTime, nullable=True),
)

_NAMESPACE = uuid.UUID("5c0a7e1e-8d1b-4c55-9a8e-6f1d2b3c4a50")

CUSTOMERS: Mapping[str, uuid.UUID] = MappingProxyType(
    {name: uuid.uuid5(_NAMESPACE, name) for name in ("alice", "bob", "carol", "dave")}
)
"""The demo customers' fixed ids by name, the same in every run."""

ALICE, BOB, CAROL, DAVE = (CUSTOMERS[name] for name in ("alice", "bob", "carol", "dave"))

SEED: tuple[dict[str, Any], ...] = tuple(
    {
        "customer_id": CUSTOMERS[name],
        "name": name,
        "balance": Decimal(balance),
        "currency": "EUR",
        "per_charge_limit": None if limit is None else Decimal(limit),
        "flaky": flaky,  # the card gateway times out on a first attempt
    }
    for name, balance, limit, flaky in (
        ("alice", "500.00", "300.00", False),
        ("bob", "20.00", None, False),
        ("carol", "1000.00", "50.00", False),
        ("dave", "400.00", None, True),
    )
)


async def seed(conn: AsyncConnection) -> None:
    """Add the demo accounts that are missing; existing balances are left alone."""
    dialect = sqlite if conn.dialect.name == "sqlite" else postgresql
    await conn.execute(dialect.insert(accounts).on_conflict_do_nothing(), list(SEED))


def build(settings: ParticipantSettings) -> Participant:
    participant = Participant(PARTICIPANT, settings, business=metadata, seed=seed)
    participant.handler(CHARGE)(charge)
    participant.handler(REFUND)(refund)
    return participant


# The per-command statements are built once: building one per call costs more CPU than the
# database's work on it. An UPDATE's WHERE binds are prefixed "w_", as column names are reserved.
_SELECT_PAYMENT = (
    sa.select(payments).where(payments.c.order_ref == sa.bindparam("order_ref")).with_for_update()
)
_SELECT_ACCOUNT = (
    sa.select(accounts)
    .where(accounts.c.customer_id == sa.bindparam("customer_id"))
    .with_for_update()
)
_SET_BALANCE = (
    accounts.update()
    .where(accounts.c.customer_id == sa.bindparam("w_customer_id"))
    .values(balance=sa.bindparam("balance", type_=accounts.c.balance.type))
)
_INSERT_PAYMENT = payments.insert()
_MARK_REFUNDED = (
    payments.update()
    .where(payments.c.order_ref == sa.bindparam("w_order_ref"))
    .values(
        status=sa.bindparam("status", type_=payments.c.status.type),
        refunded_at=sa.bindparam("refunded_at", type_=payments.c.refunded_at.type),
    )
)


async def _payment(conn: AsyncConnection, order_ref: uuid.UUID) -> sa.Row[Any] | None:
    return (await conn.execute(_SELECT_PAYMENT, {"order_ref": order_ref})).first()


async def _account(conn: AsyncConnection, customer: uuid.UUID) -> sa.Row[Any] | None:
    return (await conn.execute(_SELECT_ACCOUNT, {"customer_id": customer})).first()


async def _set_balance(conn: AsyncConnection, customer: uuid.UUID, balance: Decimal) -> None:
    await conn.execute(_SET_BALANCE, {"w_customer_id": customer, "balance": balance})


async def charge(
    conn: AsyncConnection, payload: ChargePayment, command: CommandEnvelope
) -> PaymentCharged:
    """Debit the account once per ``order_ref``; the checks run before anything changes."""
    prior = await _payment(conn, payload.order_ref)
    if prior is not None:
        if prior.status == PaymentStatus.CHARGED:
            return PaymentCharged(
                payment_id=prior.payment_id, amount=prior.amount, balance_after=prior.balance_after
            )
        raise BusinessError(
            PaymentFailure.PAYMENT_CANCELLED, f"order {payload.order_ref} was already refunded"
        )
    account = await _account(conn, payload.customer_id)
    if account is None:
        raise BusinessError(PaymentFailure.UNKNOWN_CUSTOMER, f"no account {payload.customer_id}")
    if account.currency != payload.currency:
        raise BusinessError(
            PaymentFailure.CURRENCY_MISMATCH,
            f"the account is in {account.currency}, the charge in {payload.currency}",
        )
    if account.per_charge_limit is not None and payload.amount > account.per_charge_limit:
        raise BusinessError(
            PaymentFailure.LIMIT_EXCEEDED,
            f"{payload.amount} is over the per-charge limit of {account.per_charge_limit}",
        )
    if account.balance < payload.amount:
        raise BusinessError(
            PaymentFailure.INSUFFICIENT_FUNDS, f"{payload.amount} is more than the balance"
        )
    if account.flaky and command.attempt == 1:
        raise TransientError(
            PaymentFailure.GATEWAY_TIMEOUT, "the card gateway did not answer in time"
        )
    balance_after: Decimal = account.balance - payload.amount
    payment_id = uuid.uuid4()
    await _set_balance(conn, payload.customer_id, balance_after)
    await conn.execute(
        _INSERT_PAYMENT,
        dict(
            order_ref=payload.order_ref,
            payment_id=payment_id,
            customer_id=payload.customer_id,
            amount=payload.amount,
            currency=payload.currency,
            balance_after=balance_after,
            status=PaymentStatus.CHARGED,
            charged_at=datetime.now(UTC),
        ),
    )
    return PaymentCharged(payment_id=payment_id, amount=payload.amount, balance_after=balance_after)


async def refund(
    conn: AsyncConnection, payload: RefundPayment, command: CommandEnvelope
) -> PaymentRefunded:
    """Credit back exactly what was charged for ``order_ref``, once; or close the ref if nothing
    was charged, so a charge arriving after its compensation is refused."""
    prior = await _payment(conn, payload.order_ref)
    if prior is None:
        await conn.execute(
            _INSERT_PAYMENT,
            {
                "order_ref": payload.order_ref,
                "customer_id": payload.customer_id,
                "status": PaymentStatus.TOMBSTONE,
                "refunded_at": datetime.now(UTC),
            },
        )
        return PaymentRefunded(payment_id=None, amount=_ZERO, nothing_to_undo=True)
    if prior.status == PaymentStatus.TOMBSTONE:
        return PaymentRefunded(payment_id=None, amount=_ZERO, nothing_to_undo=True)
    if prior.status == PaymentStatus.CHARGED:
        account = await _account(conn, prior.customer_id)
        assert account is not None, "accounts are never deleted"
        await _set_balance(conn, prior.customer_id, account.balance + prior.amount)
        await conn.execute(
            _MARK_REFUNDED,
            {
                "w_order_ref": payload.order_ref,
                "status": PaymentStatus.REFUNDED,
                "refunded_at": datetime.now(UTC),
            },
        )
    return PaymentRefunded(payment_id=prior.payment_id, amount=prior.amount, nothing_to_undo=False)


async def snapshot(ledger: Ledger) -> dict[str, Decimal]:
    """Balance by customer name, for the demo's summary."""
    query = sa.select(accounts.c.name, accounts.c.balance).order_by(accounts.c.name)
    async with ledger.reader.connect() as conn:
        return {row.name: row.balance for row in await conn.execute(query)}


if __name__ == "__main__":
    from saga_demo.cli import run_service

    run_service(PARTICIPANT)
