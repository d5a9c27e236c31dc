"""The trip saga: book a flight, then a hotel; if the hotel says no, cancel the flight.

Run the orchestrator with ``SAGA_DEFINITIONS=trip.sagas:registry saga run --migrate`` from the
project's folder.
"""

from __future__ import annotations

from datetime import timedelta

from saga import Registry, RetryPolicy, SagaContext, SagaDefinition, Step
from trip.models import (
    BookFlight,
    BookHotel,
    CancelFlight,
    CancelHotel,
    FlightBooked,
    FlightCancelled,
    HotelBooked,
    HotelCancelled,
    TripInput,
)


def _trip(ctx: SagaContext) -> str:
    return str(ctx.saga_id)


TRIP = SagaDefinition(
    "trip",
    1,
    [
        Step(
            "flight",
            participant="flights",
            action="flights.book",
            payload=lambda ctx: BookFlight(
                trip=_trip(ctx), traveller=ctx.input["traveller"], flight=ctx.input["flight"]
            ),
            compensation="flights.cancel",
            compensation_payload=lambda ctx: CancelFlight(trip=_trip(ctx)),
            payload_model=BookFlight,
            reply_model=FlightBooked,
            compensation_payload_model=CancelFlight,
            compensation_reply_model=FlightCancelled,
            timeout=timedelta(seconds=5),
            retry=RetryPolicy(max_attempts=3),
        ),
        Step(
            "hotel",
            participant="hotels",
            action="hotels.book",
            payload=lambda ctx: BookHotel(
                trip=_trip(ctx),
                traveller=ctx.input["traveller"],
                city=ctx.input["city"],
                nights=ctx.input["nights"],
                check_in=ctx.input["check_in"],
            ),
            compensation="hotels.cancel",
            compensation_payload=lambda ctx: CancelHotel(trip=_trip(ctx)),
            payload_model=BookHotel,
            reply_model=HotelBooked,
            compensation_payload_model=CancelHotel,
            compensation_reply_model=HotelCancelled,
            failures=("no_rooms",),
            timeout=timedelta(seconds=5),
        ),
    ],
    input_model=TripInput,
)

registry = Registry([TRIP], participants=["flights", "hotels"])
