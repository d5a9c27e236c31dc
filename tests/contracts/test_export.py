"""``saga schema export``: the contracts of any registry, written all or nothing; and the demo's,
committed under contracts/ and kept in step with the code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any
from uuid import UUID

import jsonschema
import pytest
from pydantic import BaseModel

from saga import Registry, SagaDefinition, Step
from saga.protocol.envelope import CommandEnvelope, ReplyEnvelope, StartSaga
from saga.protocol.export import BUNDLE_FILENAME, bundle, export, message_schemas
from saga.transport.topology import Topology
from saga_demo.checkout import CHECKOUT, registry

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "contracts"
REFRESH = "run scripts/contracts to refresh the committed contracts"
COMMANDS = {c.command_type: c for c in registry().commands()}


def _export(
    out: Path, *args: str, definitions: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    for name in ("SAGA_DEFINITIONS", "SAGA_PREFIX"):
        env.pop(name, None)
    if definitions is not None:
        env["SAGA_DEFINITIONS"] = definitions
    return subprocess.run(
        [sys.executable, "-m", "saga", "schema", "export", str(out), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=out.parent,
        check=False,
    )


def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): p.read_text(encoding="utf-8")
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# -- the demo's committed contracts --------------------------------------------------------------


@pytest.mark.parametrize(
    ("folder", "definitions"), [("checkout", "saga_demo.checkout:registry"), ("protocol", None)]
)
def test_the_committed_contracts_are_what_the_code_exports(
    tmp_path: Path, folder: str, definitions: str | None
) -> None:
    out = tmp_path / folder
    done = _export(out, definitions=definitions)
    assert done.returncode == 0, done.stderr
    committed = COMMITTED / folder
    assert committed.is_dir(), f"{committed} is missing; {REFRESH}"
    assert _tree(committed) == _tree(out), f"contracts/{folder} drifted from the code; {REFRESH}"


def test_the_bundle_names_every_model_of_the_checkout() -> None:
    found = bundle(registry())
    defs = found["$defs"]
    expected: set[type[Any]] = {CommandEnvelope, ReplyEnvelope, StartSaga}
    expected.add(CHECKOUT.input_model)  # type: ignore[arg-type]
    for c in COMMANDS.values():
        expected |= {c.payload_model, c.reply_model}
    for model in expected:
        assert model.__name__ in defs, model.__name__
        assert defs[model.__name__]["additionalProperties"] is False
    assert found["x-sagas"] == {  # the newest version: the one a start request begins
        "checkout": {"version": 2, "input": {"$ref": "#/$defs/CheckoutInput"}}
    }
    assert found["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert found["x-schema-version"] == 1 and found["x-max-message-bytes"] == 256 * 1024


def test_x_commands_mirror_the_steps() -> None:
    commands = bundle(registry())["x-commands"]
    assert (
        set(commands)
        == set(COMMANDS)
        == {
            f"{p}.{v}"
            for p, vs in {
                "order": ("create", "cancel"),
                "payment": ("charge", "refund"),
                "inventory": ("reserve", "release"),
                "shipping": ("schedule", "cancel"),
            }.items()
            for v in vs
        }
    )
    for command_type, entry in commands.items():
        spec = COMMANDS[command_type]
        assert entry["participant"] == spec.participant == command_type.split(".")[0]
        assert entry["compensates"] == spec.compensates
        assert entry["failures"] == list(spec.failures)
        assert entry["payload"] == {"$ref": f"#/$defs/{spec.payload_model.__name__}"}  # type: ignore[union-attr]
        assert entry["reply"] == {"$ref": f"#/$defs/{spec.reply_model.__name__}"}  # type: ignore[union-attr]
    assert commands["payment.charge"]["failures"][:2] == ["insufficient_funds", "limit_exceeded"]
    assert all(e["failures"] == [] for e in commands.values() if e["compensates"])


def test_money_is_a_decimal_string_in_the_schema() -> None:
    amount = bundle(registry())["$defs"]["ChargePayment"]["properties"]["amount"]
    assert amount["type"] == "string"
    assert amount["pattern"] == r"^[0-9]{1,7}(\.[0-9]{1,2})?$"


@pytest.mark.parametrize("command_type", [c for c in COMMANDS if not COMMANDS[c].compensates])
def test_every_demo_action_is_keyed_by_order_ref_and_undone(command_type: str) -> None:
    spec = COMMANDS[command_type]
    field = spec.payload_model.model_fields["order_ref"]  # type: ignore[union-attr]
    assert field.annotation is UUID and field.is_required()
    [undo] = [c for c in COMMANDS.values() if c.compensates == command_type]
    assert undo.participant == spec.participant
    nothing = undo.reply_model.model_fields["nothing_to_undo"]  # type: ignore[union-attr]
    assert nothing.annotation is bool and nothing.is_required()


# -- any registry ------------------------------------------------------------------------------


class BookFlight(BaseModel):
    flight: str
    seats: int


class FlightBooked(BaseModel):
    booking: str


TRIP = SagaDefinition(
    "trip",
    1,
    [
        Step(
            "flight",
            participant="flights",
            action="flights.book",
            compensation="flights.cancel",
            payload_model=BookFlight,
            reply_model=FlightBooked,
        ),
        # no models at all: still exported, as free JSON objects
        Step("hotel", participant="hotels", action="hotels.book", compensation="hotels.cancel"),
    ],
)


def test_a_registry_of_ones_own_exports_with_and_without_models(tmp_path: Path) -> None:
    written = export(tmp_path / "out", Registry([TRIP]), Topology("acme"))
    names = {str(p.relative_to(tmp_path / "out")) for p in written}
    assert names == {
        "asyncapi.json",
        BUNDLE_FILENAME,
        "messages/CommandEnvelope.schema.json",
        "messages/ReplyEnvelope.schema.json",
        "messages/StartSaga.schema.json",
        "messages/BookFlight.schema.json",
        "messages/FlightBooked.schema.json",
    }
    commands = json.loads((tmp_path / "out" / BUNDLE_FILENAME).read_text())["x-commands"]
    assert commands["flights.book"]["payload"] == {"$ref": "#/$defs/BookFlight"}
    assert commands["hotels.book"]["payload"] == {"type": "object"}
    assert commands["hotels.cancel"]["compensates"] == "hotels.book"
    document = json.loads((tmp_path / "out" / "asyncapi.json").read_text())
    assert {c["address"] for c in document["channels"].values()} == {
        "acme.cmd.flights",
        "acme.cmd.hotels",
        "acme.replies",
        "acme.start",
    }
    for path in (tmp_path / "out" / "messages").iterdir():
        jsonschema.Draft202012Validator.check_schema(json.loads(path.read_text()))


def test_the_cli_exports_a_registry_from_the_current_directory(tmp_path: Path) -> None:
    """A project's own module, found without PYTHONPATH (as `python -m` would)."""
    (tmp_path / "tripsagas.py").write_text(
        "from saga import Registry, SagaDefinition, Step\n"
        "registry = Registry([SagaDefinition('trip', 1, [Step('flight', participant='flights',"
        " action='flights.book', compensation='flights.cancel')])])\n"
    )
    done = _export(tmp_path / "out", definitions="tripsagas:registry")
    assert done.returncode == 0, done.stderr
    assert "wrote 5 files" in done.stdout  # asyncapi, bundle, three envelopes
    document = json.loads((tmp_path / "out" / "asyncapi.json").read_text())
    assert [s["name"] for s in document["x-sagas"]] == ["trip"]


