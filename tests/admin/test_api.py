"""The admin API through the real uvicorn port of a running orchestrator: real RabbitMQ, the
scripted participant, and a SQLite file or a PostgreSQL schema."""

from __future__ import annotations

import logging
import uuid
from datetime import datetime
from typing import Any

import pytest
import structlog
from structlog.testing import LogCapture

from saga import InvalidInputError
from saga.admin import app as admin_app
from saga.admin.app import ACTOR_HEADER
from saga.core.ids import saga_id_for_key
from saga.core.state import HistoryKind
from saga.orchestrator import runtime
from saga.protocol import StartSaga
from tests.admin.conftest import Stack

pytestmark = pytest.mark.rabbitmq

BOTH = pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)

COMPENSATION_STUCK = {"gamma": ["fail"], "beta~undo": ["fail"]}


def _order(items: list[dict[str, Any]]) -> list[tuple[datetime, uuid.UUID]]:
    return [(datetime.fromisoformat(s["created_at"]), uuid.UUID(s["saga_id"])) for s in items]


async def _all_pages(stack: Stack, params: dict[str, Any], limit: int) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    cursor = None
    for _ in range(100):
        query = {**params, "limit": limit, **({"cursor": cursor} if cursor else {})}
        answer = await stack.client.get("/api/sagas", params=query)
        assert answer.status_code == 200, answer.text
        page = answer.json()
        assert len(page["items"]) <= limit
        found += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return found
    raise AssertionError("paging never ended")


@BOTH
async def test_list_filters_and_keyset_paging(stack: Stack) -> None:
    ids: dict[str, str] = {}
    for i in range(7):
        script = {} if i % 2 == 0 else {"beta": ["fail"]}
        ids[f"k{i}"] = await stack.start("trip", script, key=f"k{i}")
    held = await stack.start("hold", {"beta": ["silent"]}, key="held")
    for i in range(7):
        await stack.wait(ids[f"k{i}"], ["COMPLETED" if i % 2 == 0 else "COMPENSATED"])
    await stack.wait(held, ["RUNNING"], step="beta")
    every = [*ids.values(), held]

    # pages of 3: every saga once, newest first, however many pages
    listed = await _all_pages(stack, {}, limit=3)
    assert sorted(s["saga_id"] for s in listed) == sorted(every)
    assert _order(listed) == sorted(_order(listed), reverse=True)

    # sagas created while paging are newer than the first page: no repeats and no gaps
    first = (await stack.client.get("/api/sagas", params={"limit": 2})).json()
    late = [await stack.start("trip", {}, key=f"late-{i}") for i in (1, 2)]
    rest = await _all_pages(stack, {"cursor": first["next_cursor"]}, limit=2)
    assert [s["saga_id"] for s in first["items"] + rest] == [s["saga_id"] for s in listed]
    for saga_id in late:
        await stack.wait(saga_id, ["COMPLETED"])

    async def ids_for(**params: Any) -> set[str]:
        return {s["saga_id"] for s in await _all_pages(stack, params, limit=500)}

    completed = {ids[f"k{i}"] for i in (0, 2, 4, 6)}
    compensated = {ids[f"k{i}"] for i in (1, 3, 5)}
    assert await ids_for(status="COMPLETED", name="trip", since=listed[-1]["created_at"]) == (
        completed | set(late)
    )
    assert await ids_for(status=["COMPENSATED"]) == compensated
    assert await ids_for(status=["COMPENSATED", "RUNNING"]) == compensated | {held}
    assert await ids_for(name="hold") == {held}
    assert await ids_for(key="k3") == {ids["k3"]}
    assert await ids_for(key="nope") == set()
    # filters and paging together: one at a time through the completed ones
    completed_paged = await _all_pages(stack, {"status": "COMPENSATED"}, limit=1)
    assert [s["saga_id"] for s in completed_paged] == [
        s["saga_id"] for s in listed if s["saga_id"] in compensated
    ]

    # since (inclusive) and until (exclusive) on created_at
    oldest_first = list(reversed(listed))
    third = oldest_first[2]["created_at"]
    assert await ids_for(since=third, until=listed[0]["created_at"]) == {
        s["saga_id"] for s in oldest_first[2:-1]
    }
    naive = datetime.fromisoformat(third).replace(tzinfo=None).isoformat()  # no offset = UTC
    assert await ids_for(until=naive) == {s["saga_id"] for s in oldest_first[:2]}

    # q: the whole id, with or without dashes, or its start
    target = ids["k5"]
    assert await ids_for(q=target) == {target}
    assert await ids_for(q=target.replace("-", "").upper()) == {target}
    by_prefix = await ids_for(q=target[:6])
    assert target in by_prefix
    assert all(s.startswith(target[:6]) for s in by_prefix)

    # every list item carries what the table needs
    k1 = next(s for s in listed if s["saga_id"] == ids["k1"])
    assert k1["status"] == "COMPENSATED"
    assert k1["key"] == "k1"
    assert k1["failure"] == "step beta failed: refused"
    assert k1["definition_version"] == 1


