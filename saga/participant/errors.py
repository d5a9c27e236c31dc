"""How a handler says no.

    Exception
    ├── BusinessError    a decision: the reply is a non-retryable failure, recorded, never redone
    └── TransientError   try again later: a retryable failure, not recorded, nothing changed

Any other exception is a bug in the handler: it is logged and answered like a TransientError
(``handler_error``), so the orchestrator retries with backoff and then compensates.
"""

from __future__ import annotations

__all__ = ["BusinessError", "TransientError"]


class BusinessError(Exception):
    def __init__(self, reason: str, detail: str | None = None):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class TransientError(Exception):
    def __init__(self, reason: str = "unavailable", detail: str | None = None):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
