"""A scripted participant for the integration and crash tests.

Each saga's input carries ``script``: ``{"beta": ["retry", "ok"], "alpha~undo": ["fail"]}`` gives
the outcome of each attempt of a step's action (key = step) or compensation (key = step~undo).
Outcomes: ``ok``, ``fail`` (not retryable), ``retry`` (retryable failure), ``silent`` (no reply),
``late`` (reply after ``late_after`` seconds), ``dup`` (reply twice with the same message id and
once more with a fresh one). Attempts past the list answer ``ok``.

Every command received is appended to a JSON-lines log; an effect is applied at most once per
idempotency key (the participant's ledger), so duplicates are counted but never doubled.
Run alone: ``python -m tests.support.responder URL PREFIX LOGFILE``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from pathlib import Path
from typing import Any

from saga.protocol.envelope import CommandEnvelope, ReplyEnvelope
from saga.transport.broker import AmqpBroker, IncomingMessage
from saga.transport.topology import Topology
from tests.support.sagas import PARTICIPANTS


class Responder:
    def __init__(self, url: str, prefix: str, log: Path, *, late_after: float = 2.5):
        self.url = url
        self.topology = Topology(prefix=prefix)
        self.log = log
        self.late_after = late_after
        self.effects: set[str] = set()
        self.received: list[dict[str, Any]] = []
        self._broker: AmqpBroker | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._broker = await AmqpBroker.connect(self.url)
        await self._broker.declare(self.topology, PARTICIPANTS)
        for participant in PARTICIPANTS:
            queue = self.topology.command_queue(participant)
            await self._broker.consume(queue, self._on_command, prefetch=100)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._broker is not None:
            await self._broker.close()

    async def _on_command(self, message: IncomingMessage) -> None:
        command = CommandEnvelope.model_validate_json(message.body)
        key = command.step if command.direction == "action" else f"{command.step}~undo"
        script = command.payload.get("script") or {}
        assert isinstance(script, dict)
        outcomes = script.get(key) or []
        assert isinstance(outcomes, list)
        outcome = str(outcomes[command.attempt - 1]) if command.attempt <= len(outcomes) else "ok"
        record = {
            "message_id": str(command.message_id),
            "idempotency_key": str(command.idempotency_key),
            "saga_id": str(command.saga_id),
            "step": command.step,
            "direction": command.direction,
            "attempt": command.attempt,
            "outcome": outcome,
            "redelivered": bool(message.redelivered),
        }
        if outcome in ("ok", "late", "dup"):
            effect = str(command.idempotency_key)
            record["new_effect"] = effect not in self.effects
            self.effects.add(effect)
        self.received.append(record)
        with self.log.open("a") as f:
            f.write(json.dumps(record) + "\n")
        reply_id = uuid.uuid5(command.message_id, "reply")
        if outcome in ("ok", "dup"):
            await self._reply(command, ReplyEnvelope.success(command, {}, message_id=reply_id))
            if outcome == "dup":
                await self._reply(command, ReplyEnvelope.success(command, {}, message_id=reply_id))
                await self._reply(command, ReplyEnvelope.success(command, {}))
        elif outcome == "fail":
            await self._reply(
                command, ReplyEnvelope.failure(command, "refused", message_id=reply_id)
            )
        elif outcome == "retry":
            reply = ReplyEnvelope.failure(command, "busy", retryable=True, message_id=reply_id)
            await self._reply(command, reply)
        elif outcome == "late":
            task = asyncio.create_task(self._late(command, reply_id))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        await message.ack()

    async def _late(self, command: CommandEnvelope, reply_id: uuid.UUID) -> None:
        await asyncio.sleep(self.late_after)
        await self._reply(command, ReplyEnvelope.success(command, {}, message_id=reply_id))

    async def _reply(self, command: CommandEnvelope, reply: ReplyEnvelope) -> None:
        assert self._broker is not None
        await self._broker.publish_raw(
            exchange="",
            routing_key=command.reply_to,
            body=reply.model_dump_json().encode(),
            message_id=str(reply.message_id),
            correlation_id=str(command.saga_id),
            message_type=f"{command.command_type}.reply",
        )


async def _main(url: str, prefix: str, log: str) -> None:
    responder = Responder(url, prefix, Path(log))
    await responder.start()
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(_main(*sys.argv[1:4]))