@BOTH
async def test_detail_has_steps_history_and_timings(stack: Stack) -> None:
    saga_id = await stack.start("trip", {"beta": ["retry", "fail"]}, key="detail")
    saga = await stack.wait(saga_id, ["COMPENSATED"])

    assert saga["name"] == "trip"
    assert saga["definition_version"] == 1
    assert saga["key"] == "detail"
    assert saga["input"] == {"script": {"beta": ["retry", "fail"]}}
    assert saga["outputs"] == {"alpha": {}}
    assert saga["failure"] == "step beta failed: refused"
    assert saga["stuck_step"] is None
    assert saga["phase"] == "idle"
    steps = {s["name"]: s for s in saga["steps"]}
    assert [s["name"] for s in saga["steps"]] == ["alpha", "beta", "gamma"]
    assert steps["alpha"]["status"] == "COMPENSATED"
    assert (steps["alpha"]["attempts"], steps["alpha"]["compensation_attempts"]) == (1, 1)
    assert steps["alpha"]["participant"] == "alpha"
    assert steps["beta"]["status"] == "FAILED"
    assert steps["beta"]["attempts"] == 2
    assert steps["beta"]["error"] == "refused"
    assert steps["gamma"]["status"] == "PENDING"

    # the full history, as the store has it, every field
    stored = await stack.service.store.history(uuid.UUID(saga_id))
    assert [h["kind"] for h in saga["history"]] == [h.kind.value for h in stored]
    assert [h["detail"] for h in saga["history"]] == [h.detail for h in stored]
    sent = [h for h in saga["history"] if h["kind"] == HistoryKind.COMMAND_SENT]
    assert [(h["step"], h["direction"], h["attempt"]) for h in sent] == [
        ("alpha", "action", 1),
        ("beta", "action", 1),
        ("beta", "action", 2),
        ("alpha", "compensation", 1),
    ]
    assert all(uuid.UUID(h["message_id"]) for h in sent)
    assert all(h["actor"] is None for h in saga["history"])
    times = [datetime.fromisoformat(h["at"]) for h in saga["history"]]
    assert times == sorted(times)

    # per-step timings, replayed from the history
    alpha, beta = steps["alpha"], steps["beta"]
    for span in (alpha["action"], alpha["compensation"], beta["action"]):
        first, finished = span["first_sent_at"], span["finished_at"]
        assert finished is not None
        assert datetime.fromisoformat(finished) >= datetime.fromisoformat(first)
        assert span["duration_ms"] >= 0
    assert beta["action"]["last_sent_at"] > beta["action"]["first_sent_at"]  # two attempts
    assert beta["compensation"] is None  # it failed: nothing to undo
    assert steps["gamma"]["action"] is None
    # one decision: beta's failure and alpha's compensation share their time
    assert alpha["compensation"]["first_sent_at"] == beta["action"]["finished_at"]


async def test_definitions_list_every_step(stack: Stack) -> None:
    answer = await stack.client.get("/api/definitions")
    assert answer.status_code == 200
    found = {d["name"]: d for d in answer.json()}
    assert sorted(found) == ["hold", "ordered", "pivoted", "trip"]
    alpha = found["trip"]["steps"][0]
    assert alpha["participant"] == "alpha"
    assert alpha["action"] == "alpha.do"
    assert alpha["compensation"] == "alpha.undo"
    assert alpha["compensated"] is True
    assert alpha["timeout_s"] == 30
    assert alpha["retry"]["max_attempts"] == 3
    assert alpha["compensation_retry"]["max_attempts"] == 4
    pivot = found["pivoted"]["steps"][1]
    assert (pivot["pivot"], pivot["compensation"], pivot["compensated"]) == (True, None, False)
    assert found["hold"]["steps"][1]["timeout_s"] == 60


