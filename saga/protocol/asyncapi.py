"""An AsyncAPI 3.0 document of a deployment's messages, from the models its sagas name.

Written from the orchestrator's side: it *sends* each command to its participant's queue
through the commands exchange, and *receives* replies and start requests. A command whose step
names no payload model (or reply model) is described as a free JSON object, so every saga can be
published, contracts or not; :func:`asyncapi_document` is pure and takes the queue names from
the caller (:class:`saga.transport.topology.Topology`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from saga.core.definition import CommandSpec, SagaDefinition
from saga.protocol.envelope import DEFAULT_MAX_BYTES, CommandEnvelope, ReplyEnvelope, StartSaga
from saga.protocol.types import SCHEMA_VERSION

__all__ = ["ASYNCAPI_VERSION", "Names", "asyncapi_document"]

ASYNCAPI_VERSION = "3.0.0"
REF = "#/components/schemas/{model}"
_AMQP_BINDING = "0.3.0"
_HEADERS = {
    "type": "object",
    "description": "AMQP headers: the W3C trace context of the span that published the message.",
    "properties": {
        "traceparent": {"type": "string", "pattern": "^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"},
        "tracestate": {"type": "string"},
    },
}
_ANY_OBJECT = {"type": "object", "description": "a JSON object; this step names no model"}


@dataclass(frozen=True)
class Names:
    """The deployment's exchange and queue names."""

    commands_exchange: str
    reply_queue: str
    start_queue: str
    command_queues: Mapping[str, str]  # participant -> its command queue


def asyncapi_document(
    names: Names,
    sagas: Sequence[SagaDefinition],
    commands: Sequence[CommandSpec],
    schemas: Mapping[str, Any],
    *,
    server: str = "localhost:5672",
) -> dict[str, Any]:
    """The document of ``commands`` (those ``sagas`` send) and of starting ``sagas``;
    ``schemas`` are the JSON Schemas of every model, by name, placed in components."""
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for participant in sorted({c.participant for c in commands}):
        channel = f"{participant}Commands"
        queue = names.command_queues[participant]
        mine = [c for c in commands if c.participant == participant]
        channels[channel] = {
            "address": queue,
            "title": f"Commands to {participant}",
            "description": (
                f"Published to the {names.commands_exchange!r} exchange with routing key "
                f"{participant!r}; consumed by {participant} from queue {queue!r}."
            ),
            "messages": {_name(c.command_type): _ref_message(_name(c.command_type)) for c in mine},
            "bindings": {
                "amqp": {
                    "is": "routingKey",
                    "exchange": {
                        "name": names.commands_exchange,
                        "type": "direct",
                        "durable": True,
                        "autoDelete": False,
                    },
                    "bindingVersion": _AMQP_BINDING,
                }
            },
        }
        for c in mine:
            name = _name(c.command_type)
            messages[name] = _command_message(c)
            messages[f"{name}Reply"] = _reply_message(c)
            operations[f"send{_title(name)}"] = {
                "action": "send",
                "channel": {"$ref": f"#/channels/{channel}"},
                "messages": [{"$ref": f"#/channels/{channel}/messages/{name}"}],
                "summary": _summary(c),
                "reply": {
                    "channel": {"$ref": "#/channels/replies"},
                    "messages": [{"$ref": f"#/channels/replies/messages/{name}Reply"}],
                },
            }
    channels["replies"] = {
        "address": names.reply_queue,
        "title": "Replies to the orchestrator",
        "description": (
            "Participants publish their replies to the default exchange with the command's "
            "reply_to as routing key; the orchestrator consumes them."
        ),
        "messages": {
            f"{_name(c.command_type)}Reply": _ref_message(f"{_name(c.command_type)}Reply")
            for c in commands
        },
        "bindings": _queue_binding(names.reply_queue),
    }
    operations["receiveReplies"] = {
        "action": "receive",
        "channel": {"$ref": "#/channels/replies"},
        "summary": "Apply a participant's reply to the saga waiting for it.",
    }
    channels["start"] = {
        "address": names.start_queue,
        "title": "Start requests",
        "description": "Publish a StartSaga here (default exchange) to start a saga by key.",
        "messages": {"startSaga": _ref_message("startSaga")},
        "bindings": _queue_binding(names.start_queue),
    }
    messages["startSaga"] = _start_message(sagas)
    operations["receiveStart"] = {
        "action": "receive",
        "channel": {"$ref": "#/channels/start"},
        "summary": "Start a saga.",
    }
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "saga orchestrator messages",
            "version": str(SCHEMA_VERSION),
            "description": "\n\n".join(_description(sagas)),
            "license": {"name": "Apache-2.0"},
        },
        "defaultContentType": "application/json",
        "servers": {"rabbitmq": {"host": server, "protocol": "amqp", "protocolVersion": "0.9.1"}},
        "channels": channels,
        "operations": operations,
        "components": {"schemas": dict(schemas), "messages": messages},
        "x-sagas": [
            {
                "name": d.name,
                "version": d.version,
                "input": _model_ref(d.input_model),
                "steps": [
                    {
                        "name": s.name,
                        "participant": s.participant,
                        "action": s.action,
                        "compensation": s.compensation if d.needs_compensation(i) else None,
                        "group": _groups(d).get(i),
                        "conditional": s.when is not None,
                    }
                    for i, s in enumerate(d.steps)
                ],
            }
            for d in sagas
        ],
    }


