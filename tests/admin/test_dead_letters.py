"""Dead letters through the admin API and the ``saga dlq`` commands, on the real RabbitMQ: real
participants (the participant library) and the orchestrator dead-letter what they cannot
apply, and the API lists, shows, replays and discards it without losing a message or its
place in its queue."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from pydantic import JsonValue
from sqlalchemy.ext.asyncio import AsyncConnection
from structlog.testing import LogCapture

from saga.admin import deadletters
from saga.admin.deadletters import SHOW_BYTES, shown_body
from saga.core.ids import command_id, idempotency_key
from saga.participant import Participant, ParticipantSettings
from saga.protocol.envelope import CommandEnvelope, StartSaga
from saga.transport.deadletters import read_dead_letter, replay_headers
from saga.transport.topology import DEAD_LETTER_REASON
from tests.admin.conftest import TOKEN, start_admin_service
from tests.admin.test_cli import saga as saga_cli
from tests.integration.harness import Harness

pytestmark = pytest.mark.rabbitmq

Handler = Callable[[AsyncConnection, dict[str, JsonValue], CommandEnvelope], Any]


@dataclass
class World:
    harness: Harness
    client: httpx.AsyncClient
    url: str
    tmp: Path
    participants: dict[str, Participant] = field(default_factory=dict)
    handled: list[str] = field(default_factory=list)

    async def participant(self, name: str, commands: list[str]) -> Participant:
        """A real participant serving ``commands`` (each answers success); replaces a running
        one of that name."""
        if name in self.participants:
            await self.participants.pop(name).stop()
        settings = ParticipantSettings(
            data_dir=self.tmp / "services",
            prefix=self.harness.prefix,
            rabbitmq_url=self.harness.rabbitmq_url,
            relay_poll_interval=0.2,
        )
        service = Participant(name, settings)
        for command_type in commands:

            async def handle(
                conn: AsyncConnection, payload: dict[str, JsonValue], command: CommandEnvelope
            ) -> dict[str, JsonValue]:
                self.handled.append(command.command_type)
                return {}

            service.handler(command_type, payload=dict[str, JsonValue], reply=dict[str, JsonValue])(
                handle
            )
        await service.start()
        self.participants[name] = service
        return service

    async def letters(self, **params: Any) -> dict[str, Any]:
        answer = await self.client.get("/api/dead-letters", params=params)
        assert answer.status_code == 200, answer.text
        page: dict[str, Any] = answer.json()
        return page

    async def wait_letters(
        self, ready: Callable[[list[dict[str, Any]]], bool], within: float = 15.0
    ) -> list[dict[str, Any]]:
        deadline = time.monotonic() + within
        while True:
            items: list[dict[str, Any]] = (await self.letters())["items"]
            if ready(items):
                return items
            if time.monotonic() > deadline:
                pytest.fail(f"dead letters never got there: {json.dumps(items, indent=1)}")
            await asyncio.sleep(0.1)

    def queue(self, participant: str) -> str:
        return self.harness.topology.command_queue(participant)


@pytest.fixture
async def world(harness: Harness, tmp_path: Path) -> AsyncIterator[World]:
    """The orchestrator with its admin API; alpha and beta serve the trip's commands, gamma
    only its compensation (so ``gamma.do`` is an unknown command to it)."""
    service = await start_admin_service(harness)
    url = f"http://127.0.0.1:{service.settings.admin_port}"
    headers = {"Authorization": f"Bearer {TOKEN}", "X-Saga-Actor": "ops-dee"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as client:
        w = World(harness, client, url, tmp_path)
        try:
            await w.participant("alpha", ["alpha.do", "alpha.undo"])
            await w.participant("beta", ["beta.do", "beta.undo"])
            await w.participant("gamma", ["gamma.undo"])
            yield w
        finally:
            for p in w.participants.values():
                await p.stop()


def command(participant: str, command_type: str, reply_to: str) -> CommandEnvelope:
    saga_id = uuid.uuid4()
    return CommandEnvelope(
        schema_version=1,
        message_id=command_id(saga_id, participant, "action", 1),
        idempotency_key=idempotency_key(saga_id, participant, "action"),
        saga_id=saga_id,
        saga_name="trip",
        step=participant,
        direction="action",
        attempt=1,
        participant=participant,
        command_type=command_type,
        reply_to=reply_to,
        deadline=datetime.now(UTC) + timedelta(minutes=5),
        payload={},
    )


async def dead_letter_four(w: World) -> dict[str, str]:
    """A malformed and an unknown-type message on gamma's queue, and the same on the
    orchestrator's (a reply that is not JSON, a start of a saga nobody registered)."""
    h, topo = w.harness, w.harness.topology
    unknown = command("gamma", "gamma.teleport", topo.reply_queue)
    start = StartSaga(
        schema_version=1, message_id=uuid.uuid4(), saga_name="nosuch", key="k1", input={}
    )
    ids = {
        "malformed": await h.publish(w.queue("gamma"), b'{"schema_version": 1, oops'),
        "unknown": await h.publish(
            w.queue("gamma"),
            unknown.model_dump_json().encode(),
            message_id=str(unknown.message_id),
        ),
        "reply": await h.publish(topo.reply_queue, b"\xff\xfe not UTF-8"),
        "start": await h.publish(
            topo.start_queue, start.model_dump_json().encode(), message_id=str(start.message_id)
        ),
        "unknown_saga": str(unknown.saga_id),
    }
    await w.wait_letters(lambda items: len(items) == 4)
    return ids


