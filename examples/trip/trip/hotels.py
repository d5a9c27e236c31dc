"""The hotels service: books a room, unless the city has none left; cancels it as compensation.

``python -m trip.hotels`` runs it. "No rooms" is a business decision (a ``BusinessError``): the
saga compensates the flight. Anything unexpected is answered as a retryable ``handler_error``.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from saga.participant import BusinessError, Participant
from saga.protocol import CommandEnvelope
from trip.models import BookHotel, CancelHotel, HotelBooked, HotelCancelled

FULL = {"Atlantis"}  # cities without a free room

metadata = sa.MetaData()
rooms = sa.Table(
    "rooms",
    metadata,
    sa.Column("trip", sa.Uuid, primary_key=True),
    sa.Column("city", sa.String(100), nullable=False),
    sa.Column("room", sa.Integer, nullable=False),
    sa.Column("cancelled", sa.Boolean, nullable=False, default=False),
)

hotels = Participant("hotels", business=metadata)


@hotels.handler("hotels.book")
async def book(conn: AsyncConnection, payload: BookHotel, command: CommandEnvelope) -> HotelBooked:
    if payload.city in FULL:
        raise BusinessError("no_rooms", f"no room in {payload.city} from {payload.check_in}")
    room = 100 + (await conn.scalar(sa.select(sa.func.count()).select_from(rooms)) or 0)
    await conn.execute(rooms.insert().values(trip=payload.trip, city=payload.city, room=room))
    return HotelBooked(room=room)


@hotels.handler("hotels.cancel")
async def cancel(
    conn: AsyncConnection, payload: CancelHotel, command: CommandEnvelope
) -> HotelCancelled:
    done = await conn.execute(
        rooms.update().where(rooms.c.trip == payload.trip).values(cancelled=True)
    )
    return HotelCancelled(nothing_to_undo=done.rowcount == 0)


if __name__ == "__main__":
    hotels.run()
