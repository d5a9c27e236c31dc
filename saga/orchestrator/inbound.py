"""What the orchestrator does with each message it consumes: a participant's reply, or a
request to start a saga. Both run inside the shared consume pipeline
(:mod:`saga.messaging.pipeline`), which parses, traces, acks and dead-letters around them."""

from __future__ import annotations

import logging

import structlog
from opentelemetry import trace

from saga.core.errors import InvalidInputError, MessageError, UnknownSagaError
from saga.faults import crash_point
from saga.orchestrator.runtime import Orchestrator, Outcome
from saga.protocol.envelope import ReplyEnvelope, StartSaga
from saga.transport.broker import IncomingMessage

__all__ = ["Inbound", "reply_attributes", "start_attributes"]

log = structlog.get_logger("saga.orchestrator")


class Inbound:
    """The orchestrator's two message handlers; each returns the outcome label to count."""

    def __init__(self, orchestrator: Orchestrator):
        self._orchestrator = orchestrator

    async def reply(self, reply: ReplyEnvelope, message: IncomingMessage) -> str:
        """Apply a participant's reply; MessageError (unknown saga, a reply that does not match
        the command it names) dead-letters it."""
        result = await self._orchestrator.handle_reply(reply)
        crash_point("after_reply_commit_before_ack")
        state = result.state
        trace.get_current_span().set_attributes(
            {"saga.name": state.name, "saga.outcome": result.outcome.value}
        )
        if result.outcome is Outcome.IGNORED and result.transition is not None:
            log.info(
                "reply_ignored",
                saga_id=str(reply.saga_id),
                saga_name=state.name,
                step=state.steps[state.current].name if state.current < len(state.steps) else None,
                attempt=state.attempt,
                message_id=str(reply.message_id),
                causation_id=str(reply.causation_id),
                reason="; ".join(h.detail for h in result.transition.history),
            )
        elif log.is_enabled_for(logging.DEBUG):
            history = result.transition.history if result.transition is not None else ()
            answered = next((h for h in history if h.step), None)
            log.debug(
                "reply_applied",
                saga_id=str(reply.saga_id),
                saga_name=state.name,
                step=None if answered is None else answered.step,
                attempt=None if answered is None else answered.attempt,
                message_id=str(reply.message_id),
                causation_id=str(reply.causation_id),
                outcome=result.outcome.value,
            )
        return result.outcome.value

    async def start(self, request: StartSaga, message: IncomingMessage) -> str:
        """Start a saga by key. The saga's span is a child of this process span, which
        continues the requester's trace when the start message carried one. A start for a
        saga that exists (a redelivery, a re-send, a retry under the same key) counts as
        ``duplicate``, so ``applied`` starts equal the sagas started."""
        try:
            result = await self._orchestrator.begin(
                request.saga_name,
                dict(request.input),
                key=request.key,
                inbox_id=request.message_id,
            )
        except UnknownSagaError as exc:
            raise MessageError("unknown_saga_name", str(exc)) from exc
        except InvalidInputError as exc:
            raise MessageError("invalid_input", str(exc)) from exc
        outcome = "applied" if result.outcome is Outcome.APPLIED else "duplicate"
        if self._orchestrator.tracing.recording:
            saga_id = str(result.state.saga_id)
            trace.get_current_span().set_attributes(
                {
                    "saga.id": saga_id,
                    "messaging.message.conversation_id": saga_id,
                    "saga.outcome": outcome,
                }
            )
        return outcome


def reply_attributes(reply: ReplyEnvelope) -> dict[str, str | int]:
    return {
        "messaging.message.conversation_id": str(reply.saga_id),
        "saga.id": str(reply.saga_id),
        "saga.participant": reply.participant,
        "saga.causation_id": str(reply.causation_id),
    }


def start_attributes(request: StartSaga) -> dict[str, str | int]:
    return {"saga.name": request.saga_name}
