"""The ids docs/protocol.md tells a participant in another language to derive are the ids the
orchestrator derives: the namespace, the names, and the worked example."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

from saga.core.ids import NAMESPACE
from saga.protocol import command_id, idempotency_key, reply_id, saga_id_for_key

DOC = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text(encoding="utf-8")


def test_the_namespace_is_the_documented_one() -> None:
    [documented] = re.findall(r"`NAMESPACE = ([0-9a-f-]{36})`", DOC)
    assert uuid.UUID(documented) == NAMESPACE


def test_the_documented_names_give_the_ids_the_orchestrator_sends() -> None:
    saga, step = uuid.uuid4(), "charge_payment"
    assert uuid.uuid5(NAMESPACE, f"cmd:{saga}:{step}:action:3") == command_id(
        saga, step, "action", 3
    )
    assert uuid.uuid5(NAMESPACE, f"idem:{saga}:{step}:compensation") == idempotency_key(
        saga, step, "compensation"
    )
    assert uuid.uuid5(NAMESPACE, "saga:checkout:order-17") == saga_id_for_key(
        "checkout", "order-17"
    )
    message = command_id(saga, step, "action", 1)
    assert uuid.uuid5(message, "reply") == reply_id(message)
    documented = (
        '"cmd:{saga_id}:{step}:{direction}:{attempt}"',
        '"idem:{saga_id}:{step}:{direction}"',
        '"saga:{saga_name}:{key}"',
        'uuid5(command_message_id, "reply")',
    )
    for name in documented:
        assert name in DOC, name


def test_the_worked_example_is_right() -> None:
    example = DOC.split("Example, saga `", 1)[1].split("Python:", 1)[0]
    saga = uuid.UUID(example.split("`", 1)[0])
    found = re.findall(r"`([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})`", example)
    action, key, undo_key, reply = (uuid.UUID(x) for x in found)
    assert action == command_id(saga, "charge_payment", "action", 1)
    assert key == idempotency_key(saga, "charge_payment", "action")
    assert undo_key == idempotency_key(saga, "charge_payment", "compensation")
    assert reply == reply_id(action)
