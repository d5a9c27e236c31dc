"""The shipping service: schedules the shipment and cancels it as compensation.

Which countries are served, and by which carrier, is data (the ``carriers`` table), so the
"undeliverable address" failure comes from the service's own state rather than a constant.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from saga.participant import (
    BusinessError,
    Ledger,
    Participant,
    ParticipantSettings,
    TransientError,
    UTCDateTime,
)
from saga.protocol import CommandEnvelope, dump_data
from saga_demo.contracts.shipping import (
    CANCEL,
    PARTICIPANT,
    SCHEDULE,
    Address,
    CancelShipment,
    ScheduleShipment,
    ShipmentCancelled,
    ShipmentScheduled,
    ShippingFailure,
)

__all__ = [
    "SEED",
    "SLOW_CITIES",
    "ShipmentStatus",
    "build",
    "cancel",
    "carriers",
    "metadata",
    "schedule",
    "seed",
    "shipments",
    "snapshot",
]


class ShipmentStatus(StrEnum):
    SCHEDULED = "SCHEDULED"
    CANCELLED = "CANCELLED"
    #: the cancel arrived first: the ref is closed, so a late schedule is refused
    TOMBSTONE = "TOMBSTONE"


SLOW_CITIES = frozenset({"slowtown"})
"""Cities whose carrier never answers: every attempt fails transiently, so the orchestrator
retries, gives up and compensates (the demo's participant that keeps failing)."""

metadata = sa.MetaData()

carriers = sa.Table(
    "carriers",
    metadata,
    sa.Column("country", sa.String(2), primary_key=True),
    sa.Column("carrier", sa.String(200), nullable=False),
)

shipments = sa.Table(
    "shipments",
    metadata,
    sa.Column("order_ref", sa.Uuid, primary_key=True),
    sa.Column("shipment_id", sa.Uuid, nullable=True),  # NULL for a tombstone
    sa.Column("address", sa.JSON, nullable=True),
    sa.Column("items", sa.JSON, nullable=True),
    sa.Column("carrier", sa.String(200), nullable=True),
    sa.Column("status", sa.String(10), nullable=False),
    sa.Column("scheduled_at", UTCDateTime, nullable=True),
    sa.Column("cancelled_at", UTCDateTime, nullable=True),
)

SEED: tuple[dict[str, Any], ...] = tuple(
    {"country": country, "carrier": carrier}
    for country, carrier in {
        "AT": "Austrian Post",
        "BE": "bpost",
        "DE": "DHL",
        "FR": "La Poste",
        "GB": "Royal Mail",
        "NL": "PostNL",
        "US": "UPS",
    }.items()
)


async def seed(conn: AsyncConnection) -> None:
    """Add the demo carriers that are missing; existing rows are left alone."""
    dialect = sqlite if conn.dialect.name == "sqlite" else postgresql
    await conn.execute(dialect.insert(carriers).on_conflict_do_nothing(), list(SEED))


def build(settings: ParticipantSettings) -> Participant:
    participant = Participant(PARTICIPANT, settings, business=metadata, seed=seed)
    participant.handler(SCHEDULE)(schedule)
    participant.handler(CANCEL)(cancel)
    return participant


def _undeliverable(address: Address) -> str | None:
    """Why no parcel can reach ``address`` in a served country, or None."""
    if address.postal_code.strip() == "00000":
        return "postal code 00000 does not exist"
    if "nowhere" in address.street.casefold():
        return "the street does not exist"
    return None


# The per-command statements are built once: building one per call costs more CPU than the
# database's work on it. An UPDATE's WHERE binds are prefixed "w_", as column names are reserved.
_SELECT_SHIPMENT = (
    sa.select(shipments).where(shipments.c.order_ref == sa.bindparam("order_ref")).with_for_update()
)
_SELECT_CARRIER = sa.select(carriers.c.carrier).where(carriers.c.country == sa.bindparam("country"))
_INSERT_SHIPMENT = shipments.insert()
_MARK_CANCELLED = (
    shipments.update()
    .where(shipments.c.order_ref == sa.bindparam("w_order_ref"))
    .values(
        status=sa.bindparam("status", type_=shipments.c.status.type),
        cancelled_at=sa.bindparam("cancelled_at", type_=shipments.c.cancelled_at.type),
    )
)


async def _shipment(conn: AsyncConnection, order_ref: uuid.UUID) -> sa.Row[Any] | None:
    return (await conn.execute(_SELECT_SHIPMENT, {"order_ref": order_ref})).first()


async def schedule(
    conn: AsyncConnection, payload: ScheduleShipment, command: CommandEnvelope
) -> ShipmentScheduled:
    """Book a carrier once per ``order_ref``; refuse it if its cancel came first."""
    prior = await _shipment(conn, payload.order_ref)
    if prior is not None:
        if prior.status == ShipmentStatus.SCHEDULED:
            return ShipmentScheduled(shipment_id=prior.shipment_id, carrier=prior.carrier)
        raise BusinessError(
            ShippingFailure.SHIPMENT_CANCELLED, f"order {payload.order_ref} was already cancelled"
        )
    address = payload.address
    carrier: str | None = (
        await conn.execute(_SELECT_CARRIER, {"country": address.country})
    ).scalar_one_or_none()
    if carrier is None:
        raise BusinessError(
            ShippingFailure.UNDELIVERABLE_ADDRESS, f"no carrier serves {address.country}"
        )
    problem = _undeliverable(address)
    if problem is not None:
        raise BusinessError(ShippingFailure.UNDELIVERABLE_ADDRESS, problem)
    if address.city.strip().casefold() in SLOW_CITIES:
        raise TransientError(
            ShippingFailure.CARRIER_UNREACHABLE, f"{carrier} did not answer for {address.city}"
        )
    shipment_id = uuid.uuid4()
    await conn.execute(
        _INSERT_SHIPMENT,
        dict(
            order_ref=payload.order_ref,
            shipment_id=shipment_id,
            address=dump_data(address),
            items=[dump_data(line) for line in payload.items],
            carrier=carrier,
            status=ShipmentStatus.SCHEDULED,
            scheduled_at=datetime.now(UTC),
        ),
    )
    return ShipmentScheduled(shipment_id=shipment_id, carrier=carrier)


async def cancel(
    conn: AsyncConnection, payload: CancelShipment, command: CommandEnvelope
) -> ShipmentCancelled:
    """Cancel the shipment once; or close the ref if nothing was scheduled."""
    prior = await _shipment(conn, payload.order_ref)
    if prior is None:
        await conn.execute(
            _INSERT_SHIPMENT,
            {
                "order_ref": payload.order_ref,
                "status": ShipmentStatus.TOMBSTONE,
                "cancelled_at": datetime.now(UTC),
            },
        )
        return ShipmentCancelled(shipment_id=None, nothing_to_undo=True)
    if prior.status == ShipmentStatus.SCHEDULED:
        await conn.execute(
            _MARK_CANCELLED,
            {
                "w_order_ref": payload.order_ref,
                "status": ShipmentStatus.CANCELLED,
                "cancelled_at": datetime.now(UTC),
            },
        )
    return ShipmentCancelled(
        shipment_id=prior.shipment_id, nothing_to_undo=prior.shipment_id is None
    )


async def snapshot(ledger: Ledger) -> dict[str, int]:
    """Shipments by status, for the demo's summary."""
    counts = dict.fromkeys(ShipmentStatus, 0)
    query = sa.select(shipments.c.status, sa.func.count()).group_by(shipments.c.status)
    async with ledger.reader.connect() as conn:
        for status, count in await conn.execute(query):
            counts[ShipmentStatus(status)] = count
    return {str(status): count for status, count in counts.items()}


if __name__ == "__main__":
    from saga_demo.cli import run_service

    run_service(PARTICIPANT)
