"""The published contracts of a deployment, from its registry: the AsyncAPI 3.0 document, one
JSON Schema per message model, and one bundle of them all (``saga schema export`` writes them;
the admin API serves the AsyncAPI document and the dashboard shows it).

Everything is built in memory first and then written through a temporary directory, so an
export either writes every file or none: a bad model (two models of one name, a model whose
schema cannot be generated) leaves the target as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from saga.core.definition import CommandSpec, Registry, SagaDefinition
from saga.protocol.asyncapi import REF, Names, asyncapi_document
from saga.protocol.envelope import DEFAULT_MAX_BYTES, CommandEnvelope, ReplyEnvelope, StartSaga
from saga.protocol.types import SCHEMA_VERSION, CommonFailure
from saga.transport.topology import Topology

__all__ = ["BUNDLE_FILENAME", "ENVELOPES", "bundle", "document", "export", "message_schemas"]

BUNDLE_FILENAME = "saga-contracts.schema.json"
ENVELOPES: tuple[type[BaseModel], ...] = (CommandEnvelope, ReplyEnvelope, StartSaga)
_DRAFT = "https://json-schema.org/draft/2020-12/schema"


def document(registry: Registry | None, topology: Topology) -> dict[str, Any]:
    """The AsyncAPI document of ``registry``'s sagas on ``topology``; without a registry, of
    the protocol alone (envelopes and start requests)."""
    sagas, commands = _contents(registry)
    names = Names(
        commands_exchange=topology.commands_exchange,
        reply_queue=topology.reply_queue,
        start_queue=topology.start_queue,
        command_queues={
            p: topology.command_queue(p) for p in sorted({c.participant for c in commands})
        },
    )
    return asyncapi_document(names, sagas, commands, _definitions(models(registry)))


def models(registry: Registry | None) -> list[type[BaseModel]]:
    """The envelopes, then every input, payload and reply model the sagas name, once each.
    ValueError when two different models share a name (their schemas would collide)."""
    sagas, commands = _contents(registry)
    found: list[type[BaseModel]] = list(ENVELOPES)
    named = [d.input_model for d in sagas] + [
        m for c in commands for m in (c.payload_model, c.reply_model)
    ]
    for model in named:
        if model is not None and model not in found:
            found.append(model)
    by_name: dict[str, type[BaseModel]] = {}
    for model in found:
        other = by_name.setdefault(model.__name__, model)
        if other is not model:
            raise ValueError(
                f"two models are named {model.__name__!r} ({other.__module__} and "
                f"{model.__module__}); give one another name: the contracts name schemas by it"
            )
    return found


def message_schemas(registry: Registry | None) -> dict[str, dict[str, Any]]:
    """One standalone JSON Schema (2020-12) per model, by model name."""
    out = {}
    for model in models(registry):
        schema = model.model_json_schema(mode="validation")
        schema["$schema"] = _DRAFT
        out[model.__name__] = schema
    return out


def bundle(registry: Registry | None) -> dict[str, Any]:
    """Every model in one JSON Schema document ($defs), with ``x-commands`` mapping each command
    type to its participant and models: one file for a code generator or a review."""
    sagas, commands = _contents(registry)
    ref = "#/$defs/{model}"

    def model_ref(model: type[Any] | None) -> dict[str, Any]:
        return {"type": "object"} if model is None else {"$ref": ref.format(model=model.__name__)}

    return {
        "$schema": _DRAFT,
        "$id": f"urn:saga:contracts:v{SCHEMA_VERSION}",
        "title": "Saga contracts",
        "description": (
            "Wire envelopes, saga inputs, command payloads and success replies. Every message "
            "is one of the envelopes in $defs; x-commands maps each command type to the models "
            "of its payload and reply (a plain object where the saga names none)."
        ),
        "$defs": _definitions(models(registry), ref),
        "x-schema-version": SCHEMA_VERSION,
        "x-max-message-bytes": DEFAULT_MAX_BYTES,
        "x-common-failures": [r.value for r in CommonFailure],
        "x-sagas": {
            d.name: {"version": d.version, "input": model_ref(d.input_model)} for d in sagas
        },
        "x-commands": {
            c.command_type: {
                "participant": c.participant,
                "payload": model_ref(c.payload_model),
                "reply": model_ref(c.reply_model),
                "compensates": c.compensates,
                "failures": list(c.failures),
            }
            for c in commands
        },
    }


def export(directory: Path, registry: Registry | None, topology: Topology) -> list[Path]:
    """Write ``asyncapi.json``, the bundle and ``messages/<Model>.schema.json`` into
    ``directory``: every file or, when anything fails, none. Returns the paths written."""
    files: dict[str, Any] = {
        "asyncapi.json": document(registry, topology),
        BUNDLE_FILENAME: bundle(registry),
    }
    for name, schema in message_schemas(registry).items():
        files[f"messages/{name}.schema.json"] = schema
    directory = directory.absolute()
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        for relative, content in files.items():
            path = staging / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(_text(content), encoding="utf-8")
        if not directory.exists():
            staging.rename(directory)  # atomic: the whole tree appears at once
        else:
            _replace_into(staging, directory, files)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [directory / relative for relative in files]


def _replace_into(staging: Path, directory: Path, files: Iterable[str]) -> None:
    """Move each staged file over its old version; a rename within one file system either
    happens or not, and every file is staged before the first is moved."""
    for relative in files:
        target = directory / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / relative, target)


def _text(content: Any) -> str:
    return json.dumps(content, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _contents(registry: Registry | None) -> tuple[list[SagaDefinition], list[CommandSpec]]:
    if registry is None:
        return [], []
    return registry.all(), registry.commands()


def _definitions(found: list[type[BaseModel]], ref: str = REF) -> dict[str, Any]:
    _, top = models_json_schema([(m, "validation") for m in found], ref_template=ref)
    defs: dict[str, Any] = top.get("$defs", {})
    return defs
