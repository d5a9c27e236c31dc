"""The building blocks of the wire protocol: the strict base model, names, reasons, JSON objects.

Every envelope is strict, closed and immutable: a message that does not match exactly is
rejected at the edge rather than coerced, so the orchestrator and the participants never
disagree about what was sent.
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, JsonValue, StringConstraints
from pydantic_core import PydanticCustomError

__all__ = [
    "SCHEMA_VERSION",
    "CommonFailure",
    "Contract",
    "ContractError",
    "JsonObject",
    "Name",
    "ReasonCode",
]

SCHEMA_VERSION = 1
"""Bumped only for incompatible changes; every envelope pins it with ``Literal[1]``."""

_MAX_ERROR_DETAIL = 4000


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

    INVALID_PAYLOAD = "invalid_payload"  # final: the payload does not fit its model
    HANDLER_ERROR = "handler_error"  # a bug in the participant; retryable
    ALREADY_COMPENSATED = "already_compensated"  # final: an action after its compensation


class Contract(BaseModel):
    """Base of every wire model: strict types, no unknown fields, immutable once built."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


Name = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_.-]*$")
]
"""Identifier for sagas, steps, participants and command types (``payment.charge``)."""

ReasonCode = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_]*$")
]
"""Machine-readable failure reason (``insufficient_funds``)."""


def _finite(value: dict[str, JsonValue]) -> dict[str, JsonValue]:
    # JSON has no NaN or Infinity, yet the parser reads them (and 1e400 as infinity) and they
    # would go out again as null: a message would not say what it said. Walked without
    # recursion, by exact type first (what the parser makes), as every payload and reply data
    # passes here: three times faster than isinstance and math.isfinite on each value.
    pending: list[Any] = [value]
    while pending:
        item = pending.pop()
        for v in item.values() if isinstance(item, dict) else item:
            t = type(v)
            if t is str or t is int or t is bool or v is None:
                continue
            if t is float:
                if v - v != 0:  # NaN and the infinities only
                    raise PydanticCustomError("finite_number", "Input should be a finite number")
            elif isinstance(v, dict | list):
                pending.append(v)
            elif isinstance(v, float) and not math.isfinite(v):
                raise PydanticCustomError("finite_number", "Input should be a finite number")
    return value


JsonObject = Annotated[
    dict[Annotated[str, StringConstraints(max_length=128)], JsonValue],
    Field(max_length=256),
    AfterValidator(_finite),
]
"""Free-form JSON object of finite numbers; its overall size is bounded by the parser's byte
limit."""
