"""One contract suite for every store: memory, SQLite and PostgreSQL behave the same."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from saga.core.definition import Parallel, SagaDefinition, Step
from saga.core.engine import decide
from saga.core.state import (
    HistoryKind,
    Phase,
    ReplySucceeded,
    SagaState,
    SagaStatus,
    Started,
    TimerFired,
    Transition,
)
from saga.orchestrator.codec import encode_command
from saga.ports import Change, CommitResult, SagaFilter, Store
from saga.store.sql import CLAIM, SqlStore

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
DEF = SagaDefinition(
    "order",
    1,
    [
        Step("reserve", participant="stock", action="stock.reserve", compensation="stock.release"),
        Step("charge", participant="pay", action="pay.charge", compensation="pay.refund"),
    ],
)


def started(
    key: str | None = None, at: datetime = T0, saga_id: uuid.UUID | None = None
) -> Transition:
    sid = saga_id or uuid.uuid4()
    payload = {"n": 1, "nested": {"list": [1, "two", None, 3.5, True]}, "text": "äé"}
    return decide(DEF, None, Started(sid, payload, key), at)


def change_for(t: Transition, expected: int | None, inbox: uuid.UUID | None = None) -> Change:
    outbox = tuple(encode_command(c, now=t.state.updated_at) for c in t.commands)
    return Change(t, expected_version=expected, inbox_id=inbox, outbox=outbox)


def reply_ok(state: SagaState, data: dict[str, object] | None = None) -> ReplySucceeded:
    assert state.awaiting is not None
    participant = DEF.steps[state.current].participant
    return ReplySucceeded(state.awaiting, participant, data or {"id": "r-1"})  # type: ignore[arg-type]


async def create(store: Store, key: str | None = None, at: datetime = T0) -> SagaState:
    t = started(key, at)
    assert await store.commit([change_for(t, None)]) == [CommitResult.APPLIED]
    return t.state


async def test_created_saga_loads_back_equal(store: Store) -> None:
    t = started("k-1")
    assert await store.commit([change_for(t, None)]) == [CommitResult.APPLIED]
    loaded = await store.load(t.state.saga_id)
    assert loaded == t.state
    assert loaded is not None and loaded.deadline is not None and loaded.deadline.tzinfo is not None
    assert await store.load(uuid.uuid4()) is None


async def test_look_ups_at_the_same_time_each_get_their_own_saga(store: Store) -> None:
    """Concurrent loads (every start being handled checks its saga is new) are read together
    by the SQL store; each caller still gets exactly its saga, or None."""
    made = [await create(store, f"k-{n}") for n in range(8)]
    unknown = [uuid.uuid4() for _ in range(3)]
    if isinstance(store, SqlStore):
        store._states.clear()  # the SQLite copy of sagas in flight would answer without a read
    before = store.counts.statements if isinstance(store, SqlStore) else 0
    asked = [s.saga_id for s in made] + unknown + [made[0].saga_id]
    found = await asyncio.gather(*(store.load(saga_id) for saga_id in asked))
    assert found == [*made, None, None, None, made[0]]
    if isinstance(store, SqlStore) and store.dialect == "sqlite":
        assert store.counts.statements - before <= 3  # one SELECT, with its BEGIN and end


async def test_creating_twice_conflicts(store: Store) -> None:
    t = started()
    assert await store.commit([change_for(t, None)]) == [CommitResult.APPLIED]
    assert await store.commit([change_for(t, None)]) == [CommitResult.CONFLICT]


async def test_same_key_twice_conflicts(store: Store) -> None:
    await create(store, key="same")
    assert await store.commit([change_for(started("same"), None)]) == [CommitResult.CONFLICT]


async def test_version_check_refuses_stale_write_and_writes_nothing(store: Store) -> None:
    s = await create(store)
    inbox_id = uuid.uuid4()
    t = decide(DEF, s, reply_ok(s), T0 + timedelta(seconds=1))
    stale = change_for(t, expected=s.version + 5, inbox=inbox_id)
    before = await store.history(s.saga_id)
    outbox_before = {m.message_id for m in await store.pending_outbox(100)}
    assert await store.commit([stale]) == [CommitResult.CONFLICT]
    assert await store.load(s.saga_id) == s
    assert await store.history(s.saga_id) == before
    assert {m.message_id for m in await store.pending_outbox(100)} == outbox_before
    # the inbox id was not kept: the same message applies once the version is right
    assert await store.commit([change_for(t, s.version, inbox_id)]) == [CommitResult.APPLIED]
    assert await store.load(s.saga_id) == t.state


async def test_inbox_refuses_a_message_twice(store: Store) -> None:
    s = await create(store)
    inbox_id = uuid.uuid4()
    t = decide(DEF, s, reply_ok(s), T0)
    assert await store.commit([change_for(t, s.version, inbox_id)]) == [CommitResult.APPLIED]
    history = await store.history(s.saga_id)
    t2 = decide(DEF, t.state, reply_ok(t.state), T0)
    assert await store.commit([change_for(t2, t.state.version, inbox_id)]) == [
        CommitResult.DUPLICATE
    ]
    assert await store.load(s.saga_id) == t.state
    assert await store.history(s.saga_id) == history


async def test_ignored_event_records_history_only(store: Store) -> None:
    s = await create(store)
    ignored = decide(DEF, s, ReplySucceeded(uuid.uuid4(), "stock"), T0)
    assert not ignored.applied
    inbox_id = uuid.uuid4()
    assert await store.commit([change_for(ignored, s.version, inbox_id)]) == [CommitResult.RECORDED]
    assert await store.load(s.saga_id) == s
    kinds = [h.kind for h in await store.history(s.saga_id)]
    assert kinds[-1] is HistoryKind.IGNORED
    assert await store.commit([change_for(ignored, s.version, inbox_id)]) == [
        CommitResult.DUPLICATE
    ]


async def test_batch_results_are_independent_and_ordered(store: Store) -> None:
    a, b = await create(store), await create(store)
    ta1 = decide(DEF, a, reply_ok(a), T0)
    ta2 = decide(DEF, ta1.state, reply_ok(ta1.state), T0)  # same saga, next version, same batch
    tb = decide(DEF, b, reply_ok(b), T0)
    new = started()
    results = await store.commit(
        [
            change_for(ta1, a.version),
            change_for(tb, b.version + 1),  # stale
            change_for(ta2, ta1.state.version),
            change_for(new, None),
        ]
    )
    assert results == [
        CommitResult.APPLIED,
        CommitResult.CONFLICT,
        CommitResult.APPLIED,
        CommitResult.APPLIED,
    ]
    final = await store.load(a.saga_id)
    assert final is not None and final.status is SagaStatus.COMPLETED
    assert await store.load(b.saga_id) == b
    assert await store.load(new.state.saga_id) == new.state


async def test_outbox_holds_committed_commands_until_marked_sent(store: Store) -> None:
    t = started()
    await store.commit([change_for(t, None)])
    pending = await store.pending_outbox(100)
    mine = [m for m in pending if m.saga_id == t.state.saga_id]
    assert [m.message_id for m in mine] == [c.message_id for c in t.commands]
    assert mine[0].routing_key == "stock" and mine[0].message_type == "stock.reserve"
    assert mine[0].body == encode_command(t.commands[0], now=T0).body
    await store.mark_sent([mine[0].message_id])
    assert mine[0].message_id not in {m.message_id for m in await store.pending_outbox(100)}


async def publish_all(store: Store) -> None:
    """What the relay does: publish every outbox row, mark it sent, and wait for the delete."""
    pending = await store.pending_outbox(1000)
    await store.mark_sent([m.message_id for m in pending])
    if isinstance(store, SqlStore):
        for _ in range(100):
            size, _ = await store.outbox_stats(datetime.now(UTC))
            if size == 0:
                return
            await asyncio.sleep(0.02)
        raise AssertionError("sent outbox rows were not deleted")


async def test_next_deadline_is_the_earliest_as_an_aware_time(store: Store) -> None:
    assert await store.next_deadline() is None
    late = await create(store, at=T0 + timedelta(seconds=5))
    early = await create(store, at=T0)
    assert early.deadline is not None and late.deadline is not None
    found = await store.next_deadline()
    assert found == early.deadline and found is not None and found.tzinfo is not None
    assert found.utcoffset() == timedelta(0)


async def test_due_timers_in_deadline_order_and_only_due(store: Store) -> None:
    early = await create(store, at=T0)
    late = await create(store, at=T0 + timedelta(seconds=5))
    await publish_all(store)
    assert early.deadline is not None and late.deadline is not None
    assert await store.due_timers(early.deadline - timedelta(seconds=1), 10) == []
    due = await store.due_timers(late.deadline, 10)
    assert [(d.saga_id, d.timer_id) for d in due] == [
        (early.saga_id, early.awaiting),
        (late.saga_id, late.awaiting),
    ]
    if claims(store):  # both are claimed now: another call (instance) gets neither
        assert await store.due_timers(late.deadline, 10) == []
    else:
        assert len(await store.due_timers(late.deadline, 1)) == 1


async def test_a_deadline_waits_while_its_command_is_unsent(store: Store) -> None:
    """A step's timeout never runs while its command has not left the outbox (a killed
    instance's claim on it being taken over, a relay behind), up to ``unsent_hold``."""
    if not isinstance(store, SqlStore):
        return  # the in-memory store has no relay behind it: nothing waits unsent
    s = await create(store, at=T0)
    assert s.deadline is not None
    assert await store.due_timers(s.deadline, 10) == []
    later = s.deadline + store.unsent_hold  # the command waited longer than the hold
    assert [t.saga_id for t in await store.due_timers(later, 10)] == [s.saga_id]
    other = await create(store, "k-2", at=T0)
    assert other.deadline is not None
    assert other.saga_id not in {t.saga_id for t in await store.due_timers(other.deadline, 10)}
    await publish_all(store)
    assert other.saga_id in {t.saga_id for t in await store.due_timers(other.deadline, 10)}


