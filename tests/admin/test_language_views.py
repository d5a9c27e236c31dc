"""What the admin API shows of parallel groups, conditions, the compensation policy and the
saga deadline: the definition's shape, and which members are in flight or stuck."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from uuid import UUID

from saga import Parallel, SagaDefinition, Step
from saga.admin.models import definition_view, saga_detail, saga_summary
from saga.core.engine import decide
from saga.core.state import ReplyFailed, ReplySucceeded, SagaStatus, Started

T0 = datetime(2030, 1, 1, tzinfo=UTC)


def step(name: str, **kw: object) -> Step:
    return Step(name, participant=name, action=f"{name}.do", compensation=f"{name}.undo", **kw)  # type: ignore[arg-type]


SHAPED = SagaDefinition(
    "shaped",
    1,
    [
        step("a"),
        Parallel(step("b"), step("c", when=lambda ctx: True)),
        step("d"),
    ],
    deadline=timedelta(minutes=2),
    on_compensation_failure="continue",
)


def test_the_definition_view_names_groups_conditions_policy_and_deadline() -> None:
    view = definition_view(SHAPED)
    assert [(s.name, s.group, s.conditional) for s in view.steps] == [
        ("a", None, False),
        ("b", 0, False),
        ("c", 0, True),
        ("d", None, False),
    ]
    assert (view.deadline_s, view.on_compensation_failure) == (120.0, "continue")


def test_the_detail_lists_members_in_flight_and_every_stuck_compensation() -> None:
    t = decide(SHAPED, None, Started(UUID(int=1), {}), T0)
    detail = saga_detail(t.state, t.history, SHAPED)
    assert detail.in_flight == ["a"] and detail.expires_at == T0 + timedelta(minutes=2)
    assert t.state.awaiting is not None
    t = decide(SHAPED, t.state, ReplySucceeded(t.state.awaiting, "a"), T0)
    assert saga_detail(t.state, t.history, SHAPED).in_flight == ["b", "c"]
    b, c = t.commands
    t = decide(SHAPED, t.state, ReplySucceeded(b.message_id, "b"), T0)
    t = decide(SHAPED, t.state, ReplySucceeded(c.message_id, "c"), T0)
    t = decide(SHAPED, t.state, ReplyFailed(t.commands[0].message_id, "d", "no"), T0)
    for _ in range(3):  # every compensation (c, b, a) refuses for good: continue goes on
        [undo] = t.commands
        t = decide(SHAPED, t.state, ReplyFailed(undo.message_id, undo.participant, "gone"), T0)
    detail = saga_detail(t.state, t.history, SHAPED)
    assert (detail.status, detail.stuck_step) == ("FAILED", "c")
    assert detail.stuck_steps == ["c", "b", "a"] and detail.in_flight == []
    assert detail.allowed_actions == ["retry", "resolve"]


def test_at_step_names_every_member_pending_and_each_has_its_own_attempt_and_deadline() -> None:
    """The list's step names the whole group in flight, not the one member the saga's timer
    is on; the pending card has each member with its own try and its own next event."""
    t = decide(SHAPED, None, Started(UUID(int=2), {}), T0)
    assert (saga_summary(t.state).at_step, saga_summary(t.state).at_steps) == ("a", ["a"])
    assert t.state.awaiting is not None
    t = decide(SHAPED, t.state, ReplySucceeded(t.state.awaiting, "a"), T0)
    b, c = t.commands
    summary = saga_summary(t.state)
    assert (summary.at_step, summary.at_steps) == ("b+c", ["b", "c"])

    later = T0 + timedelta(seconds=1)
    t = decide(SHAPED, t.state, ReplyFailed(c.message_id, "c", "busy", retryable=True), later)
    detail = saga_detail(t.state, t.history, SHAPED)
    assert (detail.at_step, detail.at_steps) == ("b+c", ["b", "c"])
    assert detail.pending is not None
    members = {m.step: m for m in detail.pending.members}
    assert list(members) == ["b", "c"]
    assert (members["b"].phase, members["b"].attempt, members["b"].max_attempts) == (
        "awaiting_reply",
        1,
        SHAPED.steps[1].retry.max_attempts,
    )
    assert members["b"].reply_deadline == T0 + SHAPED.steps[1].timeout
    assert (members["b"].last_sent_at, members["b"].next_retry_at) == (T0, None)
    assert (members["c"].phase, members["c"].last_error) == ("backoff", "busy")
    assert members["c"].next_retry_at is not None and members["c"].next_retry_at > later
    assert members["c"].reply_deadline is None

    # b succeeds: c alone is pending, still a member of its group
    t = decide(SHAPED, t.state, ReplySucceeded(b.message_id, "b"), later)
    detail = saga_detail(t.state, t.history, SHAPED)
    assert (detail.at_step, detail.at_steps) == ("c", ["c"])
    assert detail.pending is not None and [m.step for m in detail.pending.members] == ["c"]

    # a single step pending has no members
    t = decide(SHAPED, None, Started(UUID(int=3), {}), T0)
    detail = saga_detail(t.state, t.history, SHAPED)
    assert detail.pending is not None and detail.pending.members == []


def test_a_failed_group_awaiting_a_member_names_that_member() -> None:
    t = decide(SHAPED, None, Started(UUID(int=4), {}), T0)
    assert t.state.awaiting is not None
    t = decide(SHAPED, t.state, ReplySucceeded(t.state.awaiting, "a"), T0)
    b, _ = t.commands
    t = decide(SHAPED, t.state, ReplyFailed(b.message_id, "b", "no"), T0)
    assert t.state.status is SagaStatus.COMPENSATING and len(t.state.lanes) == 1
    summary = saga_summary(t.state)
    assert (summary.at_step, summary.at_steps) == ("c", ["c"])
