"""The ``saga`` command line."""

from __future__ import annotations

import asyncio
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from sqlalchemy.exc import SQLAlchemyError

from contracts.schema import write_bundle
from saga import __version__
from saga.errors import ConfigError
from saga.logs import configure_logging
from saga.loop import run as run_loop
from saga.secrets import redact_url
from saga.service import OrchestratorService, load_registry
from saga.settings import load_settings
from saga.store.sql import SqlStore
from saga.telemetry import configure_tracing

app = typer.Typer(
    name="saga",
    help="A saga orchestrator over RabbitMQ with a transactional outbox.",
    no_args_is_help=True,
    add_completion=False,
)
schema_app = typer.Typer(help="Message contracts: JSON Schema export.", no_args_is_help=True)
app.add_typer(schema_app, name="schema")


@app.command()
def version() -> None:
    """Print the installed version."""
    typer.echo(__version__)


def _fail(exc: Exception) -> NoReturn:
    typer.echo(f"error: {redact_url(str(exc))}", err=True)
    raise typer.Exit(code=2)


@app.command()
def run(
    migrate: Annotated[
        bool, typer.Option("--migrate", help="Apply missing schema migrations before starting.")
    ] = False,
) -> None:
    """Run the orchestrator service (settings from SAGA_* environment variables)."""
    try:
        settings = load_settings(**({"auto_migrate": True} if migrate else {}))
        configure_logging(settings.log_level)
        if not settings.definitions:
            raise ConfigError(
                "SAGA_DEFINITIONS is not set: point it at your Registry, e.g. "
                "SAGA_DEFINITIONS=myapp.sagas:registry"
            )
        registry = load_registry(settings.definitions)
        provider = configure_tracing("saga-orchestrator")
    except ConfigError as exc:
        _fail(exc)
    try:
        run_loop(OrchestratorService(settings, registry).serve())
    except ConfigError as exc:
        _fail(exc)
    finally:
        provider.shutdown()  # export the spans still batched


@app.command()
def migrate() -> None:
    """Apply missing schema migrations to SAGA_DATABASE_URL and print the version."""
    try:
        settings = load_settings()
    except ConfigError as exc:
        _fail(exc)

    async def go() -> tuple[list[int], int]:
        store = SqlStore(settings.database_url)
        try:
            applied = await store.migrate()
            return applied, await store.current_version()
        finally:
            await store.close()

    try:
        applied, version = asyncio.run(go())
    except (OSError, SQLAlchemyError) as exc:
        _fail(ConfigError(f"cannot migrate {redact_url(settings.database_url)}: {exc}"))
    typer.echo(f"schema at version {version}" + (f" (applied {applied})" if applied else ""))


@schema_app.command("export")
def schema_export(
    directory: Annotated[Path, typer.Argument(help="Directory to write the schema bundle to.")],
) -> None:
    """Write the JSON Schema bundle of every message to DIRECTORY."""
    path = write_bundle(directory)
    typer.echo(f"wrote {path}")


def _add_plugins() -> None:
    """Mount the typer apps registered under the ``saga.commands`` entry point group."""
    for entry in entry_points(group="saga.commands"):
        if entry.name in {c.name for c in app.registered_commands} | {
            g.name for g in app.registered_groups
        }:
            continue
        try:
            plugin = entry.load()
        except ImportError as exc:  # a broken plugin must not take the core commands down
            typer.echo(f"warning: saga {entry.name} is unavailable: {exc}", err=True)
            continue
        app.add_typer(plugin, name=entry.name)


def main() -> None:
    _add_plugins()
    app()
