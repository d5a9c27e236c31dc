"""The small library every demo participant uses to join sagas.

A participant registers one handler per command type. For each command it runs the handler's
business change, records the command's idempotency key with the reply it produced, and writes
the reply to its own outbox, all in ONE transaction of its own database; a relay publishes the
outbox with publisher confirms. A redelivered or retried command gets the stored reply again
without a second side effect.
"""

from saga.participant.errors import BusinessError, TransientError
from saga.participant.runtime import Handler, Participant
from saga.participant.settings import ServiceSettings

__all__ = ["BusinessError", "Handler", "Participant", "ServiceSettings", "TransientError"]
