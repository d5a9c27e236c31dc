"""``saga bench --participants echo``: a participant that answers every command with success at
once, with no database, no ledger and no validation beyond reading the ids it must echo.

It is the ceiling's responder (:mod:`saga_tools.bench.ceiling`) speaking the saga protocol: the
reply is published persistent with a confirm, then the command is acked. With these in place
of the demo services, what remains of a saga's cost is the orchestrator's own, to compare with
the ceiling's bare requester in the same run.

Runs as ``python -m saga_tools.bench.echo PARTICIPANT`` with the stack's ``SAGA_*`` variables;
prints ``participant_started`` once it consumes.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from saga.core.ids import reply_id
from saga.loop import run as run_loop
from saga.transport.topology import Topology

__all__ = ["respond"]


def reply_to(body: bytes) -> tuple[str, str, bytes]:
    """(routing key, reply message id, reply body) of the success reply to a command."""
    command = json.loads(body)
    message_id = str(reply_id(uuid.UUID(command["message_id"])))
    reply = {
        "schema_version": 1,
        "message_id": message_id,
        "causation_id": command["message_id"],
        "saga_id": command["saga_id"],
        "participant": command["participant"],
        "command_type": command["command_type"],
        "outcome": "success",
        "data": {},
    }
    return command["reply_to"], message_id, json.dumps(reply).encode()


async def respond(url: str, prefix: str, participant: str, prefetch: int) -> None:
    """Answer the commands of ``participant`` until the process is stopped."""
    connection = await aio_pika.connect(url)
    consume = await connection.channel()
    await consume.set_qos(prefetch_count=prefetch)
    publish = await connection.channel(publisher_confirms=True, on_return_raises=True)
    queue = await consume.get_queue(Topology(prefix=prefix).command_queue(participant))

    async def on_command(message: AbstractIncomingMessage) -> None:
        routing_key, message_id, body = reply_to(message.body)
        await publish.default_exchange.publish(
            aio_pika.Message(
                body,
                message_id=message_id,
                correlation_id=message.correlation_id,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=routing_key,
            mandatory=True,
        )
        await message.ack()

    await queue.consume(on_command)
    print("participant_started", participant, flush=True)
    try:
        await asyncio.Future()
    finally:
        await connection.close()


if __name__ == "__main__":
    run_loop(
        respond(
            os.environ["SAGA_RABBITMQ_URL"],
            os.environ.get("SAGA_PREFIX", "saga"),
            sys.argv[1],
            int(os.environ.get("SAGA_PREFETCH", "64")),
        )
    )
