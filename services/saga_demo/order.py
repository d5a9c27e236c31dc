"""The order service: records the order and cancels it as compensation.

Orders are keyed by ``order_ref``, so a resent create finds its order instead of making a second.
A cancel that finds no order leaves a cancelled row behind: the compensation may overtake its
action, and the late action must then be refused rather than create an order nobody will undo.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from saga.participant import BusinessError, Ledger, Participant, ParticipantSettings, UTCDateTime
from saga.protocol import CommandEnvelope, dump_data
from saga_demo.contracts.order import (
    CANCEL,
    CREATE,
    PARTICIPANT,
    CancelOrder,
    CreateOrder,
    OrderCancelled,
    OrderCreated,
    OrderFailure,
)
from saga_demo.payment import Amount

__all__ = ["OrderStatus", "build", "cancel", "create", "metadata", "orders", "snapshot"]


class OrderStatus(StrEnum):
    CREATED = "CREATED"
    CANCELLED = "CANCELLED"


metadata = sa.MetaData()

orders = sa.Table(
    "orders",
    metadata,
    sa.Column("order_ref", sa.Uuid, primary_key=True),
    # The order's columns are NULL on a row a cancel left behind before any create.
    sa.Column("order_id", sa.Uuid, nullable=True),
    sa.Column("customer_id", sa.Uuid, nullable=True),
    sa.Column("items", sa.JSON, nullable=True),
    sa.Column("total", Amount, nullable=True),
    sa.Column("currency", sa.String(3), nullable=True),
    sa.Column("status", sa.String(10), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=True),
    sa.Column("cancelled_at", UTCDateTime, nullable=True),
    sa.Column("cancel_reason", sa.String(200), nullable=True),
)


def build(settings: ParticipantSettings) -> Participant:
    participant = Participant(PARTICIPANT, settings, business=metadata)
    participant.handler(CREATE)(create)
    participant.handler(CANCEL)(cancel)
    return participant


# The per-command statements are built once: building one per call costs more CPU than the
# database's work on it. An UPDATE's WHERE binds are prefixed "w_", as column names are reserved.
_SELECT_ORDER = (
    sa.select(orders).where(orders.c.order_ref == sa.bindparam("order_ref")).with_for_update()
)
_INSERT_ORDER = orders.insert()
_MARK_CANCELLED = (
    orders.update()
    .where(orders.c.order_ref == sa.bindparam("w_order_ref"))
    .values(
        status=sa.bindparam("status", type_=orders.c.status.type),
        cancelled_at=sa.bindparam("cancelled_at", type_=orders.c.cancelled_at.type),
        cancel_reason=sa.bindparam("cancel_reason", type_=orders.c.cancel_reason.type),
    )
)


async def _order(conn: AsyncConnection, order_ref: uuid.UUID) -> sa.Row[Any] | None:
    return (await conn.execute(_SELECT_ORDER, {"order_ref": order_ref})).first()


async def create(
    conn: AsyncConnection, payload: CreateOrder, command: CommandEnvelope
) -> OrderCreated:
    """Record the order once per ``order_ref``; refuse it if its cancel came first."""
    prior = await _order(conn, payload.order_ref)
    if prior is not None:
        if prior.status == OrderStatus.CREATED:
            return OrderCreated(order_id=prior.order_id, total=prior.total)
        raise BusinessError(
            OrderFailure.ORDER_CANCELLED, f"order {payload.order_ref} was already cancelled"
        )
    order_id = uuid.uuid4()
    total = payload.total
    await conn.execute(
        _INSERT_ORDER,
        dict(
            order_ref=payload.order_ref,
            order_id=order_id,
            customer_id=payload.customer_id,
            items=[dump_data(line) for line in payload.items],
            total=total,
            currency=payload.currency,
            status=OrderStatus.CREATED,
            created_at=datetime.now(UTC),
        ),
    )
    return OrderCreated(order_id=order_id, total=total)


async def cancel(
    conn: AsyncConnection, payload: CancelOrder, command: CommandEnvelope
) -> OrderCancelled:
    """Cancel the order, or leave a cancelled row if there is none yet; the same answer again
    for a ref already cancelled."""
    prior = await _order(conn, payload.order_ref)
    if prior is None:
        await conn.execute(
            _INSERT_ORDER,
            {
                "order_ref": payload.order_ref,
                "status": OrderStatus.CANCELLED,
                "cancelled_at": datetime.now(UTC),
                "cancel_reason": payload.reason,
            },
        )
        return OrderCancelled(order_id=None, nothing_to_undo=True)
    if prior.status == OrderStatus.CREATED:
        await conn.execute(
            _MARK_CANCELLED,
            {
                "w_order_ref": payload.order_ref,
                "status": OrderStatus.CANCELLED,
                "cancelled_at": datetime.now(UTC),
                "cancel_reason": payload.reason,
            },
        )
    return OrderCancelled(order_id=prior.order_id, nothing_to_undo=prior.order_id is None)


async def snapshot(ledger: Ledger) -> dict[str, int]:
    """Orders by status, for the demo's summary (a cancel that found no order counts too)."""
    counts = dict.fromkeys(OrderStatus, 0)
    query = sa.select(orders.c.status, sa.func.count()).group_by(orders.c.status)
    async with ledger.reader.connect() as conn:
        for status, count in await conn.execute(query):
            counts[OrderStatus(status)] = count
    return {str(status): count for status, count in counts.items()}


if __name__ == "__main__":
    from saga_demo.cli import run_service

    run_service(PARTICIPANT)
