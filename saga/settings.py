"""Settings from ``SAGA_*`` environment variables, validated at start.

A bad value stops the process with one line per problem naming the variable and what to change,
never a traceback.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from saga.errors import ConfigError

__all__ = ["Settings", "load_settings"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SAGA_", extra="ignore", frozen=True)

    database_url: str = Field(
        "sqlite+aiosqlite:///saga.db",
        description="sqlite+aiosqlite:///file.db (one orchestrator) or postgresql+asyncpg://...",
    )
    rabbitmq_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    definitions: str = Field(
        "", description="module:attribute of the Registry (or a callable returning one)"
    )
    prefix: str = Field("saga", pattern=r"^[a-z][a-z0-9_.-]{0,40}$")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    quorum_queues: bool = False
    prefetch: int = Field(256, ge=1, le=65_535)
    max_message_bytes: int = Field(256 * 1024, ge=1024, le=16 * 1024 * 1024)
    max_batch: int = Field(128, ge=1, le=10_000)
    relay_batch: int = Field(500, ge=1, le=10_000)
    relay_in_flight: int = Field(256, ge=1, le=10_000)
    relay_poll_interval: float = Field(1.0, gt=0, le=60)
    timer_interval: float = Field(0.1, gt=0, le=60)
    timer_grace: float = Field(1.0, ge=0, le=600)
    auto_migrate: bool = False
    sqlite_synchronous: Literal["FULL", "NORMAL", "EXTRA"] = "FULL"
    shutdown_timeout: float = Field(10.0, gt=0, le=600)
    inbox_retention_hours: float = Field(168.0, ge=1, le=24 * 365)

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str) -> str:
        if not value.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ValueError(
                "use sqlite+aiosqlite:///path/to/saga.db or postgresql+asyncpg://user@host/db"
            )
        return value

    @field_validator("rabbitmq_url")
    @classmethod
    def _amqp(cls, value: str) -> str:
        if not value.startswith(("amqp://", "amqps://")):
            raise ValueError("use amqp://user:password@host:5672/vhost")
        return value

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


def load_settings(**overrides: object) -> Settings:
    """Read the environment (``overrides`` win); ConfigError lists every bad variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else "?"
            lines.append(f"SAGA_{field.upper()}: {err['msg']}")
        raise ConfigError("invalid settings:\n  " + "\n  ".join(lines)) from None
