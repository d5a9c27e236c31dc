"""Injected failures for chaos soaks: a participant told to fail some commands on purpose.

``SAGA_FAULT_PLAN`` names a JSON file ``{"faults": [{"saga_id", "command_type", "mode",
"times"}]}``. ``mode: "transient"`` answers a retryable failure to attempts ``1..times`` of that
command (so ``times`` at or above the step's retry budget exhausts it); ``mode: "refuse"``
answers a final business refusal. The answer goes through the ledger like any other, so an
injected failure is recorded, replayed to redeliveries and counted by the checker exactly like a
real one. Unset, the plan is empty and costs one dictionary lookup per command.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from uuid import UUID

from saga.core.errors import ConfigError

__all__ = ["FaultPlan", "InjectedFault", "load_fault_plan"]

#: the reasons injected failures carry, so a checker can tell them from the services' own
INJECTED_REFUSAL = "injected_refusal"
INJECTED_TRANSIENT = "injected_transient"


@dataclass(frozen=True, slots=True)
class InjectedFault:
    mode: Literal["transient", "refuse"]
    times: int = 1


FaultPlan = dict[tuple[UUID, str], InjectedFault]


def load_fault_plan(path: Path | None) -> FaultPlan:
    """The plan in ``path``, or an empty one; a malformed file stops the service at start."""
    if path is None:
        return {}
    try:
        entries = json.loads(path.read_text())["faults"]
        plan: FaultPlan = {}
        for e in entries:
            mode = e["mode"]
            if mode not in ("transient", "refuse"):
                raise ValueError(f"mode {mode!r} is not transient or refuse")
            times = int(e.get("times", 1))
            if times < 1:
                raise ValueError(f"times {times} is below 1")
            plan[(UUID(e["saga_id"]), str(e["command_type"]))] = InjectedFault(mode, times)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"SAGA_FAULT_PLAN: cannot read {path}: {exc}") from None
    return plan
