"""Quorum queues: what is declared, and the orchestrator and the participants agreeing on it.

Both sides declare the shared queues (replies, starts, their dead-letter queues), so they must
declare them with the same arguments; a participant whose ``SAGA_QUORUM_QUEUES`` differs from
the orchestrator's is refused with a message saying so, not a channel error.

No ``x-quorum-initial-group-size`` is declared: RabbitMQ then puts a replica on every node of
the cluster (3 of 3 here, checked on the private cluster by ``test_stack.py``), and adding the
argument now would make every quorum queue declared before it inequivalent (PRECONDITION_FAILED
on the next start).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from saga.core.errors import ConfigError
from saga.transport.broker import AmqpBroker
from saga.transport.topology import Topology
from saga_demo.checkout import PARTICIPANTS
from tests.conftest import require_rabbitmq
from tests.e2e.stack import delete_topology


@pytest.mark.parametrize("quorum", [True, False])
def test_orchestrator_and_participants_declare_shared_queues_alike(quorum: bool) -> None:
    topology = Topology(prefix="p", quorum=quorum)
    orchestrator = {q.name: q.arguments for q in topology.queues(PARTICIPANTS)}
    for participant in PARTICIPANTS:
        for q in topology.queues([participant]):
            assert orchestrator[q.name] == q.arguments, (participant, q.name)


def test_quorum_queue_arguments() -> None:
    topology = Topology(prefix="p", quorum=True)
    assert topology.queue_arguments("p.cmd.order") == {
        "x-queue-type": "quorum",
        "x-delivery-limit": 20,
        "x-dead-letter-exchange": "p.dlx",
        "x-dead-letter-routing-key": "p.cmd.order.dlq",
    }
    assert topology.dead_letter_arguments() == {"x-queue-type": "quorum"}
    for spec in topology.queues(PARTICIPANTS):
        assert spec.arguments["x-queue-type"] == "quorum"
        assert "x-quorum-initial-group-size" not in spec.arguments


@pytest.fixture
async def prefix(unique: str) -> AsyncIterator[str]:
    url = require_rabbitmq()
    name = f"quorum-{unique}"
    try:
        yield name
    finally:
        await delete_topology(url, name)


@pytest.mark.rabbitmq
async def test_a_participant_on_other_queue_types_is_refused_with_the_setting_named(
    prefix: str,
) -> None:
    url = require_rabbitmq()
    orchestrator = await AmqpBroker.connect(url)
    participant = await AmqpBroker.connect(url)
    try:
        await orchestrator.declare(Topology(prefix=prefix, quorum=True), PARTICIPANTS)
        with pytest.raises(ConfigError) as caught:
            await participant.declare(Topology(prefix=prefix, quorum=False), ["order"])
        message = str(caught.value)
        assert "same SAGA_QUORUM_QUEUES" in message, message
        assert "x-queue-type" in message, message
    finally:
        await participant.close()
        await orchestrator.close()
