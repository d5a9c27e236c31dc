"""The committed JSON Schema bundle and the catalog it is built from."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from contracts import CATALOG, PARTICIPANTS, ContractError, command_types, compensation_for, lookup
from contracts.envelope import CommandEnvelope, ReplyEnvelope, StartSaga
from contracts.schema import (
    BUNDLE_FILENAME,
    SCHEMAS_DIR,
    bundle_models,
    export_bundle,
    main,
    render_bundle,
    write_bundle,
)

SNAPSHOT = SCHEMAS_DIR / BUNDLE_FILENAME
REFRESH = "run python -m contracts.schema to refresh"


def _resolve(bundle: dict[str, Any], ref: str) -> dict[str, Any]:
    prefix = "#/$defs/"
    assert ref.startswith(prefix), ref
    schema: dict[str, Any] = bundle["$defs"][ref.removeprefix(prefix)]
    return schema


def test_export_equals_committed_snapshot() -> None:
    assert SNAPSHOT.is_file(), f"{SNAPSHOT.name} is missing; {REFRESH}"
    committed = SNAPSHOT.read_text(encoding="utf-8")
    assert json.loads(committed) == export_bundle(), f"schema bundle drifted; {REFRESH}"
    assert committed == render_bundle(), f"schema bundle text drifted; {REFRESH}"


def test_bundle_is_deterministic_with_sorted_keys_and_trailing_newline() -> None:
    text = render_bundle()
    assert text == render_bundle()
    assert text.endswith("}\n") and not text.endswith("\n\n")
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    assert list(export_bundle()) == sorted(export_bundle())


def test_bundle_header() -> None:
    bundle = export_bundle()
    assert bundle["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert bundle["$id"]
    assert bundle["x-schema-version"] == 1
    assert bundle["x-max-message-bytes"] == 256 * 1024


def test_every_catalog_model_and_envelope_has_a_definition() -> None:
    defs = export_bundle()["$defs"]
    expected = {CommandEnvelope, ReplyEnvelope, StartSaga}
    for contract in CATALOG.values():
        expected |= {contract.payload, contract.reply}
    assert expected <= set(bundle_models())
    for model in expected:
        assert model.__name__ in defs, f"{model.__name__} missing from the bundle; {REFRESH}"
        assert defs[model.__name__]["additionalProperties"] is False


def test_x_commands_mirror_the_catalog() -> None:
    bundle = export_bundle()
    commands = bundle["x-commands"]
    assert set(commands) == set(CATALOG)
    for command_type, entry in commands.items():
        contract = CATALOG[command_type]
        assert entry["participant"] == contract.participant
        assert entry["compensates"] == contract.compensates
        assert entry["failures"] == list(contract.failures)
        payload = _resolve(bundle, entry["payload"]["$ref"])
        reply = _resolve(bundle, entry["reply"]["$ref"])
        assert payload["title"] == contract.payload.__name__
        assert reply["title"] == contract.reply.__name__


def test_money_is_a_decimal_string_in_the_schema() -> None:
    amount = export_bundle()["$defs"]["ChargePayment"]["properties"]["amount"]
    assert amount["type"] == "string"
    assert amount["pattern"] == r"^[0-9]{1,7}(\.[0-9]{1,2})?$"


def test_write_bundle_writes_the_snapshot_text(tmp_path: Path) -> None:
    path = write_bundle(tmp_path / "out")
    assert path == tmp_path / "out" / BUNDLE_FILENAME
    assert path.read_text(encoding="utf-8") == render_bundle()


def test_cli_writes_and_checks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--check", str(tmp_path)]) == 1  # nothing written yet
    assert main([str(tmp_path)]) == 0
    assert (tmp_path / BUNDLE_FILENAME).read_text(encoding="utf-8") == render_bundle()
    assert main(["--check", str(tmp_path)]) == 0
    (tmp_path / BUNDLE_FILENAME).write_text("{}\n", encoding="utf-8")
    assert main(["--check", str(tmp_path)]) == 1
    assert REFRESH in capsys.readouterr().out


# -- catalog ---------------------------------------------------------------------------------


def test_participants() -> None:
    assert PARTICIPANTS == ("order", "payment", "inventory", "shipping")
    assert {c.participant for c in CATALOG.values()} == set(PARTICIPANTS)


@pytest.mark.parametrize(
    ("participant", "expected"),
    [
        ("order", ("order.create", "order.cancel")),
        ("payment", ("payment.charge", "payment.refund")),
        ("inventory", ("inventory.reserve", "inventory.release")),
        ("shipping", ("shipping.schedule", "shipping.cancel")),
    ],
)
def test_command_types(participant: str, expected: tuple[str, ...]) -> None:
    assert command_types(participant) == expected


@pytest.mark.parametrize(
    ("action", "compensation", "failures"),
    [
        ("order.create", "order.cancel", ("invalid_order", "order_cancelled")),
        (
            "payment.charge",
            "payment.refund",
            (
                "insufficient_funds",
                "limit_exceeded",
                "unknown_customer",
                "currency_mismatch",
                "payment_cancelled",
                "gateway_timeout",
            ),
        ),
        (
            "inventory.reserve",
            "inventory.release",
            ("out_of_stock", "unknown_sku", "reservation_cancelled"),
        ),
        (
            "shipping.schedule",
            "shipping.cancel",
            ("undeliverable_address", "shipment_cancelled", "carrier_unreachable"),
        ),
    ],
)
def test_every_action_has_a_compensation(
    action: str, compensation: str, failures: tuple[str, ...]
) -> None:
    undo = compensation_for(action)
    assert undo is not None and undo.command_type == compensation
    assert undo.compensates == action and undo.is_compensation
    assert lookup(action).compensates is None and not lookup(action).is_compensation
    assert compensation_for(compensation) is None
    assert lookup(action).failures == failures
    assert undo.failures == ()  # compensations must not fail for business reasons


@pytest.mark.parametrize("contract", list(CATALOG.values()), ids=list(CATALOG))
def test_every_payload_is_keyed_by_order_ref(contract: Any) -> None:
    field = contract.payload.model_fields["order_ref"]
    assert field.annotation is UUID and field.is_required()


@pytest.mark.parametrize(
    "contract",
    [c for c in CATALOG.values() if c.is_compensation],
    ids=[t for t, c in CATALOG.items() if c.is_compensation],
)
def test_compensation_replies_can_say_nothing_to_undo(contract: Any) -> None:
    field = contract.reply.model_fields["nothing_to_undo"]
    assert field.annotation is bool and field.is_required()


@pytest.mark.parametrize("command_type", ["payment.steal", "", "PAYMENT.CHARGE", "x" * 10_000])
def test_unknown_command_type(command_type: str) -> None:
    with pytest.raises(ContractError) as info:
        lookup(command_type)
    assert info.value.reason == "unknown_command"
    assert len(info.value.detail) < 120
    with pytest.raises(ContractError, match="unknown_command"):
        compensation_for(command_type)


def test_unknown_participant() -> None:
    with pytest.raises(ContractError) as info:
        command_types("billing")
    assert info.value.reason == "unknown_participant"


def test_catalog_is_read_only() -> None:
    with pytest.raises(TypeError):
        CATALOG["payment.charge"] = CATALOG["payment.refund"]  # type: ignore[index]


def test_contracts_import_neither_saga_nor_services() -> None:
    code = (
        "import sys, contracts, contracts.schema; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('saga', 'services')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
