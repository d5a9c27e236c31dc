"""The trip's contracts: the saga's input and each command's payload and reply.

Plain pydantic models: the saga names them on its steps (so inputs and payloads are validated
and ``saga schema export`` publishes them), and the services type their handlers with them.
"""

from __future__ import annotations

from datetime import date
from uuid import UUID

from pydantic import BaseModel, Field


class TripInput(BaseModel):
    traveller: str = Field(min_length=1, max_length=100)
    flight: str = Field(pattern=r"^[A-Z]{2}[0-9]{1,4}$")
    city: str = Field(min_length=1, max_length=100)
    nights: int = Field(ge=1, le=30)
    check_in: date


class BookFlight(BaseModel):
    trip: UUID
    traveller: str
    flight: str


class FlightBooked(BaseModel):
    seat: str


class CancelFlight(BaseModel):
    trip: UUID


class FlightCancelled(BaseModel):
    nothing_to_undo: bool


class BookHotel(BaseModel):
    trip: UUID
    traveller: str
    city: str
    nights: int
    check_in: date


class HotelBooked(BaseModel):
    room: int


class CancelHotel(BaseModel):
    trip: UUID


class HotelCancelled(BaseModel):
    nothing_to_undo: bool
