"""asyncpg's own errors (the PostgreSQL batch runs straight on the driver) are classified as
SQLAlchemy's wrapped ones were: a rollback to break a conflict, a dead connection, a fault of
the database rather than of the message."""

from __future__ import annotations

import asyncpg
import pytest

from saga.store.faults import (
    UnusableConnectionError,
    database_fault,
    describe_error,
    rolled_back,
    stale_connection,
)

E = asyncpg.exceptions


@pytest.mark.parametrize(
    ("error", "rolled", "stale", "fault"),
    [
        (E.DeadlockDetectedError("deadlock detected"), True, False, True),
        (E.SerializationError("could not serialize access"), True, False, True),
        (E.ConnectionDoesNotExistError("connection was closed"), False, True, True),
        (E.ConnectionFailureError("connection failure"), False, True, True),
        (E.AdminShutdownError("terminating connection"), False, True, True),
        (
            E.InterfaceError("cannot call Connection.fetch(): connection is closed"),
            False,
            True,
            True,
        ),
        (E.InterfaceError("another operation is in progress"), False, False, True),
        (ConnectionResetError("reset by peer"), False, True, True),
        (UnusableConnectionError("InternalClientError: broken"), False, True, True),
        (E.UniqueViolationError("duplicate key"), False, False, False),
        (E.UndefinedColumnError("no such column"), False, False, False),
        (E.InternalClientError("a bug"), False, False, False),
    ],
)
def test_raw_asyncpg_errors_are_classified_as_the_wrapped_ones(
    error: Exception, rolled: bool, stale: bool, fault: bool
) -> None:
    assert rolled_back(error) is rolled
    assert stale_connection(error) is stale
    assert database_fault(error) is fault
    assert describe_error(error) == f"{type(error).__name__}: {error}"


def test_an_error_caused_by_a_dead_connection_counts_as_stale() -> None:
    try:
        try:
            raise E.ConnectionDoesNotExistError("connection was closed in the middle of operation")
        except Exception as exc:
            raise RuntimeError("rollback failed") from exc
    except RuntimeError as outer:
        assert stale_connection(outer) and database_fault(outer)
