"""Shared building blocks for every message schema.

All contracts are strict, closed and immutable: a message that does not match exactly is rejected
at the edge rather than coerced, so the orchestrator and the participants never disagree about
what was sent. Money travels as a decimal string (``"12.50"``), never as a JSON number, because
binary floats cannot represent cents.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Any, Protocol, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    StringConstraints,
    WithJsonSchema,
)
from pydantic_core import PydanticCustomError

__all__ = [
    "MAX_AMOUNT",
    "SCHEMA_VERSION",
    "CommonFailure",
    "Contract",
    "ContractError",
    "Country",
    "Currency",
    "JsonObject",
    "Money",
    "Name",
    "NonNegativeMoney",
    "PostalCode",
    "Quantity",
    "ReasonCode",
    "ShortText",
    "Sku",
    "unique_skus",
]

SCHEMA_VERSION = 1
"""Bumped only for incompatible changes; every envelope pins it with ``Literal[1]``."""

MAX_AMOUNT = Decimal("1000000")
_MAX_ERROR_DETAIL = 4000
_CENT = Decimal("0.01")
_DECIMAL_TEXT = re.compile(r"-?[0-9]+(\.[0-9]+)?")


class ContractError(ValueError):
    """The one error a caller has to handle when a message does not fit its contract.

    ``reason`` is a stable machine code (``too_large``, ``invalid_utf8``, ``invalid_json``,
    ``schema_violation``, ``unknown_command``) suitable for a failure reply or a metric label;
    ``detail`` is for humans, never echoes the offending input and is at most 4000 characters.
    """

    def __init__(self, reason: str, detail: str, errors: tuple[str, ...] = ()) -> None:
        if len(detail) > _MAX_ERROR_DETAIL:
            detail = detail[: _MAX_ERROR_DETAIL - 3] + "..."
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.errors = errors


class CommonFailure(StrEnum):
    """Failure reasons any participant may reply with, whatever the command."""

    INVALID_PAYLOAD = "invalid_payload"
    HANDLER_ERROR = "handler_error"  # a bug in the participant; retryable
    UNKNOWN_COMMAND = "unknown_command"


class Contract(BaseModel):
    """Base of every wire model: strict types, no unknown fields, immutable once built."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


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
"""Like :data:`Money` but zero is allowed (balances, refunds of nothing)."""

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

Name = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_.-]*$")
]
"""Identifier for sagas, steps, participants and command types (``payment.charge``)."""

ReasonCode = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_]*$")
]
"""Machine-readable failure reason (``insufficient_funds``)."""

Quantity = Annotated[int, Field(ge=1, le=10_000)]


def _finite(value: dict[str, JsonValue]) -> dict[str, JsonValue]:
    # JSON has no NaN or Infinity, yet the parser reads them (and 1e400 as infinity) and they
    # would go out again as null: a message would not say what it said. Walked without recursion.
    pending: list[JsonValue] = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, float) and not math.isfinite(item):
            raise PydanticCustomError("finite_number", "Input should be a finite number")
        if isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return value


JsonObject = Annotated[
    dict[Annotated[str, StringConstraints(max_length=128)], JsonValue],
    Field(max_length=256),
    AfterValidator(_finite),
]
"""Free-form JSON object of finite numbers; its overall size is bounded by the parser's byte
limit."""


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
