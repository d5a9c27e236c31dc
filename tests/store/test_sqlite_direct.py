"""What the direct SQLite paths write is exactly what SQLAlchemy writes.

The orchestrator's group commit (:mod:`saga.store.sqlite_batch`) and the participants' ledger
statements (:mod:`saga.participant.ledger_sql`) bypass SQLAlchemy's execution on SQLite. The
same changes are written both ways into two files here and every stored value is compared with
its SQLite storage class: a value stored in another format (a datetime without its
microseconds, a UUID with dashes) would sort and compare differently from rows SQLAlchemy
writes, and from the values the admin API binds. The participants' ledger statements on
PostgreSQL (:class:`~saga.participant.ledger_sql.PostgresStatements`, fixed texts on asyncpg's
connection) are compared with SQLAlchemy Core's the same way, as SQLAlchemy reads them back.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import sqlite

from saga.core.definition import SagaDefinition, Step
from saga.core.engine import decide
from saga.core.state import ReplySucceeded, Started
from saga.participant.ledger import Ledger, outbox, processed, replies, spans, tombstones
from saga.participant.ledger_sql import (
    CoreStatements,
    PostgresStatements,
    SqliteStatements,
    statements,
)
from saga.ports import Change, CommitResult, OutboxMessage
from saga.store import sql as sql_module
from saga.store.schema import UTCDateTime, sagas
from saga.store.sql import SqlStore
from saga.store.sqlite_batch import (
    Prepared,
    sqlite_utc_datetime,
    sqlite_utc_text,
    sqlite_uuid_text,
)
from tests.conftest import require_postgres

T0 = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)  # no microseconds: the format must add them
SAGA = uuid.UUID("11111111-2222-3333-4444-555555555555")
DEF = SagaDefinition(
    "order",
    1,
    [
        Step("charge", participant="pay", action="pay.charge", compensation="pay.refund"),
        Step("ship", participant="ship", action="ship.send", compensatable=False),
    ],
)


def dump(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, each value with its SQLite storage class."""
    with sqlite3.connect(path) as conn:
        tables = [
            name
            for (name,) in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite%'"
            )
        ]
        found: dict[str, list[tuple[Any, ...]]] = {}
        for table in tables:
            columns = [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]
            select = ", ".join(f"{c}, typeof({c})" for c in columns)
            found[table] = sorted(
                conn.execute(f"SELECT {select} FROM {table}").fetchall(), key=repr
            )
    return found


async def write_sagas(path: Path, *, bulk: bool) -> None:
    store = SqlStore(f"sqlite+aiosqlite:///{path}")
    await store.migrate()
    store._bulk = bulk  # False: SQLAlchemy Core, row by row
    try:
        first = decide(DEF, None, Started(SAGA, {"n": 1}, "key-1"), T0)
        assert first.state.awaiting is not None
        command = OutboxMessage(
            message_id=first.state.awaiting,
            saga_id=SAGA,
            exchange="saga.commands",
            routing_key="pay",
            message_type="pay.charge",
            body=b'{"n": 1}',
            headers={"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"},
            created_at=T0,
        )
        change = Change(first, None, inbox_id=uuid.UUID(int=1), outbox=(command,))
        assert await store.commit([change]) == [CommitResult.APPLIED]
        second = decide(
            DEF,
            first.state,
            ReplySucceeded(first.state.awaiting, "pay", {"id": "p-1"}),
            T0 + timedelta(milliseconds=1500),
        )
        change = Change(second, first.state.version, inbox_id=uuid.UUID(int=2))
        assert await store.commit([change]) == [CommitResult.APPLIED]
    finally:
        await store.close()


async def test_the_group_commit_stores_rows_as_sqlalchemy_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sql_module, "_now", lambda: T0 + timedelta(seconds=1))
    await write_sagas(tmp_path / "direct.db", bulk=True)
    await write_sagas(tmp_path / "core.db", bulk=False)
    direct, core = dump(tmp_path / "direct.db"), dump(tmp_path / "core.db")
    assert direct["saga_instances"], "nothing was written"
    assert direct == core


