"""Crash points for fault-injection tests: the process kills itself where it is told to.

``SAGA_FAULT_POINT=<name>`` (and optionally ``SAGA_FAULT_AFTER=<n>``, default 1) makes the n-th
pass through that point SIGKILL the process: no cleanup, no flush, exactly like a power cut of the
process. Unset, a crash point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

__all__ = ["ORCHESTRATOR_POINTS", "PARTICIPANT_POINTS", "POINTS", "armed", "crash_point"]

ORCHESTRATOR_POINTS = (
    "after_commit_before_publish",
    "after_publish_before_confirm",
    "after_confirm_before_mark",
    "after_reply_commit_before_ack",
)
PARTICIPANT_POINTS = ("participant_after_commit_before_reply",)  # effect applied, no reply yet
POINTS = ORCHESTRATOR_POINTS + PARTICIPANT_POINTS

_target = os.environ.get("SAGA_FAULT_POINT")
_passes = {"left": int(os.environ.get("SAGA_FAULT_AFTER", "1"))}
if _target is not None and _target not in POINTS:
    raise SystemExit(f"SAGA_FAULT_POINT={_target!r} is not one of {', '.join(POINTS)}")


def armed(name: str) -> bool:
    """True when the process is set to crash at ``name``."""
    return name == _target


def crash_point(name: str) -> None:
    if name != _target:
        return
    _passes["left"] -= 1
    if _passes["left"] <= 0:
        os.kill(os.getpid(), signal.SIGKILL)
