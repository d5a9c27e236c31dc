"""The inventory service's rules, on a real database, without a broker."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from saga.participant import Participant
from saga.protocol.envelope import CommandEnvelope, parse_data
from saga_demo import inventory
from saga_demo.contracts.inventory import (
    RELEASE,
    RESERVE,
    ReleaseStock,
    ReserveStock,
    StockLine,
    StockReleased,
    StockReserved,
)
from saga_demo.inventory import BOOK, LAMP, RARE
from tests.services.helpers import command, participant, row, rows

SEEDED = {BOOK: 100, LAMP: 10, RARE: 0}


@pytest.fixture
async def svc(tmp_path: Path) -> AsyncIterator[Participant]:
    async with participant(inventory.build, tmp_path) as service:
        yield service


def reserve(
    saga: uuid.UUID, ref: uuid.UUID, *lines: tuple[str, int], attempt: int = 1
) -> CommandEnvelope:
    items = [StockLine(sku=sku, quantity=quantity) for sku, quantity in lines]
    return command(RESERVE, ReserveStock(order_ref=ref, items=items), saga, attempt=attempt)


def release(saga: uuid.UUID, ref: uuid.UUID) -> CommandEnvelope:
    return command(RELEASE, ReleaseStock(order_ref=ref), saga)


async def test_reserve_takes_every_line_from_available(svc: Participant) -> None:
    ref = uuid.uuid4()
    reply = await svc.handle(reserve(uuid.uuid4(), ref, (BOOK, 7), (LAMP, 10)))
    reserved = parse_data(StockReserved, reply.data)
    assert await inventory.snapshot(svc.ledger) == {BOOK: 93, LAMP: 0, RARE: 0}
    stock = {r["sku"]: (r["on_hand"], r["reserved"]) for r in await rows(svc, inventory.stock)}
    assert stock[BOOK] == (100, 7)
    stored = await row(svc, inventory.reservations, ref)
    assert stored is not None
    assert (stored["status"], stored["reservation_id"]) == ("RESERVED", reserved.reservation_id)


@pytest.mark.parametrize(
    ("lines", "reason"),
    [
        (((BOOK, 1), ("NOPE-0", 1)), "unknown_sku"),
        (((LAMP, 11),), "out_of_stock"),
        (((BOOK, 5), (RARE, 1)), "out_of_stock"),
    ],
)
async def test_a_refused_reservation_changes_nothing(
    svc: Participant, lines: tuple[tuple[str, int], ...], reason: str
) -> None:
    reply = await svc.handle(reserve(uuid.uuid4(), uuid.uuid4(), *lines))
    assert (reply.outcome, reply.reason, reply.retryable) == ("failure", reason, False)
    assert await inventory.snapshot(svc.ledger) == SEEDED
    assert await rows(svc, inventory.reservations) == []


async def test_the_last_units_go_to_one_order_only(svc: Participant) -> None:
    first = await svc.handle(reserve(uuid.uuid4(), uuid.uuid4(), (LAMP, 9)))
    second = await svc.handle(reserve(uuid.uuid4(), uuid.uuid4(), (LAMP, 2)))
    third = await svc.handle(reserve(uuid.uuid4(), uuid.uuid4(), (LAMP, 1)))
    assert (first.outcome, second.reason, third.outcome) == ("success", "out_of_stock", "success")
    assert (await inventory.snapshot(svc.ledger))[LAMP] == 0


async def test_a_repeated_reservation_reserves_once(svc: Participant) -> None:
    saga, ref = uuid.uuid4(), uuid.uuid4()
    first = await svc.handle(message := reserve(saga, ref, (LAMP, 4)))
    assert (await svc.handle(message)).data == first.data
    assert (await svc.handle(reserve(saga, ref, (LAMP, 4), attempt=2))).data == first.data
    assert (await svc.handle(reserve(uuid.uuid4(), ref, (LAMP, 4)))).data == first.data
    assert (await inventory.snapshot(svc.ledger))[LAMP] == 6


async def test_release_restores_exactly_once(svc: Participant) -> None:
    saga, ref = uuid.uuid4(), uuid.uuid4()
    reply = await svc.handle(reserve(saga, ref, (BOOK, 30), (LAMP, 2)))
    reservation_id = parse_data(StockReserved, reply.data).reservation_id
    first = await svc.handle(release(saga, ref))
    assert parse_data(StockReleased, first.data) == StockReleased(
        reservation_id=reservation_id, nothing_to_undo=False
    )
    assert (await svc.handle(release(uuid.uuid4(), ref))).data == first.data
    assert await inventory.snapshot(svc.ledger) == SEEDED
    stored = await row(svc, inventory.reservations, ref)
    assert stored is not None
    assert stored["status"] == "RELEASED"
    late = await svc.handle(reserve(uuid.uuid4(), ref, (BOOK, 30)))
    assert (late.outcome, late.reason) == ("failure", "reservation_cancelled")
    assert await inventory.snapshot(svc.ledger) == SEEDED


async def test_a_release_before_its_reserve_refuses_the_late_reserve(svc: Participant) -> None:
    saga, ref = uuid.uuid4(), uuid.uuid4()
    undo = await svc.handle(release(saga, ref))
    assert parse_data(StockReleased, undo.data) == StockReleased(
        reservation_id=None, nothing_to_undo=True
    )
    late = await svc.handle(reserve(saga, ref, (BOOK, 1)))
    assert (late.outcome, late.reason, late.retryable) == (
        "failure",
        "already_compensated",  # the library's tombstone answers before the handler
        False,
    )
    assert await inventory.snapshot(svc.ledger) == SEEDED
    stored = await row(svc, inventory.reservations, ref)
    assert stored is not None
    assert (stored["status"], stored["reservation_id"]) == ("TOMBSTONE", None)
    assert (await svc.handle(release(uuid.uuid4(), ref))).data == undo.data


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
async def test_stock_is_conserved_across_reserve_and_release(tmp_path: Path, backend: str) -> None:
    async with participant(inventory.build, tmp_path, backend) as svc:
        plan = [((BOOK, 10), (LAMP, 3)), ((BOOK, 90),), ((LAMP, 7),)]
        sagas = [(uuid.uuid4(), uuid.uuid4(), lines) for lines in plan]
        for saga, ref, lines in sagas:
            assert (await svc.handle(reserve(saga, ref, *lines))).outcome == "success"
        assert await inventory.snapshot(svc.ledger) == {BOOK: 0, LAMP: 0, RARE: 0}
        refused = await svc.handle(reserve(uuid.uuid4(), uuid.uuid4(), (BOOK, 1)))
        assert refused.reason == "out_of_stock"
        for saga, ref, _ in sagas:
            await svc.handle(release(saga, ref))
        assert await inventory.snapshot(svc.ledger) == SEEDED
        on_hand = {r["sku"]: r["on_hand"] for r in await rows(svc, inventory.stock)}
        assert on_hand == SEEDED