def test_a_failing_export_writes_nothing(tmp_path: Path) -> None:
    """Two different models of one name cannot both be published: the export stops before it
    writes a single file, and an earlier export stays as it was."""
    (tmp_path / "clash.py").write_text(
        "from pydantic import BaseModel, create_model\n"
        "from saga import Registry, SagaDefinition, Step\n"
        "A = create_model('Booking', a=(int, ...))\n"
        "B = create_model('Booking', b=(str, ...))\n"
        "registry = Registry([SagaDefinition('trip', 1, [\n"
        "    Step('flight', participant='flights', action='flights.book', compensatable=False,"
        " payload_model=A),\n"
        "    Step('hotel', participant='hotels', action='hotels.book', compensatable=False,"
        " payload_model=B)])])\n"
    )
    done = _export(tmp_path / "out", definitions="clash:registry")
    assert done.returncode == 2
    assert done.stderr.startswith("error: two models are named 'Booking'"), done.stderr
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert _export(tmp_path / "out", definitions="clash:registry").returncode == 2
    assert _tree(tmp_path / "out") == {"keep.txt": "mine"}


def test_message_schemas_without_a_registry_are_the_envelopes() -> None:
    assert set(message_schemas(None)) == {"CommandEnvelope", "ReplyEnvelope", "StartSaga"}


def test_the_reply_schema_refuses_what_the_orchestrator_refuses() -> None:
    """A failure without a reason, or a retryable success, fails the exported schema as it
    fails the orchestrator's parser."""
    schema = message_schemas(None)["ReplyEnvelope"]
    validator = jsonschema.Draft202012Validator(schema)
    base = {
        "schema_version": 1,
        "message_id": "4b1cfd7e-54e7-5ac2-9c33-7b9320c3a4df",
        "causation_id": "4b1cfd7e-54e7-5ac2-9c33-7b9320c3a4df",
        "saga_id": "00000000-0000-4000-8000-000000000001",
        "participant": "flights",
        "command_type": "flights.book",
    }
    good = [
        {**base, "outcome": "success", "data": {"seat": "1A"}},
        {**base, "outcome": "failure", "reason": "no_seats", "retryable": True},
    ]
    bad = [
        {**base, "outcome": "failure"},
        {**base, "outcome": "failure", "reason": None},
        {**base, "outcome": "success", "reason": "odd"},
        {**base, "outcome": "success", "retryable": True},
    ]
    for body in good:
        assert list(validator.iter_errors(body)) == [], body
        ReplyEnvelope.model_validate_json(json.dumps(body))
    for body in bad:
        assert list(validator.iter_errors(body)), body
        with pytest.raises(ValueError):
            ReplyEnvelope.model_validate_json(json.dumps(body))
