"""Batch operator actions (``POST /api/sagas/batch/{action}``) on a real orchestrator: real
RabbitMQ, the scripted participant, and a SQLite file or a PostgreSQL schema."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from tests.admin.conftest import TOKEN, Stack, start_admin_service

pytestmark = pytest.mark.rabbitmq

BOTH = pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)

#: gamma fails, then beta's compensation fails: FAILED, root cause "step gamma failed: refused"
GAMMA_STUCK = {"gamma": ["fail"], "beta~undo": ["fail"]}
#: beta fails, then alpha's compensation fails: FAILED, root cause "step beta failed: refused"
BETA_STUCK = {"beta": ["fail"], "alpha~undo": ["fail"]}


async def _histories(stack: Stack, ids: list[str]) -> dict[str, list[dict[str, Any]]]:
    return {i: (await stack.saga(i))["history"] for i in ids}


async def _finished(client: httpx.AsyncClient, batch: dict[str, Any]) -> dict[str, Any]:
    """Poll the batch's progress until it has finished."""
    deadline = time.monotonic() + 30
    while True:
        answer = await client.get(f"/api/sagas/batch/{batch['batch_id']}")
        assert answer.status_code == 200, answer.text
        found: dict[str, Any] = answer.json()
        assert found["done"] <= found["total"]
        if found["state"] == "finished":
            assert found["done"] == found["total"]
            return found
        assert time.monotonic() < deadline, found
        await asyncio.sleep(0.05)


def _operators(saga: dict[str, Any]) -> list[tuple[str, str]]:
    return [(h["actor"], h["detail"]) for h in saga["history"] if h["kind"] == "operator"]


@BOTH
async def test_dry_run_changes_nothing_then_a_batch_retry_moves_the_failed_sagas_on(
    stack: Stack,
) -> None:
    gamma = [await stack.start("trip", GAMMA_STUCK) for _ in range(3)]
    beta = await stack.start("trip", BETA_STUCK)
    done = await stack.start("trip", {})
    for saga_id in [*gamma, beta]:
        await stack.wait(saga_id, ["FAILED"])
    await stack.wait(done, ["COMPLETED"])
    every = [*gamma, beta, done]
    before = await _histories(stack, every)

    body = {"filter": {"status": ["FAILED"], "reason": "STEP GAMMA"}, "dry_run": True}
    answer = await stack.client.post("/api/sagas/batch/retry", json=body)
    assert answer.status_code == 200, answer.text
    preview = answer.json()
    assert preview["dry_run"] is True
    assert preview["matched"] == 3 and preview["would_apply"] == 3
    assert preview["truncated"] is False
    assert {i["saga_id"] for i in preview["items"]} == set(gamma)
    for item in preview["items"]:
        assert item["name"] == "trip" and item["status"] == "FAILED"
        assert item["at_step"] == "beta"  # stuck compensating beta
        assert item["why"] == "step gamma failed: refused"
        assert item["allowed"] is True and item["refusal"] is None
    assert await _histories(stack, every) == before  # the dry run wrote nothing

    # the run acts on exactly the ids the dry run showed
    run = {
        "filter": {"status": ["FAILED"], "reason": "step gamma"},
        "reason": "gateway back",
        "saga_ids": [i["saga_id"] for i in preview["items"]][:2],
    }
    answer = await stack.client.post(
        "/api/sagas/batch/retry", json=run, headers={"X-Saga-Actor": "ann"}
    )
    assert answer.status_code == 202, answer.text
    assert answer.headers["location"] == f"/api/sagas/batch/{answer.json()['batch_id']}"
    result = await _finished(stack.client, answer.json())
    assert (result["total"], result["applied"], result["skipped"], result["failed"]) == (2, 2, 0, 0)
    assert result["actor"] == "ann" and result["reason"] == "gateway back"
    acted = [r["saga_id"] for r in result["results"]]
    assert acted == run["saga_ids"]
    assert all(r["outcome"] == "applied" and r["why"] is None for r in result["results"])
    for saga_id in acted:
        saga = await stack.wait(saga_id, ["COMPENSATED"])
        assert _operators(saga) == [("ann", "retry: gateway back")]
        assert saga["resolution"]["action"] == "retry"
    left = next(i for i in gamma if i not in acted)
    assert await _histories(stack, [left, beta, done]) == {k: before[k] for k in (left, beta, done)}

    # again on the same ids: the engine refuses each (it is COMPENSATED now), nothing changes
    settled = await _histories(stack, acted)
    answer = await stack.client.post("/api/sagas/batch/retry", json={**run, "filter": {}})
    assert answer.status_code == 202, answer.text
    again = await _finished(stack.client, answer.json())
    assert (again["applied"], again["skipped"], again["failed"]) == (0, 2, 0)
    for r in again["results"]:
        assert r["outcome"] == "skipped"
        assert r["why"] == (
            "OperatorRetry rejected: only a FAILED saga can be retried; this one is COMPENSATED"
        )
        assert r["status"] == "COMPENSATED"
    assert await _histories(stack, acted) == settled


