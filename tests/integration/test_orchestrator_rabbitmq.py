"""The orchestrator service end to end: real RabbitMQ, a real database, a scripted participant.

Each test runs with its own queue prefix and database, asserts the final status, the commands
the participant received for the saga (in order) and the saga's history, and deletes its queues
and exchanges afterwards.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

import pytest

import saga.orchestrator.runtime
from saga.core.ids import command_id, saga_id_for_key
from saga.core.state import JSON, HistoryEntry, HistoryKind, SagaStatus, StepStatus
from saga.orchestrator.service import OrchestratorService
from saga.ports import SagaFilter
from saga.protocol.envelope import StartSaga
from tests.faults._db_helpers import LogRecorder
from tests.integration.harness import (
    Harness,
    command_types,
    commands,
    describe,
    kinds,
    reply_body,
    wait_history,
    wait_terminal,
    wait_until,
)
from tests.support.sagas import PARTICIPANTS

pytestmark = pytest.mark.rabbitmq

STEPS = list(PARTICIPANTS)


def _entries(history: Sequence[HistoryEntry], kind: HistoryKind) -> list[HistoryEntry]:
    return [h for h in history if h.kind is kind]


# --- 1. happy path ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
async def test_happy_path_completes_with_every_step_in_order(running: Harness) -> None:
    service, participant = running.service, running.participant
    started = await service.start_saga("trip", {"script": {}})

    [final] = await wait_terminal(service, [started.saga_id])

    assert final.status is SagaStatus.COMPLETED
    assert [s.status for s in final.steps] == [StepStatus.SUCCEEDED] * 3
    assert commands(participant, started.saga_id) == [
        ("alpha.do", 1),
        ("beta.do", 1),
        ("gamma.do", 1),
    ]
    history = await service.orchestrator.history(started.saga_id)
    assert kinds(history) == [
        "started",
        *["command_sent", "step_succeeded"] * 3,
        "completed",
    ]
    assert [h.step for h in _entries(history, HistoryKind.STEP_SUCCEEDED)] == STEPS
    assert service.dead_lettered == 0


# --- 2. failure at each step ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("backend", "failing"),
    [
        ("sqlite", "alpha"),
        ("sqlite", "beta"),
        ("sqlite", "gamma"),
        pytest.param("postgres", "gamma", marks=pytest.mark.postgres),
    ],
    indirect=["backend"],
)
async def test_failure_compensates_succeeded_steps_in_reverse(
    running: Harness, failing: str
) -> None:
    service, participant = running.service, running.participant
    started = await service.start_saga("trip", {"script": {failing: ["fail"]}})

    [final] = await wait_terminal(service, [started.saga_id])

    done = STEPS[: STEPS.index(failing)]
    assert final.status is SagaStatus.COMPENSATED
    assert command_types(participant, started.saga_id) == [
        *(f"{s}.do" for s in done),
        f"{failing}.do",
        *(f"{s}.undo" for s in reversed(done)),
    ]
    statuses = {s.name: s.status for s in final.steps}
    assert statuses[failing] is StepStatus.FAILED
    assert all(statuses[s] is StepStatus.COMPENSATED for s in done)
    assert all(statuses[s] is StepStatus.PENDING for s in STEPS[STEPS.index(failing) + 1 :])
    history = await service.orchestrator.history(started.saga_id)
    assert [h.step for h in _entries(history, HistoryKind.STEP_FAILED)] == [failing]
    assert [h.step for h in _entries(history, HistoryKind.STEP_COMPENSATED)] == list(reversed(done))
    assert kinds(history)[-1] == "compensated"
    assert HistoryKind.COMPLETED not in {h.kind for h in history}


# --- 3. retryable failure ---------------------------------------------------------------------


async def test_retryable_failure_is_retried_then_completes(running: Harness) -> None:
    service, participant = running.service, running.participant
    started = await service.start_saga("trip", {"script": {"beta": ["retry", "ok"]}})

    [final] = await wait_terminal(service, [started.saga_id])

    assert final.status is SagaStatus.COMPLETED
    assert commands(participant, started.saga_id) == [
        ("alpha.do", 1),
        ("beta.do", 1),
        ("beta.do", 2),
        ("gamma.do", 1),
    ]
    history = await service.orchestrator.history(started.saga_id)
    retries = _entries(history, HistoryKind.RETRY_SCHEDULED)
    assert [h.step for h in retries] == ["beta"]
    assert [(h.step, h.attempt) for h in history if h.kind is HistoryKind.COMMAND_SENT] == [
        ("alpha", 1),
        ("beta", 1),
        ("beta", 2),
        ("gamma", 1),
    ]
    assert [h.step for h in _entries(history, HistoryKind.STEP_SUCCEEDED)] == STEPS
    [failed] = _entries(history, HistoryKind.STEP_FAILED)
    assert (failed.step, failed.attempt) == ("beta", 1)
    assert "retryable" in failed.detail
    assert final.step("beta").status is StepStatus.SUCCEEDED


# --- 4. step timeout --------------------------------------------------------------------------


async def test_step_timeout_compensates_the_timed_out_step_too(running: Harness) -> None:
    service, participant = running.service, running.participant
    started = await service.start_saga("trip", {"script": {"beta": ["silent"] * 3}})

    [final] = await wait_terminal(service, [started.saga_id])

    assert final.status is SagaStatus.COMPENSATED
    assert commands(participant, started.saga_id) == [
        ("alpha.do", 1),
        ("beta.do", 1),
        ("beta.do", 2),
        ("beta.do", 3),
        ("beta.undo", 1),
        ("alpha.undo", 1),
    ]
    assert final.step("beta").status is StepStatus.COMPENSATED
    assert final.step("gamma").status is StepStatus.PENDING
    history = await service.orchestrator.history(started.saga_id)
    timed_out = _entries(history, HistoryKind.STEP_TIMED_OUT)
    assert [(h.step, h.attempt) for h in timed_out] == [("beta", 1), ("beta", 2), ("beta", 3)]
    [compensating] = _entries(history, HistoryKind.COMPENSATION_STARTED)
    assert "timed out" in compensating.detail
    assert kinds(history).index("compensation_started") > kinds(history).index("step_timed_out")
    assert [h.step for h in _entries(history, HistoryKind.STEP_COMPENSATED)] == [
        "beta",
        "alpha",
    ]
    assert kinds(history)[-1] == "compensated"


# --- 5. late reply ----------------------------------------------------------------------------


async def test_late_reply_after_timeout_is_ignored(running: Harness) -> None:
    service, participant = running.service, running.participant
    started = await service.start_saga("trip", {"script": {"beta": ["late"]}})
    saga_id = started.saga_id

    [final] = await wait_terminal(service, [saga_id])
    assert final.status is SagaStatus.COMPLETED
    assert commands(participant, saga_id) == [
        ("alpha.do", 1),
        ("beta.do", 1),
        ("beta.do", 2),
        ("gamma.do", 1),
    ]

    # the reply to attempt 1 arrives 2.5 s after the command, 1 s after its timeout
    [ignored] = await wait_history(service, saga_id, HistoryKind.IGNORED, 1)
    late_reply_id = uuid.uuid5(command_id(saga_id, "beta", "action", 1), "reply")
    assert ignored.message_id == late_reply_id
    assert "late" in ignored.detail
    assert "beta action attempt 1" in ignored.detail
    history = await service.orchestrator.history(saga_id)
    [timed_out] = _entries(history, HistoryKind.STEP_TIMED_OUT)
    assert (timed_out.step, timed_out.attempt) == ("beta", 1)
    assert [(h.step, h.attempt) for h in _entries(history, HistoryKind.STEP_SUCCEEDED)] == [
        ("alpha", 1),
        ("beta", 2),
        ("gamma", 1),
    ]
    assert kinds(history).index("completed") < kinds(history).index("ignored")
    after = await service.orchestrator.get(saga_id)
    assert after.status is SagaStatus.COMPLETED
    assert after.version == final.version  # the late reply changed nothing


# --- 6. duplicate replies ---------------------------------------------------------------------


async def test_duplicate_replies_advance_the_saga_once(running: Harness) -> None:
    service, participant = running.service, running.participant
    script: JSON = {step: ["dup"] for step in STEPS}
    started = await service.start_saga("trip", {"script": script})
    saga_id = started.saga_id

    [final] = await wait_terminal(service, [saga_id])
    assert final.status is SagaStatus.COMPLETED
    assert commands(participant, saga_id) == [("alpha.do", 1), ("beta.do", 1), ("gamma.do", 1)]

    # per step: the same reply id twice (the inbox drops the copy without a trace) and once
    # with a fresh id (recorded as ignored); without the inbox there would be six entries
    ignored = await wait_history(service, saga_id, HistoryKind.IGNORED, 3)
    assert len(ignored) == 3, [describe(h) for h in ignored]
    assert all("duplicate" in h.detail for h in ignored)
    assert len({h.message_id for h in ignored}) == 3
    for step in STEPS:
        assert sum(f"to {step} action attempt 1" in h.detail for h in ignored) == 1
    history = await service.orchestrator.history(saga_id)
    assert [h.step for h in _entries(history, HistoryKind.STEP_SUCCEEDED)] == STEPS
    assert (await service.orchestrator.get(saga_id)).version == final.version


# --- 7. reply for an unknown saga -------------------------------------------------------------


async def test_reply_for_unknown_saga_is_dead_lettered(running: Harness) -> None:
    service, participant = running.service, running.participant
    reply_queue = running.topology.reply_queue
    stranger = uuid.uuid4()
    body = reply_body(stranger)
    message_id = await running.publish(reply_queue, body)

    [dead] = await running.dead_letters(reply_queue, 1)
    assert dead.reason == "unknown_saga"
    assert dead.message_id == message_id
    assert dead.body == body
    assert dead.headers["x-saga-dead-letter-queue"] == reply_queue
    assert str(stranger) in dead.headers["x-saga-dead-letter-detail"]
    assert await service.store.load(stranger) is None
    assert service.dead_lettered == 1

    started = await service.start_saga("trip", {"script": {}})
    [final] = await wait_terminal(service, [started.saga_id])
    assert final.status is SagaStatus.COMPLETED
    assert command_types(participant, started.saga_id) == ["alpha.do", "beta.do", "gamma.do"]


# --- 8. malformed messages --------------------------------------------------------------------


async def test_malformed_messages_are_dead_lettered_with_a_reason(harness: Harness) -> None:
    service = await harness.start_service(max_message_bytes=2048)
    participant = await harness.start_responder()
    reply_queue, start_queue = harness.topology.reply_queue, harness.topology.start_queue
    valid = reply_body(uuid.uuid4())
    expected = {
        await harness.publish(reply_queue, b'{"schema_version": 1, "saga_id": '): "invalid_json",
        await harness.publish(reply_queue, b'{"detail": "\xff\xfe"}'): "invalid_utf8",
        await harness.publish(reply_queue, valid, content_type="text/plain"): (
            "wrong_content_type"
        ),
        await harness.publish(reply_queue, json.dumps({"schema_version": 1}).encode()): (
            "schema_violation"
        ),
        await harness.publish(reply_queue, b'{"pad": "' + b"x" * 3000 + b'"}'): "too_large",
    }
    bad_start = await harness.publish(start_queue, b"not json at all")

    dead = await harness.dead_letters(reply_queue, len(expected))
    assert {d.message_id: d.reason for d in dead} == expected
    assert all(d.headers["x-saga-dead-letter-queue"] == reply_queue for d in dead)
    [dead_start] = await harness.dead_letters(start_queue, 1)
    assert (dead_start.message_id, dead_start.reason) == (bad_start, "invalid_json")
    assert service.dead_lettered == len(expected) + 1

    # nothing was half-applied and the service keeps working
    assert await service.store.list_sagas(SagaFilter()) == []
    started = await service.start_saga("trip", {"script": {"beta": ["retry"]}})
    [final] = await wait_terminal(service, [started.saga_id])
    assert final.status is SagaStatus.COMPLETED
    assert command_types(participant, started.saga_id) == [
        "alpha.do",
        "beta.do",
        "beta.do",
        "gamma.do",
    ]


# --- 9. starting through the start queue ------------------------------------------------------


def _start_message(name: str, key: str, message_id: uuid.UUID | None = None) -> bytes:
    request = StartSaga(
        schema_version=1,
        message_id=message_id or uuid.uuid4(),
        saga_name=name,
        key=key,
        input={"script": {"alpha": ["retry"]}},
    )
    return request.model_dump_json().encode()


async def test_start_queue_starts_one_saga_per_key(running: Harness) -> None:
    service, participant = running.service, running.participant
    start_queue = running.topology.start_queue
    key = f"order-{uuid.uuid4().hex[:8]}"
    first = _start_message("trip", key)
    await running.publish(start_queue, first)
    await running.publish(start_queue, first)  # redelivered copy: same message id
    await running.publish(start_queue, _start_message("trip", key))  # client retry: new id
    unknown = await running.publish(start_queue, _start_message("no-such-saga", key))

    saga_id = saga_id_for_key("trip", key)
    [final] = await wait_terminal(service, [saga_id])

    assert final.status is SagaStatus.COMPLETED
    assert final.key == key
    assert commands(participant, saga_id) == [
        ("alpha.do", 1),
        ("alpha.do", 2),
        ("beta.do", 1),
        ("gamma.do", 1),
    ]
    [dead] = await running.dead_letters(start_queue, 1)
    assert (dead.message_id, dead.reason) == (unknown, "unknown_saga_name")
    assert "no-such-saga" in dead.headers["x-saga-dead-letter-detail"]
    sagas = await service.store.list_sagas(SagaFilter())
    assert [s.saga_id for s in sagas] == [saga_id]
    history = await service.orchestrator.history(saga_id)
    assert kinds(history).count("started") == 1
    assert len({r["saga_id"] for r in participant.received}) == 1
    assert service.dead_lettered == 1


def _consumed(service: OrchestratorService, queue: str, outcome: str) -> float:
    value = service.metrics.registry.get_sample_value(
        "saga_messages_consumed_total", {"queue": queue, "outcome": outcome}
    )
    return value or 0.0


async def test_duplicate_starts_are_counted_as_duplicates_and_logged(
    running: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = LogRecorder()
    monkeypatch.setattr(saga.orchestrator.runtime, "log", recorder)
    service = running.service
    start_queue = running.topology.start_queue
    key, other = f"order-{uuid.uuid4().hex[:8]}", f"order-{uuid.uuid4().hex[:8]}"
    first = _start_message("trip", key)
    await running.publish(start_queue, first)
    await running.publish(start_queue, first)  # a redelivered copy, likely before the commit
    await running.publish(start_queue, _start_message("trip", other))
    saga_id = saga_id_for_key("trip", key)
    # counted once committed: both sagas exist from here on
    await wait_until(lambda: _consumed(service, start_queue, "applied") >= 2, "both sagas to start")
    await running.publish(start_queue, first)  # re-sent after the commit: same message id
    await running.publish(start_queue, _start_message("trip", key))  # retry: new id, same key

    await wait_until(
        lambda: sum(_consumed(service, start_queue, o) for o in ("applied", "duplicate")) >= 5,
        "every start to be consumed",
    )

    assert len(await service.store.list_sagas(SagaFilter())) == 2
    assert _consumed(service, start_queue, "applied") == 2
    assert _consumed(service, start_queue, "duplicate") == 3
    ignored = recorder.named("ignored", saga_id=str(saga_id))
    assert len(ignored) == 3
    assert {(line["level"], line["detail"]) for line in ignored} == {
        ("info", "saga already started")
    }
    assert not recorder.named("ignored", saga_id=str(saga_id_for_key("trip", other)))


# --- 10. compensation that keeps failing ------------------------------------------------------


async def test_compensation_retries_then_fails_then_operator_retry(running: Harness) -> None:
    service, participant = running.service, running.participant
    recovers = await service.start_saga(
        "trip", {"script": {"beta": ["fail"], "alpha~undo": ["retry", "retry"]}}
    )
    stuck = await service.start_saga(
        "trip", {"script": {"beta": ["fail"], "alpha~undo": ["retry"] * 4}}
    )
    # beyond the limit of 4: the same four attempts, then FAILED; after the operator's retry
    # the budget starts over, so attempts 5 and 6 fail again and the 7th compensates
    beyond = await service.start_saga(
        "trip", {"script": {"beta": ["fail"], "alpha~undo": ["retry"] * 6}}
    )

    recovered, failed, past = await wait_terminal(
        service, [recovers.saga_id, stuck.saga_id, beyond.saga_id]
    )

    assert recovered.status is SagaStatus.COMPENSATED
    assert commands(participant, recovers.saga_id) == [
        ("alpha.do", 1),
        ("beta.do", 1),
        ("alpha.undo", 1),
        ("alpha.undo", 2),
        ("alpha.undo", 3),
    ]
    assert failed.status is SagaStatus.FAILED
    assert failed.stuck_step == "alpha"
    assert failed.step("alpha").status is not StepStatus.COMPENSATED
    assert commands(participant, stuck.saga_id) == [
        ("alpha.do", 1),
        ("beta.do", 1),
        *(("alpha.undo", n) for n in range(1, 5)),
    ]
    history = await service.orchestrator.history(stuck.saga_id)
    failures = _entries(history, HistoryKind.COMPENSATION_FAILED)
    assert [(h.step, h.attempt) for h in failures] == [("alpha", n) for n in range(1, 5)]
    assert kinds(history)[-1] == "failed"
    assert _entries(history, HistoryKind.FAILED)[0].step == "alpha"
    history = await service.orchestrator.history(recovers.saga_id)
    assert len(_entries(history, HistoryKind.COMPENSATION_FAILED)) == 2
    assert kinds(history)[-1] == "compensated"
    assert (past.status, past.stuck_step) == (SagaStatus.FAILED, "alpha")
    assert commands(participant, beyond.saga_id) == commands(participant, stuck.saga_id)

    result = await service.orchestrator.retry(stuck.saga_id, actor="ops", reason="fixed")
    assert result.state.status is SagaStatus.COMPENSATING
    [final] = await wait_terminal(service, [stuck.saga_id])

    assert final.status is SagaStatus.COMPENSATED
    assert final.stuck_step is None
    assert commands(participant, stuck.saga_id)[-1] == ("alpha.undo", 5)
    assert len(commands(participant, stuck.saga_id)) == 7
    history = await service.orchestrator.history(stuck.saga_id)
    [operator] = _entries(history, HistoryKind.OPERATOR)
    assert operator.actor == "ops"
    assert "fixed" in operator.detail
    assert [h.step for h in _entries(history, HistoryKind.STEP_COMPENSATED)] == ["alpha"]
    assert kinds(history)[-1] == "compensated"

    await service.orchestrator.retry(beyond.saga_id, actor="ops", reason="try again")
    [final] = await wait_terminal(service, [beyond.saga_id])
    assert final.status is SagaStatus.COMPENSATED
    assert commands(participant, beyond.saga_id)[2:] == [("alpha.undo", n) for n in range(1, 8)]
    history = await service.orchestrator.history(beyond.saga_id)
    failures = _entries(history, HistoryKind.COMPENSATION_FAILED)
    assert [h.attempt for h in failures] == [1, 2, 3, 4, 5, 6]
    assert kinds(history).count("failed") == 1
    assert kinds(history)[-1] == "compensated"


# --- 11. restart ------------------------------------------------------------------------------


async def test_restart_resumes_sagas_in_flight(harness: Harness) -> None:
    first = await harness.start_service()
    quiet: JSON = {}  # replies wait in the reply queue while no orchestrator runs
    silent: JSON = {"alpha": ["silent"]}  # a deadline passes during the restart
    failing: JSON = {"beta": ["fail"]}  # compensation after the restart
    scripts = [quiet] * 6 + [silent] * 3 + [failing] * 3
    started = [await first.start_saga("trip", {"script": s}) for s in scripts]
    ids = [s.saga_id for s in started]
    assert all(s.status is SagaStatus.RUNNING for s in started)
    await harness.stop_service(first)  # the participant is not consuming yet

    participant = await harness.start_responder()
    # Every alpha.do was waiting in its queue, each published exactly once: a graceful stop
    # lets the relay finish before its last flush, so nothing is sent twice.
    await wait_until(lambda: len(participant.received) >= len(ids), "alpha.do delivered")
    assert {r["saga_id"] for r in participant.received} == {str(i) for i in ids}
    assert {r["step"] for r in participant.received} == {"alpha"}

    # let the silent sagas' deadlines pass while no orchestrator runs
    deadline = max(s.deadline for s in started if s.deadline is not None)
    await asyncio.sleep(max(0.0, (deadline - datetime.now(UTC)).total_seconds() + 0.1))
    second = await harness.start_service()
    finals = await wait_terminal(second, ids)

    assert [f.status for f in finals] == [SagaStatus.COMPLETED] * 9 + [SagaStatus.COMPENSATED] * 3
    for saga_id in ids[:6]:
        assert commands(participant, saga_id) == [
            ("alpha.do", 1),
            ("beta.do", 1),
            ("gamma.do", 1),
        ]
    for saga_id in ids[6:9]:
        assert commands(participant, saga_id) == [
            ("alpha.do", 1),
            ("alpha.do", 2),
            ("beta.do", 1),
            ("gamma.do", 1),
        ]
        history = await second.orchestrator.history(saga_id)
        assert [h.attempt for h in _entries(history, HistoryKind.STEP_TIMED_OUT)] == [1]
    for saga_id in ids[9:]:
        assert commands(participant, saga_id) == [
            ("alpha.do", 1),
            ("beta.do", 1),
            ("alpha.undo", 1),
        ]
    for saga_id in ids:
        history = await second.orchestrator.history(saga_id)
        assert kinds(history).count("started") == 1
        assert kinds(history).count("command_sent") == len(commands(participant, saga_id))