def audit_log(monkeypatch: pytest.MonkeyPatch) -> LogCapture:
    """What the dead-letter actions log, caught by a logger of our own: a module's cached
    logger ignores capture_logs() once the process has configured structlog (another test
    may have)."""
    capture = LogCapture()
    monkeypatch.setattr(
        deadletters,
        "log",
        structlog.wrap_logger(
            structlog.PrintLogger(),
            processors=[structlog.processors.add_log_level, capture],
            wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        ),
    )
    return capture


async def test_dead_letters_are_listed_shown_replayed_and_discarded(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    w, topo = world, world.harness.topology
    captured = audit_log(monkeypatch)
    ids = await dead_letter_four(w)
    page = await w.letters()
    by_id = {item["id"]: item for item in page["items"]}
    assert set(by_id) == {ids["malformed"], ids["unknown"], ids["reply"], ids["start"]}
    expected = {
        ids["malformed"]: ("invalid_json", w.queue("gamma")),
        ids["unknown"]: ("unknown_command", w.queue("gamma")),
        ids["reply"]: ("invalid_utf8", topo.reply_queue),
        ids["start"]: ("unknown_saga_name", topo.start_queue),
    }
    for message_id, (reason, queue) in expected.items():
        item = by_id[message_id]
        assert (item["reason"], item["queue"]) == (reason, queue), item
        assert item["dead_letter_queue"] == f"{queue}.dlq"
        assert item["message_id"] == message_id
        assert item["detail"]
        assert 0 <= item["age_s"] < 60
        assert (item["copies"], item["replays"]) == (1, 0)
    assert by_id[ids["unknown"]]["saga_id"] == ids["unknown_saga"]
    assert "gamma.teleport" in by_id[ids["unknown"]]["detail"]
    assert by_id[ids["malformed"]]["saga_id"] is None
    # every dead-letter queue of the deployment, from its registry and prefix
    assert {q["dead_letter_queue"] for q in page["queues"]} == {
        f"{q}.dlq"
        for q in (
            topo.reply_queue,
            topo.start_queue,
            *(w.queue(p) for p in ["alpha", "beta", "gamma"]),
        )
    }
    assert not page["truncated"]

    # filters: by queue (or its .dlq), reason, saga id, time
    only = await w.letters(queue=w.queue("gamma"))
    assert {i["id"] for i in only["items"]} == {ids["malformed"], ids["unknown"]}
    assert [q["dead_letter_queue"] for q in only["queues"]] == [f"{w.queue('gamma')}.dlq"]
    by_reason = await w.letters(reason="unknown_command")
    assert [i["id"] for i in by_reason["items"]] == [ids["unknown"]]
    by_saga = await w.letters(saga_id=ids["unknown_saga"])
    assert [i["id"] for i in by_saga["items"]] == [ids["unknown"]]
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert (await w.letters(since=future))["items"] == []
    assert len((await w.letters(until=future))["items"]) == 4
    assert len((await w.letters(limit=1))["items"]) == 1
    assert (await w.letters(limit=1))["truncated"]

    # one message: headers and body, pretty when JSON
    shown = await w.client.get(f"/api/dead-letters/{w.queue('gamma')}.dlq/{ids['unknown']}")
    assert shown.status_code == 200, shown.text
    detail = shown.json()
    assert detail["body_format"] == "json"
    assert '\n  "command_type": "gamma.teleport"' in detail["body"]
    assert detail["headers"][DEAD_LETTER_REASON] == "unknown_command"
    binary = (await w.client.get(f"/api/dead-letters/{topo.reply_queue}/{ids['reply']}")).json()
    assert binary["body_format"] == "base64"

    # unknown queue or message: 404 saying why
    missing = await w.client.get(f"/api/dead-letters/{w.queue('gamma')}/{uuid.uuid4()}")
    assert missing.status_code == 404
    assert "no dead letter" in missing.json()["detail"]
    nowhere = await w.client.get("/api/dead-letters", params={"queue": "elsewhere"})
    assert nowhere.status_code == 404
    assert f"{topo.reply_queue}.dlq" in nowhere.json()["detail"]

    # replay after fixing nothing: it is dead-lettered again, listed once, replayed once
    captured.entries.clear()
    replayed = await w.client.post(
        f"/api/dead-letters/{w.queue('gamma')}/{ids['malformed']}/replay",
        json={"reason": "see whether it goes through now"},
    )
    logs = list(captured.entries)
    assert replayed.status_code == 200, replayed.text
    result = replayed.json()
    assert (result["action"], result["actor"]) == ("replay", "ops-dee")
    assert [(m["id"], m["outcome"]) for m in result["messages"]] == [(ids["malformed"], "replayed")]
    audit = [e for e in logs if e["event"] == "dead_letter_replayed"]
    assert len(audit) == 1
    assert audit[0]["actor"] == "ops-dee"
    assert audit[0]["reason"] == "see whether it goes through now"
    assert audit[0]["log_level"] == "info"
    back = await w.wait_letters(
        lambda items: any(i["id"] == ids["malformed"] and i["replays"] == 1 for i in items)
    )
    assert [i["copies"] for i in back if i["id"] == ids["malformed"]] == [1]
    assert len(back) == 4

    # discard: gone for good; a second discard finds nothing
    captured.entries.clear()
    discarded = await w.client.post(
        f"/api/dead-letters/{topo.start_queue}.dlq/{ids['start']}/discard",
        json={"reason": "nobody runs that saga"},
    )
    logs = list(captured.entries)
    assert discarded.status_code == 200, discarded.text
    assert discarded.json()["messages"][0]["outcome"] == "discarded"
    assert [e["actor"] for e in logs if e["event"] == "dead_letter_discarded"] == ["ops-dee"]
    assert ids["start"] not in {i["id"] for i in (await w.letters())["items"]}
    again = await w.client.post(
        f"/api/dead-letters/{topo.start_queue}/{ids['start']}/discard", json={"reason": "twice"}
    )
    assert again.status_code == 404

    # a bulk action must say what it takes; a reason is required
    unfiltered = await w.client.post(
        "/api/dead-letters/discard", json={"reason": "all", "filter": {}}
    )
    assert unfiltered.status_code == 422
    assert "at least one" in unfiltered.json()["detail"]
    no_reason = await w.client.post(
        f"/api/dead-letters/{topo.reply_queue}/{ids['reply']}/discard", json={}
    )
    assert no_reason.status_code == 422
    bulk = await w.client.post(
        "/api/dead-letters/discard",
        json={"reason": "bad bytes", "filter": {"reason": "invalid_utf8"}},
    )
    assert [m["id"] for m in bulk.json()["messages"]] == [ids["reply"]]
    left = {i["id"] for i in (await w.letters())["items"]}
    assert left == {ids["malformed"], ids["unknown"]}


async def test_reading_keeps_every_message_and_its_order_under_concurrent_operators(
    world: World,
) -> None:
    """Listings at the same time all see the whole queue; a discard between them removes only
    its message; the order of the rest stays."""
    w = world
    queue = w.queue("gamma")
    sent = [await w.harness.publish(queue, f"broken {n}".encode()) for n in range(12)]
    await w.wait_letters(lambda items: len(items) == 12)

    async def listing() -> list[str]:
        return [i["id"] for i in (await w.letters(queue=queue))["items"]]

    async def discard(message_id: str) -> int:
        answer = await w.client.post(
            f"/api/dead-letters/{queue}/{message_id}/discard", json={"reason": "noise"}
        )
        return answer.status_code

    results = await asyncio.gather(
        listing(), listing(), discard(sent[5]), listing(), discard(sent[5]), listing()
    )
    assert sorted(r for r in results if isinstance(r, int)) == [200, 404]
    rest = [m for m in sent if m != sent[5]]
    for found in results:
        if isinstance(found, list):
            assert found in (sent, rest), found
    assert await listing() == rest


async def test_replaying_a_fixed_command_finishes_its_saga(world: World) -> None:
    """gamma could not handle its command (unknown to it): the saga waits; once a gamma that
    handles it runs, replaying the dead letter (chosen by saga id) completes the saga."""
    w = world
    answer = await w.client.post("/api/sagas", json={"name": "trip", "input": {}})
    saga_id = answer.json()["saga"]["saga_id"]
    items = await w.wait_letters(lambda items: any(i["saga_id"] == saga_id for i in items))
    (letter,) = items
    assert (letter["reason"], letter["message_type"]) == ("unknown_command", "gamma.do")

    await w.participant("gamma", ["gamma.do", "gamma.undo"])  # the fix, deployed
    replayed = await w.client.post(
        "/api/dead-letters/replay",
        json={"reason": "gamma.do deployed", "filter": {"saga_id": saga_id}},
    )
    assert replayed.status_code == 200, replayed.text
    assert [m["outcome"] for m in replayed.json()["messages"]] == ["replayed"]
    deadline = time.monotonic() + 20
    while (await w.client.get(f"/api/sagas/{saga_id}")).json()["status"] != "COMPLETED":
        assert time.monotonic() < deadline, "the saga did not complete after the replay"
        await asyncio.sleep(0.1)
    assert w.handled.count("gamma.do") == 1
    assert (await w.letters())["items"] == []


async def test_saga_dlq_commands(world: World) -> None:
    w = world
    ids = await dead_letter_four(w)
    gamma = w.queue("gamma")

    listed = await saga_cli("dlq", "list", url=w.url)
    assert listed.code == 0, listed.err
    for reason in ("invalid_json", "unknown_command", "invalid_utf8", "unknown_saga_name"):
        assert reason in listed.out
    assert ids["unknown"] in listed.out

    as_json = await saga_cli("dlq", "list", "--queue", gamma, "--json", url=w.url)
    assert {i["id"] for i in as_json.json()["items"]} == {ids["malformed"], ids["unknown"]}

    shown = await saga_cli("dlq", "show", gamma, ids["unknown"], url=w.url)
    assert shown.code == 0, shown.err
    assert "unknown_command" in shown.out
    assert '"command_type": "gamma.teleport"' in shown.out

    discarded = await saga_cli(
        "dlq",
        "discard",
        w.harness.topology.start_queue,
        ids["start"],
        "-r",
        "no such saga",
        url=w.url,
    )
    assert discarded.code == 0, discarded.err
    assert "discarded" in discarded.out
    gone = await saga_cli(
        "dlq", "discard", w.harness.topology.start_queue, ids["start"], "-r", "again", url=w.url
    )
    assert gone.code == 1
    assert "no dead letter" in gone.err

    replayed = await saga_cli(
        "dlq",
        "replay",
        "--queue",
        gamma,
        "--cause",
        "invalid_json",
        "-r",
        "retry it",
        url=w.url,
    )
    assert replayed.code == 0, replayed.err
    assert ids["malformed"] in replayed.out
    await w.wait_letters(
        lambda items: any(i["id"] == ids["malformed"] and i["replays"] == 1 for i in items)
    )
    nothing = await saga_cli("dlq", "replay", "-r", "everything", url=w.url)
    assert nothing.code == 2
    assert "--all" in nothing.err
    unknown = await saga_cli("dlq", "list", "--queue", "nowhere", url=w.url)
    assert unknown.code == 1
    assert "no dead-letter queue 'nowhere'" in unknown.err


# --- the pure parts ------------------------------------------------------------------------


def test_a_message_rabbitmq_dead_lettered_is_read_from_x_death() -> None:
    when = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    letter = read_dead_letter(
        "p.replies.dlq",
        "p.replies",
        b'{"saga_id": "6c1f4b0e-3f7a-4a55-9a39-0d1e5b1d2a10"}',
        headers={
            "x-death": [
                {"reason": b"delivery_limit", "queue": b"p.replies", "count": 1, "time": when}
            ],
            "traceparent": b"00-abc",
        },
    )
    assert (letter.reason, letter.queue, letter.dead_lettered_at) == (
        "delivery_limit",
        "p.replies",
        when,
    )
    assert letter.saga_id == "6c1f4b0e-3f7a-4a55-9a39-0d1e5b1d2a10"
    assert letter.id.startswith("sha256:")
    assert replay_headers(letter) == {"traceparent": "00-abc", "x-saga-replays": "1"}


def test_a_body_is_shown_pretty_clipped_or_as_base64() -> None:
    assert shown_body(b'{"a":1}') == ('{\n  "a": 1\n}', "json", False)
    text, form, clipped = shown_body(b"x" * (SHOW_BYTES + 10))
    assert (len(text), form, clipped) == (SHOW_BYTES, "text", True)
    assert shown_body(b"\xff\x00")[1] == "base64"
