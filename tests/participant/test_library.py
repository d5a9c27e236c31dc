"""The participant library serves any command type, with the user's own models, and gives it
every guarantee: one transaction per command, dedup by idempotency key and by message, tombstones
against a late action, typed payloads, and refusals for handlers it cannot read."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import pytest
import sqlalchemy as sa
from pydantic import BaseModel, JsonValue
from sqlalchemy.ext.asyncio import AsyncConnection

from saga.core.errors import ConfigError
from saga.core.ids import command_id, idempotency_key
from saga.participant import (
    ALREADY_COMPENSATED,
    BusinessError,
    Participant,
    ParticipantSettings,
    TransientError,
    runtime,
)
from saga.participant.ledger import Ledger
from saga.protocol.envelope import CommandEnvelope
from saga.transport.topology import Topology
from tests.conftest import require_postgres, require_rabbitmq

metadata = sa.MetaData()
bookings = sa.Table(
    "bookings",
    metadata,
    sa.Column("saga_id", sa.Uuid, primary_key=True),
    sa.Column("flight", sa.String(20), nullable=False),
    sa.Column("seats", sa.Integer, nullable=False),
    sa.Column("cancelled", sa.Boolean, nullable=False, default=False),
)


class BookFlight(BaseModel):
    flight: str
    seats: int


class FlightBooked(BaseModel):
    booking: uuid.UUID
    seats: int


calls: list[str] = []


def flights(tmp_path: Path, settings: ParticipantSettings | None = None) -> Participant:
    """A user's participant: its own name, command types, models and tables."""
    service = Participant(
        "flights",
        settings or ParticipantSettings(data_dir=tmp_path, prefix="acme"),
        business=metadata,
    )

    @service.handler("flights.book")
    async def book(
        conn: AsyncConnection, payload: BookFlight, command: CommandEnvelope
    ) -> FlightBooked:
        calls.append(f"book {command.attempt}")
        if payload.flight == "FULL":
            raise BusinessError("sold_out", f"{payload.flight} has no seats")
        if payload.flight == "FLAKY" and command.attempt == 1:
            raise TransientError("gds_timeout")
        await conn.execute(
            bookings.insert().values(
                saga_id=command.saga_id, flight=payload.flight, seats=payload.seats
            )
        )
        return FlightBooked(booking=command.saga_id, seats=payload.seats)

    @service.handler("flights.cancel")
    async def cancel(
        conn: AsyncConnection, payload: dict[str, JsonValue], command: CommandEnvelope
    ) -> dict[str, JsonValue]:
        calls.append("cancel")
        done = await conn.execute(
            bookings.update().where(bookings.c.saga_id == command.saga_id).values(cancelled=True)
        )
        return {"nothing_to_undo": done.rowcount == 0}

    @service.handler("flights.notify")
    async def notify(
        conn: AsyncConnection, payload: dict[str, JsonValue], command: CommandEnvelope
    ) -> None:
        calls.append("notify")

    return service


@pytest.fixture
async def svc(tmp_path: Path) -> AsyncIterator[Participant]:
    calls.clear()
    service = flights(tmp_path)
    await service.setup_database()
    try:
        yield service
    finally:
        await service.ledger.close()


def command(
    command_type: str,
    payload: dict[str, Any],
    saga_id: uuid.UUID,
    *,
    step: str = "flight",
    direction: str = "action",
    attempt: int = 1,
) -> CommandEnvelope:
    """A command exactly as the orchestrator derives its ids."""
    return CommandEnvelope(
        schema_version=1,
        message_id=command_id(saga_id, step, direction, attempt),
        idempotency_key=idempotency_key(saga_id, step, direction),
        saga_id=saga_id,
        saga_name="trip",
        step=step,
        direction=direction,  # type: ignore[arg-type]
        attempt=attempt,
        participant="flights",
        command_type=command_type,
        reply_to="acme.replies",
        deadline=datetime.now(UTC) + timedelta(seconds=10),
        payload=payload,
    )


def book(saga: uuid.UUID, flight: str = "LH400", attempt: int = 1) -> CommandEnvelope:
    return command("flights.book", {"flight": flight, "seats": 2}, saga, attempt=attempt)


def cancel(saga: uuid.UUID) -> CommandEnvelope:
    return command("flights.cancel", {}, saga, direction="compensation")


async def booked(svc: Participant) -> list[tuple[str, bool]]:
    async with svc.ledger.reader.connect() as conn:
        rows = await conn.execute(sa.select(bookings.c.flight, bookings.c.cancelled))
        return [(r.flight, r.cancelled) for r in rows]


