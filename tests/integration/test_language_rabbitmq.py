"""Parallel groups, conditional steps, the compensation-failure policy and the saga deadline on
the real stack: the orchestrator service on RabbitMQ and a database, three participants built
with the participant library, each with a durable SQLite ledger.

"Once" is read from the participants' own tables: each handler run that took effect wrote one
``effects`` row in the transaction that recorded its answer. A member that must still be in
flight is held at a gate of the participant's handler until the test has seen what it waits
for in the store, so no assertion depends on which of two timers or replies comes first.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from uuid import UUID

import pytest

from saga.core.state import Direction, HistoryEntry, HistoryKind, SagaState, SagaStatus, StepStatus
from saga.orchestrator.runtime import Outcome
from saga.orchestrator.service import OrchestratorService
from tests.integration.harness import Harness, describe, wait_terminal
from tests.support.language import Participants, registry, running_participants

pytestmark = pytest.mark.rabbitmq

BOOKS = {"flight": "beta.book", "hotel": "gamma.book"}
CANCELS = {"flight": "beta.cancel", "hotel": "gamma.cancel"}


@pytest.fixture
async def stack(harness: Harness, tmp_path: Path) -> AsyncIterator[Participants]:
    """The orchestrator with the tour sagas, and alpha, beta and gamma with their ledgers."""
    await harness.start_service(definitions=registry())
    async with running_participants(
        tmp_path / "participants", harness.prefix, harness.rabbitmq_url
    ) as participants:
        yield participants


async def wait_state(
    service: OrchestratorService,
    saga_id: UUID,
    check: Callable[[SagaState], bool],
    what: str,
    *,
    timeout: float = 15.0,  # noqa: ASYNC109
) -> SagaState:
    """Poll the store until the saga's state passes ``check``; fail with its history if not."""
    deadline = time.monotonic() + timeout
    while True:
        state = await service.store.load(saga_id)
        if state is not None and check(state):
            return state
        if time.monotonic() > deadline:
            history = await service.orchestrator.history(saga_id)
            lines = "\n    ".join(describe(h) for h in history)
            pytest.fail(f"saga never reached: {what}; history:\n    {lines}")
        await asyncio.sleep(0.05)


def sent(history: list[HistoryEntry], direction: Direction) -> list[str | None]:
    return [
        h.step for h in history if h.kind is HistoryKind.COMMAND_SENT and h.direction is direction
    ]


def compensated(history: list[HistoryEntry]) -> list[str | None]:
    return [h.step for h in history if h.kind is HistoryKind.STEP_COMPENSATED]


def nothing_dead_lettered(service: OrchestratorService, stack: Participants) -> None:
    """Late and duplicate answers are ignored or deduplicated, never refused as bad messages."""
    assert service.dead_lettered == 0
    assert [p.dead_lettered for p in stack.services.values()] == [0, 0, 0]


def statuses(state: SagaState) -> dict[str, StepStatus]:
    return {s.name: s.status for s in state.steps}


# --- success, and the conditional step ---------------------------------------------------------


@pytest.mark.parametrize(
    ("backend", "insure"),
    [
        ("sqlite", False),
        ("sqlite", True),
        pytest.param("postgres", False, marks=pytest.mark.postgres),
    ],
    indirect=["backend"],
)
async def test_a_parallel_saga_completes_with_each_effect_once(
    harness: Harness, stack: Participants, insure: bool
) -> None:
    service = harness.service
    started = await service.start_saga("tour", {"insure": insure})

    [final] = await wait_terminal(service, [started.saga_id])

    assert final.status is SagaStatus.COMPLETED, final.failure
    insured = StepStatus.SUCCEEDED if insure else StepStatus.SKIPPED
    assert statuses(final) == {
        "reserve": StepStatus.SUCCEEDED,
        "flight": StepStatus.SUCCEEDED,
        "hotel": StepStatus.SUCCEEDED,
        "insure": insured,
        "confirm": StepStatus.SUCCEEDED,
    }
    assert final.lanes == ()
    assert final.context.output("flight") == {"done": "beta.book"}
    expected = Counter(["alpha.reserve", "beta.book", "gamma.book", "alpha.confirm"])
    if insure:
        expected["alpha.insure"] = 1
    assert await stack.effects() == expected
    assert stack.script.entered == expected  # the skipped step never reached its participant
    history = await service.orchestrator.history(started.saga_id)
    actions = sent(history, Direction.ACTION)
    assert actions == ["reserve", "flight", "hotel", *(["insure"] if insure else []), "confirm"]
    # fan-out: both members left before either answered
    kinds = [(h.kind, h.step) for h in history]
    first_answer = min(
        kinds.index((HistoryKind.STEP_SUCCEEDED, "flight")),
        kinds.index((HistoryKind.STEP_SUCCEEDED, "hotel")),
    )
    assert kinds.index((HistoryKind.COMMAND_SENT, "hotel")) < first_answer
    skipped = [h.step for h in history if h.kind is HistoryKind.STEP_SKIPPED]
    assert skipped == ([] if insure else ["insure"])
    assert sent(history, Direction.COMPENSATION) == []
    nothing_dead_lettered(harness.service, stack)


