"""``saga bench --participants library``: the participant library itself, with handlers that do
no work of their own.

Each process is a :class:`saga.participant.Participant` with its durable ledger (the same
database settings as the demo services), its consume pipeline, group commit, reply outbox and
relay, and one handler per command type of the checkout that answers success with no data and
touches no table. What it costs per command is what the library costs a service, apart from
the service's own business statements; the demo services add theirs on top.

Runs as ``python -m saga_tools.bench.library PARTICIPANT`` with the stack's ``SAGA_*`` variables.
"""

from __future__ import annotations

import sys

from pydantic import JsonValue
from sqlalchemy.ext.asyncio import AsyncConnection

from saga.participant import Participant
from saga.protocol import CommandEnvelope
from saga_demo.checkout import CHECKOUT

__all__ = ["build", "command_types"]


def command_types(participant: str) -> list[str]:
    """The checkout's action and compensation command types sent to ``participant``."""
    found: list[str] = []
    for step in CHECKOUT.steps:
        if step.participant == participant:
            found += [step.action] + ([step.compensation] if step.compensation else [])
    return found


async def _answer(
    _conn: AsyncConnection, _payload: dict[str, JsonValue], _command: CommandEnvelope
) -> None:
    """Success, with no data and no statement of its own."""


def build(name: str) -> Participant:
    participant = Participant(name)
    for command_type in command_types(name):
        participant.handler(command_type)(_answer)
    return participant


if __name__ == "__main__":
    build(sys.argv[1]).run()
