"""The checkout saga as ``saga bench`` runs it.

``registry`` (``--step-timeout``): with thousands of sagas in flight a command can wait in its
queue longer than the checkout's 3-second step timeout; it then times out, is re-sent and
finally compensated, and the extra messages slow everything further. That measures the timeout
policy, not the machinery. This registry keeps every step of the checkout and only sets the
timeout from ``SAGA_BENCH_STEP_TIMEOUT`` (seconds).

``echo_registry`` (``--participants echo``): the same steps, payloads and input validation,
for participants that answer every command with an empty success
(:mod:`saga_tools.bench.echo`): no reply data is expected, and the charge takes its amount
from the input instead of the order's reply.

Both run the newest checkout (its charge and reservation in parallel) unless
``SAGA_BENCH_CHECKOUT_VERSION`` (``--checkout-version``) names another registered version:
version 1 runs its four steps one after another, the shape the peers' benchmarks run.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from datetime import timedelta
from decimal import Decimal
from typing import Any, cast

from saga import JSON, Registry, SagaContext, SagaDefinition
from saga_demo.checkout import CHECKOUT, CHECKOUT_V1, PARTICIPANTS

__all__ = ["VERSIONS", "echo_registry", "registry"]

STEP_TIMEOUT_ENV = "SAGA_BENCH_STEP_TIMEOUT"
VERSION_ENV = "SAGA_BENCH_CHECKOUT_VERSION"
#: the checkout's registered versions, by number
VERSIONS = {d.version: d for d in (CHECKOUT_V1, CHECKOUT)}


def _checkout() -> SagaDefinition:
    return VERSIONS[int(os.environ.get(VERSION_ENV, CHECKOUT.version))]


def _timeout() -> timedelta:
    return timedelta(seconds=float(os.environ.get(STEP_TIMEOUT_ENV, "3")))


def registry() -> Registry:
    checkout = _checkout()
    steps = [dataclasses.replace(step, timeout=_timeout()) for step in checkout.steps]
    return Registry([dataclasses.replace(checkout, steps=tuple(steps))], participants=PARTICIPANTS)


def _charge_from_input(ctx: SagaContext) -> Mapping[str, JSON]:
    items = cast(list[dict[str, Any]], ctx.input["items"])
    total = sum((Decimal(i["unit_price"]) * int(i["quantity"]) for i in items), Decimal("0.00"))
    assert ctx.saga_id is not None
    return {
        "order_ref": str(ctx.saga_id),
        "customer_id": ctx.input["customer_id"],
        "amount": f"{total:.2f}",
        "currency": ctx.input["currency"],
    }


def echo_registry() -> Registry:
    checkout = _checkout()
    steps = []
    for step in checkout.steps:
        echo = dataclasses.replace(
            step, timeout=_timeout(), reply_model=None, compensation_reply_model=None
        )
        if step.name == "charge_payment":
            echo = dataclasses.replace(echo, payload=_charge_from_input)
        steps.append(echo)
    return Registry([dataclasses.replace(checkout, steps=tuple(steps))], participants=PARTICIPANTS)
