"""Keeping passwords out of logs, errors and reprs.

Every URL we print goes through :func:`redact_url`; every log line (ours and the stdlib's, e.g.
aio-pika's reconnect warnings) goes through :func:`redact` as its last step before rendering, so
a password that slipped into an exception message is caught there too.
"""

from __future__ import annotations

import re
from collections.abc import MutableMapping
from typing import Any

__all__ = ["redact", "redact_event", "redact_url"]

#: ``scheme://user:password@`` anywhere in a text
_CREDENTIALS = re.compile(r"(?P<head>\b[a-z][a-z0-9+.-]*://[^:/@\s]*):(?P<secret>[^@\s]+)@", re.I)
#: where a comma-separated list of URLs (several broker nodes) starts its next URL
_NEXT_URL = re.compile(r"(?<=,)(?=\s*[a-z][a-z0-9+.-]*://)", re.I)
_MASK = "***"


def redact(text: str) -> str:
    """``text`` with the password of every URL in it masked.

    URLs of a comma-separated list are masked one by one: otherwise a URL without a password
    but with a port (``amqp://h1:5672/,amqp://u:pw@h2/``) would read as user ``h1`` with a
    password running up to the next ``@``, which masks the secret but garbles the list."""
    if "://" not in text:
        return text
    return "".join(
        _CREDENTIALS.sub(lambda m: f"{m['head']}:{_MASK}@", part) for part in _NEXT_URL.split(text)
    )


def redact_url(url: str) -> str:
    """A URL, or comma-separated URLs, with every password masked (user names stay: they help
    find the account)."""
    return redact(url)


def redact_event(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> Any:
    """structlog processor: mask URL passwords in every string value of the event."""
    for key, value in event.items():
        if isinstance(value, str):
            event[key] = redact(value)
        elif not isinstance(value, int | float | bool) and value is not None:
            text = str(value)
            masked = redact(text)
            if masked != text:
                event[key] = masked
    return event