async def test_a_start_beyond_the_in_flight_bound_is_429_and_stores_nothing(
    stack: Stack,
) -> None:
    admission = stack.service.orchestrator.admission
    assert admission is not None
    known = await stack.client.post(
        "/api/sagas", json={"name": "trip", "input": {"script": {}}, "key": "known"}
    )
    assert known.status_code == 201, known.text
    await stack.wait(known.json()["saga"]["saga_id"], ["COMPLETED"])
    filler = [uuid.uuid4() for _ in range(admission.limit)]
    admission.adopt(filler)  # every slot taken
    try:
        full = await stack.client.post("/api/sagas", json={"name": "trip", "input": {}})
        assert full.status_code == 429, full.text
        assert full.headers["retry-after"] == "1"
        assert "SAGA_MAX_IN_FLIGHT" in full.json()["detail"]
        listed = (await stack.client.get("/api/sagas", params={"limit": 100})).json()
        assert len(listed["items"]) == 1  # only the known one: nothing was stored
        again = await stack.client.post(
            "/api/sagas", json={"name": "trip", "input": {"script": {}}, "key": "known"}
        )
        assert again.status_code == 200, again.text  # an existing key needs no slot
    finally:
        admission.release(filler)
    after = await stack.client.post("/api/sagas", json={"name": "trip", "input": {"script": {}}})
    assert after.status_code == 201, after.text


async def test_start_is_idempotent_by_key(stack: Stack) -> None:
    body = {"name": "trip", "input": {"script": {}, "n": 1}, "key": "order-17"}
    first = await stack.client.post("/api/sagas", json=body)
    assert first.status_code == 201, first.text
    saga_id = first.json()["saga"]["saga_id"]
    assert first.json()["created"] is True
    assert saga_id == str(saga_id_for_key("trip", "order-17"))
    assert first.headers["location"] == f"/api/sagas/{saga_id}"

    again = await stack.client.post("/api/sagas", json={**body, "input": {"other": True}})
    assert again.status_code == 200, again.text
    assert again.json()["created"] is False
    assert again.json()["saga"]["saga_id"] == saga_id
    saga = await stack.wait(saga_id, ["COMPLETED"])
    assert saga["input"] == {"script": {}, "n": 1}  # the first start's input, kept

    no_key = [
        await stack.client.post("/api/sagas", json={"name": "trip", "input": {"script": {}}})
        for _ in range(2)
    ]
    assert [a.status_code for a in no_key] == [201, 201]
    assert no_key[0].json()["saga"]["saga_id"] != no_key[1].json()["saga"]["saga_id"]


GOOD_ORDER: dict[str, Any] = {
    "customer_id": "0b3c6f1e-3d5e-4c5a-9a52-2f1f0b3a7d42",
    "currency": "EUR",
    "items": [{"sku": "BOOK-1", "quantity": 2, "unit_price": "19.9"}],
    "address": {
        "name": "Ann Smith",
        "street": "Main St 1",
        "city": "Berlin",
        "postal_code": "10115",
        "country": "DE",
    },
}


@pytest.mark.parametrize(
    ("change", "fields"),
    [
        (
            {"order": 17},
            ["input.address", "input.currency", "input.customer_id", "input.items", "input.order"],
        ),
        ({"items": []}, ["input.items"]),
        (
            {"items": [{"sku": "BOOK-1", "quantity": 0, "unit_price": "1.00"}]},
            ["input.items.0.quantity"],
        ),
        (
            {"items": [{"sku": "BOOK-1", "quantity": -1, "unit_price": "1.00"}]},
            ["input.items.0.quantity"],
        ),
        (
            {"items": [{"sku": "BOOK-1", "quantity": 1, "unit_price": "-5.00"}]},
            ["input.items.0.unit_price"],
        ),
        ({"customer_id": None}, ["input.customer_id"]),
    ],
    ids=[
        "unrelated",
        "no-items",
        "quantity-0",
        "quantity-negative",
        "negative-price",
        "no-customer",
    ],
)
async def test_an_invalid_input_is_refused_with_the_fields_and_nothing_stored_or_sent(
    stack: Stack, change: dict[str, Any], fields: list[str]
) -> None:
    order = {"order": 17} if "order" in change else {**GOOD_ORDER, **change}
    if change.get("customer_id", "") is None:
        del order["customer_id"]
    answer = await stack.client.post(
        "/api/sagas", json={"name": "ordered", "input": order, "key": "k-1"}
    )
    assert answer.status_code == 422, answer.text
    body = answer.json()
    found = sorted({".".join(str(p) for p in e["loc"][1:]) for e in body["errors"]})
    assert found == sorted(fields), body
    for field in fields:
        assert field in body["detail"]
    listed = await stack.client.get("/api/sagas", params={"name": "ordered"})
    assert listed.json()["items"] == []  # nothing stored
    assert await stack.service.store.pending_outbox(10) == []  # nothing to send
    assert stack.harness.responder is None or stack.harness.responder.received == []


