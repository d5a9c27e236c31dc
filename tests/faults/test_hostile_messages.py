"""Messages that pass schema validation (or are not even read) but are wrong, on the real broker.

A reply that answers another saga, another step, or comes from the wrong service changes no saga:
it is recorded in the saga's history as ignored, with the reason, and logged. An envelope of an
unknown schema version, a command a participant does not handle and one whose ``reply_to`` no
reply could reach are dead-lettered with their reason; a command with a negative amount is
answered ``invalid_payload``, with no effect. A body over ``max_message_bytes`` is dead-lettered
as ``too_large`` without being decoded, by the orchestrator and by a participant. (A reply for an
unknown saga is covered by tests/integration/test_orchestrator_rabbitmq.py.)
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import sqlalchemy as sa

from saga.core.ids import command_id
from saga.core.state import HistoryEntry, HistoryKind, SagaStatus, StepStatus
from saga.participant.ledger import processed
from saga.protocol.envelope import CommandEnvelope, ReplyEnvelope, StartSaga
from saga.protocol.types import Contract
from saga_demo.contracts.payment import CHARGE
from tests.faults._db_helpers import (
    CommandTap,
    LogRecorder,
    dead_letters,
    open_harness,
    payment_world,
    reason_of,
    record_logs,
    reply_json,
    slow_trip,
    start_orchestrator,
)
from tests.integration.harness import Harness, kinds, wait_terminal

pytestmark = pytest.mark.rabbitmq


async def _send_reply(harness: Harness, body: bytes) -> UUID:
    """Publish a reply body with its own message id as the AMQP message id."""
    message_id = UUID(json.loads(body)["message_id"])
    await harness.publish(harness.topology.reply_queue, body, message_id=str(message_id))
    return message_id


def _ignored(history: Sequence[HistoryEntry]) -> dict[UUID | None, str]:
    return {h.message_id: h.detail for h in history if h.kind is HistoryKind.IGNORED}


async def _settle_all(harness: Harness, *, quiet: float = 0.5) -> None:
    """Let the orchestrator take every published reply before the test looks."""
    channel = await harness.channel()
    for _ in range(100):
        queue = await channel.declare_queue(harness.topology.reply_queue, passive=True)
        if not queue.declaration_result.message_count:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(quiet)


# --- the orchestrator -------------------------------------------------------------------------


async def test_replies_for_another_saga_step_or_service_change_nothing(
    tmp_path: Path, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = LogRecorder()
    record_logs(monkeypatch, recorder, of="orchestrator")
    async with open_harness(tmp_path, unique) as harness:
        service = await start_orchestrator(harness, slow_trip())
        tap = CommandTap(harness)
        a = await service.start_saga("trip", {"script": {}})
        b = await service.start_saga("trip", {"script": {}})
        a_alpha = await tap.expect(a.saga_id, "alpha")
        b_alpha = await tap.expect(b.saga_id, "alpha")
        before = await service.store.load_many([a.saga_id, b.saga_id])

        beta_of_a = command_id(a.saga_id, "beta", "action", 1)
        undo_of_a = command_id(a.saga_id, "alpha", "compensation", 1)
        expected = {
            # saga B's command id on a reply addressed to saga A
            await _send_reply(harness, reply_json(a_alpha, causation_id=str(b_alpha.message_id))): (
                "reply answers no command of this saga"
            ),
            # a step of saga A that has not been sent yet
            await _send_reply(
                harness,
                reply_json(
                    a_alpha, causation_id=str(beta_of_a), participant="beta", command_type="beta.do"
                ),
            ): "duplicate or late reply to beta action attempt 1; awaiting alpha action attempt 1",
            # the compensation of the awaited step, never sent
            await _send_reply(
                harness,
                reply_json(a_alpha, causation_id=str(undo_of_a), command_type="alpha.undo"),
            ): (
                "duplicate or late reply to alpha compensation attempt 1; "
                "awaiting alpha action attempt 1"
            ),
        }
        version_two = await _send_reply(harness, reply_json(a_alpha, schema_version=2))
        # the awaited command, answered by the wrong service, or naming a command never sent:
        # it matches the awaited command in its causation id only, so it is refused outright
        wrong_service = await _send_reply(harness, reply_json(a_alpha, participant="beta"))
        teleport = await _send_reply(harness, reply_json(a_alpha, command_type="alpha.teleport"))

        dead = {
            d.message_id: d for d in await harness.dead_letters(harness.topology.reply_queue, 3)
        }
        assert dead[str(version_two)].reason == "schema_violation"
        assert "schema_version" in dead[str(version_two)].headers["x-saga-dead-letter-detail"]
        assert json.loads(dead[str(version_two)].body)["schema_version"] == 2  # body untouched
        assert dead[str(wrong_service)].reason == "reply_mismatch"
        assert dead[str(wrong_service)].headers["x-saga-dead-letter-detail"] == (
            "reply to alpha action attempt 1 comes from participant 'beta', but the command "
            "went to 'alpha'"
        )
        assert dead[str(teleport)].reason == "reply_mismatch"
        assert dead[str(teleport)].headers["x-saga-dead-letter-detail"] == (
            "reply to alpha action attempt 1 names command type 'alpha.teleport', but "
            "'alpha.do' was sent"
        )
        await _settle_all(harness)

        # nothing moved: same versions, same awaited commands, no command sent
        after = await service.store.load_many([a.saga_id, b.saga_id])
        for saga_id in (a.saga_id, b.saga_id):
            assert after[saga_id].version == before[saga_id].version
            assert after[saga_id].status is SagaStatus.RUNNING
            assert after[saga_id].awaiting == before[saga_id].awaiting
        await tap.poll()
        assert len(tap.received) == 2
        history_a = await service.orchestrator.history(a.saga_id)
        assert _ignored(history_a) == expected
        assert kinds(history_a) == ["started", "command_sent", *["ignored"] * 3]
        assert kinds(await service.orchestrator.history(b.saga_id)) == ["started", "command_sent"]

        # every one of them left a log line with its reason
        for message_id, why in expected.items():
            [line] = recorder.named("reply_ignored", message_id=str(message_id))
            assert line["saga_id"] == str(a.saga_id)
            assert line["reason"] == why
        [line] = recorder.named("message_dead_lettered", message_id=str(version_two))
        assert line["reason"] == "schema_violation"
        [line] = recorder.named("message_dead_lettered", message_id=str(teleport))
        assert line["reason"] == "reply_mismatch"

        # and both sagas go on normally
        for saga_id, first in ((a.saga_id, a_alpha), (b.saga_id, b_alpha)):
            await _send_reply(harness, ReplyEnvelope.success(first, {}).model_dump_json().encode())
            for step in ("beta", "gamma"):
                command = await tap.expect(saga_id, step)
                body = ReplyEnvelope.success(command, {}).model_dump_json().encode()
                await _send_reply(harness, body)
        finals = await wait_terminal(service, [a.saga_id, b.saga_id])
        assert [f.status for f in finals] == [SagaStatus.COMPLETED] * 2
        for saga_id in (a.saga_id, b.saga_id):
            assert [tap.count(saga_id, step) for step in ("alpha", "beta", "gamma")] == [1, 1, 1]
            history = await service.orchestrator.history(saga_id)
            assert kinds(history).count("step_succeeded") == 3
        assert service.dead_lettered == 3


async def test_replies_for_a_compensated_step_change_nothing(
    tmp_path: Path, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = LogRecorder()
    record_logs(monkeypatch, recorder, of="orchestrator")
    async with open_harness(tmp_path, unique) as harness:
        service = await start_orchestrator(harness, slow_trip())
        tap = CommandTap(harness)
        started = await service.start_saga("trip", {"script": {}})
        saga_id = started.saga_id
        alpha = await tap.expect(saga_id, "alpha")
        await _send_reply(harness, ReplyEnvelope.success(alpha, {}).model_dump_json().encode())
        beta = await tap.expect(saga_id, "beta")
        refused = ReplyEnvelope.failure(beta, "refused").model_dump_json().encode()
        await _send_reply(harness, refused)
        undo = await tap.expect(saga_id, "alpha", "compensation")
        undone = ReplyEnvelope.success(undo, {}).model_dump_json().encode()
        undone_id = await _send_reply(harness, undone)
        [final] = await wait_terminal(service, [saga_id])
        assert final.status is SagaStatus.COMPENSATED
        history_before = await service.orchestrator.history(saga_id)

        no_reply = "no reply is awaited (saga COMPENSATED, idle)"
        await harness.publish(harness.topology.reply_queue, undone, message_id=str(undone_id))
        expected = {
            await _send_reply(harness, reply_json(undo)): (
                f"duplicate or late reply to alpha compensation attempt 1; {no_reply}"
            ),
            await _send_reply(
                harness,
                ReplyEnvelope.failure(undo, "busy", retryable=True).model_dump_json().encode(),
            ): f"duplicate or late reply to alpha compensation attempt 1; {no_reply}",
            await _send_reply(harness, reply_json(alpha)): (
                f"duplicate or late reply to alpha action attempt 1; {no_reply}"
            ),
            await _send_reply(harness, reply_json(beta)): (
                f"duplicate or late reply to beta action attempt 1; {no_reply}"
            ),
        }
        await harness.dead_letters(harness.topology.reply_queue, 0)
        await _settle_all(harness)

        after = await service.orchestrator.get(saga_id)
        assert after.version == final.version
        assert after.status is SagaStatus.COMPENSATED
        assert [s.status for s in after.steps] == [
            StepStatus.COMPENSATED,
            StepStatus.FAILED,
            StepStatus.PENDING,
        ]
        history = await service.orchestrator.history(saga_id)
        # the redelivered compensation reply is a duplicate by message id: not even recorded
        assert history[: len(history_before)] == history_before
        assert _ignored(history[len(history_before) :]) == expected
        assert len(history) == len(history_before) + len(expected)
        await tap.poll()
        assert [(c.step, c.direction) for c in tap.received] == [
            ("alpha", "action"),
            ("beta", "action"),
            ("alpha", "compensation"),
        ]
        for message_id, why in expected.items():
            [line] = recorder.named("reply_ignored", message_id=str(message_id))
            assert line["reason"] == why
        assert service.dead_lettered == 0


async def test_oversize_messages_are_dead_lettered_before_parsing(
    tmp_path: Path, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    parsed = _record_decodes(monkeypatch, ReplyEnvelope, StartSaga)
    async with open_harness(tmp_path, unique) as harness:
        service = await harness.start_service(max_message_bytes=2048)
        participant = await harness.start_responder()
        reply_queue, start_queue = harness.topology.reply_queue, harness.topology.start_queue
        # neither is JSON, nor UTF-8, nor of the JSON content type: only the size is looked at
        binary = bytes(range(256)) * 16
        big_reply = await harness.publish(
            reply_queue, binary, content_type="application/octet-stream"
        )
        big_start = await harness.publish(start_queue, b"<" * 5000, content_type=None)

        [dead_reply] = await harness.dead_letters(reply_queue, 1)
        [dead_start] = await harness.dead_letters(start_queue, 1)
        assert (dead_reply.message_id, dead_reply.reason) == (big_reply, "too_large")
        assert (
            dead_reply.headers["x-saga-dead-letter-detail"]
            == "message is 4096 bytes, the limit is 2048"
        )
        assert dead_reply.body == binary
        assert (dead_start.message_id, dead_start.reason) == (big_start, "too_large")
        assert (
            dead_start.headers["x-saga-dead-letter-detail"]
            == "message is 5000 bytes, the limit is 2048"
        )
        assert parsed == []

        started = await service.start_saga("trip", {"script": {}})
        [final] = await wait_terminal(service, [started.saga_id])
        assert final.status is SagaStatus.COMPLETED
        assert len(participant.received) == 3
        assert len(parsed) == 3  # the three replies: the spy sees what is decoded
        assert max(len(body) for body in parsed) <= 2048
        assert service.dead_lettered == 2


# --- a participant ----------------------------------------------------------------------------


async def test_participant_refuses_wrong_commands(
    tmp_path: Path, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = LogRecorder()
    record_logs(monkeypatch, recorder, of="participant")
    async with payment_world(tmp_path, unique) as world:
        opening = await world.balance()
        negative = world.charge("-5.00")
        valid = world.charge("10.00")
        elsewhere = world.command(
            CHARGE, dict(valid.payload), participant="inventory", saga_id=uuid.uuid4()
        )
        unknown = world.command("payment.teleport", {"order_ref": str(uuid.uuid4())})
        # its reply could never be delivered: the effect must not happen either
        nowhere = world.charge("3.00").model_copy(update={"reply_to": f"{world.prefix}.nowhere"})
        version_two: dict[str, Any] = json.loads(world.charge("1.00").model_dump_json())
        version_two["schema_version"] = 2

        await world.send_command(negative)
        expected_dead = {
            await world.send_command(elsewhere): (
                "unknown_command",
                "payment does not handle 'payment.charge' (addressed to 'inventory')",
            ),
            await world.send_command(unknown): (
                "unknown_command",
                "payment does not handle 'payment.teleport' (addressed to 'payment')",
            ),
            await world.send(json.dumps(version_two).encode()): ("schema_violation", None),
            await world.send_command(nowhere): (
                "unknown_reply_to",
                f"reply_to '{world.prefix}.nowhere' is not this deployment's reply queue "
                f"'{world.prefix}.replies'",
            ),
        }
        await world.send_command(valid)

        replies = await world.replies(2)
        [refusal] = replies[negative.message_id]
        assert (refusal.outcome, refusal.reason, refusal.retryable) == (
            "failure",
            "invalid_payload",
            False,
        )
        assert refusal.detail is not None and "amount" in refusal.detail
        [charged] = replies[valid.message_id]
        assert charged.outcome == "success"

        dead = await dead_letters(world.channel, world.queue, len(expected_dead))
        for letter in dead:
            reason, detail = expected_dead[str(letter.message_id)]
            assert reason_of(letter) == reason
            if detail is not None:
                assert letter.headers["x-saga-dead-letter-detail"] == detail
        assert {str(d.message_id) for d in dead} == set(expected_dead)
        version_detail = next(
            d.headers["x-saga-dead-letter-detail"]
            for d in dead
            if reason_of(d) == "schema_violation"
        )
        assert "schema_version" in version_detail
        for message_id, (reason, _) in expected_dead.items():
            [line] = recorder.named("message_dead_lettered", message_id=message_id)
            assert line["reason"] == reason

        # only the valid charge moved money; the refusal is final, recorded like any answer
        assert await world.balance() == opening - Decimal("10.00")
        assert [c["order_ref"] for c in await world.charges()] == [valid.saga_id]
        async with world.service.ledger.reader.connect() as conn:
            rows = {r.message_id: r.reason for r in await conn.execute(sa.select(processed))}
        assert rows == {negative.message_id: "invalid_payload", valid.message_id: None}
        assert world.service.dead_lettered == 4
        relay = world.service._relay
        assert relay is not None and relay.failures == 0  # no reply it cannot deliver


async def test_participant_dead_letters_oversize_commands_before_parsing(
    tmp_path: Path, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    parsed = _record_decodes(monkeypatch, CommandEnvelope)
    async with payment_world(tmp_path, unique, max_message_bytes=2048) as world:
        garbage = bytes(range(256)) * 12  # neither UTF-8 nor JSON: decoding it would say so
        big = await world.send(garbage)

        [dead] = await dead_letters(world.channel, world.queue, 1)
        assert (dead.message_id, reason_of(dead)) == (big, "too_large")
        assert dead.headers["x-saga-dead-letter-detail"] == (
            "message is 3072 bytes, the limit is 2048"
        )
        assert dead.body == garbage
        assert parsed == []

        valid = world.charge("10.00")
        await world.send_command(valid)
        replies = await world.replies(1)
        assert [r.outcome for r in replies[valid.message_id]] == ["success"]
        assert len(parsed) == 1
        assert world.service.dead_lettered == 1


def _record_decodes(monkeypatch: pytest.MonkeyPatch, *models: type[Contract]) -> list[bytes]:
    """Spy on the JSON decoding of ``models`` (where parsing happens): every body it is given."""
    seen: list[bytes] = []
    for model in models:
        real: Callable[..., Any] = model.model_validate_json

        def spy(cls: Any, /, raw: bytes, *args: Any, _real: Any = real, **kwargs: Any) -> Any:
            seen.append(raw)
            return _real(raw, *args, **kwargs)

        monkeypatch.setattr(model, "model_validate_json", classmethod(spy))
    return seen
