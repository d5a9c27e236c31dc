"""The deterministic ids are uuid5 values in one fixed namespace, byte for byte: sagas stored
before, and participants in other languages, derive the same ids."""

from __future__ import annotations

import pickle
import uuid

from hypothesis import given
from hypothesis import strategies as st

from saga.core.ids import NAMESPACE, command_id, idempotency_key, reply_id, saga_id_for_key


@given(st.uuids(), st.text(), st.sampled_from(["action", "compensation"]), st.integers(1, 10**6))
def test_every_id_is_uuid5_in_the_namespace(
    saga_id: uuid.UUID, name: str, direction: str, attempt: int
) -> None:
    made = command_id(saga_id, name, direction, attempt)
    expected = uuid.uuid5(NAMESPACE, f"cmd:{saga_id}:{name}:{direction}:{attempt}")
    assert made == expected
    assert (made.bytes, str(made), hash(made)) == (expected.bytes, str(expected), hash(expected))
    assert (made.version, made.variant, made.is_safe) == (5, uuid.RFC_4122, expected.is_safe)
    assert idempotency_key(saga_id, name, direction) == uuid.uuid5(
        NAMESPACE, f"idem:{saga_id}:{name}:{direction}"
    )
    assert saga_id_for_key(name, str(attempt)) == uuid.uuid5(NAMESPACE, f"saga:{name}:{attempt}")
    assert reply_id(made) == uuid.uuid5(made, "reply")


def test_known_ids_never_change() -> None:
    saga = uuid.UUID("11111111-2222-3333-4444-555555555555")
    assert str(saga_id_for_key("checkout", "order-1")) == "9006064a-f679-5228-bf84-4d1eb199d195"
    assert str(command_id(saga, "charge", "action", 2)) == "a9e8eab2-65d3-54e6-b2b3-7179669b3a53"
    made = idempotency_key(saga, "charge", "compensation")
    assert pickle.loads(pickle.dumps(made)) == made
