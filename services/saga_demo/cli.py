"""Run the demo services: one per process, or all four in one (``saga-service all``), and place
sample checkouts (``saga-service place-orders``).

Settings come from ``SAGA_*`` environment variables; a bad one stops the start with one line on
stderr and exit status 2, before anything is opened.
"""

from __future__ import annotations

import asyncio
import random
import sys
import uuid
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from enum import StrEnum
from typing import Annotated

import aiormq
import typer

from saga.client import SagaClient
from saga.core.errors import ConfigError
from saga.core.ids import saga_id_for_key
from saga.participant import Participant, ParticipantSettings
from saga.participant.settings import load_participant_settings
from saga.process import fail, launch, serve
from saga.protocol.envelope import StartSaga
from saga.telemetry import Metrics, MetricsServer, configure_tracing
from saga.transport.topology import Topology
from saga_demo import inventory, order, payment, shipping
from saga_demo.checkout import CHECKOUT, checkout_input

__all__ = [
    "BUILDERS",
    "SAMPLE_ADDRESSES",
    "SAMPLE_PRICES",
    "Service",
    "main",
    "place_orders",
    "run_service",
    "sample_checkouts",
    "serve_all",
]

BUILDERS: dict[str, Callable[[ParticipantSettings], Participant]] = {
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


async def serve_all(settings: ParticipantSettings) -> None:
    """Run the four services in this process until SIGTERM or SIGINT.

    One signal handler for all of them: ``Participant.serve`` installs its own, and a loop keeps
    only the last handler per signal, so four ``serve()`` calls would leave three running.
    """
    participants = [build(settings) for build in BUILDERS.values()]
    metrics = Metrics()  # one /metrics for the four; every series names its participant
    for participant in participants:
        participant.metrics = metrics
    server = MetricsServer(metrics.registry)
    if settings.metrics_port:
        server.start(settings.metrics_host, settings.metrics_port)

    async def start() -> None:
        started = await asyncio.gather(*(p.start() for p in participants), return_exceptions=True)
        for outcome in started:
            if isinstance(outcome, BaseException):
                raise outcome

    async def stop() -> None:
        await asyncio.gather(*(p.stop() for p in participants), return_exceptions=True)

    try:
        await serve(
            start,
            stop,
            start_timeout=settings.start_timeout,
            stop_timeout=settings.shutdown_timeout,
        )
    finally:
        server.stop()


def run_service(name: str) -> None:
    """Run service ``name`` (or ``all``) until SIGTERM or SIGINT."""
    try:
        settings = load_participant_settings()
    except ConfigError as exc:
        fail(exc, 2)
    if name == Service.ALL:
        launch("saga-services", lambda: serve_all(settings), log_level=settings.log_level)
    else:
        launch(f"saga-{name}", BUILDERS[name](settings).serve, log_level=settings.log_level)


# --- sample checkouts ----------------------------------------------------------------------

SAMPLE_PRICES: Mapping[str, Decimal] = {
    inventory.BOOK: Decimal("19.90"),
    inventory.LAMP: Decimal("45.00"),
    inventory.RARE: Decimal("30.00"),
    inventory.EBOOK: Decimal("9.90"),
}
"""Unit price of each demo SKU (``inventory.EBOOK`` is digital: never reserved nor shipped)."""

SAMPLE_ADDRESSES: Sequence[Mapping[str, str]] = (
    {
        "name": "Ann Smith",
        "street": "Main St 1",
        "city": "Berlin",
        "postal_code": "10115",
        "country": "DE",
    },
    {
        "name": "Jean Dupont",
        "street": "12 Rue de Rivoli",
        "city": "Paris",
        "postal_code": "75001",
        "country": "FR",
    },
    {
        "name": "Tom Brown",
        "street": "221B Baker Street",
        "city": "London",
        "postal_code": "NW1 6XE",
        "country": "GB",
    },
    {  # undeliverable: the shipping step fails and the checkout is compensated
        "name": "Ann Smith",
        "street": "1 Nowhere Lane",
        "city": "Atlantis",
        "postal_code": "00000",
        "country": "DE",
    },
)
"""Where sample checkouts go; the last one cannot be delivered to."""


def sample_checkouts(count: int, seed: int | None = None) -> list[StartSaga]:
    """``count`` checkout requests mixing the demo customers, SKUs and addresses.

    ``seed`` fixes the mix (customers, lines, addresses), not the keys: every call makes new
    ``sample-<uuid>`` keys, so running it again places new orders rather than repeating old ones.
    """
    rng = random.Random(seed)
    customers = sorted(payment.CUSTOMERS)
    skus = sorted(SAMPLE_PRICES)
    starts = []
    for _ in range(count):
        customer = payment.CUSTOMERS[rng.choice(customers)]
        lines = [
            (sku, rng.randint(1, 2), SAMPLE_PRICES[sku])
            for sku in sorted(rng.sample(skus, rng.choice((1, 1, 2))))
        ]
        address = rng.choice(SAMPLE_ADDRESSES)
        starts.append(
            StartSaga(
                schema_version=1,
                message_id=uuid.uuid4(),
                saga_name=CHECKOUT.name,
                key=f"sample-{uuid.uuid4()}",
                input=checkout_input(customer, lines, address),
            )
        )
    return starts


async def place_orders(
    rabbitmq_url: str, prefix: str, starts: Sequence[StartSaga], *, wait: float = 30.0
) -> None:
    """Publish ``starts`` to ``{prefix}.start``: persistent, mandatory, each one confirmed.

    Waits up to ``wait`` seconds for the orchestrator to have declared the queue (a container
    may start before the orchestrator is ready); raises ConfigError if it never appears.
    """
    async with await SagaClient.connect(rabbitmq_url, prefix=prefix, wait=wait) as client:
        await client.publish(starts)


# --- the command line ----------------------------------------------------------------------

app = typer.Typer(
    name="saga-service",
    help="Run a demo participant service, or place sample checkouts "
    "(settings from SAGA_* environment variables).",
    no_args_is_help=True,
    add_completion=False,
)


def _serve(service: Service) -> Callable[[], None]:
    def serve() -> None:
        run_service(service.value)

    what = (
        "all four services in one process" if service is Service.ALL else f"the {service} service"
    )
    serve.__doc__ = f"Run {what} until SIGTERM or SIGINT."
    return serve


for _service in Service:
    app.command(_service.value)(_serve(_service))


@app.command("place-orders")
def place_orders_command(
    count: Annotated[int, typer.Option(min=1, max=10_000, help="How many checkouts.")] = 10,
    seed: Annotated[
        int | None, typer.Option(help="Seed of the mix of customers, items and addresses.")
    ] = None,
    wait: Annotated[
        float, typer.Option(min=0, help="Seconds to wait for the orchestrator's start queue.")
    ] = 30.0,
) -> None:
    """Start COUNT sample checkouts via the start queue; print their saga ids, one a line.

    Uses SAGA_RABBITMQ_URL and SAGA_PREFIX; every checkout gets a new key sample-<uuid>.
    """
    try:
        settings = load_participant_settings()
    except ConfigError as exc:
        fail(exc, 2)
    starts = sample_checkouts(count, seed)
    try:
        provider = configure_tracing("saga-client")
    except ConfigError as exc:
        fail(exc, 2)
    try:
        asyncio.run(place_orders(settings.rabbitmq_url, settings.prefix, starts, wait=wait))
    except ConfigError as exc:
        fail(exc, 2)
    except (OSError, aiormq.exceptions.AMQPError) as exc:  # refused, or the connection broke
        fail(exc, 1)
    finally:
        provider.shutdown()
    for start in starts:
        typer.echo(saga_id_for_key(start.saga_name, start.key))
    queue = Topology(prefix=settings.prefix).start_queue
    print(f"placed {len(starts)} checkouts on {queue}", file=sys.stderr)


def main() -> None:
    app()