async def test_an_invalid_input_by_message_or_in_process_is_refused_too(stack: Stack) -> None:
    """The start queue dead-letters it (invalid_input, the fields in the detail); the in-process
    start raises; neither stores a saga or sends a command."""
    bad = {**GOOD_ORDER, "items": []}
    with pytest.raises(InvalidInputError) as refused:
        await stack.service.start_saga("ordered", bad, key="in-process")
    assert [e.loc for e in refused.value.errors] == [("items",)]
    request = StartSaga(
        schema_version=1, message_id=uuid.uuid4(), saga_name="ordered", key="by-message", input=bad
    )
    harness = stack.harness
    await harness.publish(harness.topology.start_queue, request.model_dump_json().encode())
    [dead] = await harness.dead_letters(harness.topology.start_queue, 1)
    assert dead.reason == "invalid_input"
    assert "items: List should have at least 1 item" in dead.headers["x-saga-dead-letter-detail"]
    for key in ("in-process", "by-message"):
        assert await stack.service.store.load(saga_id_for_key("ordered", key)) is None
    assert await stack.service.store.pending_outbox(10) == []


async def test_a_valid_input_is_stored_as_its_model_reads_it(stack: Stack) -> None:
    answer = await stack.client.post("/api/sagas", json={"name": "ordered", "input": GOOD_ORDER})
    assert answer.status_code == 201, answer.text
    saga = await stack.wait(answer.json()["saga"]["saga_id"], ["COMPLETED"])
    assert saga["input"]["items"][0]["unit_price"] == "19.90"  # canonical: the model's form


@BOTH
async def test_retry_a_failed_saga_with_a_stuck_compensation(stack: Stack) -> None:
    saga_id = await stack.start("trip", COMPENSATION_STUCK)
    failed = await stack.wait(saga_id, ["FAILED"])
    assert failed["stuck_step"] == "beta"
    assert failed["direction"] == "compensation"

    answer = await stack.client.post(
        f"/api/sagas/{saga_id}/retry",
        json={"reason": "beta's ledger fixed by hand"},
        headers={"X-Saga-Actor": "alice@ops"},
    )
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert result["saga"]["status"] == "COMPENSATING"
    operator = result["entries"][0]
    assert operator["kind"] == "operator"
    assert operator["actor"] == "alice@ops"
    assert operator["detail"] == "retry: beta's ledger fixed by hand"
    assert [
        (e["kind"], e["step"], e["direction"], e["attempt"]) for e in result["entries"][1:]
    ] == [("command_sent", "beta", "compensation", 2)]

    done = await stack.wait(saga_id, ["COMPENSATED"])
    assert [s["status"] for s in done["steps"]] == ["COMPENSATED", "COMPENSATED", "FAILED"]
    recorded = [h for h in done["history"] if h["kind"] == "operator"]
    assert [(h["actor"], h["detail"]) for h in recorded] == [
        ("alice@ops", "retry: beta's ledger fixed by hand")
    ]


