"""Fuzzing every decoder: whatever arrives, a valid message or one ContractError comes out.

For arbitrary bytes, arbitrary JSON, and valid messages with random damage (fields dropped or
repeated, types swapped, huge strings, deep nesting, odd unicode, NaN and Infinity, numbers as
strings and back, extra fields, broken bytes), ``parse`` and ``parse_data`` either return the model
or raise :class:`ContractError` with a known reason and a short detail that does not echo the
input; anything they accept survives ``model_dump_json`` and parsing again unchanged. The last two
tests push such messages through the orchestrator's consumers and a participant's consumer on a
:class:`MemoryBroker`: each message is applied, ignored or dead-lettered with the right reason,
never handed back to the queue, and the consumers keep going.

``SAGA_FUZZ_EXAMPLES`` sets the examples per decoder test (the two consumer tests run half that);
the default, 300, keeps this file well under 30 s. ``scripts/fuzz`` runs 20,000 (160,000 in all).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import JsonValue
from pydantic_core import from_json

from saga.orchestrator.service import OrchestratorService
from saga.participant import ParticipantSettings
from saga.protocol.envelope import (
    DEFAULT_MAX_BYTES,
    CommandEnvelope,
    ReplyEnvelope,
    StartSaga,
    dump_data,
    parse,
    parse_data,
)
from saga.protocol.types import Contract, ContractError
from saga.settings import load_settings
from saga.transport.broker import IncomingMessage
from saga.transport.memory import MemoryBroker
from saga.transport.topology import DEAD_LETTER_DETAIL, DEAD_LETTER_QUEUE, DEAD_LETTER_REASON
from saga_demo import order
from saga_demo.contracts import (
    CancelOrder,
    CancelShipment,
    ChargePayment,
    CreateOrder,
    OrderCancelled,
    OrderCreated,
    PaymentCharged,
    PaymentRefunded,
    RefundPayment,
    ReleaseStock,
    ReserveStock,
    ScheduleShipment,
    ShipmentCancelled,
    ShipmentScheduled,
    StockReleased,
    StockReserved,
)
from tests.support.catalog import CATALOG
from tests.support.sagas import registry

EXAMPLES = int(os.environ.get("SAGA_FUZZ_EXAMPLES", "300"))
CONSUMER_EXAMPLES = max(10, EXAMPLES // 2)

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
        HealthCheck.filter_too_much,
    ],
)
CONSUMER_FUZZ = settings(FUZZ, max_examples=CONSUMER_EXAMPLES)

REASONS = {"too_large", "invalid_utf8", "invalid_json", "schema_violation"}
MAX_DETAIL = 4000
"""Longest detail a ContractError may carry."""
REPLY_DETAIL = 1000
"""Longest detail of a reply envelope or a dead-letter header."""
ECHO = 65
"""No run of this many characters of the input may reappear in a detail. Shorter echoes are by
design: a clipped unknown field name (37 characters), a duplicated SKU (at most 64)."""
SETTLE_TIMEOUT = 15.0

ENVELOPES: tuple[type[Contract], ...] = (CommandEnvelope, ReplyEnvelope, StartSaga)
DATA_MODELS: tuple[type[Contract], ...] = tuple(
    dict.fromkeys(m for c in CATALOG.values() for m in (c.payload, c.reply))
)
ALL_MODELS = ENVELOPES + DATA_MODELS
#: command type whose payload (or success reply) is the model
COMMAND_OF: dict[type[Contract], str] = {
    **{c.payload: t for t, c in CATALOG.items()},
    **{c.reply: t for t, c in CATALOG.items()},
}


# --- JSON text with the parts the json module will not write ----------------------------------


@dataclass(frozen=True)
class Raw:
    """A JSON text fragment written as it is: NaN, 1e400, deep nesting, broken syntax."""

    text: str


@dataclass(frozen=True)
class Dup:
    """A key written a second time in the same object."""

    key: str


def to_text(value: Any, *, ascii_only: bool = True) -> str:
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        members = (
            json.dumps(k.key if isinstance(k, Dup) else k, ensure_ascii=ascii_only)
            + ":"
            + to_text(v, ascii_only=ascii_only)
            for k, v in value.items()
        )
        return "{" + ",".join(members) + "}"
    if isinstance(value, list):
        return "[" + ",".join(to_text(v, ascii_only=ascii_only) for v in value) + "]"
    return json.dumps(value, ensure_ascii=ascii_only)  # floats: NaN, Infinity as JS writes them


def encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")  # a lone surrogate makes invalid UTF-8


# --- valid messages, as JSON --------------------------------------------------------------------


def pattern(regex: str) -> st.SearchStrategy[str]:
    return st.from_regex(regex, fullmatch=True)


UUIDS = st.uuids().map(str) | st.uuids().map(lambda u: str(u).upper())
NAMES = pattern(r"[a-z][a-z0-9_.-]{0,63}")
REASON_CODES = pattern(r"[a-z][a-z0-9_]{0,63}")
SKUS = pattern(r"[A-Z0-9][A-Z0-9-]{0,63}")
CURRENCIES = pattern(r"[A-Z]{3}")
COUNTRIES = pattern(r"[A-Z]{2}")
POSTAL_CODES = pattern(r"[A-Za-z0-9][A-Za-z0-9 -]{0,15}")
SHORT_TEXTS = st.text(max_size=199).map(lambda s: "x" + s)
MONEY = st.decimals(Decimal("0.01"), Decimal("1000000"), places=2).map(str) | st.integers(
    1, 1_000_000
).map(str)
NON_NEGATIVE_MONEY = MONEY | st.sampled_from(["0", "0.00", "0.0"])
OFFSETS = st.integers(-1439, 1439).map(lambda m: timezone(timedelta(minutes=m)))
DEADLINES = st.builds(
    lambda d, tz: d.replace(tzinfo=tz).isoformat(),
    st.datetimes(datetime(1, 1, 2), datetime(9999, 12, 30)),
    OFFSETS,
)
FINITE_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
FINITE_JSON = st.recursive(
    FINITE_LEAVES,
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=16), kids, max_size=4)
    ),
    max_leaves=12,
)
JSON_OBJECTS = st.dictionaries(st.text(max_size=128), FINITE_JSON, max_size=6)


def stock_lines(most: int = 50) -> st.SearchStrategy[list[dict[str, Any]]]:
    return st.lists(
        st.fixed_dictionaries({"sku": SKUS, "quantity": st.integers(1, 10_000)}),
        min_size=1,
        max_size=most,
        unique_by=lambda line: line["sku"],
    )


def order_lines(most: int = 50) -> st.SearchStrategy[list[dict[str, Any]]]:
    line = {
        "sku": SKUS,
        "quantity": st.integers(1, 10),  # 50 lines x 10 x 1000.00 stays chargeable
        "unit_price": st.decimals(Decimal("0.01"), Decimal("1000"), places=2).map(str),
    }
    return st.lists(
        st.fixed_dictionaries(line), min_size=1, max_size=most, unique_by=lambda x: x["sku"]
    )


ADDRESSES = st.fixed_dictionaries(
    {
        "name": SHORT_TEXTS,
        "street": SHORT_TEXTS,
        "city": SHORT_TEXTS,
        "postal_code": POSTAL_CODES,
        "country": COUNTRIES,
    }
)


def undone(id_field: str, **done: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """A compensation's reply: something undone, or nothing to undo."""
    nothing = {id_field: st.none(), "nothing_to_undo": st.just(True)}
    if done:
        nothing["amount"] = st.sampled_from(["0", "0.00"])
    return st.fixed_dictionaries(
        {id_field: UUIDS, "nothing_to_undo": st.just(False), **done}
    ) | st.fixed_dictionaries(nothing)


