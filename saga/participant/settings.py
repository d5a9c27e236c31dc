"""Settings of a participant service, from ``SAGA_*`` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import SettingsConfigDict

from saga.core.errors import ConfigError
from saga.settings import AmqpSettings

__all__ = ["ParticipantSettings", "load_participant_settings"]


class ParticipantSettings(AmqpSettings):
    model_config = SettingsConfigDict(env_prefix="SAGA_", extra="ignore", frozen=True)

    prefix: str = Field("saga", pattern=r"^[a-z][a-z0-9_.-]{0,40}$")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    data_dir: Path = Path("data")
    #: one URL for every service: SQLite gets a file per service in ``data_dir`` when unset;
    #: a PostgreSQL URL gives each service a schema of its own named after it
    services_database_url: str | None = None
    quorum_queues: bool = False  # must match the orchestrator's: queues are declared by both
    prefetch: int = Field(64, ge=1, le=65_535)
    max_message_bytes: int = Field(256 * 1024, ge=1024, le=16 * 1024 * 1024)
    #: deliveries that fail with the database up before a command is dead-lettered as poison
    max_deliveries: int = Field(5, ge=1, le=1000)
    relay_poll_interval: float = Field(1.0, gt=0, le=60)
    sqlite_synchronous: str = Field("FULL", pattern="^(FULL|NORMAL|EXTRA)$")
    #: Prometheus /metrics; 0 turns it off (``saga-service all`` serves the four on one port)
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(0, ge=0, le=65_535)
    #: failures to inject on purpose (chaos soaks only): see saga/participant/faults.py
    fault_plan: Path | None = None

    @field_validator("services_database_url")
    @classmethod
    def _known_database(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("postgresql+asyncpg://"):
            raise ValueError(
                "use postgresql+asyncpg://user@host/db (each service gets a schema of its own); "
                "for SQLite leave it unset and set SAGA_DATA_DIR: each service gets its own file"
            )
        return value

    def database_url(self, service: str) -> tuple[str, str | None]:
        """(url, schema) of ``service``'s own database."""
        if self.services_database_url is None:
            return f"sqlite+aiosqlite:///{self.data_dir / f'{service}.db'}", None
        # the prefix is in the schema name, so two deployments on one database stay apart
        schema = f"svc_{self.prefix}_{service}".replace("-", "_").replace(".", "_")
        return self.services_database_url, schema


def load_participant_settings(**overrides: object) -> ParticipantSettings:
    """The settings from ``SAGA_*`` (and ``overrides``), or ConfigError naming each bad one."""
    try:
        return ParticipantSettings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = [
            f"SAGA_{str(e['loc'][0]).upper()}: {str(e['msg']).removeprefix('Value error, ')}"
            if e["loc"]
            else str(e["msg"]).removeprefix("Value error, ")
            for e in exc.errors()
        ]
        raise ConfigError("invalid settings:\n  " + "\n  ".join(lines)) from None
