"""A participant's ledger and reply outbox, in the same database as its business state.

``processed`` maps a command's idempotency key (the same for every attempt of one step in one
direction) to the final reply it produced, so a redelivery or a retry gets that reply again and
the effect happens once. Retryable failures are not recorded: nothing changed, so the next
attempt runs the handler afresh. ``tombstones`` holds the keys of actions whose compensation
ran before them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from saga.ports import OutboxMessage
from saga.store.fresh import OutboxCopy
from saga.store.lease import WriterLease, write_connection, write_transaction
from saga.store.schema import UTCDateTime
from saga.store.sql import delete_sent, drain_span_rows, sqlite_engine
from saga.work import WorkCounts

__all__ = [
    "Ledger",
    "ledger_metadata",
    "outbox",
    "processed",
    "replies",
    "spans",
    "tombstones",
]

ledger_metadata = sa.MetaData()

processed = sa.Table(
    "ledger_processed",
    ledger_metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    sa.Column("idempotency_key", sa.Uuid, nullable=False, unique=True),
    sa.Column("message_id", sa.Uuid, nullable=False),
    sa.Column("saga_id", sa.Uuid, nullable=False, index=True),
    sa.Column("command_type", sa.String(64), nullable=False),
    sa.Column("direction", sa.String(20), nullable=False),
    sa.Column("outcome", sa.String(10), nullable=False),
    sa.Column("reason", sa.String(64), nullable=True),
    sa.Column("detail", sa.Text, nullable=True),
    sa.Column("data", sa.JSON, nullable=False),
    sa.Column("processed_at", UTCDateTime, nullable=False),
)

#: every reply given, by its message id (derived from the command's): a redelivered message
#: gets exactly its first reply, transient failures included
replies = sa.Table(
    "ledger_replies",
    ledger_metadata,
    sa.Column("message_id", sa.Uuid, primary_key=True),
    sa.Column("command_message_id", sa.Uuid, nullable=False),
    sa.Column("body", sa.LargeBinary, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
)

#: actions closed before they arrived: a compensation that found its action unanswered leaves the
#: action's idempotency key here, and the action, should it come late, is refused unapplied
tombstones = sa.Table(
    "ledger_tombstones",
    ledger_metadata,
    sa.Column("idempotency_key", sa.Uuid, primary_key=True),
    sa.Column("saga_id", sa.Uuid, nullable=False),
    sa.Column("step", sa.String(64), nullable=False),
    sa.Column("compensation_message_id", sa.Uuid, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
)

outbox = sa.Table(
    "ledger_outbox",
    ledger_metadata,
    sa.Column("message_id", sa.Uuid, primary_key=True),
    sa.Column("saga_id", sa.Uuid, nullable=False),
    sa.Column("routing_key", sa.String(255), nullable=False),
    sa.Column("message_type", sa.String(100), nullable=False),
    sa.Column("body", sa.LargeBinary, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    #: the reply's AMQP headers (its trace context); added after the first release
    sa.Column("headers", sa.JSON, nullable=True),
)


#: spans of committed commands, waiting to be exported (only while spans are exported): written
#: in the transaction that answers the commands, deleted once the exporter took them
spans = sa.Table(
    "ledger_spans",
    ledger_metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    sa.Column("records", sa.JSON, nullable=False),
)


def _add_missing_columns(conn: sa.Connection, schema: str | None) -> None:
    """Columns added to a released table: create_all makes new tables only."""
    have = {c["name"] for c in sa.inspect(conn).get_columns(outbox.name, schema=schema)}
    if "headers" not in have:
        table = outbox.name if schema is None else f'"{schema}".{outbox.name}'
        conn.execute(sa.text(f"ALTER TABLE {table} ADD COLUMN headers JSON"))


class Ledger:
    """Engine, schema and reply outbox of one participant's database.

    Write through :meth:`begin` (or :attr:`lease`): on SQLite it lends the one writer connection,
    held across transactions, to one writer at a time (:mod:`saga.store.lease`)."""

    def __init__(
        self,
        url: str,
        *,
        schema: str | None = None,
        business: sa.MetaData | None = None,
        sqlite_synchronous: str = "FULL",
    ):
        self.url = url
        self.schema = schema
        self.business = business
        self.synchronous = sqlite_synchronous.upper()
        self._doomed: list[UUID] = []
        self._outbox = OutboxCopy(self._delete_sent)  # replies the relay has not sent yet
        self.is_sqlite = url.startswith("sqlite")
        #: statements, transactions and thread hand-offs (SQLite; saga.work)
        self.counts = WorkCounts()
        self.lease: WriterLease | None = None
        if self.is_sqlite:
            # spare: a caller that writes through the engine itself, not the lease, gets a
            # connection of its own (and waits for SQLite's lock) instead of the pool's timeout
            self.engine = sqlite_engine(
                url, immediate=True, synchronous=sqlite_synchronous, counts=self.counts, spare=1
            )
            self.reader: AsyncEngine = sqlite_engine(
                url, immediate=False, synchronous=sqlite_synchronous, counts=self.counts
            )
        else:
            options: dict[str, Any] = {}
            if schema is not None:
                options["schema_translate_map"] = {None: schema}
            self.engine = create_async_engine(url, execution_options=options)
            self.reader = self.engine

    @property
    def engine(self) -> AsyncEngine:
        """The writer engine; its connections are for :meth:`begin` to lend."""
        return self._engine

    @engine.setter
    def engine(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self.lease = WriterLease(engine) if self.is_sqlite else None

    def begin(self) -> AbstractAsyncContextManager[AsyncConnection]:
        """A write transaction, committed when the block ends without an error."""
        return write_transaction(self.lease, self.engine)

    def _writer(self) -> AbstractAsyncContextManager[AsyncConnection]:
        """A writer connection outside a transaction, for a caller that runs its own."""
        return write_connection(self.lease, self.engine)

    async def setup(self) -> None:
        async with self.begin() as conn:
            if self.schema is not None and not self.is_sqlite:
                await conn.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"'))
            await conn.run_sync(ledger_metadata.create_all)
            await conn.run_sync(_add_missing_columns, None if self.is_sqlite else self.schema)
            if self.business is not None:
                await conn.run_sync(self.business.create_all)

    async def close(self) -> None:
        await self._outbox.close()
        if self.lease is not None:
            await self.lease.close()
        await self.engine.dispose()
        if self.reader is not self.engine:
            await self.reader.dispose()

    async def drop(self) -> None:
        """Remove everything (tests)."""
        async with self.begin() as conn:
            if self.schema is not None and not self.is_sqlite:
                await conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE'))
            else:
                await conn.run_sync(ledger_metadata.drop_all)
                if self.business is not None:
                    await conn.run_sync(self.business.drop_all)

    def insert_ignore(self, table: sa.Table) -> Any:
        dialect = sqlite if self.is_sqlite else postgresql
        return dialect.insert(table).on_conflict_do_nothing()

    # --- the relay's view ----------------------------------------------------------------

    def wrote(self, messages: Iterable[OutboxMessage]) -> None:
        """Replies a transaction that has committed put in the outbox, for :meth:`pending_outbox`
        to hand to the relay without reading them back (:mod:`saga.store.fresh`)."""
        self._outbox.add(messages)

    async def pending_outbox(self, limit: int) -> list[OutboxMessage]:
        known = self._outbox.pending(limit)
        if known is not None:
            return known
        query = sa.select(outbox).order_by(outbox.c.created_at).limit(limit)
        async with self.reader.connect() as conn:
            rows = [
                OutboxMessage(
                    message_id=r.message_id,
                    saga_id=r.saga_id,
                    exchange="",
                    routing_key=r.routing_key,
                    message_type=r.message_type,
                    body=bytes(r.body),
                    headers=dict(r.headers or {}),
                    created_at=r.created_at,
                )
                for r in await conn.execute(query)
            ]
        return self._outbox.read(rows, limit)

    async def mark_sent(self, message_ids: Sequence[UUID]) -> None:
        """Sent replies are deleted by the next write transaction that calls
        :meth:`take_deletes`, or soon by one of their own (:mod:`saga.store.fresh`)."""
        if message_ids:
            self._outbox.sent(message_ids)

    def take_deletes(self) -> list[UUID]:
        """The ids of sent replies for the caller's write transaction to delete; report how it
        ended with :meth:`deletes_done`."""
        self._doomed = self._outbox.take_deletes()
        return list(self._doomed)

    def deletes_done(self, *, committed: bool) -> None:
        self._outbox.deletes_done(self._doomed, committed=committed)
        self._doomed = []

    async def _delete_sent(self, message_ids: list[UUID]) -> None:
        delete = outbox.delete().where(outbox.c.message_id.in_(message_ids))
        async with self._writer() as conn:
            await delete_sent(conn, delete, self.synchronous)

    async def drain_spans(
        self, limit: int, export: Callable[[list[Mapping[str, Any]]], Awaitable[None]]
    ) -> int:
        """Export committed span records, then delete them (at-least-once; one participant
        process per ledger, so no two drains share rows). The delete does not wait for an
        fsync on SQLite: lost in a power cut, it only exports a duplicate."""
        return await drain_span_rows(
            spans, self.reader, self._writer, self.synchronous, limit, export
        )

    async def history(self) -> list[dict[str, Any]]:
        """Every final reply in the order it was given: the service's audit trail."""
        async with self.reader.connect() as conn:
            rows = await conn.execute(sa.select(processed).order_by(processed.c.id))
            return [dict(r._mapping) for r in rows]


def now() -> datetime:
    return datetime.now(UTC)
