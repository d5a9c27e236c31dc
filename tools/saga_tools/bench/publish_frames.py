"""CPU per message of encoding a publish's frames: pamqp's path (what ``Publisher._send`` did)
against :func:`saga.transport.publish_frames.publish_frames`, alternated in one run.

The messages are shaped like the orchestrator's commands as ``AmqpBroker.publish_many`` builds
them: an ~800-byte JSON body, ``application/json``, persistent, a correlation and a message id,
a timestamp, a message type, and headers with a trace context and a few string fields. Both
encoders get the same messages in batches, as ``publish_many`` passes them, and must produce
the same bytes (checked first). The figure is ``time.process_time`` per message, the best of
the rounds for each, so a burst of other load on the machine does not pick the winner.

    python -m saga_tools.bench.publish_frames --messages 20000 --rounds 7
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import aiormq
from aiormq.abc import ChannelFrame
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from saga.transport.amqp import Outgoing
from saga.transport.publish_frames import publish_frames

__all__ = ["messages", "by_pamqp", "by_ours"]

CHANNEL = 1
BODY_MAX = 131072 - 8  # RabbitMQ's default frame_max, less a frame's overhead


class _Sizes:
    """What ``aiormq.Channel._split_body`` reads of its channel."""

    max_content_size = BODY_MAX


def messages(count: int, body_size: int = 800) -> list[Outgoing]:
    """``count`` commands shaped like the orchestrator's."""
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    result = []
    for n in range(count):
        saga_id, message_id = uuid.uuid4(), uuid.uuid4()
        payload = {"order_id": f"order-{n}", "note": ""}
        envelope = {
            "schema_version": 1,
            "message_id": str(message_id),
            "idempotency_key": f"{saga_id}:charge:0",
            "saga_id": str(saga_id),
            "saga_name": "checkout",
            "step": "charge",
            "direction": "forward",
            "attempt": 1,
            "participant": "payment",
            "command_type": "payment.charge",
            "reply_to": "saga.replies",
            "deadline": (now + timedelta(seconds=30)).isoformat(),
            "payload": payload,
        }
        body = json.dumps(envelope).encode()
        payload["note"] = "x" * max(0, body_size - len(body))
        body = json.dumps(envelope).encode()
        headers: dict[str, Any] = {
            "traceparent": f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01",
            "saga-name": "checkout",
            "saga-step": "charge",
            "saga-attempt": "1",
        }
        properties = Basic.Properties(
            content_type="application/json",
            headers=headers,
            delivery_mode=2,
            correlation_id=str(saga_id),
            message_id=str(message_id),
            timestamp=now + timedelta(milliseconds=n),
            message_type="payment.charge",
        )
        result.append(Outgoing("saga.commands", "payment", body, properties))
    return result


def by_pamqp(batch: Sequence[Outgoing]) -> bytes:
    """The frames of ``batch`` as ``Publisher._send`` marshalled them before."""
    frames: list[Any] = []
    for m in batch:
        frames.append(Basic.Publish(exchange=m.exchange, routing_key=m.routing_key, mandatory=True))
        frames.append(ContentHeader(properties=m.properties, body_size=len(m.body)))
        frames.extend(aiormq.Channel._split_body(_Sizes(), m.body))  # type: ignore[arg-type]
    return ChannelFrame.marshall(channel_number=CHANNEL, frames=frames).payload


def by_ours(batch: Sequence[Outgoing]) -> bytes:
    """The frames of ``batch`` as ``Publisher._send`` encodes them now."""
    parts = []
    for m in batch:
        data = publish_frames(
            CHANNEL, m.exchange, m.routing_key, True, m.properties, m.body, BODY_MAX
        )
        assert data is not None
        parts.append(data)
    return ChannelFrame(payload=b"".join(parts), should_close=False).payload


def _cpu_per_message(
    encode: Callable[[Sequence[Outgoing]], bytes], batches: list[list[Outgoing]]
) -> float:
    count = sum(len(b) for b in batches)
    start = time.process_time()
    for batch in batches:
        encode(batch)
    return (time.process_time() - start) / count * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=20, help="messages per publish_many call")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--body", type=int, default=800, help="body size in bytes")
    args = parser.parse_args(argv)
    sample = messages(args.messages, args.body)
    batches = [sample[i : i + args.batch] for i in range(0, len(sample), args.batch)]
    for batch in batches:
        if by_pamqp(batch) != by_ours(batch):
            raise SystemExit("the encoders disagree: no figures")
    old: list[float] = []
    new: list[float] = []
    for _ in range(args.rounds):
        old.append(_cpu_per_message(by_pamqp, batches))
        new.append(_cpu_per_message(by_ours, batches))
    print(
        f"{args.messages} messages of {len(sample[0].body)} bytes, batches of {args.batch}, "
        f"{args.rounds} rounds alternated"
    )
    print(f"pamqp (before): best {min(old):6.2f} µs/message, rounds {[round(x, 2) for x in old]}")
    print(f"ours  (after):  best {min(new):6.2f} µs/message, rounds {[round(x, 2) for x in new]}")
    print(f"saved: {min(old) - min(new):.2f} µs/message ({min(old) / min(new):.1f}x less CPU)")


if __name__ == "__main__":
    main()