VALID_DATA: dict[type[Contract], st.SearchStrategy[dict[str, Any]]] = {
    CreateOrder: st.fixed_dictionaries(
        {"order_ref": UUIDS, "customer_id": UUIDS, "items": order_lines(), "currency": CURRENCIES}
    ),
    OrderCreated: st.fixed_dictionaries({"order_id": UUIDS, "total": MONEY}),
    CancelOrder: st.fixed_dictionaries({"order_ref": UUIDS, "reason": SHORT_TEXTS}),
    OrderCancelled: undone("order_id"),
    ChargePayment: st.fixed_dictionaries(
        {"order_ref": UUIDS, "customer_id": UUIDS, "amount": MONEY, "currency": CURRENCIES}
    ),
    PaymentCharged: st.fixed_dictionaries(
        {"payment_id": UUIDS, "amount": MONEY, "balance_after": NON_NEGATIVE_MONEY}
    ),
    RefundPayment: st.fixed_dictionaries({"order_ref": UUIDS, "customer_id": UUIDS}),
    PaymentRefunded: undone("payment_id", amount=MONEY),
    ReserveStock: st.fixed_dictionaries({"order_ref": UUIDS, "items": stock_lines()}),
    StockReserved: st.fixed_dictionaries({"reservation_id": UUIDS}),
    ReleaseStock: st.fixed_dictionaries({"order_ref": UUIDS}),
    StockReleased: undone("reservation_id"),
    ScheduleShipment: st.fixed_dictionaries(
        {"order_ref": UUIDS, "address": ADDRESSES, "items": stock_lines()}
    ),
    ShipmentScheduled: st.fixed_dictionaries({"shipment_id": UUIDS, "carrier": SHORT_TEXTS}),
    CancelShipment: st.fixed_dictionaries({"order_ref": UUIDS}),
    ShipmentCancelled: undone("shipment_id"),
}


def command_json(
    command_type: str | None = None,
    payload: st.SearchStrategy[Any] | None = None,
    reply_to: st.SearchStrategy[str] = NAMES,
) -> st.SearchStrategy[dict[str, Any]]:
    """A CommandEnvelope: of ``command_type`` with its valid payload, or of any name."""
    if command_type is None:
        participant, ctype, body = NAMES, NAMES, JSON_OBJECTS
    else:
        contract = CATALOG[command_type]
        participant, ctype = st.just(contract.participant), st.just(command_type)
        body = VALID_DATA[contract.payload]
    return st.fixed_dictionaries(
        {
            "schema_version": st.just(1),
            "message_id": UUIDS,
            "idempotency_key": UUIDS,
            "saga_id": UUIDS,
            "saga_name": NAMES,
            "step": NAMES,
            "direction": st.sampled_from(["action", "compensation"]),
            "attempt": st.integers(1, 2**63),
            "participant": participant,
            "command_type": ctype,
            "reply_to": reply_to,
            "deadline": DEADLINES,
            "payload": body if payload is None else payload,
        }
    )


