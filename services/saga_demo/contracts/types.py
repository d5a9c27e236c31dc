"""Value types of the demo's messages: money as decimal strings, currencies, SKUs, addresses.

Money travels as a decimal string (``"12.50"``), never as a JSON number, because binary floats
cannot represent cents.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal
from typing import Annotated, Any, Protocol, TypeVar

from pydantic import AfterValidator, BeforeValidator, Field, StringConstraints, WithJsonSchema
from pydantic_core import PydanticCustomError

__all__ = [
    "MAX_AMOUNT",
    "Country",
    "Balance",
    "Currency",
    "Money",
    "NonNegativeMoney",
    "PostalCode",
    "Quantity",
    "ShortText",
    "Sku",
    "unique_skus",
]

MAX_AMOUNT = Decimal("1000000")
_CENT = Decimal("0.01")
_DECIMAL_TEXT = re.compile(r"-?[0-9]+(\.[0-9]+)?")


def _decimal_text(value: Any) -> Any:
    # Reject JSON numbers (and Python ints/floats) so amounts never pass through a binary float.
    if isinstance(value, Decimal):
        return value
    if isinstance(value, str):
        if _DECIMAL_TEXT.fullmatch(value) is None:
            raise PydanticCustomError(
                "decimal_string", "Input should be a plain decimal string such as '12.50'"
            )
        return Decimal(value)
    raise PydanticCustomError("decimal_type", "Input should be a decimal string such as '12.50'")


def _to_cents(value: Decimal) -> Decimal:
    # One canonical form per amount, so equal amounts serialise identically.
    return value.quantize(_CENT)


_AMOUNT_SCHEMA = {
    "type": "string",
    "pattern": r"^[0-9]{1,7}(\.[0-9]{1,2})?$",
    "description": "Decimal amount as a string, at most 2 decimal places.",
}

Money = Annotated[
    Decimal,
    BeforeValidator(_decimal_text),
    Field(gt=0, le=1_000_000, max_digits=9, decimal_places=2),
    AfterValidator(_to_cents),
    WithJsonSchema({**_AMOUNT_SCHEMA, "description": "Positive amount, at most 1000000.00."}),
]
"""A positive amount of money, at most one million, in cents precision."""

NonNegativeMoney = Annotated[
    Decimal,
    BeforeValidator(_decimal_text),
    Field(ge=0, le=1_000_000, max_digits=9, decimal_places=2),
    AfterValidator(_to_cents),
    WithJsonSchema({**_AMOUNT_SCHEMA, "description": "Amount from 0 to 1000000.00."}),
]
"""Like :data:`Money` but zero is allowed (refunds of nothing)."""

MAX_BALANCE = Decimal("9999999999.99")

Balance = Annotated[
    Decimal,
    BeforeValidator(_decimal_text),
    Field(ge=0, le=MAX_BALANCE, max_digits=12, decimal_places=2),
    AfterValidator(_to_cents),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": r"^[0-9]{1,10}(\.[0-9]{1,2})?$",
            "description": "An account balance from 0 to 9999999999.99 (NUMERIC(12, 2)).",
        }
    ),
]
"""An account's balance: what the payment ledger's ``NUMERIC(12, 2)`` column holds, which is more
than one charge may move (:data:`Money`)."""

Currency = Annotated[str, StringConstraints(pattern=r"^[A-Z]{3}$")]
"""ISO 4217 style currency code."""

Country = Annotated[str, StringConstraints(pattern=r"^[A-Z]{2}$")]
"""ISO 3166-1 alpha-2 style country code."""

Sku = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Z0-9][A-Z0-9-]*$")
]

PostalCode = Annotated[
    str, StringConstraints(min_length=1, max_length=16, pattern=r"^[A-Za-z0-9][A-Za-z0-9 -]*$")
]

ShortText = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"\S")]
"""Free human-readable text; must contain something besides whitespace."""

Quantity = Annotated[int, Field(ge=1, le=10_000)]


class _HasSku(Protocol):
    @property
    def sku(self) -> str: ...


_L = TypeVar("_L", bound=_HasSku)


def unique_skus(lines: Sequence[_L]) -> Sequence[_L]:
    """Reject repeated SKUs: stock is reserved and released per SKU, so each may appear once."""
    seen: set[str] = set()
    for line in lines:
        if line.sku in seen:
            raise ValueError(f"sku {line.sku} appears more than once")
        seen.add(line.sku)
    return lines
