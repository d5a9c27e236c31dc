"""The database misbehaving under the orchestrator and under a participant, for real.

* A poison message (its write fails on every delivery while the database is fine) is
  dead-lettered with reason ``poison`` after ``max_deliveries`` failed deliveries, and the
  messages around it keep flowing, including those that shared a group commit with it.
* A locked database (another process holds ``BEGIN IMMEDIATE`` past the busy timeout) and a full
  one (``PRAGMA max_page_count``: "database or disk is full") fail writes for seconds: nothing is
  acked before its commit, the process stays up, no healthy message is dead-lettered however
  often it fails, and once the fault is gone every saga (every command) completes exactly once.

The sagas here wait 30 s for a reply, so no timeout races the held-up replies: every saga
completing without a timeout is what proves that no reply was acked and lost.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from uuid import UUID

import pytest
import sqlalchemy as sa

from saga.core.ids import command_id, saga_id_for_key
from saga.core.state import SagaStatus
from saga.messaging.poison import PoisonGuard
from saga.participant.ledger import processed
from saga.protocol.envelope import ReplyEnvelope, StartSaga
from saga.store.sql import sqlite_engine
from tests.faults._db_helpers import (
    LogRecorder,
    PageLimit,
    PaymentWorld,
    WriteLock,
    dead_letters,
    open_harness,
    payment_world,
    ready,
    reason_of,
    record_logs,
    reject_inbox,
    reject_rows,
    slow_trip,
    sqlite_path,
    start_orchestrator,
)
from tests.integration.harness import Harness, command_types, kinds, wait_terminal, wait_until

pytestmark = pytest.mark.rabbitmq

HAPPY = ["started", *["command_sent", "step_succeeded"] * 3, "completed"]


async def _start_request(harness: Harness, key: str) -> UUID:
    """Publish a StartSaga for ``key``; returns the saga id it will have."""
    request = StartSaga(
        schema_version=1, message_id=uuid.uuid4(), saga_name="trip", key=key, input={"script": {}}
    )
    await harness.publish(
        harness.topology.start_queue,
        request.model_dump_json().encode(),
        message_id=str(request.message_id),
    )
    return saga_id_for_key("trip", key)


def _failures(recorder: LogRecorder, event: str) -> Counter[str]:
    """Failed deliveries logged, by message id."""
    return Counter(str(line["message_id"]) for line in recorder.named(event))


async def _dlqs_empty(harness: Harness) -> None:
    channel = await harness.channel()
    for queue in (harness.topology.reply_queue, harness.topology.start_queue):
        assert await ready(channel, harness.topology.dead_letter_queue(queue)) == 0


async def _assert_each_saga_ran_once(harness: Harness, saga_ids: list[UUID]) -> None:
    """COMPLETED with the plain history (no timeout, no retry, nothing applied twice), and the
    participant applied each step's effect exactly once."""
    service, responder = harness.service, harness.participant
    finals = await wait_terminal(service, saga_ids, timeout=30)
    assert {f.status for f in finals} == {SagaStatus.COMPLETED}
    for saga_id in saga_ids:
        assert kinds(await service.orchestrator.history(saga_id)) == HAPPY
        assert set(command_types(responder, saga_id)) == {"alpha.do", "beta.do", "gamma.do"}
        effects = [
            r["step"]
            for r in responder.received
            if r["saga_id"] == str(saga_id) and r["new_effect"]
        ]
        assert sorted(effects) == ["alpha", "beta", "gamma"]