class Rows:
    """One transaction's ledger rows, as the runtime builds them."""

    def __init__(self, at: datetime):
        key, message = uuid.UUID(int=10), uuid.UUID(int=11)
        self.processed_rows = [
            {
                "idempotency_key": key,
                "message_id": message,
                "saga_id": SAGA,
                "command_type": "pay.charge",
                "direction": "action",
                "outcome": "success",
                "reason": None,
                "detail": None,
                "data": {"amount": "1.50", "nested": {"a": [1, 2]}},
                "processed_at": at,
            }
        ]
        self.tombstone_rows = [
            {
                "idempotency_key": uuid.UUID(int=12),
                "saga_id": SAGA,
                "step": "ship",
                "compensation_message_id": uuid.UUID(int=13),
                "created_at": at,
            }
        ]
        self.reply_rows = [
            {
                "message_id": uuid.UUID(int=14),
                "command_message_id": message,
                "body": b'{"reply": true}',
                "created_at": at,
            }
        ]
        self.outbox_rows = [
            {
                "message_id": uuid.UUID(int=14),
                "saga_id": SAGA,
                "routing_key": "saga.replies",
                "message_type": "pay.charge.reply",
                "body": b'{"reply": true}',
                "headers": {"traceparent": "00-" + "3" * 32 + "-" + "4" * 16 + "-01"},
                "created_at": at,
            }
        ]
        self.span_rows = [{"records": [{"name": "process cmd.pay", "span_id": "5" * 16}]}]


async def exercise(ledger: Ledger, pick: Callable[[Any, Ledger, Any], Any]) -> tuple[Any, ...]:
    """Write :class:`Rows` in one transaction; in another, read them back and delete the reply
    from the outbox inside a savepoint that is rolled back. ``pick`` chooses the statements
    from the connection, the ledger and what :func:`statements` chose."""
    async with ledger.begin() as conn:
        await pick(conn, ledger, await statements(conn, ledger)).write(Rows(T0))
    async with ledger.begin() as conn:
        ledger_sql = pick(conn, ledger, await statements(conn, ledger))
        keys = [uuid.UUID(int=10), uuid.UUID(int=12), uuid.UUID(int=99)]
        read = (
            await ledger_sql.given([uuid.UUID(int=14), uuid.UUID(int=98)]),
            sorted(await ledger_sql.recorded(keys)),
        )
        savepoint = await ledger_sql.savepoint()
        await ledger_sql.delete_sent([uuid.UUID(int=14)])
        await savepoint.rollback()
    return read


async def write_ledger(path: Path, pick: Callable[[Any, Ledger, Any], Any]) -> tuple[Any, ...]:
    """:func:`exercise` on a SQLite file of its own."""
    ledger = Ledger(f"sqlite+aiosqlite:///{path}")
    await ledger.setup()
    try:
        return await exercise(ledger, pick)
    finally:
        await ledger.close()


def core(conn: Any, ledger: Ledger, chosen: Any) -> Any:
    return CoreStatements(conn, ledger)


def assert_the_same_ledger(
    read: tuple[Any, ...], read_core: tuple[Any, ...], stored: dict[str, Any]
) -> None:
    """What both ways read back is the same, and what they stored is what was written."""
    for table in (processed, replies, tombstones, outbox, spans):
        assert len(stored[table.name]) == 1, table.name  # written, and the delete undone
    assert read == read_core
    given, recorded = read
    assert given == {uuid.UUID(int=14): b'{"reply": true}'}
    assert [(r.key, r.tombstone) for r in recorded] == [
        (uuid.UUID(int=10), False),
        (uuid.UUID(int=12), True),
    ]
    assert recorded[0].data == {"amount": "1.50", "nested": {"a": [1, 2]}}


