"""The checkout as the wide soak (a RabbitMQ cluster) runs it: steps that wait 10 s for a reply.

A cluster notices a partition between its nodes only when the Erlang net tick runs out (4 s in
the soak, 60 s by default); until then the processes on the cut-off node are stalled, not
disconnected, and nothing tells the orchestrator so. The demo's 3 s step timeout is shorter
than that stall, so with the checkouts whose first two attempts are planned to fail, a stall
on the third would time it out for good: correct (its outcome is unknown), but no longer the
test of losing and doubling nothing that the soak is. As docs/operations.md advises for a
cluster, the steps here wait longer than the cluster takes to notice a partition. Same name,
version, steps, parallel group, conditions and retry budgets otherwise, so the plan's
expectations are unchanged.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from saga import Registry
from saga_demo.checkout import CHECKOUT, PARTICIPANTS

__all__ = ["CLUSTER_CHECKOUT", "CLUSTER_STEP_TIMEOUT", "cluster_registry"]

CLUSTER_STEP_TIMEOUT = timedelta(seconds=10)

CLUSTER_CHECKOUT = replace(
    CHECKOUT, steps=tuple(replace(s, timeout=CLUSTER_STEP_TIMEOUT) for s in CHECKOUT.steps)
)


def cluster_registry() -> Registry:
    """``SAGA_DEFINITIONS=saga_tools.chaos.definitions:cluster_registry``."""
    return Registry([CLUSTER_CHECKOUT], participants=PARTICIPANTS)
