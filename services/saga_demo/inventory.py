"""The inventory service: reserves stock for an order and releases it as compensation.

A reservation is all lines or none. Reserving moves units from available to ``reserved`` without
touching ``on_hand``, so releasing restores exactly what was taken and stock is conserved.
Digital goods (``DIGITAL``) are not stocked: the checkout never sends their lines here.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from saga.participant import BusinessError, Ledger, Participant, ParticipantSettings, UTCDateTime
from saga.protocol import CommandEnvelope, dump_data
from saga_demo.contracts.inventory import (
    DIGITAL,
    EBOOK,
    PARTICIPANT,
    RELEASE,
    RESERVE,
    InventoryFailure,
    ReleaseStock,
    ReserveStock,
    StockReleased,
    StockReserved,
)

__all__ = [
    "BOOK",
    "DIGITAL",
    "EBOOK",
    "LAMP",
    "RARE",
    "SEED",
    "ReservationStatus",
    "build",
    "metadata",
    "release",
    "reservations",
    "reserve",
    "seed",
    "snapshot",
    "stock",
]


class ReservationStatus(StrEnum):
    RESERVED = "RESERVED"
    RELEASED = "RELEASED"
    #: the release arrived first: the ref is closed, so a late reserve is refused
    TOMBSTONE = "TOMBSTONE"


metadata = sa.MetaData()

stock = sa.Table(
    "stock",
    metadata,
    sa.Column("sku", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("on_hand", sa.Integer, nullable=False),
    sa.Column("reserved", sa.Integer, nullable=False, default=0),
    sa.CheckConstraint("reserved >= 0 AND reserved <= on_hand", name="ck_stock_reserved"),
)

reservations = sa.Table(
    "reservations",
    metadata,
    sa.Column("order_ref", sa.Uuid, primary_key=True),
    sa.Column("reservation_id", sa.Uuid, nullable=True),  # NULL for a tombstone
    sa.Column("items", sa.JSON, nullable=True),
    sa.Column("status", sa.String(10), nullable=False),
    sa.Column("reserved_at", UTCDateTime, nullable=True),
    sa.Column("released_at", UTCDateTime, nullable=True),
)

BOOK = "BOOK-1"
LAMP = "LAMP-2"
RARE = "RARE-9"

SEED: tuple[dict[str, Any], ...] = (
    {"sku": BOOK, "name": "Paperback book", "on_hand": 100, "reserved": 0},
    {"sku": LAMP, "name": "Desk lamp", "on_hand": 10, "reserved": 0},
    {"sku": RARE, "name": "Signed first edition", "on_hand": 0, "reserved": 0},  # sold out
)


async def seed(conn: AsyncConnection) -> None:
    """Add the demo SKUs that are missing; existing stock and reservations are left alone."""
    dialect = sqlite if conn.dialect.name == "sqlite" else postgresql
    await conn.execute(dialect.insert(stock).on_conflict_do_nothing(), list(SEED))


def build(settings: ParticipantSettings) -> Participant:
    participant = Participant(PARTICIPANT, settings, business=metadata, seed=seed)
    participant.handler(RESERVE)(reserve)
    participant.handler(RELEASE)(release)
    return participant


# The per-command statements are built once: building one per call costs more CPU than the
# database's work on it. An UPDATE's WHERE binds are prefixed "w_", as column names are reserved.
_SELECT_RESERVATION = (
    sa.select(reservations)
    .where(reservations.c.order_ref == sa.bindparam("order_ref"))
    .with_for_update()
)
# Rows locked in SKU order, so two reservations of the same SKUs cannot deadlock.
_SELECT_STOCK = (
    sa.select(stock)
    .where(stock.c.sku.in_(sa.bindparam("skus", expanding=True)))
    .order_by(stock.c.sku)
    .with_for_update()
)
_TAKE_STOCK = (
    stock.update()
    .where(stock.c.sku == sa.bindparam("w_sku"))
    .values(reserved=stock.c.reserved + sa.bindparam("w_quantity", type_=sa.Integer))
)
_RETURN_STOCK = (
    stock.update()
    .where(stock.c.sku == sa.bindparam("w_sku"))
    .values(reserved=stock.c.reserved - sa.bindparam("w_quantity", type_=sa.Integer))
)
_INSERT_RESERVATION = reservations.insert()
_MARK_RELEASED = (
    reservations.update()
    .where(reservations.c.order_ref == sa.bindparam("w_order_ref"))
    .values(
        status=sa.bindparam("status", type_=reservations.c.status.type),
        released_at=sa.bindparam("released_at", type_=reservations.c.released_at.type),
    )
)


async def _reservation(conn: AsyncConnection, order_ref: uuid.UUID) -> sa.Row[Any] | None:
    return (await conn.execute(_SELECT_RESERVATION, {"order_ref": order_ref})).first()


async def reserve(
    conn: AsyncConnection, payload: ReserveStock, command: CommandEnvelope
) -> StockReserved:
    """Reserve every line or none, once per ``order_ref``."""
    prior = await _reservation(conn, payload.order_ref)
    if prior is not None:
        if prior.status == ReservationStatus.RESERVED:
            return StockReserved(reservation_id=prior.reservation_id)
        raise BusinessError(
            InventoryFailure.RESERVATION_CANCELLED,
            f"order {payload.order_ref} was already released",
        )
    skus = sorted(line.sku for line in payload.items)
    rows = {row.sku: row for row in await conn.execute(_SELECT_STOCK, {"skus": skus})}
    unknown = [sku for sku in skus if sku not in rows]
    if unknown:
        raise BusinessError(InventoryFailure.UNKNOWN_SKU, f"no such sku: {', '.join(unknown)}")
    short = [
        f"{line.sku} (wanted {line.quantity}, {available} available)"
        for line in payload.items
        if (available := rows[line.sku].on_hand - rows[line.sku].reserved) < line.quantity
    ]
    if short:
        raise BusinessError(InventoryFailure.OUT_OF_STOCK, "; ".join(short))
    for line in payload.items:
        await conn.execute(_TAKE_STOCK, {"w_sku": line.sku, "w_quantity": line.quantity})
    reservation_id = uuid.uuid4()
    await conn.execute(
        _INSERT_RESERVATION,
        dict(
            order_ref=payload.order_ref,
            reservation_id=reservation_id,
            items=[dump_data(line) for line in payload.items],
            status=ReservationStatus.RESERVED,
            reserved_at=datetime.now(UTC),
        ),
    )
    return StockReserved(reservation_id=reservation_id)


async def release(
    conn: AsyncConnection, payload: ReleaseStock, command: CommandEnvelope
) -> StockReleased:
    """Give back exactly the reserved units, once; or close the ref if nothing was reserved."""
    prior = await _reservation(conn, payload.order_ref)
    if prior is None:
        await conn.execute(
            _INSERT_RESERVATION,
            {
                "order_ref": payload.order_ref,
                "status": ReservationStatus.TOMBSTONE,
                "released_at": datetime.now(UTC),
            },
        )
        return StockReleased(reservation_id=None, nothing_to_undo=True)
    if prior.status == ReservationStatus.TOMBSTONE:
        return StockReleased(reservation_id=None, nothing_to_undo=True)
    if prior.status == ReservationStatus.RESERVED:
        for line in sorted(prior.items, key=lambda item: str(item["sku"])):
            await conn.execute(
                _RETURN_STOCK, {"w_sku": line["sku"], "w_quantity": int(line["quantity"])}
            )
        await conn.execute(
            _MARK_RELEASED,
            {
                "w_order_ref": payload.order_ref,
                "status": ReservationStatus.RELEASED,
                "released_at": datetime.now(UTC),
            },
        )
    return StockReleased(reservation_id=prior.reservation_id, nothing_to_undo=False)


async def snapshot(ledger: Ledger) -> dict[str, int]:
    """Units available (on hand and not reserved) by SKU, for the demo's summary."""
    query = sa.select(stock.c.sku, (stock.c.on_hand - stock.c.reserved).label("available"))
    async with ledger.reader.connect() as conn:
        return {row.sku: row.available for row in await conn.execute(query.order_by(stock.c.sku))}


if __name__ == "__main__":
    from saga_demo.cli import run_service

    run_service(PARTICIPANT)