async def test_a_users_own_command_types_are_served_with_their_models(svc: Participant) -> None:
    assert svc.command_types == ("flights.book", "flights.cancel", "flights.notify")
    saga = uuid.uuid4()
    reply = await svc.handle(book(saga))
    assert (reply.outcome, reply.command_type, reply.participant) == (
        "success",
        "flights.book",
        "flights",
    )
    assert FlightBooked.model_validate(reply.data) == FlightBooked(booking=saga, seats=2)
    assert reply.causation_id == book(saga).message_id
    assert reply.message_id == uuid.uuid5(book(saga).message_id, "reply")
    assert await booked(svc) == [("LH400", False)]
    undo = await svc.handle(cancel(saga))
    assert (undo.outcome, undo.data) == ("success", {"nothing_to_undo": False})
    note = await svc.handle(command("flights.notify", {"any": ["json"]}, saga, step="notify"))
    assert (note.outcome, note.data) == ("success", {})
    assert await booked(svc) == [("LH400", True)]


async def test_the_writer_connection_is_taken_from_the_pool_once_for_every_command(
    svc: Participant,
) -> None:
    """Checking the connection out of the pool and back for each transaction cost more of a lone
    command's CPU than its statements; the ledger's lease holds it, whatever the handler did."""
    saga = uuid.uuid4()
    before = svc.ledger.counts.transactions
    assert (await svc.handle(book(uuid.uuid4(), flight="FULL"))).outcome == "failure"
    for each in (book(saga), cancel(saga), book(uuid.uuid4(), flight="FLAKY")):
        await svc.handle(each)
    assert svc.ledger.counts.transactions - before == 4
    assert svc.ledger.lease is not None and svc.ledger.lease.checkouts == 1
    assert await booked(svc) == [("LH400", True)]


async def test_the_same_key_gets_the_same_answer_and_the_effect_happens_once(
    svc: Participant,
) -> None:
    saga = uuid.uuid4()
    first = await svc.handle(book(saga))
    again = await svc.handle(book(saga))  # the same message redelivered
    retry = await svc.handle(book(saga, attempt=2))  # a new attempt, the same key
    assert again == first
    assert (retry.outcome, retry.data) == (first.outcome, first.data)
    assert retry.causation_id == book(saga, attempt=2).message_id
    assert calls == ["book 1"]
    assert await booked(svc) == [("LH400", False)]


async def test_business_and_transient_failures(svc: Participant) -> None:
    refused = await svc.handle(book(uuid.uuid4(), "FULL"))
    assert (refused.outcome, refused.reason, refused.retryable) == ("failure", "sold_out", False)
    saga = uuid.uuid4()
    flaky = await svc.handle(book(saga, "FLAKY"))
    assert (flaky.outcome, flaky.reason, flaky.retryable) == ("failure", "gds_timeout", True)
    # a retryable failure is not recorded: the next attempt runs the handler again
    second = await svc.handle(book(saga, "FLAKY", attempt=2))
    assert second.outcome == "success"
    assert calls == ["book 1", "book 1", "book 2"]


async def test_a_late_action_after_its_compensation_is_refused_unapplied(
    svc: Participant,
) -> None:
    saga = uuid.uuid4()
    undo = await svc.handle(cancel(saga))  # the compensation overtook its action
    assert (undo.outcome, undo.data) == ("success", {"nothing_to_undo": True})
    late = await svc.handle(book(saga))
    assert (late.outcome, late.reason, late.retryable) == ("failure", ALREADY_COMPENSATED, False)
    assert await booked(svc) == []
    assert calls == ["cancel"]  # the action's handler never ran
    assert (await svc.handle(book(saga, attempt=2))).reason == ALREADY_COMPENSATED
    history = await svc.ledger.history()
    assert [(h["command_type"], h["outcome"], h["reason"]) for h in history] == [
        ("flights.cancel", "success", None),
        ("flights.book", "failure", ALREADY_COMPENSATED),
    ]


