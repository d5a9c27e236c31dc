"""The broker ceiling: request/reply round trips between two plain aio-pika processes.

The same durability as the saga stack (durable queues, persistent messages, publisher confirms
on both legs, manual acks after the reply is confirmed) and the same number in flight, with no
database and no validation: what RabbitMQ and two aio-pika clients can do on this machine. A
4-step saga needs 4 round trips, so ``rate / 4`` is the most a saga stack could reach here.

The responder runs as ``python -m saga_tools.bench.ceiling QUEUE PREFETCH URL`` (a process of its
own, like a participant); the requester is :func:`measure`, in the caller's process.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass

import aio_pika
import aiormq
from aio_pika.abc import AbstractIncomingMessage

from saga.loop import run as run_loop
from saga_tools.bench.procfs import cpu_seconds

__all__ = ["CeilingResult", "measure", "respond"]


@dataclass(frozen=True)
class CeilingResult:
    round_trips: int
    concurrency: int
    seconds: float
    requester_cpu_s: float
    responder_cpu_s: float

    @property
    def rate(self) -> float:
        return self.round_trips / self.seconds if self.seconds > 0 else 0.0


def _persistent(body: bytes, **fields: str) -> aio_pika.Message:
    return aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, **fields)  # type: ignore[arg-type]


async def respond(url: str, queue: str, prefetch: int) -> None:
    """Answer every request on ``queue`` until the process is killed: publish the reply with a
    confirm, then ack the request (the participants' order: reply safe before ack)."""
    connection = await aio_pika.connect(url)
    consume = await connection.channel()
    await consume.set_qos(prefetch_count=prefetch)
    publish = await connection.channel(publisher_confirms=True, on_return_raises=True)
    requests = await consume.declare_queue(queue, durable=True)

    async def on_request(message: AbstractIncomingMessage) -> None:
        await publish.default_exchange.publish(
            _persistent(message.body, correlation_id=message.correlation_id or ""),
            routing_key=message.reply_to or "",
            mandatory=True,
        )
        await message.ack()

    await requests.consume(on_request)
    print("ready", flush=True)
    await asyncio.Future()


async def measure(
    url: str, prefix: str, *, round_trips: int, concurrency: int, warmup: int = 200
) -> CeilingResult:
    """Run ``round_trips`` request/reply pairs with ``concurrency`` in flight against a
    responder process started here; the queues are deleted afterwards."""
    request_queue, reply_queue = f"{prefix}.ceiling.requests", f"{prefix}.ceiling.replies"
    connection = await aio_pika.connect(url)
    async with connection:
        setup = await connection.channel()
        await setup.declare_queue(request_queue, durable=True)
        await setup.declare_queue(reply_queue, durable=True)
        responder = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "saga_tools.bench.ceiling",
            request_queue,
            str(concurrency),
            url,
            stdout=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL,
        )
        try:
            assert responder.stdout is not None
            if (await responder.stdout.readline()).strip() != b"ready":
                raise RuntimeError("the ceiling responder did not start")
            requester = _Requester(connection, request_queue, reply_queue, concurrency)
            await requester.start()
            await requester.run(min(warmup, round_trips))
            cpu0, rcpu0 = time.process_time(), cpu_seconds(responder.pid)
            t0 = time.perf_counter()
            await requester.run(round_trips)
            seconds = time.perf_counter() - t0
            cpu1, rcpu1 = time.process_time(), cpu_seconds(responder.pid)
            await requester.stop()
        finally:
            responder.kill()
            await responder.wait()
            cleanup = await connection.channel()
            for name in (request_queue, reply_queue):
                await cleanup.queue_delete(name)
    return CeilingResult(round_trips, concurrency, seconds, cpu1 - cpu0, rcpu1 - rcpu0)


class _Requester:
    """Keeps ``concurrency`` requests in flight: each worker sends one, waits for its reply
    (matched by correlation id), and sends the next."""

    def __init__(
        self, connection: aio_pika.abc.AbstractConnection, requests: str, replies: str, n: int
    ):
        self.connection = connection
        self.requests = requests
        self.replies = replies
        self.concurrency = n
        self.waiting: dict[str, asyncio.Future[None]] = {}
        self.body = b'{"bench": "ceiling", "padding": "' + b"x" * 600 + b'"}'  # a command's size
        self.sent = 0

    async def start(self) -> None:
        self.publish = await self.connection.channel(publisher_confirms=True, on_return_raises=True)
        consume = await self.connection.channel()
        await consume.set_qos(prefetch_count=max(self.concurrency, 1))
        self.queue = await consume.get_queue(self.replies, ensure=False)
        self.tag = await self.queue.consume(self._on_reply)

    async def stop(self) -> None:
        await self.queue.cancel(self.tag)

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        await message.ack()
        future = self.waiting.pop(message.correlation_id or "", None)
        if future is not None and not future.done():
            future.set_result(None)

    async def _one(self) -> None:
        self.sent += 1
        key = str(self.sent)
        future = asyncio.get_running_loop().create_future()
        self.waiting[key] = future
        confirm = await self.publish.default_exchange.publish(
            _persistent(self.body, correlation_id=key, reply_to=self.replies),
            routing_key=self.requests,
            mandatory=True,
        )
        if not isinstance(confirm, aiormq.spec.Basic.Ack):
            raise RuntimeError(f"request not confirmed: {confirm!r}")
        await future

    async def _worker(self, count: int) -> None:
        for _ in range(count):
            await self._one()

    async def run(self, total: int) -> None:
        workers = max(1, min(self.concurrency, total))
        share, extra = divmod(total, workers)
        await asyncio.gather(*(self._worker(share + (i < extra)) for i in range(workers)))


if __name__ == "__main__":
    run_loop(respond(sys.argv[3], sys.argv[1], int(sys.argv[2])))  # the stack's event loop
