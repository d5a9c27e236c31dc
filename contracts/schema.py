"""Export every contract as one JSON Schema bundle, for non-Python participants and for review.

The bundle is committed next to the package; a test fails when the models drift from it, so any
change to the wire format shows up as a diff of the snapshot.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic.json_schema import models_json_schema

from contracts.catalog import CATALOG
from contracts.common import SCHEMA_VERSION, CommonFailure, Contract
from contracts.envelope import DEFAULT_MAX_BYTES, CommandEnvelope, ReplyEnvelope, StartSaga

__all__ = [
    "BUNDLE_FILENAME",
    "BUNDLE_ID",
    "SCHEMAS_DIR",
    "bundle_models",
    "export_bundle",
    "main",
    "render_bundle",
    "write_bundle",
]

BUNDLE_FILENAME = "saga-contracts.schema.json"
BUNDLE_ID = f"urn:saga:contracts:v{SCHEMA_VERSION}"
SCHEMAS_DIR = Path(__file__).resolve().parent / "schemas"
_DRAFT = "https://json-schema.org/draft/2020-12/schema"
_REF = "#/$defs/{model}"


def bundle_models() -> tuple[type[Contract], ...]:
    """The envelopes, then each command's payload and reply model, in catalog order."""
    models: list[type[Contract]] = [CommandEnvelope, ReplyEnvelope, StartSaga]
    for contract in CATALOG.values():
        for model in (contract.payload, contract.reply):
            if model not in models:
                models.append(model)
    return tuple(models)


def export_bundle() -> dict[str, Any]:
    """The whole bundle as a JSON-ready dict with recursively sorted keys."""
    models = bundle_models()
    _, top = models_json_schema([(m, "validation") for m in models], ref_template=_REF)
    commands = {
        c.command_type: {
            "participant": c.participant,
            "payload": {"$ref": _REF.format(model=c.payload.__name__)},
            "reply": {"$ref": _REF.format(model=c.reply.__name__)},
            "compensates": c.compensates,
            "failures": list(c.failures),
        }
        for c in CATALOG.values()
    }
    bundle = {
        "$schema": _DRAFT,
        "$id": BUNDLE_ID,
        "title": "Saga contracts",
        "description": (
            "Wire envelopes, command payloads and success replies of the saga orchestrator. "
            "Every message is one of the envelopes in $defs; x-commands maps each command type "
            "to the models of its payload and reply."
        ),
        "$defs": top["$defs"],
        "x-schema-version": SCHEMA_VERSION,
        "x-max-message-bytes": DEFAULT_MAX_BYTES,
        "x-common-failures": [r.value for r in CommonFailure],
        "x-commands": commands,
    }
    sorted_bundle: dict[str, Any] = _sort_keys(bundle)
    return sorted_bundle


def render_bundle() -> str:
    """The bundle as the exact text of the committed snapshot."""
    return json.dumps(export_bundle(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_bundle(directory: Path | str = SCHEMAS_DIR) -> Path:
    """Write the bundle into ``directory`` and return the file's path."""
    path = Path(directory) / BUNDLE_FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_bundle(), encoding="utf-8")
    return path


def _sort_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sort_keys(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sort_keys(v) for v in value]
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m contracts.schema", description="Write the saga contracts schema bundle."
    )
    parser.add_argument(
        "directory",
        nargs="?",
        type=Path,
        default=SCHEMAS_DIR,
        help="where to write the bundle (default: the package's schemas directory)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if the bundle in the directory is missing or out of date",
    )
    args = parser.parse_args(argv)
    directory: Path = args.directory
    if args.check:
        path = directory / BUNDLE_FILENAME
        current = path.read_text(encoding="utf-8") if path.is_file() else None
        if current != render_bundle():
            print(f"{path} is out of date; run python -m contracts.schema to refresh")
            return 1
        print(f"{path} is up to date")
        return 0
    print(write_bundle(directory))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
