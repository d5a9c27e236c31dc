"""The demo's command types as the tests read them: each with its participant, its payload and
reply models and the action it compensates, from the checkout saga's steps."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import JsonValue

from saga.protocol.envelope import parse_data
from saga.protocol.types import Contract
from saga_demo.checkout import registry

__all__ = ["CATALOG", "DemoCommand"]


@dataclass(frozen=True)
class DemoCommand:
    command_type: str
    participant: str
    payload: type[Contract]
    reply: type[Contract]
    compensates: str | None
    failures: tuple[str, ...]

    @property
    def is_compensation(self) -> bool:
        return self.compensates is not None

    def parse_payload(self, data: Mapping[str, JsonValue]) -> Any:
        return parse_data(self.payload, data)

    def parse_reply(self, data: Mapping[str, JsonValue]) -> Any:
        return parse_data(self.reply, data)


CATALOG: Mapping[str, DemoCommand] = {
    c.command_type: DemoCommand(
        c.command_type, c.participant, c.payload_model, c.reply_model, c.compensates, c.failures
    )
    for c in registry().commands()
}
