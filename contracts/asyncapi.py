"""An AsyncAPI 3.0 document of the wire protocol, generated from the same models as the JSON
Schema bundle, so a participant in any language (or a code generator) reads one description.

The document is written from the orchestrator's side: it *sends* each command to its
participant's queue through the commands exchange, and *receives* replies and start requests.
Queue and exchange names depend on the deployment's prefix, so the caller passes them in
(``contracts`` never imports the orchestrator).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic.json_schema import models_json_schema

from contracts.catalog import CATALOG, CommandContract
from contracts.common import SCHEMA_VERSION, Contract
from contracts.envelope import DEFAULT_MAX_BYTES, CommandEnvelope, ReplyEnvelope, StartSaga

__all__ = ["ASYNCAPI_VERSION", "SagaSummary", "StepSummary", "Topology", "asyncapi_document"]

ASYNCAPI_VERSION = "3.0.0"
_REF = "#/components/schemas/{model}"
_AMQP_BINDING = "0.3.0"
_HEADERS = {
    "type": "object",
    "description": "AMQP headers: the W3C trace context of the span that published the message.",
    "properties": {
        "traceparent": {"type": "string", "pattern": "^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"},
        "tracestate": {"type": "string"},
    },
}


@dataclass(frozen=True)
class Topology:
    """The deployment's names (``saga.transport.topology.Topology`` provides them)."""

    commands_exchange: str
    reply_queue: str
    start_queue: str
    command_queues: Mapping[str, str]  # participant -> its command queue


@dataclass(frozen=True)
class StepSummary:
    name: str
    participant: str
    action: str
    compensation: str | None


@dataclass(frozen=True)
class SagaSummary:
    """A registered saga definition, as far as the wire is concerned."""

    name: str
    version: int
    steps: Sequence[StepSummary]


