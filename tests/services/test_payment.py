"""The payment service's rules, on a real database, without a broker."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa

from saga.participant import Participant
from saga.protocol.envelope import CommandEnvelope, ReplyEnvelope, parse_data
from saga_demo import payment
from saga_demo.contracts.payment import (
    CHARGE,
    REFUND,
    ChargePayment,
    PaymentCharged,
    PaymentRefunded,
    RefundPayment,
)
from tests.services.helpers import command, participant, row, rows

SEEDED = {"alice": Decimal("500.00"), "bob": Decimal("20.00"), "carol": Decimal("1000.00")}
SEEDED["dave"] = Decimal("400.00")


@pytest.fixture
async def svc(tmp_path: Path) -> AsyncIterator[Participant]:
    async with participant(payment.build, tmp_path) as service:
        yield service


def charge(
    saga: uuid.UUID,
    ref: uuid.UUID,
    customer: uuid.UUID,
    amount: str,
    currency: str = "EUR",
    *,
    attempt: int = 1,
) -> CommandEnvelope:
    payload = ChargePayment(
        order_ref=ref, customer_id=customer, amount=Decimal(amount), currency=currency
    )
    return command(CHARGE, payload, saga, attempt=attempt)


def refund(saga: uuid.UUID, ref: uuid.UUID, customer: uuid.UUID) -> CommandEnvelope:
    return command(REFUND, RefundPayment(order_ref=ref, customer_id=customer), saga)


def charged(reply: ReplyEnvelope) -> PaymentCharged:
    assert reply.outcome == "success", reply
    return parse_data(PaymentCharged, reply.data)


def refunded(reply: ReplyEnvelope) -> PaymentRefunded:
    assert reply.outcome == "success", reply
    return parse_data(PaymentRefunded, reply.data)


async def test_a_charge_debits_exactly_the_amount(svc: Participant) -> None:
    ref = uuid.uuid4()
    result = charged(await svc.handle(charge(uuid.uuid4(), ref, payment.ALICE, "123.45")))
    assert result.amount == Decimal("123.45")
    assert result.balance_after == Decimal("376.55")
    balances = await payment.snapshot(svc.ledger)
    assert balances == {**SEEDED, "alice": Decimal("376.55")}
    assert all(type(b) is Decimal for b in balances.values())
    stored = await row(svc, payment.payments, ref)
    assert stored is not None
    assert stored["status"] == "CHARGED"
    assert stored["amount"] == Decimal("123.45")
    assert stored["payment_id"] == result.payment_id


async def test_a_charge_may_reach_the_limit_and_empty_the_account(svc: Participant) -> None:
    charged(await svc.handle(charge(uuid.uuid4(), uuid.uuid4(), payment.ALICE, "300.00")))
    result = charged(await svc.handle(charge(uuid.uuid4(), uuid.uuid4(), payment.BOB, "20.00")))
    assert result.balance_after == Decimal("0.00")
    balances = await payment.snapshot(svc.ledger)
    assert balances["alice"] == Decimal("200.00")
    assert balances["bob"] == Decimal("0.00")


async def test_a_balance_above_one_charge_s_maximum_is_answered_as_it_is(
    svc: Participant,
) -> None:
    """The reply's balance holds what the ledger's NUMERIC(12, 2) holds, not only what one
    charge may move: an account with millions in it can still be charged."""
    async with svc.ledger.begin() as conn:
        await conn.execute(
            sa.update(payment.accounts)
            .where(payment.accounts.c.customer_id == payment.ALICE)
            .values(balance=Decimal("5000000.00"), per_charge_limit=None)
        )
    result = charged(await svc.handle(charge(uuid.uuid4(), uuid.uuid4(), payment.ALICE, "10.00")))
    assert result.balance_after == Decimal("4999990.00")
    assert (await payment.snapshot(svc.ledger))["alice"] == Decimal("4999990.00")


@pytest.mark.parametrize(
    ("customer", "amount", "currency", "reason"),
    [
        (uuid.UUID(int=7), "10.00", "EUR", "unknown_customer"),
        (payment.ALICE, "10.00", "USD", "currency_mismatch"),
        (payment.ALICE, "300.01", "EUR", "limit_exceeded"),
        (payment.CAROL, "50.01", "EUR", "limit_exceeded"),
        (payment.BOB, "20.01", "EUR", "insufficient_funds"),
    ],
)
async def test_a_refused_charge_changes_nothing_and_is_final(
    svc: Participant, customer: uuid.UUID, amount: str, currency: str, reason: str
) -> None:
    saga = uuid.uuid4()
    reply = await svc.handle(charge(saga, uuid.uuid4(), customer, amount, currency))
    assert (reply.outcome, reply.reason, reply.retryable) == ("failure", reason, False)
    assert await payment.snapshot(svc.ledger) == SEEDED
    assert await rows(svc, payment.payments) == []
    [recorded] = await svc.ledger.history()
    assert (recorded["outcome"], recorded["reason"]) == ("failure", reason)
    again = await svc.handle(charge(saga, uuid.uuid4(), customer, amount, currency, attempt=2))
    assert (again.outcome, again.reason, again.retryable) == ("failure", reason, False)


async def test_a_redelivered_or_retried_charge_debits_once(svc: Participant) -> None:
    saga, ref = uuid.uuid4(), uuid.uuid4()
    first = await svc.handle(message := charge(saga, ref, payment.ALICE, "40.00"))
    redelivered = await svc.handle(message)
    retried = await svc.handle(charge(saga, ref, payment.ALICE, "40.00", attempt=2))
    assert first.data == redelivered.data == retried.data
    assert retried.causation_id != first.causation_id
    assert (await payment.snapshot(svc.ledger))["alice"] == Decimal("460.00")
    assert len(await svc.ledger.history()) == 1
    assert svc.duplicates == 2


async def test_a_second_charge_of_the_same_order_gets_the_first_reply(svc: Participant) -> None:
    ref = uuid.uuid4()
    first = await svc.handle(charge(uuid.uuid4(), ref, payment.ALICE, "40.00"))
    second = await svc.handle(charge(uuid.uuid4(), ref, payment.ALICE, "40.00"))
    assert charged(first) == charged(second)
    assert (await payment.snapshot(svc.ledger))["alice"] == Decimal("460.00")
    assert len(await rows(svc, payment.payments)) == 1


async def test_a_refund_credits_back_exactly_once(svc: Participant) -> None:
    saga, ref = uuid.uuid4(), uuid.uuid4()
    payment_id = charged(await svc.handle(charge(saga, ref, payment.CAROL, "49.99"))).payment_id
    assert (await payment.snapshot(svc.ledger))["carol"] == Decimal("950.01")
    first = await svc.handle(message := refund(saga, ref, payment.CAROL))
    assert refunded(first) == PaymentRefunded(
        payment_id=payment_id, amount=Decimal("49.99"), nothing_to_undo=False
    )
    assert (await svc.handle(message)).data == first.data
    other_saga = await svc.handle(refund(uuid.uuid4(), ref, payment.CAROL))
    assert other_saga.data == first.data
    assert await payment.snapshot(svc.ledger) == SEEDED
    stored = await row(svc, payment.payments, ref)
    assert stored is not None
    assert stored["status"] == "REFUNDED"


async def test_a_refund_before_its_charge_refuses_the_late_charge(svc: Participant) -> None:
    saga, ref = uuid.uuid4(), uuid.uuid4()
    undo = refunded(await svc.handle(refund(saga, ref, payment.ALICE)))
    assert undo == PaymentRefunded(payment_id=None, amount=Decimal("0.00"), nothing_to_undo=True)
    late = await svc.handle(charge(saga, ref, payment.ALICE, "10.00"))
    assert (late.outcome, late.reason, late.retryable) == ("failure", "already_compensated", False)
    assert await payment.snapshot(svc.ledger) == SEEDED
    stored = await row(svc, payment.payments, ref)
    assert stored is not None
    assert (stored["status"], stored["payment_id"]) == ("TOMBSTONE", None)
    again = refunded(await svc.handle(refund(uuid.uuid4(), ref, payment.ALICE)))
    assert again.nothing_to_undo


async def test_a_charge_after_its_refund_is_refused(svc: Participant) -> None:
    ref = uuid.uuid4()
    await svc.handle(charge(uuid.uuid4(), ref, payment.ALICE, "10.00"))
    await svc.handle(refund(uuid.uuid4(), ref, payment.ALICE))
    late = await svc.handle(charge(uuid.uuid4(), ref, payment.ALICE, "10.00"))
    assert (late.outcome, late.reason) == ("failure", "payment_cancelled")
    assert await payment.snapshot(svc.ledger) == SEEDED


async def test_a_flaky_gateway_fails_the_first_attempt_only(svc: Participant) -> None:
    saga, ref = uuid.uuid4(), uuid.uuid4()
    first = await svc.handle(charge(saga, ref, payment.DAVE, "50.00"))
    assert (first.outcome, first.reason, first.retryable) == ("failure", "gateway_timeout", True)
    assert await svc.ledger.history() == []
    assert await rows(svc, payment.payments) == []
    assert await payment.snapshot(svc.ledger) == SEEDED
    second = charged(await svc.handle(charge(saga, ref, payment.DAVE, "50.00", attempt=2)))
    assert second.balance_after == Decimal("350.00")
    assert len(await svc.ledger.history()) == 1


async def test_a_redelivered_message_gets_its_first_reply_even_a_transient_one(
    svc: Participant,
) -> None:
    """The orchestrator may have applied that retryable failure already: running the handler
    again for the same message could produce a success it never sees, an effect never undone."""
    saga, ref = uuid.uuid4(), uuid.uuid4()
    message = charge(saga, ref, payment.DAVE, "50.00")
    first = await svc.handle(message)
    assert (first.outcome, first.retryable) == ("failure", True)
    async with svc.ledger.begin() as conn:  # the gateway recovers
        await conn.execute(sa.update(payment.accounts).values(flaky=False))
    again = await svc.handle(message)
    assert again == first
    assert await rows(svc, payment.payments) == []
    assert await payment.snapshot(svc.ledger) == SEEDED
    second = charged(await svc.handle(charge(saga, ref, payment.DAVE, "50.00", attempt=2)))
    assert second.balance_after == Decimal("350.00")


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
async def test_money_is_conserved_across_charges_and_refunds(tmp_path: Path, backend: str) -> None:
    async with participant(payment.build, tmp_path, backend) as svc:
        assert await payment.snapshot(svc.ledger) == SEEDED
        plan = [
            (payment.ALICE, "0.01"),
            (payment.ALICE, "299.99"),
            (payment.BOB, "19.99"),
            (payment.CAROL, "33.33"),
            (payment.DAVE, "0.10"),
        ]
        sagas = [(uuid.uuid4(), uuid.uuid4(), customer, amount) for customer, amount in plan]
        for saga, ref, customer, amount in sagas:
            await svc.handle(charge(saga, ref, customer, amount, attempt=2))
        balances = await payment.snapshot(svc.ledger)
        taken = sum((Decimal(amount) for _, amount in plan), Decimal("0"))
        assert sum(balances.values()) == sum(SEEDED.values()) - taken
        assert balances["alice"] == Decimal("200.00")
        for saga, ref, customer, _ in sagas:
            assert not refunded(await svc.handle(refund(saga, ref, customer))).nothing_to_undo
        assert await payment.snapshot(svc.ledger) == SEEDED


async def test_amounts_are_stored_as_exact_decimals(svc: Participant) -> None:
    await svc.handle(charge(uuid.uuid4(), uuid.uuid4(), payment.ALICE, "0.10"))
    query = sa.text("SELECT balance, typeof(balance) FROM accounts WHERE name = 'alice'")
    async with svc.ledger.reader.connect() as conn:
        assert (await conn.execute(query)).one() == ("499.90", "text")
    async with svc.ledger.begin() as conn:
        with pytest.raises(sa.exc.StatementError, match="Decimal, not float"):
            await conn.execute(payment.accounts.update().values(balance=1.5))


async def test_seeding_again_keeps_live_balances(svc: Participant) -> None:
    await svc.handle(charge(uuid.uuid4(), uuid.uuid4(), payment.BOB, "5.00"))
    await svc.setup_database()
    assert (await payment.snapshot(svc.ledger))["bob"] == Decimal("15.00")
