"""``saga-service place-orders``: the sample mix, and what it puts on the start queue."""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from decimal import Decimal
from typing import Any
from uuid import UUID, uuid4

import aio_pika
import pytest

from saga.core.ids import saga_id_for_key
from saga.core.state import Direction, SagaContext
from saga.protocol.envelope import StartSaga, parse
from saga.transport.amqp import declare
from saga.transport.topology import Topology
from saga_demo import payment
from saga_demo.checkout import CHECKOUT, PARTICIPANTS
from saga_demo.cli import SAMPLE_ADDRESSES, SAMPLE_PRICES, sample_checkouts
from saga_tools.chaos.model import total
from tests.conftest import require_rabbitmq
from tests.crash.helpers import base_env
from tests.e2e.stack import BIN, delete_topology

KEY = re.compile(r"^sample-[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def test_the_mix_is_fixed_by_the_seed_and_the_keys_are_new_each_time() -> None:
    first, again, other = (sample_checkouts(40, seed) for seed in (3, 3, 4))
    assert [s.input for s in first] == [s.input for s in again]
    assert [s.input for s in first] != [s.input for s in other]
    assert [s.input for s in sample_checkouts(40)] != [s.input for s in sample_checkouts(40)]
    everything = first + again + other
    assert all(KEY.match(s.key) for s in everything), [s.key for s in everything][:3]
    assert len({s.key for s in everything}) == len(everything)
    assert len({s.message_id for s in everything}) == len(everything)
    assert {s.saga_name for s in everything} == {CHECKOUT.name}


def test_every_sample_is_a_valid_checkout_and_the_mix_covers_the_demo() -> None:
    samples = sample_checkouts(300, seed=11)
    inputs: list[dict[str, Any]] = [dict(s.input) for s in samples]
    for s, checkout in zip(samples, inputs, strict=True):
        parse(StartSaga, s.model_dump_json().encode())
        saga_id = saga_id_for_key(s.saga_name, s.key)
        created = {"order_id": str(uuid4()), "total": str(total(checkout))}
        ctx = SagaContext(checkout, {}, saga_id).with_output("create_order", created)
        for step in CHECKOUT.steps:  # every payload the saga will build validates
            if step.when is not None and not step.when(ctx):
                continue  # digital goods alone: neither reserved nor shipped
            step.build(Direction.ACTION, ctx)
            step.build(Direction.COMPENSATION, ctx)
        prices = {i["sku"]: Decimal(i["unit_price"]) for i in checkout["items"]}
        assert all(SAMPLE_PRICES[sku] == price for sku, price in prices.items()), checkout
    customers = Counter(c["customer_id"] for c in inputs)
    assert set(customers) == {str(c) for c in payment.CUSTOMERS.values()}
    skus = Counter(i["sku"] for c in inputs for i in c["items"])
    assert set(skus) == set(SAMPLE_PRICES)
    assert any(all(i.get("digital") for i in c["items"]) for c in inputs)  # nothing to ship
    addresses = Counter(c["address"]["city"] for c in inputs)
    assert set(addresses) == {a["city"] for a in SAMPLE_ADDRESSES}


async def _run(*args: str, prefix: str, rabbitmq_url: str) -> tuple[int, str, str]:
    env = base_env()
    env.update(SAGA_RABBITMQ_URL=rabbitmq_url, SAGA_PREFIX=prefix)
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "saga-service"),
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.rabbitmq
async def test_place_orders_publishes_persistent_starts_and_prints_their_saga_ids(
    unique: str,
) -> None:
    url = require_rabbitmq()
    prefix = f"e2e-po-{unique}"
    topology = Topology(prefix=prefix)
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        await declare(channel, topology, PARTICIPANTS)
        code, out, err = await _run(
            "place-orders", "--count", "7", "--seed", "5", prefix=prefix, rabbitmq_url=url
        )
        assert code == 0, err
        assert err.strip().splitlines()[-1] == f"placed 7 checkouts on {topology.start_queue}"
        printed = [UUID(line) for line in out.splitlines()]
        queue = await channel.get_queue(topology.start_queue)
        starts = []
        for _ in range(7):
            message = await queue.get(timeout=5)
            assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
            assert message.content_type == "application/json"
            start = parse(StartSaga, message.body)
            assert message.message_id == str(start.message_id)
            starts.append(start)
            await message.ack()
        assert await queue.get(fail=False) is None, "more messages than --count"
        assert printed == [saga_id_for_key(s.saga_name, s.key) for s in starts]
        assert [s.input for s in starts] == [s.input for s in sample_checkouts(7, seed=5)]
    finally:
        await connection.close()
        await delete_topology(url, prefix)


@pytest.mark.rabbitmq
async def test_place_orders_without_an_orchestrator_fails_in_one_line(unique: str) -> None:
    url = require_rabbitmq()
    prefix = f"e2e-po-{unique}"
    code, out, err = await _run(
        "place-orders", "--count", "2", "--wait", "0.5", prefix=prefix, rabbitmq_url=url
    )
    assert code == 2, err
    assert out == ""
    assert err.strip().splitlines()[-1] == (
        f"error: queue '{prefix}.start' does not exist after 0.5s: is the orchestrator running "
        f"with SAGA_PREFIX={prefix}?"
    )


async def test_an_unreachable_broker_exits_2_in_one_line() -> None:
    code, _, err = await _run(
        "place-orders", prefix="e2e-po-x", rabbitmq_url="amqp://guest:guest@127.0.0.1:1/"
    )
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("error: cannot reach RabbitMQ at "), err