def reply_json(
    command_type: str | None = None, data: st.SearchStrategy[Any] | None = None
) -> st.SearchStrategy[dict[str, Any]]:
    """A ReplyEnvelope: a success with ``command_type``'s valid reply data, or any failure."""
    if command_type is None:
        ctype, good = NAMES, JSON_OBJECTS
    else:
        ctype, good = st.just(command_type), VALID_DATA[CATALOG[command_type].reply]
    common = {
        "schema_version": st.just(1),
        "message_id": UUIDS,
        "causation_id": UUIDS,
        "saga_id": UUIDS,
        "participant": NAMES,
        "command_type": ctype,
    }
    details = st.text(min_size=1, max_size=1000)
    success = st.fixed_dictionaries(
        {**common, "outcome": st.just("success")},
        optional={
            "reason": st.none(),
            "detail": details,
            "retryable": st.just(False),
            "data": good if data is None else data,
        },
    )
    failure = st.fixed_dictionaries(
        {**common, "outcome": st.just("failure"), "reason": REASON_CODES},
        optional={"detail": details, "retryable": st.booleans(), "data": JSON_OBJECTS},
    )
    return success if data is not None else success | failure


START_JSON = st.fixed_dictionaries(
    {
        "schema_version": st.just(1),
        "message_id": UUIDS,
        "saga_name": NAMES,
        "key": st.text(min_size=1, max_size=200),
        "input": JSON_OBJECTS,
    }
)

VALID: dict[type[Contract], st.SearchStrategy[dict[str, Any]]] = {
    CommandEnvelope: command_json() | st.sampled_from(sorted(CATALOG)).flatmap(command_json),
    ReplyEnvelope: reply_json() | st.sampled_from(sorted(CATALOG)).flatmap(reply_json),
    StartSaga: START_JSON,
    **VALID_DATA,
}


# --- damage -----------------------------------------------------------------------------------

WEIRD_TOKENS = st.sampled_from(
    [
        "NaN",
        "Infinity",
        "-Infinity",
        "nan",
        "inf",
        "1e400",
        "-1e400",
        "1e-400",
        "-0",
        "0.0e0",
        "1E+2",
        "01",
        "+1",
        "0x10",
        ".5",
        "5.",
        "tru",
        "nul",
        "undefined",
        "'x'",
        '"\\ud800"',
        '"\\udc00\\ud800"',
        '"\\u0000"',
        '"\\x41"',
        '"\\uZZZZ"',
        '"unterminated',
        "[1,]",
        "{,}",
        '{"a":1,}',
        '{"a"}',
        "1 2",
        "",
        "//",
        "/* */ 1",
    ]
).map(Raw)
BIG_NUMBERS = st.builds(
    lambda digits, kind: Raw(
        ["9" * digits, "-" + "9" * digits, "0." + "1" * digits, "1e" + "9" * min(digits, 30)][kind]
    ),
    st.integers(1, 6000),
    st.integers(0, 3),
)
DEEP = st.builds(
    lambda depth, kind: Raw(
        "[" * depth + "]" * depth if kind else '{"a":' * depth + "1" + "}" * depth
    ),
    st.integers(1, 3000),
    st.booleans(),
)
HUGE_STRINGS = st.builds(
    lambda unit, n: unit * n, st.text(min_size=1, max_size=4), st.integers(50, 70_000)
)
UNICODE = st.text(
    st.characters(codec=None) | st.characters(categories=["Cs", "Cc", "Cf", "Zs", "Mn"]),
    max_size=30,
)
ANY_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(-(10**30), 10**30)
    | st.floats()
    | st.text(max_size=30)
    | UNICODE
    | WEIRD_TOKENS
)
ANY_JSON = st.recursive(
    ANY_LEAVES,
    lambda kids: (
        st.lists(kids, max_size=5) | st.dictionaries(st.text(max_size=20), kids, max_size=5)
    ),
    max_leaves=20,
)
_NUMBER = re.compile(r"-?[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?")


def swapped(node: Any) -> list[Any]:
    """The same value as another type: numbers as strings and back, scalars in containers."""
    if isinstance(node, Raw):
        return [node.text, None]
    if isinstance(node, bool):
        return [str(node).lower(), int(node), None]
    if isinstance(node, int | float):
        return [str(node), repr(float(node)) if abs(node) < 1e300 else "1e400", [node], -node]
    if isinstance(node, str):
        number = Raw(node) if _NUMBER.fullmatch(node) else len(node)
        return [number, node.upper(), f" {node} ", node[:-1], [node], {"value": node}, True]
    if isinstance(node, dict):
        return [list(node.values()), to_text(node), None]
    if isinstance(node, list):
        return [{str(i): v for i, v in enumerate(node)}, node[0] if node else None, to_text(node)]
    return ["null", 0, "", {}, []]


def replacements(node: Any) -> st.SearchStrategy[Any]:
    options: list[st.SearchStrategy[Any]] = [
        st.sampled_from(swapped(node)),
        ANY_JSON,
        WEIRD_TOKENS,
        BIG_NUMBERS,
        DEEP,
        HUGE_STRINGS,
        UNICODE,
    ]
    if isinstance(node, dict):
        plain = [k for k in node if isinstance(k, str)]
        extra = st.tuples(st.text(max_size=200) | HUGE_STRINGS | UNICODE, ANY_JSON)
        options.append(extra.map(lambda kv: {**node, kv[0]: kv[1]}))
        if node:
            keys = st.sampled_from(list(node))
            options.append(keys.map(lambda k: {x: v for x, v in node.items() if x != k}))
        if plain:
            dup = st.tuples(st.sampled_from(plain), ANY_JSON)
            options.append(dup.map(lambda kv: {**node, Dup(kv[0]): kv[1]}))
    if isinstance(node, list):
        options.append(st.integers(2, 300).map(lambda n: node * n))
        if node:  # every element damaged the same way: many errors in one message
            options.append(
                st.tuples(replacements(node[0]), st.integers(1, 60)).map(lambda t: [t[0]] * t[1])
            )
    return st.one_of(options)


