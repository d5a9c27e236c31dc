"""The shipping service: schedules the shipment and cancels it as compensation."""

from __future__ import annotations

from enum import StrEnum
from typing import Self
from uuid import UUID

from pydantic import model_validator

from saga.protocol import Contract
from saga_demo.contracts.inventory import StockLines
from saga_demo.contracts.types import Country, PostalCode, ShortText

__all__ = [
    "CANCEL",
    "PARTICIPANT",
    "SCHEDULE",
    "Address",
    "CancelShipment",
    "ScheduleShipment",
    "ShipmentCancelled",
    "ShipmentScheduled",
    "ShippingFailure",
]

PARTICIPANT = "shipping"
SCHEDULE = "shipping.schedule"
CANCEL = "shipping.cancel"


class ShippingFailure(StrEnum):
    """Business reasons ``shipping.schedule`` can fail with."""

    UNDELIVERABLE_ADDRESS = "undeliverable_address"
    SHIPMENT_CANCELLED = "shipment_cancelled"  # cancelled first; late schedule refused
    CARRIER_UNREACHABLE = "carrier_unreachable"  # transient: sent with retryable=true


class Address(Contract):
    name: ShortText
    street: ShortText
    city: ShortText
    postal_code: PostalCode
    country: Country


class ScheduleShipment(Contract):
    """Payload of ``shipping.schedule``; at most one shipment exists per ``order_ref``."""

    order_ref: UUID
    address: Address
    items: StockLines


class ShipmentScheduled(Contract):
    shipment_id: UUID
    carrier: ShortText


class CancelShipment(Contract):
    """Payload of ``shipping.cancel``, the compensation of ``shipping.schedule``."""

    order_ref: UUID


class ShipmentCancelled(Contract):
    """``nothing_to_undo`` means no shipment existed for the ref, which still counts as success."""

    shipment_id: UUID | None
    nothing_to_undo: bool

    @model_validator(mode="after")
    def _undo_is_consistent(self) -> Self:
        if self.nothing_to_undo != (self.shipment_id is None):
            raise ValueError("shipment_id must be null exactly when nothing_to_undo is true")
        return self
