"""Every error saga raises, in one tree.

    SagaError
    ├── DefinitionError        a saga definition is invalid; raised at registration
    ├── UnknownSagaError       a name, version or id that nothing is registered or stored under
    ├── InvalidInputError      a saga's input does not fit its input model; nothing was stored
    ├── ConfigError            a setting is missing or wrong; says what to change
    ├── ConcurrencyError       a saga changed under us (version check failed); safe to retry
    └── MessageError           an inbound message cannot be applied; carries the dead-letter reason

Callers branch on the type, never on the message text. ``MessageError.reason`` is a short
machine-readable code that goes into the dead-letter header.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ConcurrencyError",
    "ConfigError",
    "DefinitionError",
    "FieldError",
    "InvalidInputError",
    "MessageError",
    "SagaError",
    "UnknownSagaError",
]


class SagaError(Exception):
    """Base of every error the package raises on purpose."""


class DefinitionError(SagaError):
    """A saga definition failed validation; the message names the saga and the step."""

    def __init__(
        self, saga: str, message: str, *, version: int | None = None, step: str | None = None
    ):
        where = f"saga {saga!r}"
        if version is not None:
            where += f" v{version}"
        if step is not None:
            where += f", step {step!r}"
        super().__init__(f"{where}: {message}")
        self.saga = saga
        self.version = version
        self.step = step


class UnknownSagaError(SagaError):
    """No definition or instance under that name, version or id."""


@dataclass(frozen=True, slots=True)
class FieldError:
    """One reason an input was refused: where (``("items", 0, "quantity")``) and why."""

    loc: tuple[str | int, ...]
    msg: str
    type: str

    def __str__(self) -> str:
        where = ".".join(str(p) for p in self.loc) or "(input)"
        return f"{where}: {self.msg}"


class InvalidInputError(SagaError, ValueError):
    """A saga's input does not fit the input model of its definition; ``errors`` says which
    fields and why. Raised before anything is stored or sent."""

    def __init__(self, saga: str, errors: tuple[FieldError, ...]):
        shown = "; ".join(str(e) for e in errors[:20])
        more = f"; and {len(errors) - 20} more" if len(errors) > 20 else ""
        super().__init__(f"invalid input for saga {saga!r}: {shown}{more}")
        self.saga = saga
        self.errors = errors


class ConfigError(SagaError):
    """A setting is invalid; the message says which and what to change."""


class ConcurrencyError(SagaError):
    """The saga's stored version moved on since it was read; re-read and decide again."""


class MessageError(SagaError):
    """An inbound message cannot be applied and must be dead-lettered with ``reason``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