def mutate_once(draw: st.DrawFn, node: Any, depth: int = 0) -> Any:
    """``node`` with one part replaced; the whole message only now and then."""
    stay = 1 if depth == 0 else 3  # stop here: 1 chance in 10 at the top, 3 in 10 below
    if isinstance(node, dict | list) and node and draw(st.integers(0, 9)) >= stay:
        key = draw(st.sampled_from(list(node) if isinstance(node, dict) else range(len(node))))
        copy = dict(node) if isinstance(node, dict) else list(node)
        copy[key] = mutate_once(draw, node[key], depth + 1)
        return copy
    return draw(replacements(node))


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[Any], most: int = 4) -> Any:
    tree = draw(base)
    for _ in range(draw(st.integers(0, most))):
        tree = mutate_once(draw, tree)
    return tree


@st.composite
def crowded(draw: st.DrawFn, base: st.SearchStrategy[Any]) -> Any:
    """A message with one error per list element or per field: as many errors as it can hold."""
    tree = draw(base)
    if not isinstance(tree, dict):
        return tree
    lists = [k for k, v in tree.items() if isinstance(v, list) and v]
    if not lists:
        return {k: draw(st.sampled_from(swapped(v))) for k, v in tree.items()}
    key = draw(st.sampled_from(lists))
    element = tree[key][0]
    for _ in range(draw(st.integers(1, 3))):
        element = mutate_once(draw, element, 1)
    return {**tree, key: [element] * draw(st.integers(15, 50) | st.integers(1, 60))}


