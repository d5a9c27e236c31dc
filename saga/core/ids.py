"""Deterministic ids: the same saga, step, direction and attempt always give the same id.

A re-sent command is therefore recognisably the same message, and nothing in the engine needs a
random number generator (which would make decisions unrepeatable).
"""

from __future__ import annotations

import hashlib
import uuid

__all__ = [
    "NAMESPACE",
    "command_id",
    "idempotency_key",
    "reply_id",
    "saga_id_for_key",
    "unit_interval",
]

#: Namespace of every uuid5 this package derives. Never change it: ids would stop matching.
NAMESPACE = uuid.UUID("6f1c6f0e-5a3b-4d8e-9c39-2f1f0b3a7d42")
_NAMESPACE_BYTES = NAMESPACE.bytes

#: the bits uuid5 sets: version 5 and the RFC 4122 variant
_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))
_SET = (5 << 76) | (0x8000 << 48)
_new_uuid = object.__new__
_set = object.__setattr__


def _uuid5(name: str) -> uuid.UUID:
    """``uuid.uuid5(NAMESPACE, name)``, the same value, built without ``UUID.__init__`` and
    its checks and without converting the namespace to bytes on every call: two ids per
    command made this a twentieth of the orchestrator's CPU per event."""
    digest = hashlib.sha1(_NAMESPACE_BYTES + name.encode(), usedforsecurity=False).digest()
    value = _new_uuid(uuid.UUID)
    _set(value, "int", (int.from_bytes(digest[:16], "big") & _CLEAR) | _SET)
    _set(value, "is_safe", uuid.SafeUUID.unknown)
    return value


def command_id(saga_id: uuid.UUID, step: str, direction: str, attempt: int) -> uuid.UUID:
    """Message id of one attempt of one command: differs per attempt, so replies match exactly."""
    return _uuid5(f"cmd:{saga_id}:{step}:{direction}:{attempt}")


def idempotency_key(saga_id: uuid.UUID, step: str, direction: str) -> uuid.UUID:
    """Key shared by every attempt of one command, so a participant applies its effect once."""
    return _uuid5(f"idem:{saga_id}:{step}:{direction}")


def reply_id(command_message_id: uuid.UUID) -> uuid.UUID:
    """Message id of the reply to one command (one delivery of one attempt): a participant that
    replies again, after a crash or to a redelivery, sends the same message, which the
    orchestrator's inbox then recognises. Namespace: the command's message id; name: ``reply``."""
    return uuid.uuid5(command_message_id, "reply")


def saga_id_for_key(saga_name: str, key: str) -> uuid.UUID:
    """Saga id derived from a client's idempotency key: starting twice finds the same saga."""
    return _uuid5(f"saga:{saga_name}:{key}")


def unit_interval(*parts: object) -> float:
    """A number in [0, 1) that is a pure function of ``parts``: seeded jitter without randomness."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64
