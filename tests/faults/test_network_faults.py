"""Network faults between the stack and the broker: dropped connections, latency, a blackhole.

The orchestrator and the four services reach the shared broker through a
:class:`~saga_tools.chaos.proxy.TcpProxy` (nothing here stops the broker itself); the test
publishes and inspects directly. Whatever the network does, the processes must recover by
themselves (no restart, no help) and every checkout must end as its input implies, with every
service's ledger exact and money and stock conserved.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any
from uuid import UUID

import pytest

from saga_tools.chaos.proxy import TcpProxy
from tests.crash.helpers import Proc
from tests.e2e.stack import Stack, submit
from tests.faults.conftest import (
    assert_outcomes,
    mixed_checkouts,
    prepare,
    start_stack,
    summary,
    unfinished,
)

pytestmark = pytest.mark.rabbitmq

PROCESSES = 5  # the orchestrator and four services: one AMQP connection each
WAVE = 25


async def _until(stack: Stack, what: str, check: Callable[[], bool], within: float) -> None:
    """Poll ``check`` until it holds; fail with ``what`` and the processes' logs if it does not."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            stack.fail(f"{what} within {within:g}s")
        await asyncio.sleep(0.1)


async def _start(stack: Stack, proxy: TcpProxy) -> dict[str, Proc]:
    await prepare(stack)
    procs = await start_stack(stack, lambda _: proxy.url(stack.rabbitmq_url))
    await _until(stack, "the processes did not connect", lambda: proxy.active >= PROCESSES, 10)
    return procs


async def test_connections_dropped_mid_run_reconnect_and_every_saga_ends_right(
    proxied_stack: Stack, proxy: TcpProxy
) -> None:
    stack = proxied_stack
    procs = await _start(stack, proxy)
    before = await stack.snapshot()
    mix = mixed_checkouts(3 * WAVE, seed=7)
    checkouts: dict[UUID, dict[str, Any]] = {}
    in_flight = []
    for wave in range(3):  # a wave of checkouts, then every connection reset under it
        checkouts |= await submit(stack, mix[wave * WAVE : (wave + 1) * WAVE], first=wave * WAVE)
        await asyncio.sleep(0.3)  # commands, replies and confirms in flight
        in_flight.append(await unfinished(stack, list(checkouts)))
        accepted = proxy.stats.connections
        dropped = proxy.drop_connections()
        assert dropped >= PROCESSES, f"only {dropped} live connections to drop"
        await _until(
            stack,
            "the processes did not reconnect by themselves",
            lambda n=accepted: (
                proxy.active >= PROCESSES and proxy.stats.connections >= n + PROCESSES
            ),
            30,
        )
        await asyncio.sleep(1.0)  # some progress before the next wave and drop
    assert all(in_flight), f"a drop hit an idle stack: unfinished sagas at each {in_flight}"
    ids = list(checkouts)

    await stack.wait_terminal(ids, 90, watch=list(procs.values()))
    await stack.wait_quiet(within=60)
    run = await assert_outcomes(
        stack, checkouts, before, "after three rounds of dropped connections"
    )
    assert all(p.alive() for p in procs.values()), stack.processes.describe()
    print(f"\nsagas unfinished at each drop {in_flight}; {proxy.stats}; {summary(run)}")


async def test_latency_on_every_chunk_changes_no_outcome(
    proxied_stack: Stack, proxy: TcpProxy
) -> None:
    stack = proxied_stack
    procs = await _start(stack, proxy)
    before = await stack.snapshot()
    proxy.latency = 0.05
    checkouts = await submit(stack, mixed_checkouts(30, seed=11))
    await asyncio.sleep(1.0)
    in_flight = await unfinished(stack, list(checkouts))
    proxy.latency = 0.25  # a slow link for a while: well under a step's 3 s reply timeout
    await asyncio.sleep(3.0)
    proxy.latency = 0.05
    await stack.wait_terminal(list(checkouts), 90, watch=list(procs.values()))
    await stack.wait_quiet(within=60)
    run = await assert_outcomes(stack, checkouts, before, "with latency on the link")
    assert proxy.stats.drops == 0 and proxy.stats.upstream_failures == 0
    print(f"\n{in_flight} sagas unfinished when the latency rose; {proxy.stats}; {summary(run)}")


async def test_blackhole_for_seconds_then_healed_every_saga_ends_right(
    proxied_stack: Stack, proxy: TcpProxy
) -> None:
    stack = proxied_stack
    procs = await _start(stack, proxy)
    before = await stack.snapshot()
    checkouts = await submit(stack, mixed_checkouts(40, seed=13))
    await asyncio.sleep(0.3)

    proxy.blackhole = True
    in_flight = await unfinished(stack, list(checkouts))
    assert in_flight > 0, "every saga ended before the blackhole: it hit an idle stack"
    await asyncio.sleep(0.5)  # a chunk already being written may still land
    stalled = (proxy.stats.bytes_up, proxy.stats.bytes_down)
    await asyncio.sleep(3.5)  # longer than a step's reply timeout: attempts time out meanwhile
    assert (proxy.stats.bytes_up, proxy.stats.bytes_down) == stalled, "the blackhole leaked"
    proxy.blackhole = False

    await stack.wait_terminal(list(checkouts), 90, watch=list(procs.values()))
    await stack.wait_quiet(within=60)
    run = await assert_outcomes(stack, checkouts, before, "after a blackhole")
    assert all(p.alive() for p in procs.values()), stack.processes.describe()
    assert proxy.stats.bytes_down > stalled[1], "nothing flowed after the blackhole healed"
    print(f"\n{in_flight} sagas unfinished at the blackhole; {proxy.stats}; {summary(run)}")


# --- the proxy itself, against a local echo server -------------------------------------


async def test_proxy_delays_holds_and_resets() -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1024):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with TcpProxy("127.0.0.1", port) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"ping")
            assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"

            proxy.latency = 0.2  # both ways: the echo comes back no sooner than 0.4 s
            started = time.monotonic()
            writer.write(b"slow")
            assert await asyncio.wait_for(reader.readexactly(4), 5) == b"slow"
            assert time.monotonic() - started >= 0.4
            proxy.latency = 0.0

            proxy.blackhole = True
            writer.write(b"held")
            held = asyncio.ensure_future(reader.readexactly(4))
            done, _ = await asyncio.wait({held}, timeout=0.5)
            assert not done, "the blackhole forwarded data"
            late, late_writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            late_writer.write(b"late")
            await asyncio.sleep(0.3)
            assert proxy.stats.bytes_down == 8  # "ping" and "slow" only
            proxy.blackhole = False
            assert await asyncio.wait_for(held, 5) == b"held"
            assert await asyncio.wait_for(late.readexactly(4), 5) == b"late"

            assert proxy.active == 2
            assert proxy.drop_connections() == 2
            with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
                await asyncio.wait_for(reader.readexactly(1), 5)
            assert (proxy.stats.connections, proxy.stats.drops, proxy.active) == (2, 2, 0)
            for w in (writer, late_writer):
                w.close()
    finally:
        server.close()
        await server.wait_closed()