def damaged(base: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(mutated(base), mutated(base), crowded(base))


@st.composite
def wire(draw: st.DrawFn, tree: Any) -> bytes:
    """``tree`` as bytes, sometimes damaged after serialisation."""
    text = to_text(tree, ascii_only=draw(st.booleans()))
    raw = encode(text)
    damage = draw(
        st.sampled_from(["none"] * 6 + ["cut", "bom", "pad", "tail", "flip", "utf16", "latin1"])
    )
    if damage == "cut":
        return raw[: draw(st.integers(0, len(raw)))]
    if damage == "bom":
        return b"\xef\xbb\xbf" + raw
    if damage == "pad":
        return draw(st.sampled_from([b" ", b"\n\t\r ", b""])) + raw + b" \n"
    if damage == "tail":
        return raw + draw(st.sampled_from([b"x", b"{}", b"\x00", b",", b" 1", b"\xff", b"\xc3"]))
    if damage == "flip" and raw:
        i = draw(st.integers(0, len(raw) - 1))
        return raw[:i] + bytes([draw(st.integers(0, 255))]) + raw[i + 1 :]
    if damage == "utf16":
        return text.encode("utf-16", "surrogatepass")
    if damage == "latin1":
        return text.encode("latin-1", "replace")
    return raw


MODELS = st.sampled_from(ALL_MODELS)
MAX_BYTES = st.sampled_from([DEFAULT_MAX_BYTES] * 4 + [1024, 64, 0])


# --- the properties ---------------------------------------------------------------------------


def echoed(detail: str, text: str) -> str | None:
    """A run of ECHO characters of ``text`` that ``detail`` repeats, if any."""
    # Such a run holds one of the blocks detail[32k : 32k + 32]: look for those first.
    block = (ECHO - 1) // 2
    if not any(detail[i : i + block] in text for i in range(0, len(detail) - block + 1, block)):
        return None
    for i in range(len(detail) - ECHO + 1):
        if detail[i : i + ECHO] in text:
            return detail[i : i + ECHO]
    return None


SOME_COMMAND = CommandEnvelope(
    schema_version=1,
    message_id=uuid.UUID(int=1),
    idempotency_key=uuid.UUID(int=2),
    saga_id=uuid.UUID(int=3),
    saga_name="checkout",
    step="create_order",
    direction="action",
    attempt=1,
    participant="order",
    command_type="order.create",
    reply_to="saga.replies",
    deadline=datetime(2030, 1, 1, tzinfo=UTC),
    payload={},
)


def check_error(exc: ContractError, source: str) -> None:
    assert exc.reason in REASONS, exc.reason
    assert 0 < len(exc.detail) <= MAX_DETAIL, (len(exc.detail), exc.detail[:300])
    assert len(str(exc)) <= MAX_DETAIL + 40
    echo = echoed(exc.detail, source)
    assert echo is None, f"the detail echoes the input: {echo!r}"
    # What a participant does with it: this must not fail, or the command is retried forever.
    reply = ReplyEnvelope.failure(SOME_COMMAND, "invalid_payload", exc.detail)
    assert reply.detail == clipped(exc.detail)


def clipped(detail: str) -> str:
    return detail if len(detail) <= REPLY_DETAIL else detail[: REPLY_DETAIL - 3] + "..."


def check_parse(model: type[Contract], raw: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> Any:
    """The message, or None after checking the ContractError; anything else fails the test."""
    try:
        message = parse(model, raw, max_bytes=max_bytes)
    except ContractError as exc:
        check_error(exc, raw.decode("utf-8", "replace"))
        return None
    assert type(message) is model
    assert len(raw) <= max_bytes
    check_round_trip(message)
    return message


def check_round_trip(message: Contract) -> None:
    dumped = message.model_dump_json().encode()
    again = parse(type(message), dumped, max_bytes=max(len(dumped), DEFAULT_MAX_BYTES))
    assert again == message
    assert again.model_dump_json().encode() == dumped
    if type(message) in DATA_MODELS:
        assert parse_data(type(message), dump_data(message)) == message


def check_parse_data(model: type[Contract], data: Mapping[str, JsonValue], source: str) -> Any:
    try:
        message = parse_data(model, data)
    except ContractError as exc:
        check_error(exc, source)
        return None
    assert type(message) is model
    check_round_trip(message)
    return message


def test_valid_examples_cover_every_model() -> None:
    assert set(VALID) == set(ALL_MODELS)
    assert len(DATA_MODELS) == 2 * len(CATALOG)


@FUZZ
@given(MODELS, st.binary(max_size=2048) | st.text().map(encode), MAX_BYTES)
def test_arbitrary_bytes(model: type[Contract], raw: bytes, max_bytes: int) -> None:
    check_parse(model, raw, max_bytes)


@FUZZ
@given(MODELS, ANY_JSON.flatmap(wire), MAX_BYTES)
def test_arbitrary_json(model: type[Contract], raw: bytes, max_bytes: int) -> None:
    check_parse(model, raw, max_bytes)


@FUZZ
@given(st.data())
def test_valid_messages_parse_and_round_trip(data: st.DataObject) -> None:
    model = data.draw(MODELS)
    tree = data.draw(VALID[model])
    message = check_parse(model, encode(to_text(tree, ascii_only=data.draw(st.booleans()))))
    assert message is not None, "a valid message was rejected"
    if model in DATA_MODELS:
        assert check_parse_data(model, tree, "") == message


@FUZZ
@given(st.data())
def test_damaged_envelopes(data: st.DataObject) -> None:
    model = data.draw(st.sampled_from(ENVELOPES))
    raw = data.draw(wire(data.draw(mutated(VALID[model]))))
    check_parse(model, raw, data.draw(MAX_BYTES))


@FUZZ
@given(st.data())
def test_damaged_payloads_and_replies(data: st.DataObject) -> None:
    """Straight through parse_data, and as the payload (or data) of an envelope, the way the
    participants and the orchestrator meet them."""
    model = data.draw(st.sampled_from(DATA_MODELS))
    tree = data.draw(damaged(VALID[model]))
    text = to_text(tree, ascii_only=data.draw(st.booleans()))
    try:
        value = from_json(encode(text))
    except ValueError:
        value = None
    if isinstance(value, dict):
        check_parse_data(model, value, text)
    command_type = COMMAND_OF[model]
    contract = CATALOG[command_type]
    if model is contract.payload:
        outer: type[Contract] = CommandEnvelope
        envelope = data.draw(command_json(command_type, payload=st.just(tree)))
    else:
        outer = ReplyEnvelope
        envelope = data.draw(reply_json(command_type, data=st.just(tree)))
    message = check_parse(outer, data.draw(wire(envelope)))
    if isinstance(message, CommandEnvelope):
        check_contract_call(contract.parse_payload, message.payload, text)
    elif isinstance(message, ReplyEnvelope) and "data" in envelope:
        check_contract_call(contract.parse_reply, message.data, text)


ONE_LINE: dict[type[Contract], st.SearchStrategy[dict[str, Any]]] = {
    CreateOrder: st.fixed_dictionaries(
        {"order_ref": UUIDS, "customer_id": UUIDS, "items": order_lines(1), "currency": CURRENCIES}
    ),
    ReserveStock: st.fixed_dictionaries({"order_ref": UUIDS, "items": stock_lines(1)}),
    ScheduleShipment: st.fixed_dictionaries(
        {"order_ref": UUIDS, "address": ADDRESSES, "items": stock_lines(1)}
    ),
}


@FUZZ
@given(st.data())
def test_many_errors_in_one_message(data: st.DataObject) -> None:
    """Every line of a long list wrong in the same way: a long detail, still bounded, and a
    participant can still answer the command with it."""
    model = data.draw(st.sampled_from(sorted(ONE_LINE, key=lambda m: m.__name__)))
    tree = data.draw(ONE_LINE[model])
    line = tree["items"][0]
    name = data.draw(st.sampled_from(sorted(line)))
    bad = st.sampled_from(swapped(line[name])) | WEIRD_TOKENS | UNICODE | ANY_LEAVES
    line = {**line, name: data.draw(bad)}
    if data.draw(st.booleans()):
        line[data.draw(st.text(min_size=1, max_size=100))] = 1
    tree = {**tree, "items": [line] * data.draw(st.integers(1, 60))}
    text = to_text(tree, ascii_only=data.draw(st.booleans()))
    check_parse(model, encode(text))
    try:
        value = from_json(encode(text))
    except ValueError:
        value = None
    if isinstance(value, dict):
        check_parse_data(model, value, text)
    envelope = data.draw(command_json(COMMAND_OF[model], payload=st.just(tree)))
    command = check_parse(CommandEnvelope, encode(to_text(envelope)))
    if command is not None:
        check_contract_call(CATALOG[COMMAND_OF[model]].parse_payload, command.payload, text)


def check_contract_call(
    decode: Callable[[Mapping[str, JsonValue]], Contract], data: Mapping[str, JsonValue], src: str
) -> None:
    try:
        message = decode(data)
    except ContractError as exc:
        check_error(exc, src)
        return
    check_round_trip(message)


# --- the consumers, end to end on a MemoryBroker -----------------------------------------------


class RecordingBroker(MemoryBroker):
    """A MemoryBroker that notes every message a consumer handed back to its queue."""

    def __init__(self) -> None:
        super().__init__()
        self.requeued: list[str] = []

    def requeue(self, queue: Any, entries: list[Any]) -> None:
        self.requeued.extend(queue.name for _ in entries)
        super().requeue(queue, entries)


@dataclass
class Collected:
    body: bytes
    headers: dict[str, Any]


@dataclass
class Collector:
    """A consumer that keeps what it receives and acks it."""

    messages: list[Collected] = field(default_factory=list)

    async def __call__(self, message: IncomingMessage) -> None:
        self.messages.append(Collected(message.body, dict(message.headers)))
        await message.ack()


OTHER_CONTENT_TYPES = [
    "text/plain",
    "application/json; charset=utf-8",
    "application/json; charset=latin-1",
    "application/json;foo=bar",
    "",
    "APPLICATION/JSON",
]
CONTENT_TYPES = (
    st.sampled_from([None, "application/json"])  # mostly the ones that pass
    | st.sampled_from([None, "application/json", *OTHER_CONTENT_TYPES])
    | st.text(max_size=20)
)
HEADERS = st.dictionaries(
    st.sampled_from([DEAD_LETTER_REASON, DEAD_LETTER_QUEUE, "x-first-death-reason"])
    | st.text(max_size=20),
    st.text(max_size=50) | st.integers() | st.booleans() | st.none() | HUGE_STRINGS,
    max_size=4,
)
MESSAGE_IDS = st.none() | st.text(max_size=40) | UUIDS


@dataclass
class Delivery:
    body: bytes
    content_type: str | None
    headers: dict[str, Any]
    message_id: str | None


def delivery(trees: st.SearchStrategy[Any]) -> st.SearchStrategy[Delivery]:
    """Mostly the messages ``trees`` gives, as they are or damaged; sometimes anything."""
    as_is = trees.map(lambda tree: encode(to_text(tree)))
    bodies = st.one_of(
        as_is,
        as_is,
        mutated(trees, most=2).flatmap(wire),
        ANY_JSON.flatmap(wire),
        st.binary(max_size=512),
    )
    return st.builds(Delivery, bodies, CONTENT_TYPES, HEADERS, MESSAGE_IDS)


async def publish(broker: MemoryBroker, queue: str, d: Delivery) -> None:
    await broker.publish_raw(
        exchange="",
        routing_key=queue,
        body=d.body,
        message_id=d.message_id,
        correlation_id=d.message_id,
        message_type=d.message_id,
        headers=d.headers,
        content_type=d.content_type,
    )


async def settle(broker: RecordingBroker, *queues: str) -> None:
    """Until ``queues`` are empty with nothing unsettled; a requeue or a hang fails the test."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SETTLE_TIMEOUT
    while True:
        assert not broker.requeued, f"handed back to the queue: {broker.requeued}"
        if all(broker.depth(q) == (0, 0) for q in queues):
            return
        assert loop.time() < deadline, f"not settled in {SETTLE_TIMEOUT} s: {queues}"
        await asyncio.sleep(0.001)


def json_content_type(value: str | None) -> bool:
    """The protocol's rule: none, or application/json with at most a UTF-8 charset."""
    if value is None:
        return True
    media, *params = [p.strip().lower() for p in value.split(";")]
    return media == "application/json" and all(
        p.replace(" ", "") in ("charset=utf-8", "charset=utf8", 'charset="utf-8"') for p in params
    )


def verdict(model: type[Contract], d: Delivery, limit: int) -> tuple[str | None, Any]:
    """(dead-letter reason, None) for a message a consumer must refuse, else (None, message)."""
    if len(d.body) > limit:  # first: an oversize body is refused unread, whatever else it is
        return "too_large", None
    if not json_content_type(d.content_type):
        return "wrong_content_type", None
    try:
        return None, parse(model, d.body, max_bytes=limit)
    except ContractError as exc:
        return exc.reason, None


def check_dead_letter(dead: list[Collected], d: Delivery, queue: str, reason: str) -> None:
    assert len(dead) == 1, f"expected one dead letter ({reason}), got {len(dead)}"
    headers = dead[0].headers
    assert dead[0].body == d.body
    assert headers[DEAD_LETTER_REASON] == reason
    assert headers[DEAD_LETTER_QUEUE] == queue
    detail = headers[DEAD_LETTER_DETAIL]
    assert len(detail) <= REPLY_DETAIL
    echo = echoed(detail, d.body.decode("utf-8", "replace"))
    assert echo is None, f"the dead-letter detail echoes the message: {echo!r}"


MESSAGE_LIMIT = 8192  # small, so that huge strings take the too_large path as well


@dataclass
class Orchestrated:
    broker: RecordingBroker
    service: OrchestratorService
    commands: list[CommandEnvelope]  # every command it sent, in order
    sagas: set[uuid.UUID]  # the sagas of those
    dead: dict[str, Collector]


async def orchestrator_on_memory(tmp_path: Path) -> Orchestrated:
    broker = RecordingBroker()
    settings = load_settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'saga.db'}",
        prefix="fuzz",
        auto_migrate=True,
        max_message_bytes=MESSAGE_LIMIT,
        sqlite_synchronous="NORMAL",
        relay_poll_interval=0.05,
        timer_interval=0.05,
        timer_grace=0.0,
    )
    service = OrchestratorService(settings, registry(), broker=broker)
    await service.start()
    topology = service.topology
    commands: list[CommandEnvelope] = []
    sagas: set[uuid.UUID] = set()

    async def take_command(message: IncomingMessage) -> None:
        command = parse(CommandEnvelope, message.body)
        commands.append(command)
        sagas.add(command.saga_id)
        await message.ack()

    for participant in ("alpha", "beta", "gamma"):
        await broker.consume(topology.command_queue(participant), take_command, prefetch=0)
    dead = {q: Collector() for q in (topology.reply_queue, topology.start_queue)}
    for queue, collector in dead.items():
        await broker.consume(topology.dead_letter_queue(queue), collector, prefetch=0)
    await service.start_saga("trip", {"n": 1}, key="seed")
    for _ in range(5000):
        if commands:
            break
        await asyncio.sleep(0.002)
    assert commands, "the seed saga sent no command"
    return Orchestrated(broker, service, commands, sagas, dead)


