"""The ``saga`` command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from contracts.schema import write_bundle
from saga import __version__

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


@app.command()
def demo() -> None:
    """Run the demo stack: orchestrator and the Order, Payment, Inventory and Shipping services."""
    typer.echo("saga demo: the demo services arrive in a later change; nothing to run yet.")


@schema_app.command("export")
def schema_export(
    directory: Annotated[Path, typer.Argument(help="Directory to write the schema bundle to.")],
) -> None:
    """Write the JSON Schema bundle of every message to DIRECTORY."""
    path = write_bundle(directory)
    typer.echo(f"wrote {path}")


def main() -> None:
    app()