def _groups(d: SagaDefinition) -> dict[int, int]:
    """Step index -> the index of its parallel group (the members are sent together), as the
    admin API's definitions say it."""
    return {i: g for g, (first, last) in enumerate(d.groups) for i in range(first, last + 1)}


def _description(sagas: Sequence[SagaDefinition]) -> list[str]:
    lines = [
        "The saga orchestrator's wire protocol: command envelopes to participants, their reply "
        "envelopes, and start requests. Every body is JSON (UTF-8) of at most "
        f"{DEFAULT_MAX_BYTES} bytes; the AMQP message id is the envelope's message_id and the "
        "correlation id its saga_id.",
    ]
    for d in sagas:
        groups = _groups(d)
        steps = "; ".join(
            f"{s.name}: {s.action} to {s.participant}"
            + (f", undone by {s.compensation}" if d.needs_compensation(i) else "")
            + (f", in parallel group {groups[i]}" if i in groups else "")
            + (", only when its condition holds" if s.when is not None else "")
            for i, s in enumerate(d.steps)
        )
        lines.append(f"Saga {d.name} v{d.version}: {steps}.")
    return lines


def _name(command_type: str) -> str:
    """A component name: letters, digits, ``.``, ``-``, ``_`` only."""
    return command_type.replace(".", "_")


def _title(name: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in name.split("_"))


def _ref_message(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/messages/{name}"}


def _model_ref(model: type[Any] | None) -> dict[str, Any]:
    return _ANY_OBJECT if model is None else {"$ref": REF.format(model=model.__name__)}


def _summary(c: CommandSpec) -> str:
    if c.compensates is not None:
        return f"Undo {c.compensates} (compensation; must accept 'nothing to undo')."
    return f"Ask {c.participant} to run {c.command_type} (step {c.step} of saga {c.saga})."


def _command_message(c: CommandSpec) -> dict[str, Any]:
    return {
        "name": c.command_type,
        "title": c.command_type,
        "summary": _summary(c),
        "contentType": "application/json",
        "correlationId": {"location": "$message.payload#/saga_id"},
        "headers": _HEADERS,
        "payload": {
            "allOf": [
                {"$ref": REF.format(model=CommandEnvelope.__name__)},
                {
                    "type": "object",
                    "properties": {
                        "command_type": {"const": c.command_type},
                        "participant": {"const": c.participant},
                        "direction": {
                            "const": "action" if c.compensates is None else "compensation"
                        },
                        "payload": _model_ref(c.payload_model),
                    },
                },
            ]
        },
        "bindings": {"amqp": {"messageType": c.command_type, "bindingVersion": _AMQP_BINDING}},
    }


def _reply_message(c: CommandSpec) -> dict[str, Any]:
    failures = sorted(c.failures)
    return {
        "name": f"{c.command_type}.reply",
        "title": f"Reply to {c.command_type}",
        "summary": (
            "success with data, or failure with a reason"
            + (f" (business reasons: {', '.join(failures)})" if failures else "")
        ),
        "contentType": "application/json",
        "correlationId": {"location": "$message.payload#/saga_id"},
        "headers": _HEADERS,
        "payload": {
            "allOf": [
                {"$ref": REF.format(model=ReplyEnvelope.__name__)},
                {
                    "type": "object",
                    "properties": {
                        "command_type": {"const": c.command_type},
                        "participant": {"const": c.participant},
                    },
                },
                {
                    "description": "a success reply's data is the reply model",
                    "if": {
                        "properties": {"outcome": {"const": "success"}},
                        "required": ["outcome"],
                    },
                    "then": {"properties": {"data": _model_ref(c.reply_model)}},
                },
            ]
        },
        "bindings": {
            "amqp": {"messageType": f"{c.command_type}.reply", "bindingVersion": _AMQP_BINDING}
        },
    }


def _start_message(sagas: Sequence[SagaDefinition]) -> dict[str, Any]:
    by_saga = [
        {
            "type": "object",
            "properties": {"saga_name": {"const": d.name}, "input": _model_ref(d.input_model)},
        }
        for d in {d.name: d for d in sagas}.values()  # the newest version of each saga
    ]
    payload: dict[str, Any] = {"$ref": REF.format(model=StartSaga.__name__)}
    if by_saga:
        payload = {"allOf": [payload, {"oneOf": by_saga}]}
    return {
        "name": "saga.start",
        "title": "Start a saga",
        "summary": "Idempotent by (saga_name, key): a second request returns the same saga.",
        "contentType": "application/json",
        "headers": _HEADERS,
        "payload": payload,
        "bindings": {"amqp": {"messageType": "saga.start", "bindingVersion": _AMQP_BINDING}},
    }


def _queue_binding(queue: str) -> dict[str, Any]:
    return {
        "amqp": {
            "is": "queue",
            "queue": {"name": queue, "durable": True, "exclusive": False, "autoDelete": False},
            "bindingVersion": _AMQP_BINDING,
        }
    }
