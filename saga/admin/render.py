"""Plain-text views of the admin API's answers for the command line: tables and a timeline.

Pure functions from the JSON the API returns to lines of text, so they are easy to test and
the command line stays thin. Compensation lines carry ``<<`` and ``undo``, so a reader sees at
a glance where the saga went backwards.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

__all__ = ["action_result", "definitions", "saga_list", "saga_timeline"]

_DEFINITION_HEADER = (
    *("", "STEP", "PARTICIPANT", "ACTION", "COMPENSATION"),
    *("TIMEOUT", "TRIES", "UNDO TRIES"),
)
#: history kinds that belong to going backwards, marked in the timeline
_BACKWARDS = {"compensation_started", "step_compensated", "compensation_failed", "compensated"}


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]


def _time(text: str | None) -> str:
    """``2024-05-01 12:00:00.123`` (UTC) from the API's ISO time."""
    if not text:
        return "-"
    when = datetime.fromisoformat(text)
    return when.strftime("%Y-%m-%d %H:%M:%S.") + f"{when.microsecond // 1000:03d}"


def _short(text: str | None, width: int = 60) -> str:
    if not text:
        return ""
    return text if len(text) <= width else text[: width - 3] + "..."


def _took(span: dict[str, Any] | None) -> str:
    if span is None:
        return "-"
    ms = span.get("duration_ms")
    if ms is None:
        return "running"
    return f"{ms:.0f} ms" if ms < 10_000 else f"{ms / 1000:.1f} s"


def saga_list(page: dict[str, Any]) -> list[str]:
    items = page["items"]
    if not items:
        return ["no sagas match"]
    rows = [
        [
            s["saga_id"],
            f"{s['name']} v{s['definition_version']}",
            s["status"],
            _time(s["created_at"]),
            s["key"] or "",
            _short(
                f"stuck at {s['stuck_step']}: {s['failure']}"
                if s["stuck_step"]
                else s["failure"] or ""  # why it compensates
            ),
        ]
        for s in items
    ]
    lines = _table(["SAGA ID", "NAME", "STATUS", "CREATED (UTC)", "KEY", "NOTE"], rows)
    if page.get("next_cursor"):
        lines.append(f"more: --cursor {page['next_cursor']}")
    return lines


def saga_timeline(saga: dict[str, Any]) -> list[str]:
    """The saga, its steps with attempts and timings, and every history entry in order."""
    lines = [
        f"saga {saga['saga_id']}  {saga['name']} v{saga['definition_version']}  {saga['status']}",
        f"created {_time(saga['created_at'])}  updated {_time(saga['updated_at'])} (UTC)"
        + (f"  key {saga['key']}" if saga["key"] else ""),
    ]
    if saga["failure"]:
        lines.append(f"failure: {saga['failure']}")
    if saga["stuck_step"]:
        lines.append(
            f"stuck at step {saga['stuck_step']}: an operator decides "
            "(saga retry | resolve ID --reason ...)"
        )
    lines.append(f"input: {json.dumps(saga['input'], sort_keys=True)}")
    lines.append("")
    step_rows = [
        [
            st["name"],
            st["participant"] or "?",
            st["status"],
            str(st["attempts"]),
            _took(st["action"]),
            str(st["compensation_attempts"]),
            _took(st["compensation"]),
            _short(st["error"], 50),
        ]
        for st in saga["steps"]
    ]
    lines += _table(
        ["STEP", "PARTICIPANT", "STATUS", "TRIES", "TOOK", "UNDO TRIES", "UNDO TOOK", "ERROR"],
        step_rows,
    )
    lines.append("")
    history = saga["history"]
    start = datetime.fromisoformat(history[0]["at"]) if history else None
    rows = []
    for h in history:
        backwards = h["direction"] == "compensation" or h["kind"] in _BACKWARDS
        elapsed = (datetime.fromisoformat(h["at"]) - start).total_seconds() if start else 0.0
        direction = {"action": "do", "compensation": "undo"}.get(h["direction"] or "", "")
        what = h["detail"] + (f"  [by {h['actor']}]" if h["actor"] else "")
        rows.append(
            [
                "<<" if backwards else "",
                _time(h["at"]),
                f"+{elapsed:.3f}s",
                h["step"] or "",
                direction,
                "" if h["attempt"] is None else f"#{h['attempt']}",
                h["kind"],
                what,
            ]
        )
    lines += _table(["", "TIME (UTC)", "ELAPSED", "STEP", "DIR", "TRY", "EVENT", "WHAT"], rows)
    return lines


def action_result(action: str, result: dict[str, Any]) -> list[str]:
    saga = result["saga"]
    lines = [f"{action}: saga {saga['saga_id']} is now {saga['status']}"]
    for h in result["entries"]:
        where = f" {h['step']}" if h["step"] else ""
        if h["direction"] == "compensation":
            where += " (undo)"
        lines.append(f"  {h['kind']}{where}: {h['detail']}")
    return lines


def definitions(found: list[dict[str, Any]]) -> list[str]:
    if not found:
        return ["no saga definitions are registered"]
    lines: list[str] = []
    for d in found:
        if lines:
            lines.append("")
        lines.append(f"{d['name']} v{d['version']}")
        rows = []
        for i, st in enumerate(d["steps"], 1):
            tries = st["retry"]["max_attempts"]
            undo_tries = st["compensation_retry"]["max_attempts"]
            rows.append(
                [
                    f"{i}.",
                    st["name"] + (" (pivot)" if st["pivot"] else ""),
                    st["participant"],
                    st["action"],
                    (st["compensation"] or "-") if st["compensated"] else "-",
                    f"{st['timeout_s']:g}s",
                    "forever" if tries is None else str(tries),
                    ("forever" if undo_tries is None else str(undo_tries))
                    if st["compensated"]
                    else "-",
                ]
            )
        lines += ["  " + line for line in _table(_DEFINITION_HEADER, rows)]
    return lines