async def test_a_batch_abort_compensates_exactly_the_running_sagas_older_than_t(
    stack: Stack,
) -> None:
    old = [await stack.start("hold", {"beta": ["silent"]}) for _ in range(2)]
    failed = await stack.start("trip", BETA_STUCK)
    for saga_id in old:
        await stack.wait(saga_id, ["RUNNING"], step="beta")
    await stack.wait(failed, ["FAILED"])
    await asyncio.sleep(0.05)
    cut = datetime.now(UTC).isoformat()
    await asyncio.sleep(0.05)
    new = await stack.start("hold", {"beta": ["silent"]})
    await stack.wait(new, ["RUNNING"], step="beta")
    before = await _histories(stack, [failed, new])

    # status RUNNING, older than the cut: the two old ones only
    running = {"filter": {"status": ["RUNNING"], "until": cut}, "dry_run": True}
    preview = (await stack.client.post("/api/sagas/batch/abort", json=running)).json()
    assert [i["saga_id"] for i in preview["items"]] == old  # oldest first

    # without the status filter the FAILED trip is selected too; its state refuses an abort
    wide = {"filter": {"until": cut}, "dry_run": True}
    preview = (await stack.client.post("/api/sagas/batch/abort", json=wide)).json()
    assert preview["matched"] == 3 and preview["would_apply"] == 2
    assert preview["would_skip"] == 1
    refused = next(i for i in preview["items"] if i["saga_id"] == failed)
    assert refused["allowed"] is False
    assert refused["refusal"] == "only a RUNNING saga can be aborted; this one is FAILED"

    answer = await stack.client.post(
        "/api/sagas/batch/abort",
        json={"filter": {"until": cut}, "reason": "customer cancelled", "expect": 3},
    )
    assert answer.status_code == 202, answer.text
    result = await _finished(stack.client, answer.json())
    assert (result["applied"], result["skipped"], result["failed"]) == (2, 1, 0)
    outcomes = {r["saga_id"]: (r["outcome"], r["why"]) for r in result["results"]}
    assert outcomes[failed] == (
        "skipped",
        "OperatorAbort rejected: only a RUNNING saga can be aborted; this one is FAILED",
    )
    for saga_id in old:
        assert outcomes[saga_id] == ("applied", None)
        saga = await stack.wait(saga_id, ["COMPENSATED"])
        assert _operators(saga) == [("admin-api", "abort: customer cancelled")]
    assert (await stack.saga(new))["status"] == "RUNNING"
    assert await _histories(stack, [failed, new]) == before


