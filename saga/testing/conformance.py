"""The conformance kit: drive any running participant, in any language, through the protocol's
hard cases, and say which it gets right (``saga conformance --participant NAME``).

It talks to RabbitMQ as a plain AMQP client, exactly as docs/protocol.md describes the wire:
it publishes commands to the commands exchange with the participant's name as routing key, reads
the replies from the deployment's reply queue and the dead letters from the participant's
dead-letter queue. Nothing of the participant's code or database is read, so a participant
written in Go or Node is checked the same way as one written with :mod:`saga.participant`.

The cases (each on a saga id of its own, so they cannot disturb each other):

* ``reply``: a command is answered once, with a reply that names it (causation id, saga id,
  participant, command type) and carries the documented AMQP properties;
* ``redelivery``: the same message again gets the same answer (and should get the same reply id);
* ``retry``: a new attempt (new message id, same idempotency key) gets the same final answer;
* ``compensation``: the compensation of an answered action succeeds;
* ``nothing_to_undo``: a compensation whose action never arrived succeeds;
* ``late_action``: that action, arriving after its compensation, is refused (not retryable);
* ``charset``: ``content_type: application/json; charset=utf-8`` is accepted;
* ``malformed``, ``oversize``, ``unknown_command``, ``foreign_reply_to``: dead-lettered to
  ``<queue>.dlq`` (with ``x-saga-dead-letter-reason``), never answered.

Payload templates may use ``"$saga_id"`` (the case's saga id) and ``"$uuid"`` (a fresh id per
case) as whole string values, so effects keyed by a business reference stay apart per case.
No orchestrator may consume the reply queue while the kit runs: it would take the replies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
)

from saga.core.errors import ConfigError
from saga.core.ids import command_id, idempotency_key
from saga.protocol.envelope import CommandEnvelope, ReplyEnvelope
from saga.transport.topology import DEAD_LETTER_REASON, Topology

__all__ = ["CASES", "Case", "Check", "Target", "render", "run_conformance"]

Verdict = Literal["PASS", "FAIL", "WARN"]

CASES = (
    "reply",
    "redelivery",
    "retry",
    "compensation",
    "nothing_to_undo",
    "late_action",
    "charset",
    "malformed",
    "oversize",
    "unknown_command",
    "foreign_reply_to",
)
_OVERSIZE = 1024 * 1024  # above any sane SAGA_MAX_MESSAGE_BYTES


@dataclass(frozen=True)
class Target:
    """The participant under test and a command it serves, with its compensation."""

    participant: str
    action: str
    payload: Mapping[str, Any]
    compensation: str
    compensation_payload: Mapping[str, Any] = field(default_factory=dict)
    prefix: str = "saga"


@dataclass(frozen=True)
class Check:
    case: str
    expectation: str
    verdict: Verdict
    detail: str = ""


@dataclass
class Case:
    """One saga's worth of commands; placeholders resolved once per case."""

    target: Target
    topology: Topology
    saga_id: uuid.UUID = field(default_factory=uuid.uuid4)
    fresh: uuid.UUID = field(default_factory=uuid.uuid4)
    step: str = "conformance"

    def command(
        self,
        direction: Literal["action", "compensation"] = "action",
        attempt: int = 1,
        **changes: Any,
    ) -> CommandEnvelope:
        target = self.target
        action = direction == "action"
        envelope = CommandEnvelope(
            schema_version=1,
            message_id=command_id(self.saga_id, self.step, direction, attempt),
            idempotency_key=idempotency_key(self.saga_id, self.step, direction),
            saga_id=self.saga_id,
            saga_name="conformance",
            step=self.step,
            direction=direction,
            attempt=attempt,
            participant=target.participant,
            command_type=target.action if action else target.compensation,
            reply_to=self.topology.reply_queue,
            deadline=datetime.now(UTC) + timedelta(seconds=30),
            payload=self._fill(target.payload if action else target.compensation_payload),
        )
        return envelope.model_copy(update=changes) if changes else envelope

    def _fill(self, value: Any) -> Any:
        if value == "$saga_id":
            return str(self.saga_id)
        if value == "$uuid":
            return str(self.fresh)
        if isinstance(value, Mapping):
            return {k: self._fill(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._fill(v) for v in value]
        return value


class _Wire:
    """The kit's AMQP side: publish commands, collect replies and dead letters by id."""

    def __init__(
        self,
        connection: AbstractConnection,
        channel: AbstractChannel,
        topology: Topology,
        participant: str,
    ):
        self.connection = connection
        self.channel = channel
        self.topology = topology
        self.participant = participant
        self.queue = topology.command_queue(participant)
        self.replies: list[AbstractIncomingMessage] = []
        self.dead: list[AbstractIncomingMessage] = []
        self._arrived = asyncio.Event()

    async def start(self) -> None:
        dlq = self.topology.dead_letter_queue(self.queue)
        for name in (self.queue, self.topology.reply_queue, dlq):
            try:
                probe = await self.connection.channel()  # a failed passive declare closes it
                queue = await probe.declare_queue(name, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                raise ConfigError(
                    f"queue {name!r} does not exist: is the participant running with this "
                    f"prefix ({self.topology.prefix!r})? It declares its queues at start"
                ) from None
            if name == self.topology.reply_queue and queue.declaration_result.consumer_count:
                raise ConfigError(
                    f"something consumes {name!r} (an orchestrator?): it would take the replies. "
                    "Run the kit on a deployment prefix where no orchestrator runs"
                )
            await probe.close()
        await self.channel.set_qos(prefetch_count=1000)
        await self._consume(
            await self.channel.declare_queue(self.topology.reply_queue, passive=True), self.replies
        )
        await self._consume(await self.channel.declare_queue(dlq, passive=True), self.dead)

    async def _consume(self, queue: AbstractQueue, into: list[AbstractIncomingMessage]) -> None:
        async def on_message(message: AbstractIncomingMessage) -> None:
            into.append(message)
            self._arrived.set()

        await queue.consume(on_message, no_ack=False)

    async def publish(
        self,
        body: bytes,
        *,
        message_id: str,
        correlation_id: str | None = None,
        message_type: str | None = None,
        content_type: str | None = "application/json",
    ) -> None:
        exchange = await self.channel.get_exchange(self.topology.commands_exchange, ensure=False)
        await exchange.publish(
            aio_pika.Message(
                body,
                message_id=message_id,
                correlation_id=correlation_id,
                type=message_type,
                content_type=content_type,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=self.participant,
            mandatory=True,
        )

    async def send(self, command: CommandEnvelope, content_type: str = "application/json") -> None:
        await self.publish(
            command.model_dump_json().encode(),
            message_id=str(command.message_id),
            correlation_id=str(command.saga_id),
            message_type=command.command_type,
            content_type=content_type,
        )

    async def reply_to(
        self, message_id: uuid.UUID, within: float, *, count: int = 1
    ) -> list[AbstractIncomingMessage]:
        """Every reply whose causation id is ``message_id``, once ``count`` have come (or
        what came within ``within`` seconds)."""
        return await self._wait(
            lambda: found if len(found := self._replies_for(message_id)) >= count else [],
            within,
        ) or self._replies_for(message_id)

    async def dead_letter(self, message_id: str, within: float) -> list[AbstractIncomingMessage]:
        return await self._wait(
            lambda: [m for m in self.dead if m.message_id == message_id], within
        )

    def _replies_for(self, message_id: uuid.UUID) -> list[AbstractIncomingMessage]:
        found = []
        for message in self.replies:
            with contextlib.suppress(ValueError):
                if json.loads(message.body).get("causation_id") == str(message_id):
                    found.append(message)
        return found

    async def _wait(self, look: Any, within: float) -> list[AbstractIncomingMessage]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            found: list[AbstractIncomingMessage] = look()
            left = deadline - loop.time()
            if found or left <= 0:
                return found
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), left)

    async def settle(self, ours: set[str]) -> None:
        """Ack what the kit caused; hand everything else back to its queue."""
        for message in [*self.replies, *self.dead]:
            mine = message.message_id in ours or _causation(message) in ours
            with contextlib.suppress(Exception):
                await (message.ack() if mine else message.nack(requeue=True))


def _causation(message: AbstractIncomingMessage) -> str | None:
    try:
        value = json.loads(message.body).get("causation_id")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


class _Run:
    def __init__(self, target: Target, wire: _Wire, timeout: float):
        self.target = target
        self.wire = wire
        self.timeout = timeout
        self.checks: list[Check] = []
        self.ours: set[str] = set()

    def case(self) -> Case:
        return Case(self.target, self.wire.topology)

    def check(
        self, case: str, expectation: str, ok: bool, detail: str = "", *, must: bool = True
    ) -> bool:
        verdict: Verdict = "PASS" if ok else ("FAIL" if must else "WARN")
        self.checks.append(Check(case, expectation, verdict, "" if ok else detail))
        return ok

    async def send(self, command: CommandEnvelope, content_type: str = "application/json") -> None:
        self.ours.add(str(command.message_id))
        await self.wire.send(command, content_type)

    async def answer(
        self, case: str, command: CommandEnvelope, deliveries: int = 1
    ) -> ReplyEnvelope | None:
        """The newest reply to ``command`` (delivered ``deliveries`` times so far), checked
        against it; None, and a FAIL, when none came."""
        found = await self.wire.reply_to(command.message_id, self.timeout, count=deliveries)
        if len(found) < deliveries:
            got = f"{len(found)} of {deliveries} replies" if found else "no reply"
            self.check(case, "answered", False, f"{got} within {self.timeout:g} s")
            return None
        await asyncio.sleep(0.2)  # a second reply to one delivery would show now
        found = self.wire._replies_for(command.message_id)
        message = found[-1]
        self.ours.add(message.message_id or "")
        try:
            reply = ReplyEnvelope.model_validate_json(message.body)
        except ValueError as exc:
            self.check(case, "answered with a valid ReplyEnvelope", False, str(exc)[:300])
            return None
        wrong = [
            f"{name} is {got!r}, not {want!r}"
            for name, got, want in (
                ("causation_id", reply.causation_id, command.message_id),
                ("saga_id", reply.saga_id, command.saga_id),
                ("participant", reply.participant, command.participant),
                ("command_type", reply.command_type, command.command_type),
                ("message_id property", message.message_id, str(reply.message_id)),
                ("delivery_mode", message.delivery_mode, aio_pika.DeliveryMode.PERSISTENT),
            )
            if got != want
        ]
        if message.content_type not in ("application/json", None):
            wrong.append(f"content_type is {message.content_type!r}")
        if len(found) != deliveries:
            wrong.append(f"{len(found)} replies to {deliveries} deliveries")
        self.check(
            case,
            "answered once, naming its command (ids, persistent, JSON)",
            not wrong,
            "; ".join(wrong),
        )
        optional = []
        if message.correlation_id != str(command.saga_id):
            optional.append(f"correlation_id {message.correlation_id!r} (want the saga id)")
        if message.type != f"{command.command_type}.reply":
            optional.append(f"type {message.type!r} (want {command.command_type}.reply)")
        if message.content_type is None:
            optional.append("no content_type (want application/json)")
        why = "; ".join(optional)
        self.check(case, "reply properties: correlation id, type", not optional, why, must=False)
        return reply

    async def dead_lettered(self, case: str, message_id: str, reason: str) -> None:
        found = await self.wire.dead_letter(message_id, self.timeout)
        self.ours.add(message_id)
        if not self.check(
            case, "dead-lettered to the .dlq", bool(found), f"not in {self.wire.queue}.dlq"
        ):
            return
        got = (found[0].headers or {}).get(DEAD_LETTER_REASON)
        detail = "no reason header (rejected without a copy?)" if got is None else f"reason {got!r}"
        self.check(case, f"x-saga-dead-letter-reason: {reason}", got == reason, detail, must=False)

    async def unanswered(self, case: str, message_id: uuid.UUID) -> None:
        found = self.wire._replies_for(message_id)
        self.check(case, "never answered", not found, f"{len(found)} replies")


async def run_conformance(
    url: str,
    target: Target,
    *,
    within: float = 10.0,
    cases: Sequence[str] = CASES,
) -> list[Check]:
    """Run ``cases`` against the participant of ``target`` on the broker at ``url``; each
    answer is awaited ``within`` seconds."""
    unknown = set(cases) - set(CASES)
    if unknown:
        raise ConfigError(f"unknown cases {sorted(unknown)}; known: {', '.join(CASES)}")
    topology = Topology(prefix=target.prefix)
    try:
        connection = await aio_pika.connect(url, timeout=10)
    except (OSError, aiormq.exceptions.AMQPError, TimeoutError) as exc:
        raise ConfigError(f"cannot reach RabbitMQ: {exc}") from None
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        wire = _Wire(connection, channel, topology, target.participant)
        await wire.start()
        run = _Run(target, wire, within)
        try:
            await _cases(run, set(cases))
        finally:
            await wire.settle(run.ours)
    return run.checks


async def _cases(run: _Run, wanted: set[str]) -> None:
    if wanted & {"reply", "redelivery", "retry", "compensation"}:
        await _answered(run, wanted)
    if wanted & {"nothing_to_undo", "late_action"}:
        await _compensated_first(run, wanted)
    if "charset" in wanted:
        command = run.case().command()
        await run.send(command, content_type="application/json; charset=utf-8")
        await run.answer("charset", command)
    await _refused(run, wanted)


def _same(a: ReplyEnvelope, b: ReplyEnvelope) -> tuple[bool, str]:
    same = (a.outcome, a.reason, a.data) == (b.outcome, b.reason, b.data)
    return same, f"{a.outcome}/{a.reason} {a.data} vs {b.outcome}/{b.reason} {b.data}"[:300]


async def _answered(run: _Run, wanted: set[str]) -> None:
    """An action answered; redelivered; retried; then compensated."""
    case = run.case()
    action = case.command()
    await run.send(action)
    answer = await run.answer("reply", action)
    if answer is None:
        return
    failure_reason = answer.outcome == "success" or bool(answer.reason)
    run.check("reply", "a failure names a reason", failure_reason, "failure without a reason")
    if "redelivery" in wanted:
        await run.send(action)
        again = await run.answer("redelivery", action, deliveries=2)
        if again is not None:
            run.check(
                "redelivery", "the same answer (outcome, reason, data)", *_same(again, answer)
            )
            run.check(
                "redelivery",
                "the same reply message id (derived from the command's)",
                again.message_id == answer.message_id,
                f"{again.message_id} vs {answer.message_id}",
                must=False,
            )
    if "retry" in wanted:
        retry = case.command(attempt=2)
        await run.send(retry)
        second = await run.answer("retry", retry)
        if second is not None and not answer.retryable:
            run.check("retry", "a new attempt gets the same final answer", *_same(second, answer))
    if "compensation" in wanted:
        undo = case.command("compensation")
        await run.send(undo)
        undone = await run.answer("compensation", undo)
        if undone is not None:
            why = f"{undone.reason}: {undone.detail}"
            run.check("compensation", "succeeds", undone.outcome == "success", why)


async def _compensated_first(run: _Run, wanted: set[str]) -> None:
    """A compensation whose action never came; then that action, late."""
    case = run.case()
    undo = case.command("compensation")
    await run.send(undo)
    undone = await run.answer("nothing_to_undo", undo)
    if undone is not None:
        why = f"{undone.reason}: {undone.detail}"
        run.check("nothing_to_undo", "succeeds", undone.outcome == "success", why)
    if "late_action" not in wanted:
        return
    late = case.command()
    await run.send(late)
    refused = await run.answer("late_action", late)
    if refused is not None:
        run.check(
            "late_action",
            "refused: a failure, not retryable",
            refused.outcome == "failure" and not refused.retryable,
            f"answered {refused.outcome}" + (" (retryable)" if refused.retryable else ""),
        )


async def _refused(run: _Run, wanted: set[str]) -> None:
    """What no participant may answer: it goes to the dead-letter queue instead."""
    if "malformed" in wanted:
        message_id = str(uuid.uuid4())
        run.ours.add(message_id)
        await run.wire.publish(b'{"schema_version": 1, "message_id": ', message_id=message_id)
        await run.dead_lettered("malformed", message_id, "invalid_json")
    if "oversize" in wanted:
        command = run.case().command()
        body = command.model_dump_json().encode()
        padded = body[:-1] + b', "padding": "' + b"x" * _OVERSIZE + b'"}'
        run.ours.add(str(command.message_id))
        await run.wire.publish(padded, message_id=str(command.message_id))
        await run.dead_lettered("oversize", str(command.message_id), "too_large")
        await run.unanswered("oversize", command.message_id)
    if "unknown_command" in wanted:
        command = run.case().command(command_type=f"{run.target.participant}.conformance-unknown")
        await run.send(command)
        await run.dead_lettered("unknown_command", str(command.message_id), "unknown_command")
        await run.unanswered("unknown_command", command.message_id)
    if "foreign_reply_to" in wanted:
        command = run.case().command(reply_to=f"{run.wire.topology.prefix}.nowhere")
        await run.send(command)
        await run.dead_lettered("foreign_reply_to", str(command.message_id), "unknown_reply_to")
        await run.unanswered("foreign_reply_to", command.message_id)


def render(checks: Sequence[Check], target: Target) -> str:
    """The pass/fail table, and a last line that sums it up."""
    rows = [("case", "expectation", "result", "detail")] + [
        (c.case, c.expectation, c.verdict, c.detail) for c in checks
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [
        "  ".join(r[i].ljust(widths[i]) for i in range(3)) + ("  " + r[3] if r[3] else "")
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    failed = sum(c.verdict == "FAIL" for c in checks)
    warned = sum(c.verdict == "WARN" for c in checks)
    lines.append("")
    lines.append(
        f"{target.participant}: {len(checks) - failed - warned} passed, {failed} failed, "
        f"{warned} warnings ({'conforms' if not failed else 'does NOT conform'})"
    )
    return "\n".join(lines)
