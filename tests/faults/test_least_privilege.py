"""Least-privilege RabbitMQ users: the commands of docs/security.md, run for real.

On a private node, the ``rabbitmqctl`` block of the "Least-privilege RabbitMQ" section of
docs/security.md is executed as written (passwords filled in), so the documentation cannot drift
from what works. Then every component connects as its own user:

* a participant's user cannot consume another participant's command queue or its dead letters,
  declare another participant's queue, or publish to the commands exchange (ACCESS_REFUSED each
  time); the client's user can publish starts but neither consume nor declare anything;
* the stack still works with those users: a few checkouts, started by the client's user, end as
  their inputs imply.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import shlex
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aio_pika
import aiormq
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from saga_tools.chaos.node import RabbitNode
from tests.crash.helpers import REPO
from tests.e2e.stack import SERVICES, Group, Stack, submit
from tests.faults.conftest import (
    assert_outcomes,
    mixed_checkouts,
    prepare,
    start_stack,
    summary,
)

pytestmark = pytest.mark.rabbitmq

DOC = REPO / "docs" / "security.md"
SECTION = "## Least-privilege RabbitMQ"
VHOST = PREFIX = "saga"  # as the documented commands name them
USERS = {"orchestrator": "saga-orchestrator", **{s: f"saga-{s}" for s in SERVICES}}
USERS["client"] = "saga-client"


def documented_commands() -> list[list[str]]:
    """The argument lists of the ``rabbitmqctl`` commands in the section's bash block."""
    text = DOC.read_text()
    assert SECTION in text, f"{DOC} has no section {SECTION!r}"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S)
    assert block is not None, f"the section {SECTION!r} of {DOC} has no bash block"
    commands = []
    for line in block.group(1).replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words:
            assert words[0] == "rabbitmqctl", f"not a rabbitmqctl command: {line}"
            commands.append(words[1:])
    return commands


@pytest.fixture
async def users(node: RabbitNode) -> dict[str, str]:
    """Run the documented commands; component -> its amqp:// URL on the vhost."""
    # Hex, as the doc advises: rabbitmqctl reads a password starting with '-' as an option.
    passwords = {name: secrets.token_hex(16) for name in USERS}
    variables = {f"${name.upper()}_PASSWORD": pw for name, pw in passwords.items()}
    commands = documented_commands()
    created = {args[1] for args in commands if args[0] == "add_user"}
    assert created == set(USERS.values()), f"the doc creates {sorted(created)}"
    for args in commands:
        await asyncio.to_thread(node.rabbitmqctl, *(variables.get(a, a) for a in args))
    return {name: node.url_for(user, passwords[name], VHOST) for name, user in USERS.items()}


@pytest.fixture
async def lp_stack(node: RabbitNode, users: dict[str, str], tmp_path: Path) -> AsyncIterator[Stack]:
    """A stack on the documented prefix and vhost; the test itself acts as the client."""
    stack = Stack(
        rabbitmq_url=users["client"], prefix=PREFIX, directory=tmp_path, processes=Group(tmp_path)
    )
    try:
        yield stack
    finally:
        await asyncio.to_thread(stack.processes.stop_all)


async def _refused(url: str, action: Callable[[AbstractChannel], Awaitable[object]]) -> str:
    """The ACCESS_REFUSED text of ``action`` on a fresh channel of ``url``'s user; fails the
    test when the broker allows it."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused) as refused:
            await action(channel)
    assert "ACCESS_REFUSED" in str(refused.value), refused.value
    return str(refused.value)


async def _ignore(message: AbstractIncomingMessage) -> None:
    """Never called: every consume here is refused."""


def _consume(queue: str) -> Callable[[AbstractChannel], Awaitable[object]]:
    async def run(channel: AbstractChannel) -> object:
        found = await channel.declare_queue(queue, passive=True)  # a lookup: always allowed
        return await found.consume(_ignore)

    return run


def _declare(queue: str) -> Callable[[AbstractChannel], Awaitable[object]]:
    async def run(channel: AbstractChannel) -> object:
        return await channel.declare_queue(queue, durable=True)

    return run


def _publish(exchange: str, routing_key: str) -> Callable[[AbstractChannel], Awaitable[object]]:
    async def run(channel: AbstractChannel) -> object:
        target = await channel.get_exchange(exchange, ensure=False)
        await target.publish(aio_pika.Message(b"{}"), routing_key=routing_key)
        await channel.declare_queue(f"{PREFIX}.start", passive=True)  # the refusal's round trip
        return None

    return run


async def test_each_component_gets_only_its_own_queues_and_the_stack_still_works(
    users: dict[str, str], lp_stack: Stack
) -> None:
    stack = lp_stack
    await prepare(stack)
    procs = await start_stack(stack, lambda component: users[component])  # declares it all

    cmd = {s: f"{PREFIX}.cmd.{s}" for s in SERVICES}
    refusals = [
        await _refused(users["payment"], _consume(cmd["order"])),
        await _refused(users["payment"], _consume(cmd["shipping"])),
        await _refused(users["inventory"], _consume(cmd["payment"])),
        await _refused(users["shipping"], _consume(cmd["inventory"])),
        await _refused(users["order"], _consume(f"{cmd['payment']}.dlq")),
        await _refused(users["payment"], _declare(cmd["order"])),
        await _refused(users["payment"], _publish(f"{PREFIX}.commands", "order")),
        await _refused(users["client"], _consume(f"{PREFIX}.start")),
        await _refused(users["client"], _declare(f"{PREFIX}.start")),
    ]
    assert (
        "access to queue 'saga.cmd.order' in vhost 'saga' refused for user 'saga-payment'"
        in (refusals[0])
    ), refusals[0]

    before = await stack.snapshot()
    checkouts = await submit(stack, mixed_checkouts(12, seed=23))  # as saga-client
    await stack.wait_terminal(list(checkouts), 60, watch=list(procs.values()))
    await stack.wait_quiet(within=30)
    run = await assert_outcomes(stack, checkouts, before, "with least-privilege users")
    assert all(p.alive() for p in procs.values()), stack.processes.describe()
    print(f"\n{len(refusals)} operations refused; {summary(run)}")
