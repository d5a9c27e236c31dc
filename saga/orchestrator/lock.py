"""One orchestrator per SQLite file, held with an advisory lock on a file beside the database."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

from saga.core.errors import ConfigError

__all__ = ["SqliteLock"]


class SqliteLock:
    """One orchestrator per SQLite file: a second one would race the first for timers and
    outbox rows, which SQLite cannot arbitrate. PostgreSQL is for several instances."""

    def __init__(self, database_url: str):
        db = database_url.split(":///", 1)[1] if ":///" in database_url else ""
        self.path = Path(f"{db}.lock") if db and db != ":memory:" else None
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a+")
        except OSError as exc:
            raise ConfigError(
                f"cannot use the SQLite database at {self.path.with_suffix('')}: {exc}; "
                "check SAGA_DATABASE_URL points at a writable path"
            ) from None
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "unknown"
            self._file.close()
            self._file = None
            raise ConfigError(
                f"another orchestrator (pid {holder}) is using this SQLite database "
                f"({self.path.with_suffix('')}); SQLite supports one orchestrator. Stop it, or "
                "use PostgreSQL (SAGA_DATABASE_URL=postgresql+asyncpg://...) for several."
            ) from None
        self._file.truncate(0)
        self._file.write(str(os.getpid()))
        self._file.flush()

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