@BOTH
async def test_a_fixed_saga_keeps_its_root_cause_apart_from_its_resolution(stack: Stack) -> None:
    """A compensation that failed and was then retried, or an action resolved by hand, is not
    what went wrong: the root cause stays the first failure, and the fix is named beside it."""
    retried = await stack.start("trip", COMPENSATION_STUCK)
    resolved = await stack.start("pivoted", {"gamma": ["fail"]})
    failed = await stack.wait(retried, ["FAILED"])
    await stack.wait(resolved, ["FAILED"])
    cause = {"step": "gamma", "error": "refused", "detail": "step gamma failed: refused"}
    assert failed["failure"].startswith("compensation of beta failed")  # why it is stuck now
    assert {k: failed["root_cause"][k] for k in cause} == cause
    assert failed["resolution"] is None

    answer = await stack.client.post(
        f"/api/sagas/{retried}/retry",
        json={"reason": "beta's ledger fixed"},
        headers={"X-Saga-Actor": "alice@ops"},
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["saga"]["root_cause"]["detail"] == cause["detail"]
    answer = await stack.client.post(
        f"/api/sagas/{resolved}/resolve",
        json={"reason": "shipped by hand", "data": {"tracking": "T-1"}},
        headers={"X-Saga-Actor": "bob"},
    )
    assert answer.status_code == 200, answer.text

    done = await stack.wait(retried, ["COMPENSATED"])
    retry_entry = next(h for h in done["history"] if h["kind"] == "operator")
    assert {k: done["root_cause"][k] for k in cause} == cause
    assert done["root_cause"]["at"] == next(
        h["at"] for h in done["history"] if h["kind"] == "compensation_started"
    )
    assert done["resolution"] == {
        "action": "retry",
        "actor": "alice@ops",
        "reason": "beta's ledger fixed",
        "at": retry_entry["at"],
    }
    completed = await stack.wait(resolved, ["COMPLETED"])
    assert {k: completed["root_cause"][k] for k in ("step", "error", "detail")} == {
        "step": "gamma",
        "error": "refused",
        "detail": "step gamma after the pivot cannot complete: refused",
    }
    assert (completed["resolution"]["action"], completed["resolution"]["actor"]) == (
        "resolve",
        "bob",
    )
    assert completed["resolution"]["reason"] == "shipped by hand"

    listed = await stack.client.get("/api/sagas", params={"limit": 10})
    assert listed.status_code == 200, listed.text
    items = {s["saga_id"]: s for s in listed.json()["items"]}
    for saga_id, shown in ((retried, done), (resolved, completed)):
        assert items[saga_id]["root_cause"] == shown["root_cause"]
        assert items[saga_id]["resolution"] == shown["resolution"]


@BOTH
async def test_abort_a_running_saga_compensates_it(stack: Stack) -> None:
    saga_id = await stack.start("hold", {"beta": ["silent"]})
    await stack.wait(saga_id, ["RUNNING"], step="beta")

    answer = await stack.client.post(
        f"/api/sagas/{saga_id}/abort", json={"reason": "customer cancelled"}
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["saga"]["status"] == "COMPENSATING"
    operator = answer.json()["entries"][0]
    assert (operator["kind"], operator["actor"]) == ("operator", "admin-api")  # no header given

    done = await stack.wait(saga_id, ["COMPENSATED"])
    assert [s["status"] for s in done["steps"]] == ["COMPENSATED", "COMPENSATED"]
    assert done["failure"] == "aborted by admin-api: customer cancelled"
    undone = [
        h["step"]
        for h in done["history"]
        if h["kind"] == "command_sent" and h["direction"] == "compensation"
    ]
    assert undone == ["beta", "alpha"]  # the aborted step too: its outcome is unknown


@BOTH
async def test_resolve_a_stuck_compensation_and_a_stuck_action(stack: Stack) -> None:
    stuck_undo = await stack.start("trip", COMPENSATION_STUCK)
    stuck_action = await stack.start("pivoted", {"gamma": ["fail"]})
    await stack.wait(stuck_undo, ["FAILED"])
    failed = await stack.wait(stuck_action, ["FAILED"])
    assert (failed["stuck_step"], failed["direction"]) == ("gamma", "action")

    answer = await stack.client.post(
        f"/api/sagas/{stuck_undo}/resolve",
        json={"reason": "refunded by hand"},
        headers={"X-Saga-Actor": "bob"},
    )
    assert answer.status_code == 200, answer.text
    done = await stack.wait(stuck_undo, ["COMPENSATED"])
    assert [s["status"] for s in done["steps"]] == ["COMPENSATED", "COMPENSATED", "FAILED"]
    assert [(h["actor"], h["detail"]) for h in done["history"] if h["kind"] == "operator"] == [
        ("bob", "resolved by hand: refunded by hand")
    ]

    answer = await stack.client.post(
        f"/api/sagas/{stuck_action}/resolve",
        json={"reason": "shipped by hand", "data": {"tracking": "T-1", "n": [1, 2]}},
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["saga"]["status"] == "COMPLETED"
    completed = await stack.saga(stuck_action)
    assert completed["outputs"]["gamma"] == {"tracking": "T-1", "n": [1, 2]}
    assert completed["steps"][2]["status"] == "SUCCEEDED"


async def test_a_saga_lists_the_actions_its_state_allows(stack: Stack) -> None:
    """What the dashboard offers is what the engine accepts: every action left out of
    ``allowed_actions`` answers 409, and refusing it leaves the history alone."""
    done = await stack.start("trip", {})
    compensated = await stack.start("trip", {"beta": ["fail"]})
    stuck = await stack.start("trip", COMPENSATION_STUCK)
    running = await stack.start("hold", {"beta": ["silent"]})
    await stack.wait(done, ["COMPLETED"])
    await stack.wait(compensated, ["COMPENSATED"])
    await stack.wait(stuck, ["FAILED"])
    await stack.wait(running, ["RUNNING"], step="beta")

    expected = {
        done: [],
        compensated: [],
        stuck: ["retry", "resolve"],
        running: ["abort"],
    }
    for saga_id, allowed in expected.items():
        saga = await stack.saga(saga_id)
        assert saga["allowed_actions"] == allowed, saga["status"]
        for action in {"retry", "abort", "resolve"} - set(allowed):
            answer = await stack.client.post(
                f"/api/sagas/{saga_id}/{action}", json={"reason": "just trying"}
            )
            assert answer.status_code == 409, answer.text
            assert "rejected: only a" in answer.json()["detail"]
        assert (await stack.saga(saga_id))["history"] == saga["history"]

    answer = await stack.client.post(f"/api/sagas/{running}/abort", json={"reason": "stop"})
    assert answer.status_code == 200, answer.text
    assert (await stack.wait(running, ["COMPENSATED"]))["allowed_actions"] == []

    schema = (await stack.client.get("/openapi.json")).json()["components"]["schemas"]
    field = schema["SagaDetail"]["properties"]["allowed_actions"]
    assert "accepts now" in field["description"]
    assert "allowed_actions" in schema["SagaDetail"]["required"]


async def test_the_list_takes_the_time_forms_the_cli_takes(stack: Stack) -> None:
    """``since``/``until`` parse as ``saga list --since`` does (one parser): ages and ISO times;
    anything else is a 422 naming the parameter and the forms that work."""
    saga_id = await stack.start("trip", {})
    await stack.wait(saga_id, ["COMPLETED"])

    async def listed(**params: str) -> list[str]:
        answer = await stack.client.get("/api/sagas", params=params)
        assert answer.status_code == 200, answer.text
        return [s["saga_id"] for s in answer.json()["items"]]

    for age in ("30s", "5m", "1h", "2d", "1w", " 1w "):
        assert saga_id in await listed(since=age), age
    assert saga_id not in await listed(until="1w")  # created before a week ago: not this one
    assert saga_id in await listed(since="2000-01-01", until="2999-01-01T00:00:00+02:00")

    for bad in ("yesterday", "1y", "-1h", "99999999999999w"):
        answer = await stack.client.get("/api/sagas", params={"since": bad})
        assert answer.status_code == 422, (bad, answer.text)
        body = answer.json()
        assert body["detail"].startswith("query.since: "), body
        assert body["errors"][0]["loc"] == ["query", "since"]
    detail = (await stack.client.get("/api/sagas", params={"until": "soon"})).json()["detail"]
    assert detail == (
        "query.until: 'soon': use an age (30m, 1h, 2d, 1w) or an ISO time (2024-05-01T12:00:00Z)"
    )


async def test_every_error_says_why(stack: Stack) -> None:
    done = await stack.start("trip", {})
    running = await stack.start("hold", {"beta": ["silent"]})
    await stack.wait(done, ["COMPLETED"])
    await stack.wait(running, ["RUNNING"], step="beta")
    unknown = uuid.uuid4()
    client = stack.client

    async def error(method: str, path: str, status: int, **kwargs: Any) -> str:
        answer = await client.request(method, path, **kwargs)
        assert answer.status_code == status, answer.text
        detail = answer.json()["detail"]
        assert isinstance(detail, str)
        assert detail
        return detail

    # 404: unknown saga, named
    assert await error("GET", f"/api/sagas/{unknown}", 404) == f"no saga with id {unknown}"
    for action in ("retry", "abort", "resolve"):
        detail = await error(
            "POST", f"/api/sagas/{unknown}/{action}", 404, json={"reason": "why not"}
        )
        assert str(unknown) in detail

    # 409: the engine's own reason; a refusal changed nothing, so the history stays as it was
    history = (await stack.saga(done))["history"]
    why = await error("POST", f"/api/sagas/{done}/retry", 409, json={"reason": "again"})
    assert why == (
        "OperatorRetry rejected: only a FAILED saga can be retried; this one is COMPLETED"
    )
    why = await error("POST", f"/api/sagas/{done}/abort", 409, json={"reason": "stop"})
    assert "only a RUNNING saga can be aborted; this one is COMPLETED" in why
    why = await error("POST", f"/api/sagas/{running}/resolve", 409, json={"reason": "done"})
    assert "only a FAILED saga can be resolved; this one is RUNNING" in why
    assert (await stack.saga(done))["history"] == history
    assert (await stack.saga(running))["status"] == "RUNNING"

    # 422: validation, with the field named
    path = f"/api/sagas/{running}/abort"
    assert "reason" in await error("POST", path, 422, json={})
    assert "reason" in await error("POST", path, 422, json={"reason": ""})
    assert "reason" in await error("POST", path, 422, json={"reason": "   "})
    assert "data" in await error("POST", path, 422, json={"reason": "x", "data": {}})
    assert "saga_id" in await error("GET", "/api/sagas/not-a-uuid", 422)
    for actor in ("", "a" * 101):
        assert "X-Saga-Actor" in await error(
            "POST", path, 422, json={"reason": "x"}, headers={"X-Saga-Actor": actor}
        )
    assert "limit" in await error("GET", "/api/sagas", 422, params={"limit": 0})
    assert "limit" in await error("GET", "/api/sagas", 422, params={"limit": 501})
    assert "status" in await error("GET", "/api/sagas", 422, params={"status": "BOGUS"})
    assert "since" in await error("GET", "/api/sagas", 422, params={"since": "yesterday"})
    assert "q" in await error("GET", "/api/sagas", 422, params={"q": "xyz"})
    assert "cursor" in await error("GET", "/api/sagas", 422, params={"cursor": "bm9wZQ"})
    assert "name" in await error("POST", "/api/sagas", 422, json={"name": "nope", "input": {}})
    assert "body" in await error(
        "POST",
        "/api/sagas",
        422,
        content=b"{not json",
        headers={"Content-Type": "application/json"},
    )
    why = await error("POST", path, 422, json={"reason": " "})
    assert why == "body.reason: say why: the reason goes into the saga's history"
    too_big = {"name": "trip", "input": {"blob": "x" * 300_000}}
    assert "SAGA_MAX_MESSAGE_BYTES" in await error("POST", "/api/sagas", 413, json=too_big)
    body = (await client.post(path, json={})).json()
    assert body["errors"][0]["loc"] == ["body", "reason"]
    assert (await stack.saga(running))["status"] == "RUNNING"  # nothing was applied


async def test_a_body_that_is_not_json_is_422_as_the_openapi_document_says(stack: Stack) -> None:
    """Bytes that are not even text (not UTF-8) got FastAPI's 400, which no endpoint documents."""
    running = await stack.start("hold", {"beta": ["silent"]})
    await stack.wait(running, ["RUNNING"], step="beta")
    document = (await stack.client.get("/openapi.json")).json()
    paths = [
        "/api/sagas",
        f"/api/sagas/{running}/retry",
        f"/api/sagas/{running}/abort",
        f"/api/sagas/{running}/resolve",
    ]
    for path in paths:
        documented = document["paths"][path.replace(running, "{saga_id}")]["post"]["responses"]
        assert "422" in documented
        assert "400" not in documented
        for body in (b'{"reason": "\x80"}', b"\x80", b"{not json", b"[1, 2]"):  # not UTF-8 first
            answer = await stack.client.post(
                path, content=body, headers={"Content-Type": "application/json"}
            )
            assert answer.status_code == 422, (path, body, answer.text)
            why = answer.json()
            assert why["detail"].startswith("body"), why
            assert why["errors"][0]["loc"][0] == "body", why
    assert (await stack.saga(running))["status"] == "RUNNING"  # nothing was applied


async def test_a_method_the_path_does_not_serve_names_every_one_it_does(stack: Stack) -> None:
    for method, path, allowed in (
        ("OPTIONS", "/api/sagas", "GET, POST"),
        ("DELETE", "/api/sagas", "GET, POST"),
        ("PUT", f"/api/sagas/{uuid.uuid4()}", "GET"),
        ("GET", f"/api/sagas/{uuid.uuid4()}/retry", "POST"),
    ):
        answer = await stack.client.request(method, path)
        assert answer.status_code == 405, (method, path, answer.text)
        assert answer.headers["allow"] == allowed, (method, path)
        assert answer.json()["detail"] == f"{method} is not allowed on {path}: use {allowed}"


async def test_a_time_filter_is_an_iso_time_never_a_number(stack: Stack) -> None:
    """`until=0.5` was read as half a second after 1970 (so nothing matched, silently)."""
    saga_id = await stack.start("trip", {})
    for number in ("0.5", "0", "1700000000", "-1"):
        for name in ("since", "until"):
            answer = await stack.client.get("/api/sagas", params={name: number})
            assert answer.status_code == 422, (name, number, answer.text)
            assert answer.json()["detail"].startswith(f"query.{name}: "), answer.text
            assert "is a number, not a time (not a Unix time)" in answer.json()["detail"]
    for until in ("2999-01-01", "2999-01-01T00:00:00Z", "2999-01-01T00:00:00"):
        answer = await stack.client.get("/api/sagas", params={"until": until})
        assert answer.status_code == 200, answer.text
        assert saga_id in [s["saga_id"] for s in answer.json()["items"]]


async def test_the_detail_says_what_a_stuck_saga_waits_on_and_collapses_its_retries(
    stack: Stack,
) -> None:
    """beta's refund fails (retryably) as often as its budget of four allows: the detail
    names the pending step with its attempt count and the one run those attempts make."""
    stuck = await stack.start("trip", {"gamma": ["fail"], "beta~undo": ["retry"] * 4})
    saga = await stack.wait(stuck, ["FAILED"])
    pending = saga["pending"]
    assert (pending["step"], pending["direction"], pending["participant"]) == (
        "beta",
        "compensation",
        "beta",
    )
    assert (pending["command"], pending["attempt"], pending["max_attempts"]) == ("beta.undo", 4, 4)
    assert (pending["phase"], pending["last_error"]) == ("idle", "busy")
    assert pending["next_retry_at"] is None and pending["reply_deadline"] is None
    assert pending["allowed_actions"] == ["retry", "resolve"]
    sent = [
        h
        for h in saga["history"]
        if h["kind"] == "command_sent" and (h["step"], h["direction"]) == ("beta", "compensation")
    ]
    assert pending["last_sent_at"] == sent[-1]["at"]
    [run] = saga["retry_runs"]
    assert (run["step"], run["direction"], run["command"]) == ("beta", "compensation", "beta.undo")
    assert (run["attempts"], run["errors"]) == (4, ["busy"])
    assert saga["history"][run["first"]] == sent[0]
    assert saga["history"][run["last"] + 1]["kind"] == "failed"
    assert 0 < run["min_interval_s"] <= run["max_interval_s"]

    done = await stack.wait(await stack.start("trip", {}), ["COMPLETED"])
    assert done["pending"] is None and done["retry_runs"] == []
    schema = (await stack.client.get("/openapi.json")).json()["components"]["schemas"]
    assert "retry policy" in schema["PendingStep"]["properties"]["max_attempts"]["description"]
    assert "RetryRun" in schema


async def test_a_refused_action_is_logged_once_with_every_field(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runtime logs a refusal (``operator_action_refused``); the API adds no second line
    for it, and still logs the actions that apply."""
    capture = LogCapture()  # loggers of our own: the modules' may be cached already
    logger = structlog.wrap_logger(
        structlog.PrintLogger(),
        processors=[capture],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
    )
    monkeypatch.setattr(runtime, "log", logger)
    monkeypatch.setattr(admin_app, "log", logger)
    done = await stack.start("trip", {})
    await stack.wait(done, ["COMPLETED"])
    answer = await stack.client.post(
        f"/api/sagas/{done}/retry", json={"reason": "just trying"}, headers={ACTOR_HEADER: "bo"}
    )
    assert answer.status_code == 409, answer.text
    lines = [e for e in capture.entries if e["event"].startswith("operator_action")]
    assert len(lines) == 1, lines
    [line] = lines
    assert line["event"] == "operator_action_refused"
    assert (line["saga_id"], line["saga_name"], line["status"]) == (done, "trip", "COMPLETED")
    assert (line["action"], line["actor"], line["reason"]) == ("OperatorRetry", "bo", "just trying")
    assert line["outcome"] == "rejected"
    assert "only a FAILED saga can be retried" in line["detail"]

    running = await stack.start("hold", {"beta": ["silent"]})
    await stack.wait(running, ["RUNNING"], step="beta")
    capture.entries.clear()
    answer = await stack.client.post(f"/api/sagas/{running}/abort", json={"reason": "stop"})
    assert answer.status_code == 200, answer.text
    [line] = [e for e in capture.entries if e["event"].startswith("operator_action")]
    assert (line["event"], line["action"], line["outcome"]) == (
        "operator_action",
        "abort",
        "applied",
    )
