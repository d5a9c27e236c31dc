"""What the admin API shows of parallel groups, conditions, the compensation policy and the
saga deadline: the definition's shape, and which members are in flight or stuck."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from uuid import UUID

from saga import Parallel, SagaDefinition, Step
from saga.admin.models import definition_view, saga_detail
from saga.core.engine import decide
from saga.core.state import ReplyFailed, ReplySucceeded, Started

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
