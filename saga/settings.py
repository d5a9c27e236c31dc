"""Settings from ``SAGA_*`` environment variables, validated at start.

A bad value stops the process with one line per problem naming the variable and what to change,
never a traceback.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from saga.core.errors import ConfigError
from saga.secrets import redact
from saga.transport.amqp import TlsFiles, broker_urls

__all__ = ["AmqpSettings", "Settings", "load_settings"]


class AmqpSettings(BaseSettings):
    """The broker connection, shared by the orchestrator and the participants. Reprs mask
    every URL's password, so printing settings never prints a secret; validation errors leave
    the input out (it would hold the passwords)."""

    model_config = SettingsConfigDict(
        env_prefix="SAGA_", extra="ignore", frozen=True, hide_input_in_errors=True
    )

    #: one node, or several nodes of one cluster separated by commas
    rabbitmq_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    #: PEM files for amqps:// (the system's CAs verify the broker when the CA file is unset)
    rabbitmq_ca_file: Path | None = None
    rabbitmq_cert_file: Path | None = None
    rabbitmq_key_file: Path | None = None
    #: seconds a process may take to start (database, broker, topology, consumers); past it,
    #: it exits with status 2 and what it was waiting for
    start_timeout: float = Field(60.0, gt=0, le=3600)
    #: seconds a stop (SIGTERM) may take: in-flight work drained, outbox flushed, broker closed
    shutdown_timeout: float = Field(10.0, gt=0, le=600)

    @field_validator("rabbitmq_url")
    @classmethod
    def _amqp(cls, value: str) -> str:
        broker_urls(value)  # ValueError naming the bad URL of the list
        return value

    @field_validator("rabbitmq_ca_file", "rabbitmq_cert_file", "rabbitmq_key_file")
    @classmethod
    def _readable(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"{value} is not a readable file")
        return value

    @model_validator(mode="after")
    def _tls_needs_amqps(self) -> AmqpSettings:
        files = (self.rabbitmq_ca_file, self.rabbitmq_cert_file, self.rabbitmq_key_file)
        tls = all(u.startswith("amqps://") for u in broker_urls(self.rabbitmq_url))
        if any(f is not None for f in files) and not tls:
            raise ValueError(
                "SAGA_RABBITMQ_CA_FILE/CERT_FILE/KEY_FILE are set but SAGA_RABBITMQ_URL is not "
                "amqps://: use amqps://host:5671/ for TLS"
            )
        if self.rabbitmq_key_file is not None and self.rabbitmq_cert_file is None:
            raise ValueError("SAGA_RABBITMQ_KEY_FILE needs SAGA_RABBITMQ_CERT_FILE")
        return self

    @property
    def tls(self) -> TlsFiles:
        return TlsFiles(self.rabbitmq_ca_file, self.rabbitmq_cert_file, self.rabbitmq_key_file)

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for key, value in super().__repr_args__():
            yield key, redact(value) if isinstance(value, str) else value


class Settings(AmqpSettings):
    model_config = SettingsConfigDict(env_prefix="SAGA_", extra="ignore", frozen=True)

    database_url: str = Field(
        "sqlite+aiosqlite:///saga.db",
        description="sqlite+aiosqlite:///file.db (one orchestrator) or postgresql+asyncpg://...",
    )
    definitions: str = Field(
        "", description="module:attribute of the Registry (or a callable returning one)"
    )
    prefix: str = Field("saga", pattern=r"^[a-z][a-z0-9_.-]{0,40}$")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    quorum_queues: bool = False
    prefetch: int = Field(256, ge=1, le=65_535)
    max_message_bytes: int = Field(256 * 1024, ge=1024, le=16 * 1024 * 1024)
    #: deliveries that fail with the database up before a message is dead-lettered as poison
    max_deliveries: int = Field(5, ge=1, le=1000)
    max_batch: int = Field(128, ge=1, le=10_000)
    #: sagas running at once in this orchestrator; more starts wait in the start queue
    max_in_flight: int = Field(200, ge=1, le=1_000_000)
    relay_batch: int = Field(500, ge=1, le=10_000)
    relay_in_flight: int = Field(256, ge=1, le=10_000)
    relay_poll_interval: float = Field(1.0, gt=0, le=60)
    timer_interval: float = Field(0.1, gt=0, le=60)
    timer_grace: float = Field(1.0, ge=0, le=600)
    timer_outage_credit_max: float = Field(30.0, ge=0, le=3600)
    auto_migrate: bool = False
    sqlite_synchronous: Literal["FULL", "NORMAL", "EXTRA"] = "FULL"
    inbox_retention_hours: float = Field(168.0, ge=1, le=24 * 365)
    #: Prometheus /metrics; 0 turns it off. Loopback unless told otherwise, like the admin API.
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(0, ge=0, le=65_535)
    #: the admin HTTP API and dashboard; 0 turns it off
    admin_host: str = "127.0.0.1"
    admin_port: int = Field(0, ge=0, le=65_535)
    #: bearer token for the admin API, or a file holding it (a mounted secret); one is required
    #: when the API is on
    admin_token: str | None = Field(None, repr=False)
    admin_token_file: Path | None = None

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str) -> str:
        if not value.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ValueError(
                "use sqlite+aiosqlite:///path/to/saga.db or postgresql+asyncpg://user@host/db"
            )
        return value

    @model_validator(mode="after")
    def _admin_needs_token(self) -> Settings:
        if self.admin_token is not None and self.admin_token_file is not None:
            raise ValueError("set SAGA_ADMIN_TOKEN or SAGA_ADMIN_TOKEN_FILE, not both")
        if self.admin_token_file is not None and not self.admin_token_file.is_file():
            raise ValueError(f"SAGA_ADMIN_TOKEN_FILE: {self.admin_token_file} is not a file")
        if self.admin_port and self.admin_token is None and self.admin_token_file is None:
            raise ValueError(
                "SAGA_ADMIN_PORT is set but no token is: set SAGA_ADMIN_TOKEN (or "
                "SAGA_ADMIN_TOKEN_FILE) to a long random string, e.g. `openssl rand -hex 32`"
            )
        if self.admin_token is not None and len(self.admin_token) < 16:
            raise ValueError("SAGA_ADMIN_TOKEN: use at least 16 characters")
        return self

    def admin_token_value(self) -> str | None:
        """The token, read from the file each time so a rotated secret applies at once."""
        if self.admin_token_file is not None:
            return self.admin_token_file.read_text().strip() or None
        return self.admin_token

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
            msg = str(err["msg"]).removeprefix("Value error, ")
            lines.append(f"SAGA_{str(err['loc'][0]).upper()}: {msg}" if err["loc"] else msg)
        raise ConfigError("invalid settings:\n  " + "\n  ".join(lines)) from None
