"""Run the demo services: one per process, or all four in one (``saga-service all``).

Settings come from ``SAGA_*`` environment variables; a bad one stops the start with one line on
stderr and exit status 2, before anything is opened.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from enum import StrEnum
from typing import Annotated, NoReturn

import typer
from sqlalchemy.exc import SQLAlchemyError

from saga.errors import ConfigError
from saga.logs import configure_logging
from services import inventory, order, payment, shipping
from services.participant import Participant, ServiceSettings
from services.participant.settings import load_service_settings

__all__ = ["BUILDERS", "Service", "main", "run_service", "serve_all"]

BUILDERS: dict[str, Callable[[ServiceSettings], Participant]] = {
    "order": order.build,
    "payment": payment.build,
    "inventory": inventory.build,
    "shipping": shipping.build,
}


class Service(StrEnum):
    ORDER = "order"
    PAYMENT = "payment"
    INVENTORY = "inventory"
    SHIPPING = "shipping"
    ALL = "all"


async def serve_all(settings: ServiceSettings) -> None:
    """Run the four services in this process until SIGTERM or SIGINT.

    One signal handler for all of them: ``Participant.serve`` installs its own, and a loop keeps
    only the last handler per signal, so four ``serve()`` calls would leave three running.
    """
    participants = [build(settings) for build in BUILDERS.values()]
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopped.set)
    try:
        started = await asyncio.gather(*(p.start() for p in participants), return_exceptions=True)
        for outcome in started:
            if isinstance(outcome, BaseException):
                raise outcome
        await stopped.wait()
    finally:
        await asyncio.gather(*(p.stop() for p in participants), return_exceptions=True)


def run_service(name: str) -> None:
    """Run service ``name`` (or ``all``) until SIGTERM or SIGINT."""
    try:
        settings = load_service_settings()
    except ConfigError as exc:
        _fail(exc, 2)
    configure_logging()
    try:
        if name == Service.ALL:
            asyncio.run(serve_all(settings))
        else:
            asyncio.run(BUILDERS[name](settings).serve())
    except ConfigError as exc:  # e.g. RabbitMQ unreachable
        _fail(exc, 2)
    except (OSError, SQLAlchemyError) as exc:
        _fail(exc, 1)


def _fail(exc: Exception, code: int) -> NoReturn:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    head, rest = (lines[0], lines[1:]) if lines else (type(exc).__name__, [])
    typer.echo(f"error: {head} {'; '.join(rest)}".rstrip(), err=True)
    raise SystemExit(code)


app = typer.Typer(
    name="saga-service",
    help="Run a demo participant service (settings from SAGA_* environment variables).",
    add_completion=False,
)


@app.command()
def serve(
    service: Annotated[Service, typer.Argument(help="The service to run, or all four.")],
) -> None:
    """Run SERVICE until SIGTERM or SIGINT."""
    run_service(service.value)


def main() -> None:
    app()