def claims(store: Store) -> bool:
    """PostgreSQL stores claim due timers and outbox rows (several instances share them)."""
    return isinstance(store, SqlStore) and store.dialect == "postgresql"


async def test_a_claimed_timer_is_skipped_until_the_saga_is_written_or_the_claim_ends(
    store: Store,
) -> None:
    s = await create(store, at=T0)
    await publish_all(store)
    assert s.deadline is not None
    (first,) = await store.due_timers(s.deadline, 10)
    if not claims(store):
        assert await store.due_timers(s.deadline, 10) == [first]  # one instance: no claims
        return
    assert await store.due_timers(s.deadline, 10) == []
    # the claim ends by itself (the claimer died) ...
    assert [t.saga_id for t in await store.due_timers(s.deadline + CLAIM * 2, 10)] == [s.saga_id]
    # ... or when the saga is written: its next deadline is free to claim at once
    assert s.awaiting is not None
    t = decide(DEF, s, TimerFired(s.awaiting), s.deadline)
    assert await store.commit([change_for(t, s.version)]) == [CommitResult.APPLIED]
    assert t.state.deadline is not None, t.state
    assert [x.saga_id for x in await store.due_timers(t.state.deadline, 10)] == [s.saga_id]


async def test_outbox_rows_are_claimed_by_one_instance_at_a_time(store: Store) -> None:
    if not claims(store):
        return  # one instance per SQLite file or memory store: nothing to share
    assert isinstance(store, SqlStore)
    await create(store)
    other = SqlStore(store.url, schema=store.schema)  # a second instance on the same database
    try:
        # the writer's own rows are its to publish: the other instance finds none
        assert await other.pending_outbox(10) == []
        mine = await store.pending_outbox(10)
        assert len(mine) == 1
    finally:
        await other.close()