# Stand-ins for the ids of a command the orchestrator really sent: the strategies must not depend
# on what the service did so far (Hypothesis replays them), so the ids go into the bytes after.
SAGA_ID = "5a9a5a9a-f022-4000-8000-00000000000a"
CAUSATION_ID = "5a9a5a9a-f022-4000-8000-00000000000b"
KNOWN_REPLIES = st.fixed_dictionaries(
    {
        "schema_version": st.just(1),
        "message_id": UUIDS,
        "causation_id": st.just(CAUSATION_ID) | UUIDS,
        "saga_id": st.just(SAGA_ID) | UUIDS,
        "participant": st.sampled_from(["alpha", "beta", "gamma"]) | NAMES,
        "command_type": st.sampled_from(["alpha.do", "beta.undo", "gamma.do"]) | NAMES,
        "outcome": st.just("success"),
        "data": JSON_OBJECTS,
    }
) | st.fixed_dictionaries(
    {
        "schema_version": st.just(1),
        "message_id": UUIDS,
        "causation_id": st.just(CAUSATION_ID),
        "saga_id": st.just(SAGA_ID),
        "participant": st.sampled_from(["alpha", "beta", "gamma"]),
        "command_type": st.sampled_from(["alpha.do", "beta.do", "gamma.undo"]),
        "outcome": st.just("failure"),
        "reason": REASON_CODES,
        "retryable": st.booleans(),
    }
)


