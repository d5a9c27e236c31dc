"""saga: a saga orchestrator over RabbitMQ, correct under every fault.

The public surface; everything else is internal and may change.
"""

from saga.core.definition import (
    CompensationPolicy,
    Parallel,
    Registry,
    RetryPolicy,
    SagaDefinition,
    Step,
)
from saga.core.errors import (
    ConcurrencyError,
    ConfigError,
    DefinitionError,
    FieldError,
    InvalidInputError,
    MessageError,
    SagaError,
    UnknownSagaError,
)
from saga.core.state import (
    JSON,
    Command,
    Direction,
    HistoryEntry,
    HistoryKind,
    SagaContext,
    SagaState,
    SagaStatus,
    StepStatus,
    Transition,
)

__version__ = "0.1.0"

__all__ = [
    "JSON",
    "Command",
    "CompensationPolicy",
    "ConcurrencyError",
    "ConfigError",
    "DefinitionError",
    "Direction",
    "FieldError",
    "HistoryEntry",
    "HistoryKind",
    "InvalidInputError",
    "MessageError",
    "Parallel",
    "Registry",
    "RetryPolicy",
    "SagaContext",
    "SagaDefinition",
    "SagaError",
    "SagaState",
    "SagaStatus",
    "Step",
    "StepStatus",
    "Transition",
    "UnknownSagaError",
    "__version__",
]