async def test_an_action_and_its_compensation_in_one_batch(svc: Participant) -> None:
    """Group commit: the action first, then its compensation, in one transaction: the
    compensation sees the booking and undoes it; no tombstone is left."""
    saga = uuid.uuid4()
    done, undone = await asyncio.gather(svc.handle(book(saga)), svc.handle(cancel(saga)))
    assert done.outcome == "success" and undone.data == {"nothing_to_undo": False}
    assert await booked(svc) == [("LH400", True)]


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
async def test_a_handler_that_fails_in_a_batch_undoes_only_its_own_writes(
    tmp_path: Path, backend: str
) -> None:
    """Group commit: three commands in one transaction, the middle one writes and then
    fails. Each handler runs in a savepoint of its own (on PostgreSQL one that went through is
    released with the next one's, or by the COMMIT): the failed one's row is gone, the other
    two's stay, and every command has its reply."""
    database = None if backend == "sqlite" else require_postgres()
    service = Participant(
        "flights",
        ParticipantSettings(data_dir=tmp_path, prefix="acme", services_database_url=database),
        business=metadata,
    )
    if database is not None:  # a schema of its own, so runs side by side share nothing
        shared = service.ledger
        service.ledger = Ledger(
            shared.url, schema=f"ledger_{uuid.uuid4().hex[:10]}", business=shared.business
        )
        await shared.close()

    @service.handler("flights.hold")
    async def hold(conn: AsyncConnection, payload: BookFlight, command: CommandEnvelope) -> None:
        await conn.execute(
            bookings.insert().values(saga_id=command.saga_id, flight=payload.flight, seats=1)
        )
        if payload.flight == "DOOMED":
            raise BusinessError("doomed", "written, then refused")

    await service.setup_database()
    try:
        sagas = [uuid.uuid4() for _ in range(3)]
        flights_held = ["LH1", "DOOMED", "LH3"]
        batches = service._group.batches
        replies = await asyncio.gather(
            *(
                service.handle(command("flights.hold", {"flight": f, "seats": 1}, saga))
                for saga, f in zip(sagas, flights_held, strict=True)
            )
        )
        assert [(r.outcome, r.reason) for r in replies] == [
            ("success", None),
            ("failure", "doomed"),
            ("success", None),
        ]
        assert service._group.batches == batches + 1  # one transaction for the three
        assert sorted(f for f, _ in await booked(service)) == ["LH1", "LH3"]
        again = command("flights.hold", {"flight": "LH4", "seats": 1}, sagas[1])
        assert (await service.handle(again)).reason == "doomed"  # recorded, and given again
    finally:
        if database is not None:
            await service.ledger.drop()
        await service.ledger.close()


async def test_an_invalid_payload_is_a_final_refusal_before_the_handler(svc: Participant) -> None:
    reply = await svc.handle(command("flights.book", {"flight": "LH400"}, uuid.uuid4()))
    assert (reply.outcome, reply.reason, reply.retryable) == ("failure", "invalid_payload", False)
    assert reply.detail is not None and "seats" in reply.detail
    assert calls == []


async def test_a_handler_that_returns_the_wrong_type_is_a_retryable_handler_error(
    tmp_path: Path,
) -> None:
    service = Participant("flights", ParticipantSettings(data_dir=tmp_path), business=metadata)

    @service.handler("flights.book")
    async def sloppy(
        conn: AsyncConnection, payload: BookFlight, command: CommandEnvelope
    ) -> FlightBooked:
        await conn.execute(bookings.insert().values(saga_id=command.saga_id, flight="X", seats=1))
        return {"booking": "not the model"}  # type: ignore[return-value]

    await service.setup_database()
    try:
        reply = await service.handle(book(uuid.uuid4()))
        assert (reply.outcome, reply.reason, reply.retryable) == ("failure", "handler_error", True)
        assert reply.detail == "handler returned dict, not FlightBooked"
        assert await booked(service) == []  # its writes were rolled back
    finally:
        await service.ledger.close()


def test_handlers_are_checked_when_they_are_registered(tmp_path: Path) -> None:
    service = Participant("flights", ParticipantSettings(data_dir=tmp_path))

    async def untyped(conn, payload, command):  # type: ignore[no-untyped-def]
        return None

    async def any_payload(conn: AsyncConnection, payload: Any, command: CommandEnvelope) -> None:
        return None

    async def two_replies(
        conn: AsyncConnection, payload: BookFlight, command: CommandEnvelope
    ) -> FlightBooked | None:
        return None

    with pytest.raises(ValueError, match="annotate its payload parameter"):
        service.handler("flights.book")(untyped)
    with pytest.raises(ValueError, match="neither a pydantic model nor a JSON object"):
        service.handler("flights.book")(any_payload)
    with pytest.raises(ValueError, match="return one reply type"):
        service.handler("flights.book")(two_replies)
    with pytest.raises(ValueError, match="must match"):
        service.handler("Flights Book")
    # explicit models need no annotations
    service.handler("flights.book", payload=BookFlight, reply=None)(untyped)
    with pytest.raises(ValueError, match="already has a handler"):
        service.handler("flights.book")


async def test_a_participant_without_handlers_does_not_start(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="has no handler"):
        await Participant("idle", ParticipantSettings(data_dir=tmp_path)).start()


@pytest.mark.rabbitmq
async def test_a_start_that_fails_half_way_closes_its_own_broker(
    tmp_path: Path, unique: str
) -> None:
    """The command queue exists with other arguments (a quorum queue): the declare is refused
    after the connection was made. The start's error says why, and nothing is left open."""
    url = require_rabbitmq()
    prefix = f"half-{unique}"
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        await channel.declare_queue(
            f"{prefix}.cmd.flights", durable=True, arguments={"x-queue-type": "quorum"}
        )
        settings = ParticipantSettings(data_dir=tmp_path, prefix=prefix, rabbitmq_url=url)
        service = flights(tmp_path, settings)
        with pytest.raises(ConfigError, match="SAGA_QUORUM_QUEUES"):
            await service.start()
        assert service.broker is None, "the broker it connected was left open"
    finally:
        await _delete_topology(connection, prefix)  # the start declared the rest before it


