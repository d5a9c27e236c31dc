"""The wire envelopes and the one way to read them off the wire.

Every message on the bus is one of three envelopes. The envelope carries routing and
idempotency metadata; the business content sits in ``payload``/``data``/``input`` as a plain JSON
object and is validated separately against the model the catalog names for the command type, so a
participant can reply ``invalid_payload`` for a bad payload instead of dropping the message.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Literal, Self, TypeVar
from uuid import UUID, uuid4

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StringConstraints,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticSerializationError, to_json

from saga.protocol.types import Contract, ContractError, JsonObject, Name, ReasonCode

__all__ = [
    "DEFAULT_MAX_BYTES",
    "CommandEnvelope",
    "Direction",
    "Outcome",
    "ReplyEnvelope",
    "StartSaga",
    "dump_data",
    "parse",
    "parse_data",
]

DEFAULT_MAX_BYTES = 256 * 1024
"""Largest message accepted; checked before any parsing so a huge body costs nothing."""

_MAX_LISTED_ERRORS = 20
_MAX_MESSAGE_CHARS = 200
_MAX_PATH_PART_CHARS = 40
_MAX_DETAIL_CHARS = 1000

Direction = Literal["action", "compensation"]
Outcome = Literal["success", "failure"]
Detail = Annotated[str, StringConstraints(min_length=1, max_length=_MAX_DETAIL_CHARS)]

M = TypeVar("M", bound=BaseModel)


class CommandEnvelope(Contract):
    """A command from the orchestrator to one participant.

    ``message_id`` is new for every attempt, so traces and replies can tell attempts apart;
    ``idempotency_key`` is the same for every attempt of one step in one direction, so the
    participant applies the effect at most once however often the command is redelivered.
    """

    schema_version: Literal[1]
    message_id: UUID
    idempotency_key: UUID
    saga_id: UUID
    saga_name: Name
    step: Name
    direction: Direction
    attempt: Annotated[int, Field(ge=1)]
    participant: Name
    command_type: Name
    reply_to: Annotated[str, StringConstraints(min_length=1, max_length=255)]
    deadline: AwareDatetime
    payload: JsonObject


class ReplyEnvelope(Contract):
    """A participant's answer to one command, correlated by ``causation_id``.

    ``retryable`` marks a transient failure (the orchestrator may resend); a non-retryable failure
    is a business decision and triggers compensation. A failure names its ``reason``; a success
    has none and is never retryable (the JSON Schema says so too).
    """

    model_config = ConfigDict(
        json_schema_extra={
            "allOf": [
                {
                    "if": {"properties": {"outcome": {"const": "failure"}}},
                    "then": {
                        "required": ["reason"],
                        "properties": {"reason": {"type": "string"}},
                    },
                },
                {
                    "if": {"properties": {"outcome": {"const": "success"}}},
                    "then": {
                        "properties": {"reason": {"type": "null"}, "retryable": {"const": False}}
                    },
                },
            ]
        }
    )

    schema_version: Literal[1]
    message_id: UUID
    causation_id: UUID
    saga_id: UUID
    participant: Name
    command_type: Name
    outcome: Outcome
    reason: ReasonCode | None = None
    detail: Detail | None = None
    retryable: bool = False
    data: JsonObject = Field(default_factory=dict)

    @model_validator(mode="after")
    def _outcome_is_consistent(self) -> Self:
        if self.outcome == "failure" and self.reason is None:
            raise ValueError("a failure reply needs a reason")
        if self.outcome == "success" and self.reason is not None:
            raise ValueError("a success reply must not have a reason")
        if self.outcome == "success" and self.retryable:
            raise ValueError("a success reply cannot be retryable")
        return self

    @classmethod
    def success(
        cls,
        command: CommandEnvelope,
        data: Contract | Mapping[str, JsonValue] | None = None,
        *,
        message_id: UUID | None = None,
        detail: str | None = None,
    ) -> ReplyEnvelope:
        """Answer ``command`` successfully, with ``data`` (a reply model or a JSON object)."""
        return cls(
            schema_version=1,
            message_id=uuid4() if message_id is None else message_id,
            causation_id=command.message_id,
            saga_id=command.saga_id,
            participant=command.participant,
            command_type=command.command_type,
            outcome="success",
            detail=_reply_detail(detail),
            data=_as_data(data),
        )

    @classmethod
    def failure(
        cls,
        command: CommandEnvelope,
        reason: str,
        detail: str | None = None,
        *,
        retryable: bool = False,
        message_id: UUID | None = None,
        data: Contract | Mapping[str, JsonValue] | None = None,
    ) -> ReplyEnvelope:
        """Answer ``command`` with a failure; ``reason`` may be any of the reason enums.

        ``detail`` is clipped to 1000 characters (a ContractError's can be longer), so that a
        failure can always be answered.
        """
        return cls(
            schema_version=1,
            message_id=uuid4() if message_id is None else message_id,
            causation_id=command.message_id,
            saga_id=command.saga_id,
            participant=command.participant,
            command_type=command.command_type,
            outcome="failure",
            reason=str(reason),
            detail=_reply_detail(detail),
            retryable=retryable,
            data=_as_data(data),
        )


class StartSaga(Contract):
    """A client's request to start a saga.

    ``key`` is the client's idempotency key: starting the same saga name with the same key again
    returns the existing saga instead of a second one.
    """

    schema_version: Literal[1]
    message_id: UUID
    saga_name: Name
    key: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    input: JsonObject


def parse(model: type[M], raw: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> M:
    """Read one message of type ``model`` from raw bytes, or raise :class:`ContractError`."""
    if len(raw) > max_bytes:
        raise ContractError("too_large", f"message is {len(raw)} bytes, the limit is {max_bytes}")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ContractError("invalid_utf8", f"not UTF-8 at byte {exc.start}") from None
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise _contract_error(model, exc) from None


def parse_data(
    model: type[M], data: Mapping[str, JsonValue], *, max_bytes: int = DEFAULT_MAX_BYTES
) -> M:
    """Validate a JSON object already parsed (an envelope's ``payload`` or ``data``).

    It goes through JSON again on purpose: the strict models accept UUIDs, datetimes and amounts
    as strings only in JSON, which is where this object came from.
    """
    try:
        raw = to_json(data)
    except PydanticSerializationError as exc:
        raise ContractError("invalid_json", f"not a JSON object: {exc}") from None
    return parse(model, raw, max_bytes=max_bytes)


def dump_data(message: Contract) -> dict[str, JsonValue]:
    """The JSON object form of a payload or reply model, ready for an envelope."""
    return message.model_dump(mode="json")


def _as_data(data: Contract | Mapping[str, JsonValue] | None) -> dict[str, JsonValue]:
    if data is None:
        return {}
    if isinstance(data, Contract):
        return dump_data(data)
    return dict(data)


def _reply_detail(detail: str | None) -> str | None:
    # Clipped, not refused: a reply that cannot be built leaves its command to be retried forever.
    return _clip(detail, _MAX_DETAIL_CHARS) if detail else None


def _contract_error(model: type[BaseModel], exc: ValidationError) -> ContractError:
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    if any(err["type"] == "json_invalid" for err in errors):
        message = _clip(errors[0]["msg"], _MAX_MESSAGE_CHARS)
        return ContractError("invalid_json", message, (message,))
    lines = tuple(f"{_path(err['loc'])}: {_message(err['msg'])}" for err in errors)
    shown = "; ".join(lines[:_MAX_LISTED_ERRORS])
    if len(lines) > _MAX_LISTED_ERRORS:
        shown += f"; and {len(lines) - _MAX_LISTED_ERRORS} more"
    return ContractError("schema_violation", f"invalid {model.__name__}: {shown}", lines)


def _path(loc: tuple[int | str, ...]) -> str:
    # Locations can contain client-chosen keys (an unknown field name), so each part is clipped.
    if not loc:
        return "(message)"
    return ".".join(_clip(str(part), _MAX_PATH_PART_CHARS) for part in loc)


def _message(msg: str) -> str:
    # Our own validators raise ValueError; pydantic's "Value error, " prefix only adds noise.
    return _clip(msg.removeprefix("Value error, "), _MAX_MESSAGE_CHARS)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
