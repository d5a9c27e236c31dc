"""Pure translation between engine values and wire messages (the ``contracts`` envelopes)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import cast

from pydantic import JsonValue

from saga.core.state import JSON, Command, ReplyFailed, ReplySucceeded
from saga.ports import OutboxMessage
from saga.protocol.envelope import CommandEnvelope, ReplyEnvelope

__all__ = ["COMMANDS_EXCHANGE", "REPLY_QUEUE", "encode_command", "reply_event"]

COMMANDS_EXCHANGE = "saga.commands"
REPLY_QUEUE = "saga.replies"


def encode_command(
    command: Command,
    *,
    now: datetime,
    reply_to: str = REPLY_QUEUE,
    exchange: str = COMMANDS_EXCHANGE,
    headers: Mapping[str, str] | None = None,
) -> OutboxMessage:
    """The outbox row for ``command``; the body is final, so a re-send is byte-identical."""
    envelope = CommandEnvelope(
        schema_version=1,
        message_id=command.message_id,
        idempotency_key=command.idempotency_key,
        saga_id=command.saga_id,
        saga_name=command.saga_name,
        step=command.step,
        direction=command.direction.value,
        attempt=command.attempt,
        participant=command.participant,
        command_type=command.command_type,
        reply_to=reply_to,
        deadline=command.deadline,
        payload=cast(dict[str, JsonValue], dict(command.payload)),
    )
    return OutboxMessage(
        message_id=command.message_id,
        saga_id=command.saga_id,
        exchange=exchange,
        routing_key=command.participant,
        message_type=command.command_type,
        body=envelope.model_dump_json().encode(),
        headers=dict(headers or {}),
        created_at=now,
    )


def reply_event(reply: ReplyEnvelope) -> ReplySucceeded | ReplyFailed:
    """The engine event a validated reply stands for."""
    if reply.outcome == "success":
        return ReplySucceeded(
            causation_id=reply.causation_id,
            participant=reply.participant,
            data=cast(dict[str, JSON], dict(reply.data)),
            message_id=reply.message_id,
            command_type=reply.command_type,
        )
    return ReplyFailed(
        causation_id=reply.causation_id,
        participant=reply.participant,
        reason=reply.reason or "unspecified",
        retryable=reply.retryable,
        message_id=reply.message_id,
        command_type=reply.command_type,
    )
