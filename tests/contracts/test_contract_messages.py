"""Valid messages round-trip; invalid ones are rejected with one readable ContractError."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import pydantic
import pytest

from saga.protocol.envelope import (
    CommandEnvelope,
    ReplyEnvelope,
    StartSaga,
    dump_data,
    parse,
    parse_data,
)
from saga.protocol.types import Contract, ContractError
from saga_demo.checkout import registry
from saga_demo.contracts import (
    Address,
    CancelOrder,
    CancelShipment,
    ChargePayment,
    CreateOrder,
    OrderCancelled,
    OrderCreated,
    OrderLine,
    PaymentCharged,
    PaymentFailure,
    PaymentRefunded,
    RefundPayment,
    ReleaseStock,
    ReserveStock,
    ScheduleShipment,
    ShipmentCancelled,
    ShipmentScheduled,
    StockLine,
    StockReleased,
    StockReserved,
)

SAGA = UUID("00000000-0000-4000-8000-000000000001")
CUSTOMER = UUID("00000000-0000-4000-8000-000000000002")
ITEM_ID = UUID("00000000-0000-4000-8000-000000000003")
LINES = [StockLine(sku="SKU-1", quantity=2), StockLine(sku="SKU-2", quantity=1)]
ADDRESS = Address(name="Ada", street="1 Main St", city="Bern", postal_code="3000", country="CH")

PAYLOADS: dict[str, Contract] = {
    "order.create": CreateOrder(
        order_ref=SAGA,
        customer_id=CUSTOMER,
        items=[
            OrderLine(sku="SKU-1", quantity=2, unit_price=Decimal("10.00")),
            OrderLine(sku="SKU-2", quantity=1, unit_price=Decimal("5.5")),
        ],
        currency="EUR",
    ),
    "order.cancel": CancelOrder(order_ref=SAGA, reason="payment declined"),
    "payment.charge": ChargePayment(
        order_ref=SAGA, customer_id=CUSTOMER, amount=Decimal("25.50"), currency="EUR"
    ),
    "payment.refund": RefundPayment(order_ref=SAGA, customer_id=CUSTOMER),
    "inventory.reserve": ReserveStock(order_ref=SAGA, items=LINES),
    "inventory.release": ReleaseStock(order_ref=SAGA),
    "shipping.schedule": ScheduleShipment(order_ref=SAGA, address=ADDRESS, items=LINES),
    "shipping.cancel": CancelShipment(order_ref=SAGA),
}

REPLIES: dict[str, Contract] = {
    "order.create": OrderCreated(order_id=ITEM_ID, total=Decimal("25.50")),
    "order.cancel": OrderCancelled(order_id=ITEM_ID, nothing_to_undo=False),
    "payment.charge": PaymentCharged(
        payment_id=ITEM_ID, amount=Decimal("25.50"), balance_after=Decimal("0")
    ),
    "payment.refund": PaymentRefunded(
        payment_id=ITEM_ID, amount=Decimal("25.50"), nothing_to_undo=False
    ),
    "inventory.reserve": StockReserved(reservation_id=ITEM_ID),
    "inventory.release": StockReleased(reservation_id=ITEM_ID, nothing_to_undo=False),
    "shipping.schedule": ShipmentScheduled(shipment_id=ITEM_ID, carrier="Post"),
    "shipping.cancel": ShipmentCancelled(shipment_id=ITEM_ID, nothing_to_undo=False),
}

NOTHING_TO_UNDO: list[Contract] = [
    OrderCancelled(order_id=None, nothing_to_undo=True),
    PaymentRefunded(payment_id=None, amount=Decimal("0"), nothing_to_undo=True),
    StockReleased(reservation_id=None, nothing_to_undo=True),
    ShipmentCancelled(shipment_id=None, nothing_to_undo=True),
]


#: the demo's command types, from the checkout saga's steps
COMMANDS = {c.command_type: c for c in registry().commands()}


def command(command_type: str = "payment.charge", attempt: int = 1) -> CommandEnvelope:
    contract = COMMANDS[command_type]
    return CommandEnvelope(
        schema_version=1,
        message_id=UUID(int=100 + attempt),
        idempotency_key=UUID(int=99),
        saga_id=SAGA,
        saga_name="checkout",
        step="charge_payment",
        direction="action" if contract.compensates is None else "compensation",
        attempt=attempt,
        participant=contract.participant,
        command_type=command_type,
        reply_to="saga.replies",
        deadline=datetime(2030, 1, 1, 12, 0, tzinfo=UTC),
        payload=dump_data(PAYLOADS[command_type]),
    )


SUCCESS = ReplyEnvelope.success(command(), REPLIES["payment.charge"], message_id=UUID(int=7))
FAILURE = ReplyEnvelope.failure(
    command(), PaymentFailure.INSUFFICIENT_FUNDS, "balance 3.00 < 25.50", message_id=UUID(int=8)
)
START = StartSaga(
    schema_version=1,
    message_id=UUID(int=9),
    saga_name="checkout",
    key="client-42",
    input={"customer_id": str(CUSTOMER), "items": [{"sku": "SKU-1", "quantity": 2}]},
)

EXAMPLES: list[Contract] = [
    *PAYLOADS.values(),
    *REPLIES.values(),
    *NOTHING_TO_UNDO,
    *(command(t) for t in COMMANDS),
    SUCCESS,
    FAILURE,
    START,
]


def _id(example: Contract) -> str:
    return type(example).__name__


# -- valid messages ----------------------------------------------------------------------------


def test_examples_cover_the_catalog() -> None:
    assert set(PAYLOADS) == set(COMMANDS) == set(REPLIES)
    for command_type, contract in COMMANDS.items():
        assert type(PAYLOADS[command_type]) is contract.payload_model
        assert type(REPLIES[command_type]) is contract.reply_model


@pytest.mark.parametrize("example", EXAMPLES, ids=_id)
def test_round_trip_through_json(example: Contract) -> None:
    raw = example.model_dump_json().encode()
    parsed = parse(type(example), raw)
    assert parsed == example
    assert parsed.model_dump_json() == example.model_dump_json()


@pytest.mark.parametrize("command_type", list(COMMANDS))
def test_payload_and_reply_round_trip_through_envelopes(command_type: str) -> None:
    contract = COMMANDS[command_type]
    cmd = parse(CommandEnvelope, command(command_type).model_dump_json().encode())
    assert contract.payload_model is not None and contract.reply_model is not None
    assert parse_data(contract.payload_model, cmd.payload) == PAYLOADS[command_type]
    reply = parse(
        ReplyEnvelope, ReplyEnvelope.success(cmd, REPLIES[command_type]).model_dump_json().encode()
    )
    assert reply.causation_id == cmd.message_id and reply.command_type == command_type
    assert parse_data(contract.reply_model, reply.data) == REPLIES[command_type]


def test_amounts_are_canonical_decimal_strings() -> None:
    charge = parse(
        ChargePayment,
        PAYLOADS["payment.charge"].model_dump_json().replace("25.50", "25.5").encode(),
    )
    assert charge.amount == Decimal("25.50") and str(charge.amount) == "25.50"
    assert json.loads(charge.model_dump_json())["amount"] == "25.50"


def test_order_total() -> None:
    order = PAYLOADS["order.create"]
    assert isinstance(order, CreateOrder)
    assert order.total == Decimal("25.50")


def test_reply_helpers_correlate_with_the_command() -> None:
    cmd = command()
    assert (SUCCESS.causation_id, SUCCESS.saga_id) == (cmd.message_id, cmd.saga_id)
    assert (SUCCESS.participant, SUCCESS.command_type) == ("payment", "payment.charge")
    assert SUCCESS.outcome == "success" and SUCCESS.reason is None and not SUCCESS.retryable
    assert FAILURE.outcome == "failure" and FAILURE.data == {}
    assert FAILURE.reason == "insufficient_funds" and type(FAILURE.reason) is str
    retry = ReplyEnvelope.failure(cmd, "timeout", retryable=True)
    assert retry.retryable and retry.message_id not in (SUCCESS.message_id, FAILURE.message_id)


def test_attempts_share_the_idempotency_key_not_the_message_id() -> None:
    first, second = command(attempt=1), command(attempt=2)
    assert first.idempotency_key == second.idempotency_key
    assert first.message_id != second.message_id


def test_python_construction_is_strict() -> None:
    good: dict[str, Any] = {
        "order_ref": SAGA,
        "customer_id": CUSTOMER,
        "amount": Decimal("1"),
        "currency": "EUR",
    }
    assert ChargePayment(**good).amount == Decimal("1.00")
    for field, loose in [("order_ref", str(SAGA)), ("amount", 12.5), ("amount", 1)]:
        with pytest.raises(pydantic.ValidationError, match=field):
            ChargePayment(**{**good, field: loose})


@pytest.mark.parametrize("example", EXAMPLES, ids=_id)
def test_models_are_frozen(example: Contract) -> None:
    name = next(iter(type(example).model_fields))
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        setattr(example, name, getattr(example, name))


# -- invalid messages --------------------------------------------------------------------------

DROP = object()
BY_NAME: dict[str, Contract] = {
    "charge": PAYLOADS["payment.charge"],
    "charged": REPLIES["payment.charge"],
    "refunded0": NOTHING_TO_UNDO[1],
    "order": PAYLOADS["order.create"],
    "cancel": PAYLOADS["order.cancel"],
    "cancelled": REPLIES["order.cancel"],
    "refund": PAYLOADS["payment.refund"],
    "reserve": PAYLOADS["inventory.reserve"],
    "release": PAYLOADS["inventory.release"],
    "ship": PAYLOADS["shipping.schedule"],
    "command": command(),
    "success": SUCCESS,
    "failure": FAILURE,
    "start": START,
}
MANY_LINES = [{"sku": f"S{i}", "quantity": 1} for i in range(51)]
AMOUNT_MAX = "less than or equal to 1000000"
NOT_UNDONE = "order_id must be null exactly when nothing_to_undo is true"

# (example, dotted path to change, new value or DROP, expected "location: message" prefix)
INVALID: list[tuple[str, str, Any, str]] = [
    ("charge", "amount", "-5.00", "amount: Input should be greater than 0"),
    ("charge", "amount", "0", "amount: Input should be greater than 0"),
    ("charge", "amount", "1.005", "amount: Decimal input should have no more than 2 decimal"),
    ("charge", "amount", "1000000.01", f"amount: Input should be {AMOUNT_MAX}"),
    ("charge", "amount", 25.5, "amount: Input should be a decimal string"),
    ("charge", "amount", "1e3", "amount: Input should be a plain decimal string"),
    ("charge", "amount", "NaN", "amount: Input should be a plain decimal string"),
    ("charged", "balance_after", "-0.01", "balance_after: Input should be greater than or equal"),
    ("command", "priority", "high", "priority: Extra inputs are not permitted"),
    ("ship", "address.floor", 3, "address.floor: Extra inputs are not permitted"),
    ("command", "deadline", "2030-01-01T12:00:00", "deadline: Input should have timezone info"),
    ("command", "deadline", "tomorrow", "deadline: Input should be a valid datetime"),
    ("command", "saga_id", "not-a-uuid", "saga_id: Input should be a valid UUID"),
    ("release", "order_ref", 12, "order_ref: UUID input should be a string"),
    ("charge", "currency", "eur", "currency: String should match pattern"),
    ("order", "currency", "EURO", "currency: String should match pattern"),
    ("order", "items", [], "items: List should have at least 1 item"),
    ("reserve", "items", MANY_LINES, "items: List should have at most 50 items"),
    ("reserve", "items.1.sku", "SKU-1", "items: sku SKU-1 appears more than once"),
    ("order", "items.0.quantity", 0, "items.0.quantity: Input should be greater than or equal"),
    ("order", "items.0.quantity", "2", "items.0.quantity: Input should be a valid integer"),
    ("order", "items.0.sku", "sku 1", "items.0.sku: String should match pattern"),
    ("order", "items.0.unit_price", "999999.99", "(message): order total must not exceed"),
    ("ship", "address.country", "Switzerland", "address.country: String should match pattern"),
    ("cancel", "reason", "   ", "reason: String should match pattern"),
    ("refund", "customer_id", DROP, "customer_id: Field required"),
    ("command", "schema_version", 2, "schema_version: Input should be 1"),
    ("start", "schema_version", "1", "schema_version: Input should be 1"),
    ("command", "attempt", 0, "attempt: Input should be greater than or equal to 1"),
    ("command", "step", "Charge Payment", "step: String should match pattern"),
    ("command", "direction", "undo", "direction: Input should be 'action' or 'compensation'"),
    ("command", "payload", [1, 2], "payload: Input should be an object"),
    ("start", "key", "", "key: String should have at least 1 character"),
    ("failure", "reason", None, "(message): a failure reply needs a reason"),
    ("failure", "reason", DROP, "(message): a failure reply needs a reason"),
    ("success", "reason", "out_of_stock", "(message): a success reply must not have a reason"),
    ("success", "retryable", True, "(message): a success reply cannot be retryable"),
    ("failure", "retryable", "true", "retryable: Input should be a valid boolean"),
    ("failure", "reason", "Out Of Stock", "reason: String should match pattern"),
    ("success", "outcome", "ok", "outcome: Input should be 'success' or 'failure'"),
    ("cancelled", "order_id", None, f"(message): {NOT_UNDONE}"),
    ("refunded0", "amount", "1.00", "(message): amount must be 0 when nothing_to_undo is true"),
]


def _patched(example: Contract, path: str, value: Any) -> bytes:
    doc = json.loads(example.model_dump_json())
    *parents, last = path.split(".")
    node: Any = doc
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if value is DROP:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("name", "path", "value", "expected"),
    INVALID,
    ids=[f"{name}.{path}={'DROP' if v is DROP else v!r}"[:50] for name, path, v, _ in INVALID],
)
def test_invalid_messages_are_rejected_readably(
    name: str, path: str, value: Any, expected: str
) -> None:
    example = BY_NAME[name]
    with pytest.raises(ContractError) as info:
        parse(type(example), _patched(example, path, value))
    error = info.value
    assert isinstance(error, ValueError)
    assert error.reason == "schema_violation"
    assert error.detail.startswith(f"invalid {type(example).__name__}: ")
    assert expected in error.detail, error.detail
    assert any(line.startswith(expected) for line in error.errors), error.errors


def test_invalid_examples_are_valid_unpatched() -> None:
    for example in BY_NAME.values():
        assert parse(type(example), example.model_dump_json().encode()) == example


def test_every_field_error_is_listed() -> None:
    doc = json.loads(PAYLOADS["payment.charge"].model_dump_json())
    doc.update(amount="-1", currency="eur", order_ref="x")
    with pytest.raises(ContractError) as info:
        parse(ChargePayment, json.dumps(doc).encode())
    assert [line.split(":")[0] for line in info.value.errors] == ["order_ref", "amount", "currency"]


def test_detail_does_not_echo_input() -> None:
    doc = json.loads(command().model_dump_json())
    secret = "S" * 5000
    doc.update(step=secret, reply_to=secret)
    doc.update({f"{secret}{i}": 1 for i in range(30)})
    with pytest.raises(ContractError) as info:
        parse(CommandEnvelope, json.dumps(doc).encode())
    detail = info.value.detail
    assert len(info.value.errors) == 32
    assert "and 12 more" in detail
    assert "S" * 50 not in detail
    assert len(detail) < 3000


def test_parse_data_reports_like_parse() -> None:
    with pytest.raises(ContractError) as info:
        parse_data(ChargePayment, {"order_ref": str(SAGA)})
    assert info.value.reason == "schema_violation"
    assert "customer_id: Field required" in info.value.detail


# -- raw input -----------------------------------------------------------------------------


def test_limit_is_inclusive() -> None:
    raw = START.model_dump_json().encode()
    assert parse(StartSaga, raw, max_bytes=len(raw)) == START
    with pytest.raises(ContractError) as info:
        parse(StartSaga, raw, max_bytes=len(raw) - 1)
    assert info.value.reason == "too_large"


def test_oversize_is_rejected_before_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("oversize input must not be parsed")

    monkeypatch.setattr(StartSaga, "model_validate_json", explode)
    raw = b"\xff" + b"{" * (256 * 1024)  # neither UTF-8 nor JSON: size is checked first
    with pytest.raises(ContractError) as info:
        parse(StartSaga, raw)
    assert info.value.reason == "too_large"
    assert str(256 * 1024) in info.value.detail
    assert len(info.value.detail) < 100


def test_default_limit_accepts_a_large_valid_message() -> None:
    message = START.model_copy(update={"input": {"blob": "x" * 200_000}})
    assert parse(StartSaga, message.model_dump_json().encode()) == message


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b'{"key": "\xff\xfe"}', "invalid_utf8"),
        (b"\xef\xbb\xbf\xc3", "invalid_utf8"),
        (b"", "invalid_json"),
        (b"{", "invalid_json"),
        (b"{'key': 1}", "invalid_json"),
        (b"{} trailing", "invalid_json"),
        (b"[]", "schema_violation"),
        (b"null", "schema_violation"),
        (b"{}", "schema_violation"),
    ],
)
def test_raw_input_reason_codes(raw: bytes, reason: str) -> None:
    with pytest.raises(ContractError) as info:
        parse(StartSaga, raw)
    assert info.value.reason == reason
    assert info.value.detail
    assert str(info.value).startswith(f"{reason}: ")
