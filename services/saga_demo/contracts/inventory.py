"""The inventory service: reserves stock for an order and releases it as compensation."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Self
from uuid import UUID

from pydantic import AfterValidator, Field, model_validator

from saga.protocol import Contract
from saga_demo.contracts.types import Quantity, Sku, unique_skus

__all__ = [
    "DIGITAL",
    "EBOOK",
    "PARTICIPANT",
    "RELEASE",
    "RESERVE",
    "InventoryFailure",
    "ReleaseStock",
    "ReserveStock",
    "StockLine",
    "StockLines",
    "StockReleased",
    "StockReserved",
]

PARTICIPANT = "inventory"
RESERVE = "inventory.reserve"
RELEASE = "inventory.release"

EBOOK = "EBOOK-4"
DIGITAL: frozenset[str] = frozenset({EBOOK})
"""The demo's digital SKUs: sold as downloads, so never stocked, reserved nor shipped (the
checkout marks their lines ``digital`` and sends inventory only the physical ones)."""


class InventoryFailure(StrEnum):
    """Business reasons ``inventory.reserve`` can fail with."""

    OUT_OF_STOCK = "out_of_stock"
    UNKNOWN_SKU = "unknown_sku"
    RESERVATION_CANCELLED = "reservation_cancelled"  # released first; late reserve refused


class StockLine(Contract):
    sku: Sku
    quantity: Quantity


StockLines = Annotated[
    list[StockLine], Field(min_length=1, max_length=50), AfterValidator(unique_skus)
]


class ReserveStock(Contract):
    """Payload of ``inventory.reserve``: all lines are reserved or none, keyed by ``order_ref``."""

    order_ref: UUID
    items: StockLines


class StockReserved(Contract):
    reservation_id: UUID


class ReleaseStock(Contract):
    """Payload of ``inventory.release``, the compensation of ``inventory.reserve``."""

    order_ref: UUID


class StockReleased(Contract):
    """``nothing_to_undo`` means no reservation existed for the ref: still a success."""

    reservation_id: UUID | None
    nothing_to_undo: bool

    @model_validator(mode="after")
    def _undo_is_consistent(self) -> Self:
        if self.nothing_to_undo != (self.reservation_id is None):
            raise ValueError("reservation_id must be null exactly when nothing_to_undo is true")
        return self