async def test_the_ledger_statements_store_and_read_rows_as_sqlalchemy_does(
    tmp_path: Path,
) -> None:
    def direct(conn: Any, ledger: Ledger, chosen: Any) -> Any:
        assert isinstance(chosen, SqliteStatements)
        return chosen

    read_direct = await write_ledger(tmp_path / "direct.db", direct)
    read_core = await write_ledger(tmp_path / "core.db", core)
    assert dump(tmp_path / "direct.db") == dump(tmp_path / "core.db")
    assert_the_same_ledger(read_direct, read_core, dump(tmp_path / "direct.db"))


@pytest.mark.parametrize(
    "value",
    [
        None,
        datetime(2026, 1, 1, tzinfo=UTC),
        datetime(2026, 12, 5, 6, 53, 47, 766224, tzinfo=UTC),
        datetime(999, 1, 2, 3, 4, 5, 6, tzinfo=timezone(timedelta(hours=5))),
        datetime(
            2030, 6, 30, 23, 59, 59, 999999, tzinfo=timezone(timedelta(hours=-9, minutes=-30))
        ),
    ],
)
def test_the_fast_utc_datetime_text_is_what_sqlalchemy_stores(value: datetime | None) -> None:
    dialect = sqlite.dialect()
    sqlalchemy_process = UTCDateTime().dialect_impl(dialect).bind_processor(dialect)
    assert sqlalchemy_process is not None
    assert sqlite_utc_text(value) == sqlalchemy_process(value)
    assert sqlite_utc_text(value) == sqlalchemy_process(value)  # the same object: cached
    if value is not None:  # an equal value of another object, and then another value
        assert sqlite_utc_text(value + timedelta(0)) == sqlalchemy_process(value)
        later = value + timedelta(microseconds=1)
        assert sqlite_utc_text(later) == sqlalchemy_process(later)


@pytest.mark.parametrize(
    "value", [None, uuid.UUID(int=0), uuid.UUID(int=1), uuid.uuid4(), uuid.UUID(int=2**128 - 1)]
)
def test_the_fast_uuid_text_is_what_sqlalchemy_stores(value: uuid.UUID | None) -> None:
    dialect = sqlite.dialect()
    sqlalchemy_process = sa.Uuid().dialect_impl(dialect).bind_processor(dialect)
    assert sqlalchemy_process is not None
    assert sqlite_uuid_text(value) == sqlalchemy_process(value)


def test_the_fast_utc_datetime_text_refuses_a_naive_time_as_sqlalchemy_does() -> None:
    with pytest.raises(ValueError, match="naive"):
        sqlite_utc_text(datetime(2026, 1, 1))