async def test_idle_sagas_have_no_timer(store: Store) -> None:
    s = await create(store)
    t1 = decide(DEF, s, reply_ok(s), T0)
    t2 = decide(DEF, t1.state, reply_ok(t1.state), T0)
    await store.commit([change_for(t1, s.version), change_for(t2, t1.state.version)])
    assert t2.state.phase is Phase.IDLE
    assert await store.due_timers(T0 + timedelta(days=365), 10) == []


async def test_history_keeps_order_and_fields(store: Store) -> None:
    s = await create(store)
    t = decide(DEF, s, reply_ok(s), T0 + timedelta(seconds=2))
    await store.commit([change_for(t, s.version)])
    history = await store.history(s.saga_id)
    created = decide(DEF, None, Started(s.saga_id, dict(s.context.input)), T0).history
    assert [h.kind for h in history] == [h.kind for h in created] + [h.kind for h in t.history]
    assert history[-1] == t.history[-1]


async def test_histories_of_many_sagas_in_one_call_keep_order_and_filter_kinds(
    store: Store,
) -> None:
    a, b, c = await create(store), await create(store), await create(store)
    t = decide(DEF, a, reply_ok(a), T0 + timedelta(seconds=2))
    await store.commit([change_for(t, a.version)])
    kinds = {HistoryKind.STARTED, HistoryKind.STEP_SUCCEEDED}
    found = await store.histories([a.saga_id, b.saga_id, uuid.uuid4()], kinds)
    assert set(found) >= {a.saga_id, b.saga_id}
    assert found[a.saga_id] == [h for h in await store.history(a.saga_id) if h.kind in kinds]
    assert [h.kind for h in found[a.saga_id]] == [HistoryKind.STARTED, HistoryKind.STEP_SUCCEEDED]
    assert [h.kind for h in found[b.saga_id]] == [HistoryKind.STARTED]
    assert c.saga_id not in found
    assert await store.histories([], kinds) == {}


