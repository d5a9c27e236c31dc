"""JSON text exactly as ``json.dumps`` writes it with its defaults, made faster.

``json.dumps`` builds a new C encoder for every call; for the small objects a saga stores and
checks (a context, a step list, a payload) that set-up cost as much as the encoding. The store
writes several JSON columns per event and the engine checks every payload, so the encoders here
are built once. The text is the same, character for character (``tests/unit/test_jsontext.py``):
rows written before and after read the same, and SQLAlchemy's own writes agree with the
direct ones.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from json import encoder as _json_encoder
from typing import Any

__all__ = ["dumps", "dumps_finite"]


def _encoder(*, allow_nan: bool) -> Callable[[Any], str]:
    make = getattr(_json_encoder, "c_make_encoder", None)
    if make is None:  # no C accelerator (another interpreter): json.dumps itself
        return lambda value: json.dumps(value, allow_nan=allow_nan)
    default = json.JSONEncoder().default  # raises TypeError for what JSON cannot hold
    # markers=None: no check for circular references, which values decoded from JSON and
    # built by the engine cannot have (a cycle would raise RecursionError, not ValueError)
    encode = make(
        None, default, _json_encoder.encode_basestring_ascii, None, ": ", ", ", False, False,
        allow_nan,
    )  # fmt: skip

    def dumps(value: Any) -> str:
        if isinstance(value, str):  # json.dumps encodes a bare string without the encoder
            return _json_encoder.encode_basestring_ascii(value)
        return "".join(encode(value, 0))

    return dumps


#: ``json.dumps(value)``
dumps = _encoder(allow_nan=True)
#: ``json.dumps(value, allow_nan=False)``: ValueError for NaN and infinities
dumps_finite = _encoder(allow_nan=False)
