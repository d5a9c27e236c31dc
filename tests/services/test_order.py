"""The order service's rules, on a real database, without a broker."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import pytest

from saga.participant import Participant
from saga.protocol.envelope import CommandEnvelope, parse_data
from saga_demo import order
from saga_demo.contracts.order import (
    CANCEL,
    CREATE,
    CancelOrder,
    CreateOrder,
    OrderCancelled,
    OrderCreated,
    OrderLine,
)
from tests.services.helpers import command, participant, row, rows

CUSTOMER = uuid.UUID(int=42)


@pytest.fixture
async def svc(tmp_path: Path) -> AsyncIterator[Participant]:
    async with participant(order.build, tmp_path) as service:
        yield service


def create(saga: uuid.UUID, ref: uuid.UUID, *lines: tuple[str, int, str]) -> CommandEnvelope:
    items = [OrderLine(sku=s, quantity=q, unit_price=Decimal(p)) for s, q, p in lines]
    payload = CreateOrder(order_ref=ref, customer_id=CUSTOMER, items=items, currency="EUR")
    return command(CREATE, payload, saga)


def cancel(saga: uuid.UUID, ref: uuid.UUID) -> CommandEnvelope:
    return command(CANCEL, CancelOrder(order_ref=ref, reason="payment failed"), saga)


BOOKS = ("BOOK-1", 3, "19.99")
LAMP = ("LAMP-2", 1, "0.10")


async def test_create_records_the_order_with_its_exact_total(svc: Participant) -> None:
    ref = uuid.uuid4()
    reply = await svc.handle(create(uuid.uuid4(), ref, BOOKS, LAMP))
    created = parse_data(OrderCreated, reply.data)
    assert created.total == Decimal("60.07")
    assert reply.data["total"] == "60.07"
    stored = await row(svc, order.orders, ref)
    assert stored is not None
    assert stored["status"] == "CREATED"
    assert stored["order_id"] == created.order_id
    assert stored["total"] == Decimal("60.07")
    assert stored["items"][0] == {"sku": "BOOK-1", "quantity": 3, "unit_price": "19.99"}
    assert await order.snapshot(svc.ledger) == {"CREATED": 1, "CANCELLED": 0}


async def test_create_is_idempotent_by_order_ref(svc: Participant) -> None:
    saga, ref = uuid.uuid4(), uuid.uuid4()
    first = await svc.handle(message := create(saga, ref, BOOKS))
    assert (await svc.handle(message)).data == first.data
    retried = create(saga, ref, BOOKS).model_copy(update={"attempt": 2})
    assert (await svc.handle(retried)).data == first.data
    assert (await svc.handle(create(uuid.uuid4(), ref, BOOKS))).data == first.data
    assert len(await rows(svc, order.orders)) == 1
    assert len(await svc.ledger.history()) == 2  # two sagas, one order


async def test_cancel_cancels_once_and_answers_the_same_again(svc: Participant) -> None:
    saga, ref = uuid.uuid4(), uuid.uuid4()
    order_id = parse_data(OrderCreated, (await svc.handle(create(saga, ref, BOOKS))).data).order_id
    first = await svc.handle(cancel(saga, ref))
    assert parse_data(OrderCancelled, first.data) == OrderCancelled(
        order_id=order_id, nothing_to_undo=False
    )
    assert (await svc.handle(cancel(uuid.uuid4(), ref))).data == first.data
    stored = await row(svc, order.orders, ref)
    assert stored is not None
    assert (stored["status"], stored["cancel_reason"]) == ("CANCELLED", "payment failed")
    assert stored["cancelled_at"] is not None
    assert await order.snapshot(svc.ledger) == {"CREATED": 0, "CANCELLED": 1}


async def test_a_cancel_before_the_create_refuses_the_late_create(svc: Participant) -> None:
    saga, ref = uuid.uuid4(), uuid.uuid4()
    undo = await svc.handle(cancel(saga, ref))
    assert parse_data(OrderCancelled, undo.data) == OrderCancelled(
        order_id=None, nothing_to_undo=True
    )
    late = await svc.handle(create(saga, ref, BOOKS))
    assert (late.outcome, late.reason, late.retryable) == ("failure", "already_compensated", False)
    stored = await row(svc, order.orders, ref)
    assert stored is not None
    assert (stored["status"], stored["order_id"], stored["total"]) == ("CANCELLED", None, None)
    again = await svc.handle(cancel(uuid.uuid4(), ref))
    assert again.data == undo.data


async def test_a_create_after_its_cancel_is_refused(svc: Participant) -> None:
    ref = uuid.uuid4()
    await svc.handle(create(uuid.uuid4(), ref, BOOKS))
    await svc.handle(cancel(uuid.uuid4(), ref))
    late = await svc.handle(create(uuid.uuid4(), ref, BOOKS))
    assert (late.outcome, late.reason) == ("failure", "order_cancelled")
    assert await order.snapshot(svc.ledger) == {"CREATED": 0, "CANCELLED": 1}


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
async def test_orders_on_each_backend(tmp_path: Path, backend: str) -> None:
    async with participant(order.build, tmp_path, backend) as svc:
        refs = [uuid.uuid4() for _ in range(3)]
        for ref in refs:
            reply = await svc.handle(create(uuid.uuid4(), ref, BOOKS, LAMP))
            assert reply.data["total"] == "60.07"
        await svc.handle(cancel(uuid.uuid4(), refs[0]))
        await svc.handle(cancel(uuid.uuid4(), uuid.uuid4()))
        assert await order.snapshot(svc.ledger) == {"CREATED": 2, "CANCELLED": 2}
        stored = await row(svc, order.orders, refs[1])
        assert stored is not None
        assert stored["total"] == Decimal("60.07")