async def test_a_selection_that_changed_since_the_dry_run_is_refused_or_skipped(
    stack: Stack,
) -> None:
    gamma = [await stack.start("trip", GAMMA_STUCK) for _ in range(2)]
    for saga_id in gamma:
        await stack.wait(saga_id, ["FAILED"])
    failed = {"status": ["FAILED"]}

    # expect: the count the dry run showed; one saga was fixed by hand since: 409, nothing done
    single = await stack.client.post(f"/api/sagas/{gamma[0]}/retry", json={"reason": "by hand"})
    assert single.status_code == 200, single.text
    await stack.wait(gamma[0], ["COMPENSATED"])
    before = await _histories(stack, gamma)
    answer = await stack.client.post(
        "/api/sagas/batch/resolve", json={"filter": failed, "reason": "x", "expect": 2}
    )
    assert answer.status_code == 409, answer.text
    assert answer.json()["detail"] == (
        "the selection is 1 sagas now, not the 2 expected: the sagas changed since the dry "
        "run; run the dry run again"
    )
    assert await _histories(stack, gamma) == before

    # saga_ids: exactly those, each only if it still matches the filter
    unknown = "00000000-0000-4000-8000-000000000000"
    answer = await stack.client.post(
        "/api/sagas/batch/resolve",
        json={"filter": failed, "reason": "refunded by hand", "saga_ids": [*gamma, unknown]},
    )
    assert answer.status_code == 202, answer.text
    result = await _finished(stack.client, answer.json())
    outcomes = {r["saga_id"]: (r["outcome"], r["why"]) for r in result["results"]}
    assert outcomes == {
        gamma[1]: ("applied", None),
        gamma[0]: ("skipped", "no longer matches the filter: it is COMPENSATED"),
        unknown: ("skipped", "no saga with this id"),
    }
    assert await _histories(stack, [gamma[0]]) == {gamma[0]: before[gamma[0]]}
    resolved = await stack.wait(gamma[1], ["COMPENSATED"])
    assert _operators(resolved)[-1] == ("admin-api", "resolved by hand: refunded by hand")


async def test_bad_batch_requests_say_why(stack: Stack) -> None:
    post = stack.client.post
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("retry", {"filter": {"status": ["FAILED"]}}, "reason: say why"),
        ("retry", {"reason": "x", "filter": {}}, "give at least one of status"),
        ("retry", {"reason": "x", "filter": {"name": "trip"}, "limit": 1001}, "body.limit"),
        (
            "retry",
            {"reason": "x", "saga_ids": ["00000000-0000-4000-8000-000000000000"] * 1001},
            "body.saga_ids",
        ),
        ("retry", {"reason": "x", "filter": {"since": "0.5"}}, "body.filter.since"),
        ("retry", {"reason": "x", "filter": {"q": "xyz"}}, "not a saga id or the start"),
        ("retry", {"reason": "x", "filter": {"colour": "red"}}, "body.filter.colour"),
        ("reboot", {"reason": "x", "filter": {"name": "trip"}}, "path.action"),
    ]
    for action, body, why in cases:
        answer = await post(f"/api/sagas/batch/{action}", json=body)
        assert answer.status_code == 422, (body, answer.text)
        assert why in answer.json()["detail"], (why, answer.json()["detail"])
    # an empty filter is allowed when it says so (a dry run here: it changes nothing)
    every = await post("/api/sagas/batch/abort", json={"all": True, "dry_run": True})
    assert every.status_code == 200, every.text
    missing = await stack.client.get("/api/sagas/batch/00000000-0000-4000-8000-000000000000")
    assert missing.status_code == 404
    assert "no batch" in missing.json()["detail"]


@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_two_orchestrators_running_the_same_batch_never_double_apply(
    stack: Stack,
) -> None:
    stuck = [await stack.start("trip", GAMMA_STUCK) for _ in range(6)]
    for saga_id in stuck:
        await stack.wait(saga_id, ["FAILED"])
    other = await start_admin_service(stack.harness)
    url = f"http://127.0.0.1:{other.settings.admin_port}"
    body = {"filter": {"status": ["FAILED"]}, "reason": "both at once"}
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=15) as second:
        one, two = await asyncio.gather(
            stack.client.post("/api/sagas/batch/retry", json=body, headers={"X-Saga-Actor": "a"}),
            second.post("/api/sagas/batch/retry", json=body, headers={"X-Saga-Actor": "b"}),
        )
        assert one.status_code == two.status_code == 202, (one.text, two.text)
        first, then = await asyncio.gather(
            _finished(stack.client, one.json()), _finished(second, two.json())
        )
    assert first["failed"] == then["failed"] == 0
    assert first["applied"] + then["applied"] == 6
    for saga_id in stuck:
        saga = await stack.wait(saga_id, ["COMPENSATED"])
        assert len(_operators(saga)) == 1, saga["history"]