# --- poison -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("backend", "error"),
    [
        ("sqlite", "IntegrityError"),
        pytest.param("postgres", "RaiseError", marks=pytest.mark.postgres),
    ],
)
async def test_a_poison_reply_is_dead_lettered_while_other_sagas_flow(
    tmp_path: Path, unique: str, monkeypatch: pytest.MonkeyPatch, backend: str, error: str
) -> None:
    recorder = LogRecorder()
    record_logs(monkeypatch, recorder, of="orchestrator")
    async with open_harness(tmp_path, unique, backend) as harness:
        service = await start_orchestrator(harness, slow_trip())
        assert service.settings.max_deliveries == 5  # the default
        responder = await harness.start_responder()
        victim = await service.start_saga("trip", {"script": {"alpha": ["silent"]}})
        await wait_until(lambda: len(responder.received) == 1, "the victim's alpha.do")
        poison = ReplyEnvelope(
            schema_version=1,
            message_id=uuid.uuid4(),
            causation_id=command_id(victim.saga_id, "alpha", "action", 1),
            saga_id=victim.saga_id,
            participant="alpha",
            command_type="alpha.do",
            outcome="success",
        )
        # every attempt to record this reply fails in the database, which is otherwise fine
        await reject_inbox(harness, poison.message_id, "poisoned")

        async def traffic() -> list[UUID]:
            """Sagas started throughout, so healthy replies share group commits with the
            poison's deliveries."""
            ids = []
            for _ in range(30):
                ids.append((await service.start_saga("trip", {"script": {}})).saga_id)
                await asyncio.sleep(0.15)
            return ids

        flowing = asyncio.create_task(traffic())
        await asyncio.sleep(0.2)
        await harness.publish(
            harness.topology.reply_queue,
            poison.model_dump_json().encode(),
            message_id=str(poison.message_id),
        )
        [dead] = await harness.dead_letters(harness.topology.reply_queue, 1, timeout=20)
        others = await flowing

        assert dead.message_id == str(poison.message_id)
        assert dead.reason == "poison"
        assert dead.headers["x-saga-dead-letter-detail"] == (
            f"failed 5 deliveries; last error: {error}: poisoned"
        )
        # four deliveries handed back, the fifth dead-lettered; no other message ever failed
        assert _failures(recorder, "apply_failed_will_retry") == {str(poison.message_id): 4}
        [line] = recorder.named("message_dead_lettered")
        assert (line["reason"], line["message_id"]) == ("poison", str(poison.message_id))
        await _assert_each_saga_ran_once(harness, others)

        # the victim never saw the poison; a sound reply moves it on
        state = await service.orchestrator.get(victim.saga_id)
        assert state.version == victim.version
        history = await service.orchestrator.history(victim.saga_id)
        assert poison.message_id not in {h.message_id for h in history}
        sound = poison.model_copy(update={"message_id": uuid.uuid4()})
        await harness.publish(harness.topology.reply_queue, sound.model_dump_json().encode())
        [final] = await wait_terminal(service, [victim.saga_id])
        assert final.status is SagaStatus.COMPLETED
        assert service.dead_lettered == 1