def asyncapi_document(
    topology: Topology,
    sagas: Iterable[SagaSummary] = (),
    *,
    server: str = "localhost:5672",
) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of every command, reply and start request on ``topology``.

    With ``sagas``, only the commands those definitions send are listed, and each saga's steps
    are described; without, every command of the catalog."""
    saga_list = list(sagas)
    used = {
        command
        for saga in saga_list
        for step in saga.steps
        for command in (step.action, step.compensation)
        if command is not None
    }
    contracts = [c for c in CATALOG.values() if not saga_list or c.command_type in used]
    unknown = used - set(CATALOG)
    if unknown:
        raise ValueError(f"commands without a contract: {sorted(unknown)}")
    models: list[type[Contract]] = [CommandEnvelope, ReplyEnvelope, StartSaga]
    for contract in contracts:
        for model in (contract.payload, contract.reply):
            if model not in models:
                models.append(model)
    _, top = models_json_schema([(m, "validation") for m in models], ref_template=_REF)
    schemas: dict[str, Any] = dict(top["$defs"])

    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    participants = sorted({c.participant for c in contracts})
    for participant in participants:
        queue = topology.command_queues[participant]
        mine = [c for c in contracts if c.participant == participant]
        channels[f"{participant}Commands"] = {
            "address": queue,
            "title": f"Commands to {participant}",
            "description": (
                f"Published to the {topology.commands_exchange!r} exchange with routing key "
                f"{participant!r}; consumed by {participant} from queue {queue!r}."
            ),
            "messages": {
                _name(c.command_type): {"$ref": f"#/components/messages/{_name(c.command_type)}"}
                for c in mine
            },
            "bindings": {
                "amqp": {
                    "is": "routingKey",
                    "exchange": {
                        "name": topology.commands_exchange,
                        "type": "direct",
                        "durable": True,
                        "autoDelete": False,
                    },
                    "bindingVersion": _AMQP_BINDING,
                }
            },
        }
        for contract in mine:
            name = _name(contract.command_type)
            messages[name] = _command_message(contract)
            operations[f"send{_title(name)}"] = {
                "action": "send",
                "channel": {"$ref": f"#/channels/{participant}Commands"},
                "messages": [{"$ref": f"#/channels/{participant}Commands/messages/{name}"}],
                "summary": _command_summary(contract),
                "reply": {
                    "channel": {"$ref": "#/channels/replies"},
                    "messages": [{"$ref": f"#/channels/replies/messages/{name}Reply"}],
                },
            }
            messages[f"{name}Reply"] = _reply_message(contract)

    channels["replies"] = {
        "address": topology.reply_queue,
        "title": "Replies to the orchestrator",
        "description": (
            "Participants publish their replies to the default exchange with the command's "
            "reply_to as routing key; the orchestrator consumes them."
        ),
        "messages": {
            f"{_name(c.command_type)}Reply": {
                "$ref": f"#/components/messages/{_name(c.command_type)}Reply"
            }
            for c in contracts
        },
        "bindings": _queue_binding(topology.reply_queue),
    }
    operations["receiveReplies"] = {
        "action": "receive",
        "channel": {"$ref": "#/channels/replies"},
        "summary": "Apply a participant's reply to the saga waiting for it.",
    }
    channels["start"] = {
        "address": topology.start_queue,
        "title": "Start requests",
        "description": "Publish a StartSaga here (default exchange) to start a saga by key.",
        "messages": {"startSaga": {"$ref": "#/components/messages/startSaga"}},
        "bindings": _queue_binding(topology.start_queue),
    }
    messages["startSaga"] = {
        "name": "saga.start",
        "title": "Start a saga",
        "summary": "Idempotent by (saga_name, key): a second request returns the same saga.",
        "contentType": "application/json",
        "headers": _HEADERS,
        "payload": {"$ref": _REF.format(model=StartSaga.__name__)},
        "bindings": {"amqp": {"messageType": "saga.start", "bindingVersion": _AMQP_BINDING}},
    }
    operations["receiveStart"] = {
        "action": "receive",
        "channel": {"$ref": "#/channels/start"},
        "summary": "Start a saga.",
    }

    description = [
        "The saga orchestrator's wire protocol: command envelopes to participants, their reply "
        "envelopes, and start requests. Every body is JSON (UTF-8) of at most "
        f"{DEFAULT_MAX_BYTES} bytes; the AMQP message id is the envelope's message_id and the "
        "correlation id its saga_id.",
    ]
    for saga in saga_list:
        steps = "; ".join(
            f"{s.name}: {s.action} to {s.participant}"
            + (f", undone by {s.compensation}" if s.compensation else "")
            for s in saga.steps
        )
        description.append(f"Saga {saga.name} v{saga.version}: {steps}.")
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "saga orchestrator messages",
            "version": str(SCHEMA_VERSION),
            "description": "\n\n".join(description),
            "license": {"name": "Apache-2.0"},
        },
        "defaultContentType": "application/json",
        "servers": {"rabbitmq": {"host": server, "protocol": "amqp", "protocolVersion": "0.9.1"}},
        "channels": channels,
        "operations": operations,
        "components": {"schemas": schemas, "messages": messages},
        "x-sagas": [
            {
                "name": s.name,
                "version": s.version,
                "steps": [
                    {
                        "name": st.name,
                        "participant": st.participant,
                        "action": st.action,
                        "compensation": st.compensation,
                    }
                    for st in s.steps
                ],
            }
            for s in saga_list
        ],
    }


def _name(command_type: str) -> str:
    """A component name: letters, digits, ``.``, ``-``, ``_`` only."""
    return command_type.replace(".", "_")


def _title(name: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in name.split("_"))


def _command_summary(contract: CommandContract) -> str:
    if contract.compensates:
        return f"Undo {contract.compensates} (compensation; must accept 'nothing to undo')."
    return f"Ask {contract.participant} to {contract.command_type.split('.', 1)[1]}."


def _command_message(contract: CommandContract) -> dict[str, Any]:
    return {
        "name": contract.command_type,
        "title": contract.command_type,
        "summary": _command_summary(contract),
        "contentType": "application/json",
        "correlationId": {"location": "$message.payload#/saga_id"},
        "headers": _HEADERS,
        "payload": {
            "allOf": [
                {"$ref": _REF.format(model=CommandEnvelope.__name__)},
                {
                    "type": "object",
                    "properties": {
                        "command_type": {"const": contract.command_type},
                        "participant": {"const": contract.participant},
                        "payload": {"$ref": _REF.format(model=contract.payload.__name__)},
                    },
                },
            ]
        },
        "bindings": {
            "amqp": {"messageType": contract.command_type, "bindingVersion": _AMQP_BINDING}
        },
    }


def _reply_message(contract: CommandContract) -> dict[str, Any]:
    failures = sorted(contract.failures)
    return {
        "name": f"{contract.command_type}.reply",
        "title": f"Reply to {contract.command_type}",
        "summary": (
            "success with data, or failure with a reason"
            + (f" (business reasons: {', '.join(failures)})" if failures else "")
        ),
        "contentType": "application/json",
        "correlationId": {"location": "$message.payload#/saga_id"},
        "headers": _HEADERS,
        "payload": {
            "allOf": [
                {"$ref": _REF.format(model=ReplyEnvelope.__name__)},
                {
                    "type": "object",
                    "properties": {
                        "command_type": {"const": contract.command_type},
                        "data": {
                            "description": "on success: the reply model; on failure: empty",
                            "anyOf": [
                                {"$ref": _REF.format(model=contract.reply.__name__)},
                                {"type": "object", "maxProperties": 0},
                            ],
                        },
                    },
                },
            ]
        },
        "bindings": {
            "amqp": {
                "messageType": f"{contract.command_type}.reply",
                "bindingVersion": _AMQP_BINDING,
            }
        },
    }


def _queue_binding(queue: str) -> dict[str, Any]:
    return {
        "amqp": {
            "is": "queue",
            "queue": {"name": queue, "durable": True, "exclusive": False, "autoDelete": False},
            "bindingVersion": _AMQP_BINDING,
        }
    }
