"""saga.core.jsontext writes the text json.dumps writes, and refuses what it refuses."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from saga.core.jsontext import dumps, dumps_finite

values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(values)
def test_the_text_is_json_dumps_text(value: Any) -> None:
    assert dumps(value) == json.dumps(value)
    try:
        expected = json.dumps(value, allow_nan=False)
    except ValueError:
        with pytest.raises(ValueError):
            dumps_finite(value)
    else:
        assert dumps_finite(value) == expected


@pytest.mark.parametrize(
    "value",
    [{"a": (1, 2)}, {1: "int key", None: 2, False: 3, 1.5: 4}, "ü€𝄞", -0.0, 10**30, []],
)
def test_tuples_keys_and_bare_values_as_json_dumps(value: Any) -> None:
    assert dumps(value) == json.dumps(value)


def test_what_json_cannot_hold_is_refused_as_json_dumps_refuses_it() -> None:
    with pytest.raises(TypeError):
        dumps({"a": object()})
    with pytest.raises(ValueError):
        dumps_finite({"a": [math.nan]})
    with pytest.raises(ValueError):
        dumps_finite(math.inf)