async def _delete_topology(connection: Any, prefix: str) -> None:
    """The queues and exchanges of ``prefix``'s flights participant, then the connection."""
    channel = await connection.channel()
    for queue in Topology(prefix=prefix).queues(["flights"]):
        await channel.queue_delete(queue.name)
    for exchange in Topology(prefix=prefix).exchanges():
        await channel.exchange_delete(exchange.name)
    await connection.close()


@pytest.mark.rabbitmq
async def test_a_lone_commands_reply_is_published_before_its_log_line(
    tmp_path: Path, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lone saga waits for the reply, not for the participant's bookkeeping: the reply of a
    command its transaction held alone is published right after the ack is queued (so the two
    share one write), and ``command_handled`` is written after it."""
    url = require_rabbitmq()
    prefix = f"lone-{unique}"
    service = flights(
        tmp_path, ParticipantSettings(data_dir=tmp_path, prefix=prefix, rabbitmq_url=url)
    )
    events: list[str] = []

    class Lines:
        def __getattr__(self, level: str) -> Any:
            return lambda event, **_: events.append(event)

    monkeypatch.setattr(runtime, "log", Lines())
    await service.start()
    relay = service._relay
    assert relay is not None
    publish = relay.publish

    async def recorded(messages: Any) -> Any:
        events.append("reply_published")
        return await publish(messages)

    relay.publish = recorded
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        replies = await channel.get_queue(f"{prefix}.replies")
        sent = book(uuid.uuid4()).model_copy(update={"reply_to": f"{prefix}.replies"})
        await channel.default_exchange.publish(
            aio_pika.Message(
                sent.model_dump_json().encode(),
                message_id=str(sent.message_id),
                content_type="application/json",
            ),
            routing_key=f"{prefix}.cmd.flights",
        )
        async with replies.iterator(timeout=10) as incoming:
            async for message in incoming:
                await message.ack()
                break
        for _ in range(100):
            if "command_handled" in events:
                break
            await asyncio.sleep(0.05)
        handled = [e for e in events if e in ("reply_published", "command_handled")]
        assert handled[:2] == ["reply_published", "command_handled"], events
    finally:
        await service.stop()
        await _delete_topology(connection, prefix)


@pytest.mark.rabbitmq
async def test_a_command_answered_from_the_ledger_is_consumed_as_a_duplicate(
    tmp_path: Path, unique: str
) -> None:
    """saga_messages_consumed_total on a command queue: the first delivery of a command is
    `applied`; the same message again, and a new attempt under the same key answered with the
    final answer on record, are `duplicate` (they changed nothing), each with its reply."""
    url = require_rabbitmq()
    prefix = f"dup-{unique}"
    calls.clear()
    service = flights(
        tmp_path, ParticipantSettings(data_dir=tmp_path, prefix=prefix, rabbitmq_url=url)
    )
    await service.start()
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        replies = await channel.get_queue(f"{prefix}.replies")  # declared by the participant
        saga = uuid.uuid4()
        here = {"reply_to": f"{prefix}.replies"}
        refused = book(saga, flight="FULL").model_copy(update=here)  # a final answer
        retried = book(saga, flight="FULL", attempt=2).model_copy(update=here)
        for sent in (refused, refused, retried):
            await channel.default_exchange.publish(
                aio_pika.Message(
                    sent.model_dump_json().encode(),
                    message_id=str(sent.message_id),
                    content_type="application/json",
                ),
                routing_key=f"{prefix}.cmd.flights",
            )

        def consumed(outcome: str) -> float:
            value = service.metrics.registry.get_sample_value(
                "saga_messages_consumed_total",
                {"queue": f"{prefix}.cmd.flights", "outcome": outcome},
            )
            return value or 0.0

        for _ in range(100):  # counted once acked
            if consumed("applied") + consumed("duplicate") == 3:
                break
            await asyncio.sleep(0.1)
        samples = [
            (s.labels, s.value)
            for m in service.metrics.registry.collect()
            for s in m.samples
            if s.name == "saga_messages_consumed_total"
        ]
        assert (consumed("applied"), consumed("duplicate")) == (1.0, 2.0), samples
        assert calls == ["book 1"]  # the handler ran once
        answers = set()
        async with replies.iterator(timeout=10) as incoming:
            async for message in incoming:
                await message.ack()
                answers.add(json.loads(message.body)["causation_id"])
                if len(answers) == 2:
                    break
        assert answers == {str(refused.message_id), str(retried.message_id)}
    finally:
        await service.stop()
        await _delete_topology(connection, prefix)
