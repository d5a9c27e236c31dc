"""Which command goes to which participant, with which payload, reply and compensation.

The orchestrator checks saga definitions against this table at startup and participants use it to
validate what they receive, so both sides read the same source of truth.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType

from pydantic import JsonValue

from contracts import inventory, order, payment, shipping
from contracts.common import Contract, ContractError
from contracts.envelope import parse_data

__all__ = [
    "CATALOG",
    "PARTICIPANTS",
    "CommandContract",
    "command_types",
    "compensation_for",
    "lookup",
]


@dataclass(frozen=True, slots=True)
class CommandContract:
    """One command type: its participant, payload and success reply models.

    ``compensates`` names the action this command undoes (``None`` for actions); ``failures``
    lists the business reasons a failure reply may carry besides the common ones.
    """

    command_type: str
    participant: str
    payload: type[Contract]
    reply: type[Contract]
    compensates: str | None = None
    failures: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.command_type.startswith(f"{self.participant}."):
            raise ValueError(f"{self.command_type} must be prefixed by {self.participant}.")

    @property
    def is_compensation(self) -> bool:
        return self.compensates is not None

    def parse_payload(self, data: Mapping[str, JsonValue]) -> Contract:
        """Validate a command envelope's ``payload`` against this command's payload model."""
        return parse_data(self.payload, data)

    def parse_reply(self, data: Mapping[str, JsonValue]) -> Contract:
        """Validate a success reply's ``data`` against this command's reply model."""
        return parse_data(self.reply, data)


def _catalog(*contracts: CommandContract) -> Mapping[str, CommandContract]:
    table = {c.command_type: c for c in contracts}
    if len(table) != len(contracts):
        raise ValueError("duplicate command type in the catalog")
    for c in contracts:
        if c.compensates is None:
            continue
        undone = table.get(c.compensates)
        if undone is None or undone.is_compensation or undone.participant != c.participant:
            raise ValueError(f"{c.command_type} must compensate an action of {c.participant}")
    return MappingProxyType(table)


def _reasons(reasons: type[StrEnum]) -> tuple[str, ...]:
    return tuple(r.value for r in reasons)


CATALOG: Mapping[str, CommandContract] = _catalog(
    CommandContract(
        order.CREATE,
        order.PARTICIPANT,
        order.CreateOrder,
        order.OrderCreated,
        failures=_reasons(order.OrderFailure),
    ),
    CommandContract(
        order.CANCEL,
        order.PARTICIPANT,
        order.CancelOrder,
        order.OrderCancelled,
        compensates=order.CREATE,
    ),
    CommandContract(
        payment.CHARGE,
        payment.PARTICIPANT,
        payment.ChargePayment,
        payment.PaymentCharged,
        failures=_reasons(payment.PaymentFailure),
    ),
    CommandContract(
        payment.REFUND,
        payment.PARTICIPANT,
        payment.RefundPayment,
        payment.PaymentRefunded,
        compensates=payment.CHARGE,
    ),
    CommandContract(
        inventory.RESERVE,
        inventory.PARTICIPANT,
        inventory.ReserveStock,
        inventory.StockReserved,
        failures=_reasons(inventory.InventoryFailure),
    ),
    CommandContract(
        inventory.RELEASE,
        inventory.PARTICIPANT,
        inventory.ReleaseStock,
        inventory.StockReleased,
        compensates=inventory.RESERVE,
    ),
    CommandContract(
        shipping.SCHEDULE,
        shipping.PARTICIPANT,
        shipping.ScheduleShipment,
        shipping.ShipmentScheduled,
        failures=_reasons(shipping.ShippingFailure),
    ),
    CommandContract(
        shipping.CANCEL,
        shipping.PARTICIPANT,
        shipping.CancelShipment,
        shipping.ShipmentCancelled,
        compensates=shipping.SCHEDULE,
    ),
)
"""Every command type, keyed by ``command_type``; read-only."""

PARTICIPANTS: tuple[str, ...] = (
    order.PARTICIPANT,
    payment.PARTICIPANT,
    inventory.PARTICIPANT,
    shipping.PARTICIPANT,
)


def lookup(command_type: str) -> CommandContract:
    """The contract of ``command_type``; an unknown type is a contract error, not a KeyError."""
    try:
        return CATALOG[command_type]
    except KeyError:
        shown = command_type if len(command_type) <= 64 else command_type[:61] + "..."
        raise ContractError("unknown_command", f"no command type {shown!r}") from None


def command_types(participant: str) -> tuple[str, ...]:
    """The command types ``participant`` must handle, actions and compensations alike."""
    if participant not in PARTICIPANTS:
        raise ContractError("unknown_participant", f"no participant {participant[:64]!r}")
    return tuple(t for t, c in CATALOG.items() if c.participant == participant)


def compensation_for(action_type: str) -> CommandContract | None:
    """The command that undoes ``action_type``, or ``None`` if it needs no compensation."""
    lookup(action_type)
    return next((c for c in CATALOG.values() if c.compensates == action_type), None)
