"""The time forms an operator types: an age (``30m``, ``1h``, ``2d``, ``1w``) or an ISO time.

One parser for the command line (``saga list --since``) and the admin API (``since``/``until``
of ``GET /api/sagas``, which the dashboard passes as typed), so a filter that works in one works
in the other. No FastAPI or httpx here: the CLI imports it without the server's libraries.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

__all__ = ["TIME_FORMS", "parse_time"]

#: what to tell someone whose time does not parse
TIME_FORMS = "an age (30m, 1h, 2d, 1w) or an ISO time (2024-05-01T12:00:00Z)"

_AGO = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_NUMBER = re.compile(r"^\s*[+-]?(\d+\.?\d*|\.\d+)\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """``30m``, ``1h``, ``2d``, ``1w`` ago, or an ISO time (no offset means UTC); ValueError
    with the forms that work otherwise."""
    ago = _AGO.match(text)
    if ago:
        try:
            return (now or datetime.now(UTC)) - timedelta(**{_UNITS[ago[2]]: int(ago[1])})
        except OverflowError:
            raise ValueError(f"{text!r} reaches back before year 1: give a smaller age") from None
    if _NUMBER.match(text):  # read as seconds since 1970 by some tools: say so, never guess
        raise ValueError(f"{text!r} is a number, not a time (not a Unix time): use {TIME_FORMS}")
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{text!r}: use {TIME_FORMS}") from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when