# --- a member fails: its sibling is awaited, then everything is undone newest first -------------


@pytest.mark.parametrize(
    ("backend", "failing"),
    [
        ("sqlite", "flight"),
        ("sqlite", "hotel"),
        pytest.param("postgres", "hotel", marks=pytest.mark.postgres),
    ],
    indirect=["backend"],
)
async def test_a_failing_member_awaits_its_sibling_then_compensates_newest_first(
    harness: Harness, stack: Participants, failing: str
) -> None:
    service, script = harness.service, stack.script
    other = "hotel" if failing == "flight" else "flight"
    script.refuse.add(BOOKS[failing])
    script.hold(BOOKS[other])
    started = await service.start_saga("tour", {"insure": True})
    saga_id = started.saga_id

    waiting = await wait_state(
        service,
        saga_id,
        lambda s: s.status is SagaStatus.COMPENSATING,
        f"{failing} refused while {other} is in flight",
    )
    # the sibling is awaited: still in flight, and no compensation has left
    assert statuses(waiting)[failing] is StepStatus.FAILED
    assert statuses(waiting)[other] is StepStatus.RUNNING
    assert [waiting.steps[lane.index].name for lane in waiting.lanes] == [other]
    assert sent(await service.orchestrator.history(saga_id), Direction.COMPENSATION) == []
    script.release(BOOKS[other])

    [final] = await wait_terminal(service, [saga_id])

    assert final.status is SagaStatus.COMPENSATED
    assert statuses(final) == {
        "reserve": StepStatus.COMPENSATED,
        failing: StepStatus.FAILED,
        other: StepStatus.COMPENSATED,
        "insure": StepStatus.PENDING,
        "confirm": StepStatus.PENDING,
    }
    history = await service.orchestrator.history(saga_id)
    assert compensated(history) == [other, "reserve"]
    assert sent(history, Direction.COMPENSATION) == [other, "reserve"]
    assert await stack.effects() == Counter(
        ["alpha.reserve", BOOKS[other], CANCELS[other], "alpha.release"]
    )
    recorded = await stack.recorded()
    assert recorded[(BOOKS[failing], "failure")] == 1
    assert CANCELS[failing] not in script.entered  # nothing to undo: it never took effect
    nothing_dead_lettered(harness.service, stack)


# --- a member times out: its outcome is unknown, so it is compensated ----------------------------


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
async def test_a_member_that_times_out_is_compensated_with_its_sibling(
    harness: Harness, stack: Participants
) -> None:
    service, script = harness.service, stack.script
    script.hold("gamma.book")  # the hotel answers only after its 1.5 s timeout
    started = await service.start_saga("tour-timeout", {})
    saga_id = started.saga_id

    await wait_state(
        service,
        saga_id,
        lambda s: s.status is SagaStatus.COMPENSATING,
        "the hotel timed out",
    )
    script.release("gamma.book")  # takes effect late: only its compensation can undo it

    [final] = await wait_terminal(service, [saga_id])

    assert final.status is SagaStatus.COMPENSATED
    history = await service.orchestrator.history(saga_id)
    timed_out = [(h.step, h.attempt) for h in history if h.kind is HistoryKind.STEP_TIMED_OUT]
    assert timed_out == [("hotel", 1)]
    assert compensated(history) == ["hotel", "flight", "reserve"]
    assert sent(history, Direction.COMPENSATION) == ["hotel", "flight", "reserve"]
    assert await stack.effects() == Counter(
        ["alpha.reserve", "beta.book", "gamma.book", "gamma.cancel", "beta.cancel", "alpha.release"]
    )
    nothing_dead_lettered(harness.service, stack)


# --- operator abort while the group is in flight -----------------------------------------------


