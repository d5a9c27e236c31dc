"""Message schemas shared by the orchestrator and the participants.

This package is a leaf: it imports neither ``saga`` nor ``services``, so both can depend on it and
non-Python participants can use the exported JSON Schema bundle instead.
"""

from contracts.common import (
    SCHEMA_VERSION,
    CommonFailure,
    Contract,
    ContractError,
    Currency,
    JsonObject,
    Money,
    Name,
    NonNegativeMoney,
    Quantity,
    ReasonCode,
    ShortText,
    Sku,
)
from contracts.envelope import (
    DEFAULT_MAX_BYTES,
    CommandEnvelope,
    ReplyEnvelope,
    StartSaga,
    dump_data,
    parse,
    parse_data,
)
from contracts.inventory import (
    InventoryFailure,
    ReleaseStock,
    ReserveStock,
    StockLine,
    StockReleased,
    StockReserved,
)
from contracts.order import (
    CancelOrder,
    CreateOrder,
    OrderCancelled,
    OrderCreated,
    OrderFailure,
    OrderLine,
)
from contracts.payment import (
    ChargePayment,
    PaymentCharged,
    PaymentFailure,
    PaymentRefunded,
    RefundPayment,
)
from contracts.shipping import (
    Address,
    CancelShipment,
    ScheduleShipment,
    ShipmentCancelled,
    ShipmentScheduled,
    ShippingFailure,
)

__all__ = [
    # common
    "SCHEMA_VERSION",
    "CommonFailure",
    "Contract",
    "ContractError",
    "Currency",
    "JsonObject",
    "Money",
    "Name",
    "NonNegativeMoney",
    "Quantity",
    "ReasonCode",
    "ShortText",
    "Sku",
    # envelopes
    "DEFAULT_MAX_BYTES",
    "CommandEnvelope",
    "ReplyEnvelope",
    "StartSaga",
    "dump_data",
    "parse",
    "parse_data",
    # order
    "CancelOrder",
    "CreateOrder",
    "OrderCancelled",
    "OrderCreated",
    "OrderFailure",
    "OrderLine",
    # payment
    "ChargePayment",
    "PaymentCharged",
    "PaymentFailure",
    "PaymentRefunded",
    "RefundPayment",
    # inventory
    "InventoryFailure",
    "ReleaseStock",
    "ReserveStock",
    "StockLine",
    "StockReleased",
    "StockReserved",
    # shipping
    "Address",
    "CancelShipment",
    "ScheduleShipment",
    "ShipmentCancelled",
    "ShipmentScheduled",
    "ShippingFailure",
]
