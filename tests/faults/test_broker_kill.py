"""The broker SIGKILLed mid-run and restarted: nothing lost, nothing applied twice.

The stack runs on a private RabbitMQ node (the shared one is never touched). Checkouts are
published and confirmed, the node is killed with SIGKILL while sagas are half-way, and booted
again on the same data directory a couple of seconds later. Durable queues and the persistent
messages the broker confirmed must come back; messages whose confirm was lost are re-sent by the
outboxes and deduplicated; deliveries that were never acked are redelivered and deduplicated.
The processes are not restarted: they must reconnect by themselves. Every saga must then end as
its input implies, every service's ledger must hold each command exactly once, and balances and
stock must have moved by the completed checkouts only.

The orchestrator runs the checkout with 3 min step timeouts (``patient_registry``): the node is
away for ~10 s, and with the demo's 3 s x 3 attempts the sagas waiting on a reply at the kill
would time out and compensate, which is correct but would hide what this test is about.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest

from saga_tools.chaos.node import RabbitNode
from tests.e2e.stack import Stack, submit
from tests.faults.conftest import (
    assert_outcomes,
    mixed_checkouts,
    prepare,
    start_stack,
    summary,
    unfinished,
)

pytestmark = pytest.mark.rabbitmq

BEFORE_KILL, AFTER_RESTART = 60, 20
DOWN_FOR = 2.0  # seconds between the kill and the restart


async def test_broker_killed_and_restarted_mid_run_loses_and_doubles_nothing(
    node: RabbitNode, node_stack: Stack
) -> None:
    stack = node_stack
    await prepare(stack)
    procs = await start_stack(
        stack, lambda _: node.url, definitions="tests.faults.conftest:patient_registry"
    )
    before = await stack.snapshot()
    mix = mixed_checkouts(BEFORE_KILL + AFTER_RESTART, seed=17)
    checkouts = await submit(stack, mix[:BEFORE_KILL])  # confirmed: the broker holds them
    ids = list(checkouts)

    # kill once the first sagas are done, so the kill finds some done, most half-way
    deadline = time.monotonic() + 30
    while (left := await unfinished(stack, ids)) == len(ids):
        if time.monotonic() > deadline:
            stack.fail("no saga finished within 30s of the start: the stack is not working")
        await asyncio.sleep(0.05)
    states = await stack.states(ids)
    progress = Counter(states[i].status.value if i in states else "NOT_STARTED" for i in ids)
    await asyncio.to_thread(node.kill)
    assert left > 0, "every saga finished before the kill: it was not mid-run"
    await asyncio.sleep(DOWN_FOR)
    assert all(p.alive() for p in procs.values()), (
        "a process died with the broker\n" + stack.processes.describe()
    )
    await asyncio.to_thread(node.start)

    # the stack takes new work after the restart, without being restarted itself
    checkouts |= await submit(stack, mix[BEFORE_KILL:], first=BEFORE_KILL)
    await stack.wait_terminal(list(checkouts), 120, watch=list(procs.values()))
    await stack.wait_quiet(within=30)
    run = await assert_outcomes(stack, checkouts, before, "after the broker was killed")
    assert all(p.alive() for p in procs.values()), stack.processes.describe()
    print(
        f"\nat the kill: {dict(sorted(progress.items()))} ({left} unfinished); "
        f"at the end: {summary(run)}"
    )