async def test_an_operator_abort_of_a_group_in_flight_compensates_every_member(
    harness: Harness, stack: Participants
) -> None:
    service, script = harness.service, stack.script
    script.hold("beta.book", "gamma.book")
    started = await service.start_saga("tour", {})
    saga_id = started.saga_id
    await wait_state(service, saga_id, lambda s: len(s.lanes) == 2, "both members in flight")

    result = await service.orchestrator.abort(saga_id, actor="ops", reason="customer cancelled")

    assert result.outcome is Outcome.APPLIED
    assert result.state.status is SagaStatus.COMPENSATING
    assert result.state.lanes == ()
    script.release("beta.book", "gamma.book")
    [final] = await wait_terminal(service, [saga_id])

    assert final.status is SagaStatus.COMPENSATED
    assert "ops" in (final.failure or "")
    history = await service.orchestrator.history(saga_id)
    assert compensated(history) == ["hotel", "flight", "reserve"]
    assert sent(history, Direction.COMPENSATION) == ["hotel", "flight", "reserve"]
    # the actions were under way when the saga was aborted: each took effect once, and each
    # was undone once
    assert await stack.effects() == Counter(
        ["alpha.reserve", "beta.book", "gamma.book", "gamma.cancel", "beta.cancel", "alpha.release"]
    )
    nothing_dead_lettered(harness.service, stack)


# --- the continue policy: a stuck compensation is passed over, then retried by an operator ------


async def test_the_continue_policy_names_the_stuck_step_and_an_operator_retry_finishes(
    harness: Harness, stack: Participants
) -> None:
    service, script = harness.service, stack.script
    script.refuse.add("alpha.confirm")
    script.transient.add("beta.cancel")  # fails on both attempts of its budget
    started = await service.start_saga("tour-continue", {})
    saga_id = started.saga_id

    [failed] = await wait_terminal(service, [saga_id])

    assert failed.status is SagaStatus.FAILED
    assert failed.stuck_step == "flight"
    assert "flight" in (failed.failure or "")
    assert statuses(failed) == {
        "reserve": StepStatus.COMPENSATED,
        "flight": StepStatus.COMPENSATING,
        "hotel": StepStatus.COMPENSATED,
        "insure": StepStatus.SKIPPED,
        "confirm": StepStatus.FAILED,
    }
    history = await service.orchestrator.history(saga_id)
    # the older step was compensated after the stuck one, not left waiting for the operator
    assert compensated(history) == ["hotel", "reserve"]
    assert await stack.effects() == Counter(
        ["alpha.reserve", "beta.book", "gamma.book", "gamma.cancel", "alpha.release"]
    )
    assert script.entered["beta.cancel"] == 2

    script.transient.clear()  # the operator fixed the flight service
    result = await service.orchestrator.retry(saga_id, actor="ops", reason="airline is back")
    assert result.outcome is Outcome.APPLIED
    [final] = await wait_terminal(service, [saga_id])

    assert final.status is SagaStatus.COMPENSATED
    assert final.stuck_step is None
    history = await service.orchestrator.history(saga_id)
    assert compensated(history) == ["hotel", "reserve", "flight"]
    assert await stack.effects() == Counter(
        ["alpha.reserve", "beta.book", "gamma.book", "gamma.cancel", "alpha.release", "beta.cancel"]
    )
    nothing_dead_lettered(harness.service, stack)


# --- the saga's deadline passes while the group is in flight -------------------------------------


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
async def test_the_saga_deadline_mid_group_aborts_the_members_and_compensates(
    harness: Harness, stack: Participants
) -> None:
    service, script = harness.service, stack.script
    script.hold("beta.book", "gamma.book")  # neither answers before the 2 s deadline
    started = await service.start_saga("tour-deadline", {})
    saga_id = started.saga_id

    passed = await wait_state(
        service, saga_id, lambda s: s.status is not SagaStatus.RUNNING, "the deadline passed"
    )
    assert passed.status is SagaStatus.COMPENSATING
    assert passed.expires_at is None
    assert "deadline" in (passed.failure or "")
    script.release("beta.book", "gamma.book")
    [final] = await wait_terminal(service, [saga_id])

    assert final.status is SagaStatus.COMPENSATED
    history = await service.orchestrator.history(saga_id)
    assert [h.kind for h in history].count(HistoryKind.DEADLINE_PASSED) == 1
    assert compensated(history) == ["hotel", "flight", "reserve"]
    assert await stack.effects() == Counter(
        ["alpha.reserve", "beta.book", "gamma.book", "gamma.cancel", "beta.cancel", "alpha.release"]
    )
    nothing_dead_lettered(harness.service, stack)