@pytest.mark.parametrize(
    "value",
    [
        None,
        datetime(2026, 1, 1, tzinfo=UTC),
        datetime(2026, 12, 5, 6, 53, 47, 766224, tzinfo=UTC),
        datetime(999, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
        datetime(2030, 6, 30, 23, 59, 59, 999999, tzinfo=UTC),
    ],
)
def test_the_fast_utc_datetime_read_is_what_sqlalchemy_reads(value: datetime | None) -> None:
    dialect = sqlite.dialect()
    impl = UTCDateTime().dialect_impl(dialect)
    store, read = impl.bind_processor(dialect), impl.result_processor(dialect, None)
    assert store is not None and read is not None
    text = store(value)
    fast = sqlite_utc_datetime(text)
    assert fast == read(text)
    assert fast is None or fast.tzinfo is UTC


LANE = {
    "index": 0,
    "tries": 1,
    "phase": "awaiting_reply",
    "awaiting": str(SAGA),
    "deadline": T0.isoformat(),
    "sent_at": None,
}


async def test_the_direct_read_of_sagas_gives_what_sqlalchemy_reads(tmp_path: Path) -> None:
    """SqlStore.load_many reads sagas on sqlite3 directly (sqlite_batch.DirectSelect): every
    column as SQLAlchemy's read of the same rows gives it, for sagas in every shape."""
    path = tmp_path / "read.db"
    await write_sagas(path, bulk=True)
    store = SqlStore(f"sqlite+aiosqlite:///{path}")
    try:
        other = uuid.UUID(int=77)
        async with store._write.begin() as conn:
            row = (await conn.execute(sa.select(sagas))).mappings().one()
            await conn.execute(
                sagas.insert().values(
                    {
                        **row,
                        "saga_id": other,
                        "key": "key-2",
                        "deadline": None,
                        "awaiting": None,
                        "trace_context": None,
                        "lanes": [LANE],
                        "expires_at": T0 + timedelta(hours=1),
                        "failure": "why",
                    }
                )
            )
        assert store._select_sagas is not None
        direct = await store._select_sagas.rows([SAGA, other, uuid.UUID(int=5)])
        async with store._read.connect() as conn:
            core = (await conn.execute(sa.select(sagas))).mappings().all()
        assert sorted(direct, key=repr) == sorted((dict(r) for r in core), key=repr)
        assert len(direct) == 2
        for each in direct:
            assert {type(each[k]) for k in ("saga_id", "created_at", "steps")} == {
                uuid.UUID,
                datetime,
                list,
            }
        states = await store.load_many([SAGA, other])
        assert set(states) == {SAGA, other}
        assert states[other].lanes[0].awaiting == SAGA
        assert store.counts.statements > 0
    finally:
        await store.close()


async def _write_ledger_pg(schema: str, pick: Callable[[Any, Ledger, Any], Any]) -> Any:
    """:func:`exercise` on PostgreSQL, in a schema of its own; returns what was read and every
    table's rows as SQLAlchemy reads them."""
    ledger = Ledger(require_postgres(), schema=schema)
    await ledger.setup()
    try:
        read = await exercise(ledger, pick)
        async with ledger.engine.connect() as conn:
            tables = {}
            for table in (processed, replies, tombstones, outbox, spans):
                rows = (await conn.execute(sa.select(table))).mappings().all()
                tables[table.name] = [{k: v for k, v in r.items() if k != "id"} for r in rows]
        async with ledger.engine.begin() as conn:
            await conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
    finally:
        await ledger.close()
    return read, tables


@pytest.mark.postgres
async def test_the_ledger_statements_on_postgresql_store_and_read_as_sqlalchemy_does(
    unique: str,
) -> None:
    """PostgresStatements (fixed texts on asyncpg's connection) against SQLAlchemy Core."""

    def direct(conn: Any, ledger: Ledger, chosen: Any) -> Any:
        assert isinstance(chosen, PostgresStatements)
        return chosen

    read_direct, stored_direct = await _write_ledger_pg(f"ledger_direct_{unique}", direct)
    read_core, stored_core = await _write_ledger_pg(f"ledger_core_{unique}", core)
    assert stored_direct == stored_core
    assert_the_same_ledger(read_direct, read_core, stored_direct)


def test_a_prepared_statement_binds_each_row_by_name_through_its_processors() -> None:
    """The getter and the converted columns are made once per statement: every batch, and
    every row of it, still gets its own values, in placeholder order, each processed."""
    row = {"a": uuid.UUID(int=1), "b": "text", "c": None}
    three = Prepared("", ("c", "a", "b"), (None, sqlite_uuid_text, str.upper))
    one = Prepared("", ("a",), (sqlite_uuid_text,))
    for _ in range(2):
        assert three.rows([row, {**row, "b": "more"}]) == [
            [None, "0" * 31 + "1", "TEXT"],
            [None, "0" * 31 + "1", "MORE"],
        ]
        assert one.rows([row]) == [["0" * 31 + "1"]]
    assert Prepared("", (), ()).rows([row]) == [[]]
