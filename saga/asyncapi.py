"""The published contracts of a deployment: the AsyncAPI 3.0 document and one JSON Schema per
message, from the contracts and the registered saga definitions (``saga schema export`` writes
them; the admin API serves ``/asyncapi.json``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from contracts.asyncapi import SagaSummary, StepSummary, asyncapi_document
from contracts.asyncapi import Topology as WireNames
from contracts.schema import bundle_models, write_bundle
from saga.core.definition import Registry, SagaDefinition
from saga.transport.topology import Topology

__all__ = ["document", "export", "message_schemas"]


def document(registry: Registry | None, topology: Topology) -> dict[str, Any]:
    """The AsyncAPI document of ``registry``'s sagas on ``topology`` (every contract when
    ``registry`` is None)."""
    sagas = [] if registry is None else [_summary(d) for d in registry.all()]
    participants = {s.participant for d in sagas for s in d.steps}
    if registry is None or not participants:
        from contracts.catalog import CATALOG  # noqa: PLC0415

        participants = {c.participant for c in CATALOG.values()}
    names = WireNames(
        commands_exchange=topology.commands_exchange,
        reply_queue=topology.reply_queue,
        start_queue=topology.start_queue,
        command_queues={p: topology.command_queue(p) for p in sorted(participants)},
    )
    return asyncapi_document(names, sagas)


def message_schemas() -> dict[str, dict[str, Any]]:
    """One standalone JSON Schema (2020-12) per wire model, by model name."""
    out = {}
    for model in bundle_models():
        schema = model.model_json_schema(mode="validation")
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        out[model.__name__] = schema
    return out


def export(directory: Path, registry: Registry | None, topology: Topology) -> list[Path]:
    """Write the AsyncAPI document, the schema bundle and one schema per message."""
    directory.mkdir(parents=True, exist_ok=True)
    written = [write_bundle(directory)]
    path = directory / "asyncapi.json"
    path.write_text(json.dumps(document(registry, topology), indent=2, sort_keys=True) + "\n")
    written.append(path)
    messages = directory / "messages"
    messages.mkdir(exist_ok=True)
    for name, schema in message_schemas().items():
        path = messages / f"{name}.schema.json"
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written


def _summary(definition: SagaDefinition) -> SagaSummary:
    return SagaSummary(
        name=definition.name,
        version=definition.version,
        steps=[
            StepSummary(
                name=step.name,
                participant=step.participant,
                action=step.action,
                compensation=step.compensation if step.compensatable else None,
            )
            for step in definition.steps
        ],
    )
