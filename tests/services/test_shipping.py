"""The shipping service's rules, on a real database, without a broker."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from saga.participant import Participant
from saga.protocol.envelope import CommandEnvelope, parse_data
from saga_demo import shipping
from saga_demo.contracts.inventory import StockLine
from saga_demo.contracts.shipping import (
    CANCEL,
    SCHEDULE,
    Address,
    CancelShipment,
    ScheduleShipment,
    ShipmentCancelled,
    ShipmentScheduled,
)
from tests.services.helpers import command, participant, row, rows

HOME = Address(
    name="Alice", street="Hauptstrasse 1", city="Berlin", postal_code="10115", country="DE"
)


@pytest.fixture
async def svc(tmp_path: Path) -> AsyncIterator[Participant]:
    async with participant(shipping.build, tmp_path) as service:
        yield service


def schedule(
    saga: uuid.UUID, ref: uuid.UUID, address: Address = HOME, *, attempt: int = 1
) -> CommandEnvelope:
    payload = ScheduleShipment(
        order_ref=ref, address=address, items=[StockLine(sku="BOOK-1", quantity=2)]
    )
    return command(SCHEDULE, payload, saga, attempt=attempt)


def cancel(saga: uuid.UUID, ref: uuid.UUID) -> CommandEnvelope:
    return command(CANCEL, CancelShipment(order_ref=ref), saga)


async def test_schedule_books_the_country_s_carrier(svc: Participant) -> None:
    ref = uuid.uuid4()
    scheduled = parse_data(ShipmentScheduled, (await svc.handle(schedule(uuid.uuid4(), ref))).data)
    assert scheduled.carrier == "DHL"
    stored = await row(svc, shipping.shipments, ref)
    assert stored is not None
    assert (stored["status"], stored["shipment_id"]) == ("SCHEDULED", scheduled.shipment_id)
    assert stored["address"]["city"] == "Berlin"
    assert await shipping.snapshot(svc.ledger) == {"SCHEDULED": 1, "CANCELLED": 0, "TOMBSTONE": 0}


@pytest.mark.parametrize(
    "change",
    [{"country": "JP"}, {"postal_code": "00000"}, {"street": "1 NoWhere Lane"}],
    ids=["country", "postal_code", "street"],
)
async def test_an_undeliverable_address_is_refused(
    svc: Participant, change: dict[str, str]
) -> None:
    address = HOME.model_copy(update=change)
    reply = await svc.handle(schedule(uuid.uuid4(), uuid.uuid4(), address))
    assert (reply.outcome, reply.reason, reply.retryable) == (
        "failure",
        "undeliverable_address",
        False,
    )
    assert await rows(svc, shipping.shipments) == []
    assert len(await svc.ledger.history()) == 1


async def test_slowtown_fails_transiently_on_every_attempt(svc: Participant) -> None:
    saga, ref = uuid.uuid4(), uuid.uuid4()
    slow = HOME.model_copy(update={"city": "Slowtown"})
    for attempt in (1, 2, 3):
        reply = await svc.handle(schedule(saga, ref, slow, attempt=attempt))
        assert (reply.reason, reply.retryable) == ("carrier_unreachable", True)
    assert await svc.ledger.history() == []
    assert await rows(svc, shipping.shipments) == []


async def test_a_repeated_schedule_books_once(svc: Participant) -> None:
    saga, ref = uuid.uuid4(), uuid.uuid4()
    first = await svc.handle(message := schedule(saga, ref))
    assert (await svc.handle(message)).data == first.data
    assert (await svc.handle(schedule(saga, ref, attempt=2))).data == first.data
    assert (await svc.handle(schedule(uuid.uuid4(), ref))).data == first.data
    assert len(await rows(svc, shipping.shipments)) == 1


async def test_cancel_cancels_once_and_refuses_a_late_schedule(svc: Participant) -> None:
    saga, ref = uuid.uuid4(), uuid.uuid4()
    reply = await svc.handle(schedule(saga, ref))
    shipment_id = parse_data(ShipmentScheduled, reply.data).shipment_id
    first = await svc.handle(cancel(saga, ref))
    assert parse_data(ShipmentCancelled, first.data) == ShipmentCancelled(
        shipment_id=shipment_id, nothing_to_undo=False
    )
    assert (await svc.handle(cancel(uuid.uuid4(), ref))).data == first.data
    late = await svc.handle(schedule(uuid.uuid4(), ref))
    assert (late.outcome, late.reason) == ("failure", "shipment_cancelled")
    assert await shipping.snapshot(svc.ledger) == {"SCHEDULED": 0, "CANCELLED": 1, "TOMBSTONE": 0}


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
async def test_a_cancel_before_its_schedule_refuses_the_late_schedule(
    tmp_path: Path, backend: str
) -> None:
    async with participant(shipping.build, tmp_path, backend) as svc:
        saga, ref = uuid.uuid4(), uuid.uuid4()
        undo = await svc.handle(cancel(saga, ref))
        assert parse_data(ShipmentCancelled, undo.data) == ShipmentCancelled(
            shipment_id=None, nothing_to_undo=True
        )
        late = await svc.handle(schedule(saga, ref))
        assert (late.outcome, late.reason, late.retryable) == (
            "failure",
            "already_compensated",
            False,
        )
        assert (await svc.handle(cancel(uuid.uuid4(), ref))).data == undo.data
        assert await shipping.snapshot(svc.ledger) == {
            "SCHEDULED": 0,
            "CANCELLED": 0,
            "TOMBSTONE": 1,
        }
