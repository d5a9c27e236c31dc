"""The demo's message models: the checkout's input, and each command's payload and reply.

They are the demo's own contracts, used exactly as a user's would be: the checkout saga names
them on its steps (``saga_demo.checkout``), the demo services type their handlers with them, and
``saga schema export`` publishes them (committed in the repository's ``contracts/checkout``).
"""

from saga_demo.contracts import inventory, order, payment, shipping
from saga_demo.contracts.checkout import CheckoutInput, CheckoutLine
from saga_demo.contracts.inventory import (
    InventoryFailure,
    ReleaseStock,
    ReserveStock,
    StockLine,
    StockReleased,
    StockReserved,
)
from saga_demo.contracts.order import (
    CancelOrder,
    CreateOrder,
    OrderCancelled,
    OrderCreated,
    OrderFailure,
    OrderLine,
)
from saga_demo.contracts.payment import (
    ChargePayment,
    PaymentCharged,
    PaymentFailure,
    PaymentRefunded,
    RefundPayment,
)
from saga_demo.contracts.shipping import (
    Address,
    CancelShipment,
    ScheduleShipment,
    ShipmentCancelled,
    ShipmentScheduled,
    ShippingFailure,
)
from saga_demo.contracts.types import (
    MAX_AMOUNT,
    MAX_BALANCE,
    Balance,
    Country,
    Currency,
    Money,
    NonNegativeMoney,
    PostalCode,
    Quantity,
    ShortText,
    Sku,
)

__all__ = [
    "MAX_AMOUNT",
    "Address",
    "CancelOrder",
    "CancelShipment",
    "ChargePayment",
    "CheckoutInput",
    "CheckoutLine",
    "Country",
    "CreateOrder",
    "Currency",
    "InventoryFailure",
    "Money",
    "NonNegativeMoney",
    "Balance",
    "MAX_BALANCE",
    "OrderCancelled",
    "OrderCreated",
    "OrderFailure",
    "OrderLine",
    "PaymentCharged",
    "PaymentFailure",
    "PaymentRefunded",
    "PostalCode",
    "Quantity",
    "RefundPayment",
    "ReleaseStock",
    "ReserveStock",
    "ScheduleShipment",
    "ShipmentCancelled",
    "ShipmentScheduled",
    "ShippingFailure",
    "ShortText",
    "Sku",
    "StockLine",
    "StockReleased",
    "StockReserved",
    "inventory",
    "order",
    "payment",
    "shipping",
]
