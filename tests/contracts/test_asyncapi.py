"""The AsyncAPI 3.0 document: valid against the official schema, and complete, i.e. every
message type that goes on the wire in a demo run is described in it.

``vendor/asyncapi-3.0.0.schema.json.gz`` is ``schemas/3.0.0-without-$id.json`` of the npm
package ``@asyncapi/specs`` 6.11.1 (Apache-2.0), kept here so the test needs no network.
"""

from __future__ import annotations

import copy
import gzip
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from saga.protocol import export as asyncapi
from saga.transport.memory import MemoryBroker
from saga.transport.topology import Topology
from saga_demo.checkout import registry
from saga_demo.demo import run_demo
from tests.support import language

SCHEMA = json.loads(
    gzip.decompress(
        (Path(__file__).parent / "vendor" / "asyncapi-3.0.0.schema.json.gz").read_bytes()
    )
)
VALIDATOR = jsonschema.Draft7Validator(SCHEMA)


def problems(document: dict[str, Any]) -> list[str]:
    return [f"{list(e.path)}: {e.message[:200]}" for e in VALIDATOR.iter_errors(document)]


def message_names(document: dict[str, Any]) -> set[str]:
    return {m["name"] for m in document["components"]["messages"].values()}


@pytest.mark.parametrize("with_registry", [True, False], ids=["checkout", "protocol"])
def test_the_document_is_valid_asyncapi_3(with_registry: bool) -> None:
    document = asyncapi.document(registry() if with_registry else None, Topology("saga"))
    assert document["asyncapi"] == "3.0.0"
    assert problems(document) == []


def test_the_validation_catches_a_broken_document() -> None:
    document = asyncapi.document(registry(), Topology("saga"))
    broken = copy.deepcopy(document)
    broken["operations"]["receiveReplies"]["action"] = "consume"
    assert problems(broken), "the schema check must be able to fail"


def test_every_command_and_reply_of_the_registry_is_described() -> None:
    document = asyncapi.document(registry(), Topology("saga"))
    expected = {c.command_type for c in registry().commands()}
    expected |= {f"{c}.reply" for c in expected} | {"saga.start"}
    assert message_names(document) == expected
    channels = {c["address"] for c in document["channels"].values()}
    assert {"saga.replies", "saga.start", "saga.cmd.order", "saga.cmd.payment"} <= channels


async def test_every_message_type_on_the_wire_in_a_demo_run_is_in_the_document(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: set[str] = set()
    publish_raw = MemoryBroker.publish_raw

    async def record(self: MemoryBroker, **kwargs: Any) -> None:
        if kwargs.get("message_type"):
            seen.add(kwargs["message_type"])
        await publish_raw(self, **kwargs)

    monkeypatch.setattr(MemoryBroker, "publish_raw", record)
    outcomes, *_ = await run_demo(data_dir=tmp_path, database_url=None, broker="memory", quiet=True)
    assert all(o.ok for o in outcomes)
    assert {"order.create", "order.create.reply", "order.cancel"} <= seen, seen
    document = asyncapi.document(registry(), Topology("saga"))
    assert seen <= message_names(document), seen - message_names(document)


def test_saga_schema_export_writes_the_documents(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "saga", "schema", "export", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env={"SAGA_DEFINITIONS": "saga_demo.checkout:registry", "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    document = json.loads((out / "asyncapi.json").read_text())
    assert problems(document) == []
    assert [(s["name"], s["version"]) for s in document["x-sagas"]] == [
        ("checkout", 1),
        ("checkout", 2),
    ]
    # version 2: the charge and the reservation in one parallel group, both conditional on
    # physical goods with the shipping; version 1 ran them one after another
    shape = {
        s["version"]: [(step["name"], step["group"], step["conditional"]) for step in s["steps"]]
        for s in document["x-sagas"]
    }
    assert shape[2] == [
        ("create_order", None, False),
        ("charge_payment", 0, False),
        ("reserve_inventory", 0, True),
        ("schedule_shipping", None, True),
    ]
    assert {(group, conditional) for _, group, conditional in shape[1]} == {(None, False)}
    assert (
        "in parallel (charge_payment: payment.charge to payment, undone by payment.refund, "
        "reserve_inventory: inventory.reserve to inventory if its condition holds, undone by "
        "inventory.release)" in document["info"]["description"]
    )
    schemas = {p.name for p in (out / "messages").iterdir()}
    assert {"CommandEnvelope.schema.json", "ReplyEnvelope.schema.json"} <= schemas
    assert (out / "saga-contracts.schema.json").is_file()
    assert "CheckoutInput.schema.json" in schemas
    for path in (out / "messages").iterdir():
        jsonschema.Draft202012Validator.check_schema(json.loads(path.read_text()))


def test_a_saga_with_a_group_a_condition_and_a_deadline_is_described_as_it_runs() -> None:
    document = asyncapi.document(language.registry(), Topology("saga"))
    assert problems(document) == []
    sagas = {s["name"]: s for s in document["x-sagas"]}
    tour = sagas["tour"]
    assert [(s["name"], s["group"], s["conditional"]) for s in tour["steps"]] == [
        ("reserve", None, False),
        ("flight", 0, False),
        ("hotel", 0, False),
        ("insure", None, True),
        ("confirm", None, False),
    ]
    assert tour["deadline_s"] is None and tour["on_compensation_failure"] == "halt"
    assert sagas["tour-deadline"]["deadline_s"] == 2.0
    assert sagas["tour-continue"]["on_compensation_failure"] == "continue"
    told = document["info"]["description"]
    assert (
        "Saga tour v1: reserve: alpha.reserve to alpha, undone by alpha.release; in parallel "
        "(flight: beta.book to beta, undone by beta.cancel, hotel: gamma.book to gamma, undone "
        "by gamma.cancel); insure: alpha.insure to alpha if its condition holds, undone by "
        "alpha.uninsure; confirm: alpha.confirm to alpha." in told
    )