def with_ids(body: bytes, command: CommandEnvelope) -> bytes:
    """``body`` with the stand-in ids replaced by ``command``'s (the same length)."""
    return body.replace(SAGA_ID.encode(), str(command.saga_id).encode()).replace(
        CAUSATION_ID.encode(), str(command.message_id).encode()
    )


TRIP_STARTS = st.fixed_dictionaries(
    {
        "schema_version": st.just(1),
        "message_id": UUIDS,
        "saga_name": st.just("trip") | NAMES,
        "key": st.text(min_size=1, max_size=200),
        "input": JSON_OBJECTS,
    }
)


async def check_orchestrator_delivery(h: Orchestrated, data: st.DataObject) -> None:
    topology = h.service.topology
    command = h.commands[-1]
    if data.draw(st.integers(0, 4)) == 0:
        queue, model = topology.start_queue, StartSaga
        d = data.draw(delivery(TRIP_STARTS))
    else:
        queue, model = topology.reply_queue, ReplyEnvelope
        command = h.commands[-1 - data.draw(st.integers(0, 19)) % min(20, len(h.commands))]
        d = data.draw(delivery(KNOWN_REPLIES))
        d.body = with_ids(d.body, command)
    expected, message = verdict(model, d, MESSAGE_LIMIT)
    if expected is None and isinstance(message, ReplyEnvelope) and message.saga_id not in h.sagas:
        expected = "unknown_saga"
    if (
        expected is None
        and isinstance(message, ReplyEnvelope)
        and message.causation_id == command.message_id
        and message.saga_id == command.saga_id
        and (message.participant, message.command_type)
        != (command.participant, command.command_type)
    ):
        expected = "reply_mismatch"  # names a command sent, and disagrees with it
    if expected is None and isinstance(message, StartSaga) and message.saga_name != "trip":
        expected = "unknown_saga_name"
    collector = h.dead[queue]
    seen, count = len(collector.messages), h.service.dead_lettered
    await publish(h.broker, queue, d)
    await settle(h.broker, queue, topology.dead_letter_queue(queue))
    dead = collector.messages[seen:]
    if expected is None:
        assert not dead, f"a good message was dead-lettered: {dead[0].headers}"
        assert h.service.dead_lettered == count
    else:
        check_dead_letter(dead, d, queue, expected)
        assert h.service.dead_lettered == count + 1


def test_orchestrator_consumers(tmp_path: Path) -> None:
    """Replies and start requests of every shape: applied or ignored (acked), or dead-lettered
    with the reason the decoder gives; never requeued, and the consumers keep going."""
    with asyncio.Runner() as runner:
        h = runner.run(orchestrator_on_memory(tmp_path))
        try:

            @CONSUMER_FUZZ
            @given(st.data())
            def example(data: st.DataObject) -> None:
                runner.run(check_orchestrator_delivery(h, data))

            example()
            runner.run(still_consuming(h))
        finally:
            runner.run(h.service.stop())
            runner.run(h.broker.close())


