"""Tables of the SQL store and their versioned migrations.

Migrations are an ordered list of functions; ``saga migrate`` applies the missing ones and the
orchestrator refuses to start unless the database is exactly at :data:`HEAD`. (A list of
functions instead of alembic: the schema is small, must work on SQLite and PostgreSQL from one
code path, and needs no autogeneration; the ``schema_version`` table plays alembic's role.)
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Dialect

__all__ = [
    "HEAD",
    "MIGRATIONS",
    "UTCDateTime",
    "history",
    "inbox",
    "metadata",
    "outbox",
    "sagas",
    "spans",
]


class UTCDateTime(sa.TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite keeps no zone of its own)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are not stored; use UTC-aware ones")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


metadata = sa.MetaData()

sagas = sa.Table(
    "saga_instances",
    metadata,
    sa.Column("saga_id", sa.Uuid, primary_key=True),
    sa.Column("name", sa.String(100), nullable=False),
    sa.Column("definition_version", sa.Integer, nullable=False),
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("key", sa.String(200), nullable=True),
    sa.Column("current_step", sa.Integer, nullable=False),
    sa.Column("direction", sa.String(20), nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("tries", sa.Integer, nullable=False),
    sa.Column("phase", sa.String(20), nullable=False),
    sa.Column("awaiting", sa.Uuid, nullable=True),
    sa.Column("deadline", UTCDateTime, nullable=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.Column("failure", sa.Text, nullable=True),
    sa.Column("stuck_step", sa.String(100), nullable=True),
    sa.Column("steps", sa.JSON, nullable=False),
    sa.Column("context", sa.JSON, nullable=False),
    sa.Column("trace_context", sa.JSON, nullable=True),
    sa.Column("sent_at", UTCDateTime, nullable=True),
    #: an instance that claimed this saga's due timer (PostgreSQL, several instances): others
    #: skip it until then; every write of the saga clears it
    sa.Column("timer_claimed_until", UTCDateTime, nullable=True),
    #: the instance (saga.store.presence) that holds that claim: free once it is gone
    sa.Column("timer_claimed_by", sa.Integer, nullable=True),
    #: the members of a parallel group in flight (saga.core.state.Lane); NULL when none is
    sa.Column("lanes", sa.JSON, nullable=True),
    #: the saga's own deadline while it runs forward; NULL without one
    sa.Column("expires_at", UTCDateTime, nullable=True),
    sa.UniqueConstraint("name", "key", name="uq_saga_instances_name_key"),
    sa.Index("ix_saga_instances_deadline", "deadline"),
    sa.Index("ix_saga_instances_status_created", "status", "created_at"),
    sa.Index("ix_saga_instances_created", "created_at", "saga_id"),
)

history = sa.Table(
    "saga_history",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    sa.Column(
        "saga_id", sa.Uuid, sa.ForeignKey("saga_instances.saga_id"), nullable=False, index=True
    ),
    sa.Column("at", UTCDateTime, nullable=False),
    sa.Column("kind", sa.String(40), nullable=False),
    sa.Column("step", sa.String(100), nullable=True),
    sa.Column("direction", sa.String(20), nullable=True),
    sa.Column("attempt", sa.Integer, nullable=True),
    sa.Column("message_id", sa.Uuid, nullable=True),
    sa.Column("actor", sa.String(200), nullable=True),
    sa.Column("detail", sa.Text, nullable=False),
)

outbox = sa.Table(
    "saga_outbox",
    metadata,
    sa.Column("message_id", sa.Uuid, primary_key=True),
    sa.Column("saga_id", sa.Uuid, nullable=False),
    sa.Column("exchange", sa.String(255), nullable=False),
    sa.Column("routing_key", sa.String(255), nullable=False),
    sa.Column("message_type", sa.String(100), nullable=False),
    sa.Column("headers", sa.JSON, nullable=False),
    sa.Column("body", sa.LargeBinary, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    #: the instance that wrote (or later claimed) the row publishes it; another instance may
    #: claim it once this has passed (the writer died, or cannot reach the broker)
    sa.Column("claimed_until", UTCDateTime, nullable=True),
    #: the instance (saga.store.presence) that holds the claim: free once it is gone
    sa.Column("claimed_by", sa.Integer, nullable=True),
    sa.Index("ix_saga_outbox_created", "created_at"),
)

outbox_saga_index = sa.Index("ix_saga_outbox_saga", outbox.c.saga_id)
outbox.indexes.discard(outbox_saga_index)  # created by migration 5, not with the table

inbox = sa.Table(
    "saga_inbox",
    metadata,
    sa.Column("message_id", sa.Uuid, primary_key=True),
    sa.Column("saga_id", sa.Uuid, nullable=False),
    sa.Column("received_at", UTCDateTime, nullable=False),
)

#: spans of committed transitions, waiting to be exported (only while spans are exported):
#: written in the transaction of the work they report, deleted once the exporter took them
spans = sa.Table(
    "saga_spans",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    sa.Column("records", sa.JSON, nullable=False),
)

schema_version = sa.Table(
    "saga_schema_version",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("applied_at", UTCDateTime, nullable=False),
)


def _v1_initial(conn: Connection) -> None:
    for table in (sagas, history, outbox, inbox):
        table.create(conn, checkfirst=True)


inbox_received_index = sa.Index("ix_saga_inbox_received", inbox.c.received_at)
inbox.indexes.discard(inbox_received_index)  # created by migration 2, not with the table


def _v2_inbox_received_index(conn: Connection) -> None:
    inbox_received_index.create(conn, checkfirst=True)


def _v3_sent_at(conn: Connection) -> None:
    _add_column(conn, sagas, "sent_at")


def _v4_claims(conn: Connection) -> None:
    _add_column(conn, sagas, "timer_claimed_until")
    _add_column(conn, outbox, "claimed_until")


def _v5_claim_owners(conn: Connection) -> None:
    _add_column(conn, sagas, "timer_claimed_by")
    _add_column(conn, outbox, "claimed_by")
    outbox_saga_index.create(conn, checkfirst=True)


def _v6_spans(conn: Connection) -> None:
    spans.create(conn, checkfirst=True)


def _v7_parallel_groups(conn: Connection) -> None:
    _add_column(conn, sagas, "lanes")
    _add_column(conn, sagas, "expires_at")


def _add_column(conn: Connection, table: sa.Table, name: str) -> None:
    """Add a column to a released table; migration 1 creates it on a new database already."""
    schema = _schema(conn)
    if name in {c["name"] for c in sa.inspect(conn).get_columns(table.name, schema=schema)}:
        return
    column_type = table.c[name].type.compile(dialect=conn.dialect)
    quote = conn.dialect.identifier_preparer
    qualified = quote.quote(table.name)
    if schema is not None:
        qualified = f"{quote.quote_schema(schema)}.{qualified}"
    conn.execute(sa.text(f"ALTER TABLE {qualified} ADD COLUMN {quote.quote(name)} {column_type}"))


def _schema(conn: Connection) -> str | None:
    """The schema the tables live in (a PostgreSQL store may map them to one)."""
    translate = conn.get_execution_options().get("schema_translate_map") or {}
    schema = translate.get(None)
    return None if schema is None else str(schema)


#: (version, description, upgrade) in order; append, never edit a released one.
MIGRATIONS: list[tuple[int, str, Callable[[Connection], None]]] = [
    (1, "saga instances, history, outbox and inbox", _v1_initial),
    (2, "index on inbox arrival time, for pruning", _v2_inbox_received_index),
    (3, "when the awaited command was sent, for step latency", _v3_sent_at),
    (4, "claims of outbox rows and due timers, for several instances", _v4_claims),
    (5, "the instance holding each claim, and outbox rows by saga", _v5_claim_owners),
    (6, "spans of committed transitions, until exported", _v6_spans),
    (7, "members of a parallel group in flight, and the saga's own deadline", _v7_parallel_groups),
]
HEAD = MIGRATIONS[-1][0]
