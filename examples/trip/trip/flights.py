"""The flights service: books a seat, cancels it as the compensation.

``python -m trip.flights`` runs it (settings from ``SAGA_*``: the broker, the prefix, where its
SQLite file goes). The library makes every command count once: the seat, the ledger entry and
the reply are one transaction of this service's own database.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from saga.participant import Participant
from saga.protocol import CommandEnvelope
from trip.models import BookFlight, CancelFlight, FlightBooked, FlightCancelled

metadata = sa.MetaData()
seats = sa.Table(
    "seats",
    metadata,
    sa.Column("trip", sa.Uuid, primary_key=True),
    sa.Column("flight", sa.String(10), nullable=False),
    sa.Column("seat", sa.String(4), nullable=False),
    sa.Column("cancelled", sa.Boolean, nullable=False, default=False),
)

flights = Participant("flights", business=metadata)


@flights.handler("flights.book")
async def book(
    conn: AsyncConnection, payload: BookFlight, command: CommandEnvelope
) -> FlightBooked:
    taken = await conn.scalar(sa.select(sa.func.count()).select_from(seats))
    seat = f"{1 + (taken or 0) // 6}{'ABCDEF'[(taken or 0) % 6]}"
    await conn.execute(seats.insert().values(trip=payload.trip, flight=payload.flight, seat=seat))
    return FlightBooked(seat=seat)


@flights.handler("flights.cancel")
async def cancel(
    conn: AsyncConnection, payload: CancelFlight, command: CommandEnvelope
) -> FlightCancelled:
    done = await conn.execute(
        seats.update().where(seats.c.trip == payload.trip).values(cancelled=True)
    )
    return FlightCancelled(nothing_to_undo=done.rowcount == 0)


if __name__ == "__main__":
    flights.run()