async def still_consuming(h: Orchestrated) -> None:
    """A good reply and a good start request after all that are still taken and applied."""
    command = h.commands[-1]
    reply = ReplyEnvelope.failure(command, "fuzzed_out")
    before = len(h.commands)
    await publish(
        h.broker,
        h.service.topology.reply_queue,
        Delivery(reply.model_dump_json().encode(), "application/json", {}, "last"),
    )
    start = StartSaga(
        schema_version=1, message_id=uuid.uuid4(), saga_name="trip", key="last", input={}
    )
    await publish(
        h.broker,
        h.service.topology.start_queue,
        Delivery(start.model_dump_json().encode(), None, {}, "start"),
    )
    topology = h.service.topology
    await settle(h.broker, topology.reply_queue, topology.start_queue)
    for _ in range(5000):
        if len(h.commands) > before:
            return
        await asyncio.sleep(0.002)
    raise AssertionError("the orchestrator sent no command after the fuzzing")


# --- a participant's command consumer ------------------------------------------------------------

ORDER_COMMANDS = (order.CREATE, order.CANCEL)
PARTICIPANT_REPLIES = "fuzzp.replies"


@dataclass
class Participating:
    broker: RecordingBroker
    service: Any
    replies: list[ReplyEnvelope]
    dead: Collector
    seen_ids: set[uuid.UUID] = field(default_factory=set)


async def participant_on_memory(tmp_path: Path) -> Participating:
    broker = RecordingBroker()
    settings = ParticipantSettings(
        prefix="fuzzp",
        data_dir=tmp_path,
        services_database_url=None,
        relay_poll_interval=0.05,
        max_message_bytes=MESSAGE_LIMIT,
        sqlite_synchronous="NORMAL",
    )
    service = order.build(settings)
    service.broker = broker
    await service.start()
    replies: list[ReplyEnvelope] = []

    async def take_reply(message: IncomingMessage) -> None:
        replies.append(parse(ReplyEnvelope, message.body))
        await message.ack()

    await broker.consume(PARTICIPANT_REPLIES, take_reply, prefetch=0)
    dead = Collector()
    queue = service.topology.command_queue(order.PARTICIPANT)
    await broker.consume(service.topology.dead_letter_queue(queue), dead, prefetch=0)
    return Participating(broker, service, replies, dead)


def order_commands() -> st.SearchStrategy[Any]:
    """Order commands with damaged payloads mostly, replying to the queue that exists."""

    def of_type(command_type: str) -> st.SearchStrategy[Any]:
        valid = VALID_DATA[CATALOG[command_type].payload]
        payload = st.one_of(mutated(valid), crowded(valid), crowded(valid))
        return command_json(command_type, payload, reply_to=st.just(PARTICIPANT_REPLIES))

    commands = st.sampled_from(ORDER_COMMANDS).flatmap(of_type)
    return st.one_of(commands, commands, mutated(commands, most=2).map(keep_reply_to))


def keep_reply_to(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {**tree, "reply_to": PARTICIPANT_REPLIES}
    return tree


async def check_participant_delivery(h: Participating, data: st.DataObject) -> None:
    queue = h.service.topology.command_queue(order.PARTICIPANT)
    d = data.draw(delivery(order_commands()))
    expected, command = verdict(CommandEnvelope, d, MESSAGE_LIMIT)
    if expected is None and (
        command.participant != order.PARTICIPANT or command.command_type not in ORDER_COMMANDS
    ):
        expected = "unknown_command"
    elif expected is None and command.reply_to != PARTICIPANT_REPLIES:
        # the bytes were damaged after serialisation, inside reply_to, and stayed valid JSON
        expected = "unknown_reply_to"
    seen, count = len(h.dead.messages), h.service.dead_lettered
    await publish(h.broker, queue, d)
    await settle(h.broker, queue, h.service.topology.dead_letter_queue(queue))
    if expected is not None:
        check_dead_letter(h.dead.messages[seen:], d, queue, expected)
        assert h.service.dead_lettered == count + 1
        return
    assert h.service.dead_lettered == count
    reply = await reply_to(h, command)
    # An id seen before gets the first answer again, whatever the command type says now.
    fresh = not {command.message_id, command.idempotency_key} & h.seen_ids
    h.seen_ids |= {command.message_id, command.idempotency_key}
    if not fresh:
        return
    contract = CATALOG[command.command_type]
    if reply.outcome == "success":
        check_round_trip(contract.parse_reply(reply.data))
    else:
        assert not reply.retryable, (reply.reason, reply.detail)
        assert reply.reason in {"invalid_payload", *contract.failures}, reply.reason
    try:
        contract.parse_payload(command.payload)
    except ContractError as exc:
        answer = ("failure", "invalid_payload", clipped(exc.detail))
        assert (reply.outcome, reply.reason, reply.detail) == answer
    else:
        assert reply.reason != "invalid_payload", reply.detail


async def reply_to(h: Participating, command: CommandEnvelope) -> ReplyEnvelope:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SETTLE_TIMEOUT
    while True:
        for reply in reversed(h.replies):
            if reply.causation_id == command.message_id:
                return reply
        assert loop.time() < deadline, "the participant sent no reply"
        await asyncio.sleep(0.001)


def test_participant_consumer(tmp_path: Path) -> None:
    """Commands with damaged payloads and envelopes: a reply (invalid_payload when the payload
    does not fit) or a dead letter with the decoder's reason; never requeued."""
    with asyncio.Runner() as runner:
        h = runner.run(participant_on_memory(tmp_path))
        try:

            @CONSUMER_FUZZ
            @given(st.data())
            def example(data: st.DataObject) -> None:
                runner.run(check_participant_delivery(h, data))

            example()
        finally:
            runner.run(h.service.stop())
            runner.run(h.broker.close())
