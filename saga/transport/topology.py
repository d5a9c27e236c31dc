"""Broker topology as pure data: every exchange, queue, binding and argument by name.

Unit-tested without a broker and applied by :func:`saga.transport.amqp.declare`. A ``prefix``
namespaces everything, so several deployments (or test runs) can share one broker.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = ["Binding", "ExchangeSpec", "QueueSpec", "Topology"]

#: header names set on messages we dead-letter ourselves
DEAD_LETTER_REASON = "x-saga-dead-letter-reason"
DEAD_LETTER_DETAIL = "x-saga-dead-letter-detail"
DEAD_LETTER_QUEUE = "x-saga-dead-letter-queue"


@dataclass(frozen=True, slots=True)
class ExchangeSpec:
    name: str
    kind: str = "direct"


@dataclass(frozen=True, slots=True)
class QueueSpec:
    name: str
    arguments: dict[str, str | int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Binding:
    queue: str
    exchange: str
    routing_key: str


@dataclass(frozen=True, slots=True)
class Topology:
    """Names and arguments for one deployment.

    * ``{prefix}.commands``: direct exchange; routing key = participant name.
    * ``{prefix}.cmd.{participant}``: one durable command queue per participant.
    * ``{prefix}.replies``: the orchestrators' reply queue (replies go through the default
      exchange with ``reply_to`` as routing key).
    * ``{prefix}.start``: start-saga requests.
    * ``{prefix}.dlx``: dead-letter exchange; ``{queue}.dlq`` holds what ``{queue}`` rejected,
      whether the broker dead-lettered it (delivery limit) or we did (with a reason header).
    """

    prefix: str = "saga"
    quorum: bool = False
    delivery_limit: int = 20  # quorum queues: redeliveries before the broker dead-letters

    @property
    def commands_exchange(self) -> str:
        return f"{self.prefix}.commands"

    @property
    def dead_letter_exchange(self) -> str:
        return f"{self.prefix}.dlx"

    @property
    def reply_queue(self) -> str:
        return f"{self.prefix}.replies"

    @property
    def start_queue(self) -> str:
        return f"{self.prefix}.start"

    def command_queue(self, participant: str) -> str:
        return f"{self.prefix}.cmd.{participant}"

    @staticmethod
    def dead_letter_queue(queue: str) -> str:
        return f"{queue}.dlq"

    def queue_arguments(self, queue: str) -> dict[str, str | int]:
        args: dict[str, str | int] = {
            "x-dead-letter-exchange": self.dead_letter_exchange,
            "x-dead-letter-routing-key": self.dead_letter_queue(queue),
        }
        if self.quorum:
            args["x-queue-type"] = "quorum"
            args["x-delivery-limit"] = self.delivery_limit
        return args

    def dead_letter_arguments(self) -> dict[str, str | int]:
        return {"x-queue-type": "quorum"} if self.quorum else {}

    def exchanges(self) -> list[ExchangeSpec]:
        return [ExchangeSpec(self.commands_exchange), ExchangeSpec(self.dead_letter_exchange)]

    def queues(self, participants: Iterable[str]) -> list[QueueSpec]:
        """Every queue with its dead-letter queue, for the orchestrator and ``participants``."""
        main = [self.reply_queue, self.start_queue] + [
            self.command_queue(p) for p in sorted(set(participants))
        ]
        specs: list[QueueSpec] = []
        for name in main:
            specs.append(QueueSpec(name, self.queue_arguments(name)))
            specs.append(QueueSpec(self.dead_letter_queue(name), self.dead_letter_arguments()))
        return specs

    def bindings(self, participants: Iterable[str]) -> list[Binding]:
        result = [
            Binding(self.command_queue(p), self.commands_exchange, p)
            for p in sorted(set(participants))
        ]
        for name in [self.reply_queue, self.start_queue] + [
            self.command_queue(p) for p in sorted(set(participants))
        ]:
            dlq = self.dead_letter_queue(name)
            result.append(Binding(dlq, self.dead_letter_exchange, dlq))
        return result