async def test_a_poison_command_is_dead_lettered_while_other_commands_flow(
    tmp_path: Path, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = LogRecorder()
    record_logs(monkeypatch, recorder, of="participant")
    async with payment_world(tmp_path, unique) as world:
        assert world.service.settings.max_deliveries == 5  # the default
        opening = await world.balance()
        poisoned = world.charge("7.00")
        # the charge itself runs; recording its outcome fails in the database, every time
        reject_rows(world.database, "ledger_processed", "saga_id", poisoned.saga_id, "poisoned")
        await world.send_command(poisoned)
        healthy = []
        for _ in range(12):
            healthy.append(world.charge("10.00"))
            await world.send_command(healthy[-1])
            await asyncio.sleep(0.3)

        [dead] = await dead_letters(world.channel, world.queue, 1, timeout=20)
        assert dead.message_id == str(poisoned.message_id)
        assert reason_of(dead) == "poison"
        assert dead.headers["x-saga-dead-letter-detail"] == (
            "failed 5 deliveries; last error: IntegrityError: poisoned"
        )
        assert _failures(recorder, "apply_failed_will_retry") == {str(poisoned.message_id): 4}
        replies = await world.replies(len(healthy))
        assert set(replies) == {c.message_id for c in healthy}
        assert all(r.outcome == "success" for copies in replies.values() for r in copies)
        # the poison's transaction never committed: no charge, no ledger row, no reply
        assert await world.balance() == opening - 10 * len(healthy)
        charged = {c["order_ref"] for c in await world.charges()}
        assert charged == {c.saga_id for c in healthy}
        assert world.service.dead_lettered == 1


async def test_a_failure_counts_only_while_the_database_answers() -> None:
    """The guard's rule on its own: an error the database raises about itself, or any error
    while ``SELECT 1`` fails, is never the message's fault."""
    up = {"value": True}

    async def probe() -> bool:
        return up["value"]

    guard = PoisonGuard(2, probe, probe_ttl=0)
    locked = sa.exc.OperationalError("INSERT", {}, Exception("database is locked"))
    bug = ValueError("bad message")
    assert await guard.failed("m", locked) == 0
    up["value"] = False
    assert await guard.failed("m", bug) == 0
    up["value"] = True
    assert await guard.failed("m", bug) == 1
    assert not guard.exhausted(1)
    assert await guard.failed("m", locked) == 1
    assert await guard.failed("m", bug) == 2
    assert guard.exhausted(2)
    guard.settled("m")
    assert await guard.failed("m", bug) == 1


# --- locked and full: the orchestrator --------------------------------------------------------


async def _ride_out(
    harness: Harness,
    recorder: LogRecorder,
    *,
    symptom: str,
    enough: Callable[[Counter[str]], bool],
    fault_on: Callable[[], Awaitable[None]],
    fault_off: Callable[[], Awaitable[None]],
    during: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Hold a fault until the failed deliveries show ``symptom`` and are ``enough``, checking
    that the process stays up and dead-letters nothing meanwhile (and ``during``); then lift
    it."""
    service = harness.service
    await fault_on()
    try:
        deadline = time.monotonic() + 30
        while True:
            failures = _failures(recorder, "apply_failed_will_retry")
            if enough(failures):
                break
            dead = recorder.named("message_dead_lettered")
            assert service.dead_lettered == 0, f"dead-lettered during the fault: {dead}"
            assert time.monotonic() < deadline, f"the fault did not bite: {failures}"
            await asyncio.sleep(0.1)
        errors = [str(line["error"]) for line in recorder.named("apply_failed_will_retry")]
        assert any(symptom in e for e in errors), errors[:3]
        assert all(not t.done() for t in service._tasks), "a background task died"
        await _dlqs_empty(harness)
        assert service.dead_lettered == 0
        if during is not None:
            await during()
    finally:
        await fault_off()


async def test_the_orchestrator_rides_out_a_locked_database(
    tmp_path: Path, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = LogRecorder()
    record_logs(monkeypatch, recorder, of="orchestrator")
    async with open_harness(tmp_path, unique) as harness:
        service = await start_orchestrator(
            harness, slow_trip(), busy_timeout_ms=500, max_deliveries=2
        )
        in_flight = [await service.start_saga("trip", {"script": {}}) for _ in range(4)]
        channel = await harness.channel()
        alpha_queue = harness.topology.command_queue("alpha")
        for _ in range(100):  # every alpha.do is out before the lock
            if await ready(channel, alpha_queue) == len(in_flight):
                break
            await asyncio.sleep(0.05)
        lock = WriteLock(sqlite_path(harness))
        started: list[UUID] = []

        async def lock_and_load() -> None:
            await lock.acquire()
            await harness.start_responder()  # its replies wait on the lock
            started.extend([await _start_request(harness, f"{unique}-{i}") for i in range(2)])

        async def nothing_applied() -> None:  # readers are not blocked by the lock
            states = await service.store.load_many([s.saga_id for s in in_flight] + started)
            assert set(states) == {s.saga_id for s in in_flight}  # the starts wait, unapplied
            assert [s.version for s in states.values()] == [1] * len(in_flight)

        # every held message fails more often than max_deliveries: none may be dead-lettered
        await _ride_out(
            harness,
            recorder,
            symptom="database is locked",
            enough=lambda f: len(f) >= 6 and min(f.values()) > 2,
            fault_on=lock_and_load,
            fault_off=lock.release,
            during=nothing_applied,
        )
        ids = [s.saga_id for s in in_flight] + started
        await _assert_each_saga_ran_once(harness, ids)
        await _dlqs_empty(harness)
        assert service.dead_lettered == 0


async def test_the_orchestrator_rides_out_a_full_disk(
    tmp_path: Path, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = LogRecorder()
    record_logs(monkeypatch, recorder, of="orchestrator")
    async with open_harness(tmp_path, unique) as harness:
        service = await start_orchestrator(harness, slow_trip(), max_deliveries=2)
        await harness.start_responder()
        limit = PageLimit(service.store._write)
        keys = [f"{unique}-{i}" for i in range(40)]

        async def renew() -> None:
            """The pragma is set at checkout: the writer lease takes its connection anew."""
            if service.store._lease is not None:
                await service.store._lease.close()

        async def fill_and_load() -> None:
            limit.full = True
            await renew()
            for key in keys:
                await _start_request(harness, key)

        async def lift() -> None:
            limit.full = False
            await renew()

        try:
            await _ride_out(
                harness,
                recorder,
                symptom="database or disk is full",
                enough=lambda f: max(f.values(), default=0) > 2,
                fault_on=fill_and_load,
                fault_off=lift,
            )
            ids = [saga_id_for_key("trip", key) for key in keys]
            await _assert_each_saga_ran_once(harness, ids)
            await _dlqs_empty(harness)
            assert service.dead_lettered == 0
        finally:
            limit.remove()


# --- locked and full: a participant -----------------------------------------------------------


async def _participant_rides_out(
    world: PaymentWorld,
    recorder: LogRecorder,
    *,
    count: int,
    amount: str,
    symptom: str,
    enough: Callable[[Counter[str]], bool],
    fault_on: Callable[[], Awaitable[None]],
    fault_off: Callable[[], Awaitable[None]],
) -> None:
    opening = await world.balance()
    commands = [world.charge(amount) for _ in range(count)]
    await fault_on()
    try:
        for command in commands:
            await world.send_command(command)
        deadline = time.monotonic() + 30
        while not enough(failures := _failures(recorder, "apply_failed_will_retry")):
            dead = recorder.named("message_dead_lettered")
            assert world.service.dead_lettered == 0, f"dead-lettered during the fault: {dead}"
            assert time.monotonic() < deadline, f"the fault did not bite: {failures}"
            await asyncio.sleep(0.1)
        errors = [str(line["error"]) for line in recorder.named("apply_failed_will_retry")]
        assert any(symptom in e for e in errors), errors[:3]
        assert world.service.handled < count  # some are held back ...
        assert await ready(world.channel, world.topology.dead_letter_queue(world.queue)) == 0
        assert world.service.dead_lettered == 0  # ... however often they fail
        assert world.service._relay_task is not None and not world.service._relay_task.done()
    finally:
        await fault_off()
    replies = await world.replies(count, timeout=30)
    assert set(replies) == {c.message_id for c in commands}
    for copies in replies.values():  # the relay may send a reply twice; it is the same reply
        assert {r.model_dump_json() for r in copies} == {copies[0].model_dump_json()}
        assert copies[0].outcome == "success"
    # each charge once: the money, the charges and the ledger agree
    assert await world.balance() == opening - Decimal(amount) * count
    assert sorted(str(c["order_ref"]) for c in await world.charges()) == sorted(
        str(c.saga_id) for c in commands
    )
    async with world.service.ledger.reader.connect() as conn:
        recorded = list(await conn.scalars(sa.select(processed.c.message_id)))
    assert sorted(map(str, recorded)) == sorted(str(c.message_id) for c in commands)
    assert world.service.dead_lettered == 0


async def test_a_participant_rides_out_a_locked_database(
    tmp_path: Path, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = LogRecorder()
    record_logs(monkeypatch, recorder, of="participant")
    async with payment_world(tmp_path, unique, start=False, max_deliveries=2) as world:
        ledger = world.service.ledger
        if ledger.lease is not None:
            await ledger.lease.close()
        await ledger.engine.dispose()  # the same engine, with a busy timeout of 0.5 s
        ledger.engine = sqlite_engine(ledger.url, immediate=True, busy_timeout_ms=500)
        await world.service.start()
        lock = WriteLock(world.database)
        await _participant_rides_out(
            world,
            recorder,
            count=5,
            amount="10.00",
            symptom="database is locked",
            enough=lambda f: len(f) == 5 and min(f.values()) > 2,
            fault_on=lock.acquire,
            fault_off=lock.release,
        )
        assert world.service.handled == 5


async def test_a_participant_rides_out_a_full_disk(
    tmp_path: Path, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = LogRecorder()
    record_logs(monkeypatch, recorder, of="participant")
    async with payment_world(tmp_path, unique, max_deliveries=2) as world:
        ledger = world.service.ledger
        limit = PageLimit(ledger.engine)

        async def renew() -> None:
            """The pragma is set at checkout: the writer lease takes its connection anew."""
            if ledger.lease is not None:
                await ledger.lease.close()

        async def fill() -> None:
            limit.full = True
            await renew()

        async def lift() -> None:
            limit.full = False
            await renew()

        try:
            await _participant_rides_out(
                world,
                recorder,
                count=40,
                amount="1.00",
                symptom="database or disk is full",
                enough=lambda f: max(f.values(), default=0) > 2,
                fault_on=fill,
                fault_off=lift,
            )
        finally:
            limit.remove()
