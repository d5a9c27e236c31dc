"""The wire protocol, for the orchestrator, the participant library and any client of ours:
the three envelopes, the one way to read them off the wire, the queue names of a deployment
and the derived ids. docs/protocol.md is the normative description; a participant in another
language follows that, or the JSON Schemas ``saga schema export`` writes.
"""

from saga.core.ids import command_id, idempotency_key, reply_id, saga_id_for_key
from saga.protocol.envelope import (
    DEFAULT_MAX_BYTES,
    CommandEnvelope,
    ReplyEnvelope,
    StartSaga,
    dump_data,
    parse,
    parse_data,
)
from saga.protocol.types import (
    SCHEMA_VERSION,
    CommonFailure,
    Contract,
    ContractError,
    JsonObject,
    Name,
    ReasonCode,
)
from saga.transport.topology import Topology

__all__ = [
    "DEFAULT_MAX_BYTES",
    "SCHEMA_VERSION",
    "CommandEnvelope",
    "CommonFailure",
    "Contract",
    "ContractError",
    "JsonObject",
    "Name",
    "ReasonCode",
    "ReplyEnvelope",
    "StartSaga",
    "Topology",
    "command_id",
    "dump_data",
    "idempotency_key",
    "parse",
    "parse_data",
    "reply_id",
    "saga_id_for_key",
]
