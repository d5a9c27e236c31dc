"""The participant library: join sagas from your own service, for your own command types.

A participant registers one handler per command type, typed with its own pydantic models (or
plain JSON). For each command it runs the handler's business change, records the command's
idempotency key with the final answer it produced, and writes the reply to its own outbox, all
in ONE transaction of its own database; a relay publishes the outbox with publisher confirms. A
redelivered or retried command gets the stored answer again without a second side effect, and
an action that arrives after its compensation is refused (:data:`ALREADY_COMPENSATED`).
docs/writing-a-participant.md walks through one.
"""

from saga.participant.errors import BusinessError, TransientError
from saga.participant.ledger import Ledger
from saga.participant.runtime import ALREADY_COMPENSATED, Handler, Participant
from saga.participant.settings import ParticipantSettings, load_participant_settings
from saga.store.schema import UTCDateTime

__all__ = [
    "ALREADY_COMPENSATED",
    "BusinessError",
    "Handler",
    "Ledger",
    "Participant",
    "ParticipantSettings",
    "TransientError",
    "UTCDateTime",
    "load_participant_settings",
]