async def test_list_filters_and_keyset_paging(store: Store) -> None:
    created = [await create(store, key=f"k{i}", at=T0 + timedelta(seconds=i)) for i in range(5)]
    done = decide(DEF, created[0], reply_ok(created[0]), T0)
    done = replace(done, state=replace(done.state))
    await store.commit([change_for(done, created[0].version)])
    page1 = await store.list_sagas(SagaFilter(limit=2))
    page2 = await store.list_sagas(SagaFilter(limit=2, after=page1[-1].saga_id))
    page3 = await store.list_sagas(SagaFilter(limit=2, after=page2[-1].saga_id))
    assert [s.saga_id for s in page1 + page2 + page3] == [s.saga_id for s in created]
    by_key = await store.list_sagas(SagaFilter(key="k3"))
    assert [s.saga_id for s in by_key] == [created[3].saga_id]
    running = await store.list_sagas(SagaFilter(status=SagaStatus.RUNNING, name="order"))
    assert len(running) == 5
    assert await store.list_sagas(SagaFilter(name="nope")) == []


async def test_a_change_decided_on_a_conflicted_one_never_lands(store: Store) -> None:
    """Two changes for one saga in one batch: the first conflicts, so the second (decided on
    top of it) must not land even when its expected version happens to match the store."""
    s = await create(store)
    first = decide(DEF, s, reply_ok(s), T0)  # would take the saga to version 2
    # another instance already moved the saga to version 2 on its own
    other = decide(DEF, s, ReplySucceeded(uuid.uuid4(), "stock"), T0)
    assert not other.applied
    moved = replace(s, version=s.version + 1, failure="changed elsewhere")
    assert await store.commit([Change(Transition(moved), expected_version=s.version)]) == [
        CommitResult.APPLIED
    ]
    second = decide(DEF, first.state, reply_ok(first.state), T0)
    ignored = decide(DEF, first.state, ReplySucceeded(uuid.uuid4(), "pay"), T0)
    results = await store.commit(
        [
            change_for(first, s.version),  # stale: conflicts
            change_for(second, first.state.version),  # matches version 2, but must not land
            change_for(ignored, first.state.version, inbox=uuid.uuid4()),
        ]
    )
    assert results == [CommitResult.CONFLICT] * 3
    assert await store.load(s.saga_id) == moved


async def test_prune_inbox_forgets_only_old_message_ids(store: Store) -> None:
    s = await create(store)
    inbox_id = uuid.uuid4()
    t = decide(DEF, s, reply_ok(s), T0)
    assert await store.commit([change_for(t, s.version, inbox_id)]) == [CommitResult.APPLIED]
    assert await store.prune_inbox(datetime.now(UTC) - timedelta(hours=1)) == 0
    t2 = decide(DEF, t.state, reply_ok(t.state), T0)
    assert await store.commit([change_for(t2, t.state.version, inbox_id)]) == [
        CommitResult.DUPLICATE
    ]
    assert await store.prune_inbox(datetime.now(UTC) + timedelta(seconds=1)) == 1
    assert await store.commit([change_for(t2, t.state.version, inbox_id)]) == [CommitResult.APPLIED]


GROUPED = SagaDefinition(
    "grouped",
    1,
    [
        Step("reserve", participant="stock", action="stock.reserve", compensation="stock.release"),
        Parallel(
            Step("charge", participant="pay", action="pay.charge", compensation="pay.refund"),
            Step("ship", participant="post", action="post.ship", compensation="post.recall"),
        ),
    ],
    deadline=timedelta(seconds=30),
)


async def test_a_group_in_flight_and_the_saga_deadline_load_back_equal(store: Store) -> None:
    """Each member's lane and the saga's own deadline survive a write and a fresh read, and
    the saga's one timer is the lane due first."""
    t = decide(GROUPED, None, Started(uuid.uuid4(), {"n": 1}), T0)
    assert await store.commit([change_for(t, None)]) == [CommitResult.APPLIED]
    assert t.state.awaiting is not None
    reply = ReplySucceeded(t.state.awaiting, "stock", {"id": "r-1"})
    fanned = decide(GROUPED, t.state, reply, T0 + timedelta(seconds=1))
    assert len(fanned.state.lanes) == 2 and fanned.state.expires_at is not None
    assert await store.commit([change_for(fanned, 1)]) == [CommitResult.APPLIED]
    if isinstance(store, SqlStore):
        store._states.clear()  # read the row, not the SQLite copy of sagas in flight
    loaded = await store.load(t.state.saga_id)
    assert loaded == fanned.state
    await publish_all(store)
    due = await store.due_timers(T0 + timedelta(seconds=11), 10)
    assert [d.timer_id for d in due] == [fanned.state.awaiting]
