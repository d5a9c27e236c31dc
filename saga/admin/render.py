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

__all__ = [
    "action_result",
    "dead_letter",
    "dead_letter_list",
    "dead_letter_result",
    "definitions",
    "saga_list",
    "saga_timeline",
    "why",
]

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


def _short(text: str | None, width: int | None = 60) -> str:
    """``text`` cut to ``width`` characters (None: never cut)."""
    if not text:
        return ""
    if width is None or len(text) <= width:
        return text
    return text[: max(width - 3, 0)] + "..."


#: how :func:`why` words each operator action
_DONE_BY = {"retry": "retried", "resolve": "resolved by hand", "abort": "aborted"}


def why(s: dict[str, Any]) -> str:
    """Why the saga went wrong and how it ended, in one line: the root cause, kept apart from
    the reason a FAILED saga is stuck now and from the operator's fix, so a compensation that
    failed and was then retried does not read as the cause of a COMPENSATED saga."""
    cause, fix = s.get("root_cause"), s.get("resolution")
    parts = []
    if s["status"] == "FAILED" and s["stuck_step"]:
        parts.append(f"stuck at {s['stuck_step']}: {s['failure']}")
    if cause is not None:
        if not parts or cause["detail"] != s["failure"]:
            parts.append(f"cause: {cause['detail']}" if parts else cause["detail"])
    elif not parts and s["failure"]:  # an older server: no root cause
        parts.append(s["failure"])
    if fix is not None:
        done = _DONE_BY.get(fix["action"], fix["action"])
        parts.append(f"{done} by {fix['actor']}: {fix['reason']}")
    return "; ".join(parts)


def _took(span: dict[str, Any] | None) -> str:
    if span is None:
        return "-"
    ms = span.get("duration_ms")
    if ms is None:
        return "running"
    return f"{ms:.0f} ms" if ms < 10_000 else f"{ms / 1000:.1f} s"


def saga_list(page: dict[str, Any], width: int | None = None) -> list[str]:
    """The page as a table; the NOTE column (:func:`why`) is cut so that a line fits in
    ``width`` characters (None: never cut, for a pipe), but never to fewer than 20."""
    items = page["items"]
    if not items:
        return ["no sagas match"]
    header = ["SAGA ID", "NAME", "STATUS", "CREATED (UTC)", "KEY", "NOTE"]
    rows = [
        [
            s["saga_id"],
            f"{s['name']} v{s['definition_version']}",
            s["status"],
            _time(s["created_at"]),
            s["key"] or "",
            why(s),
        ]
        for s in items
    ]
    if width is not None:
        before = sum(max(len(r[i]) for r in [header, *rows]) + 2 for i in range(len(header) - 1))
        room = max(width - before, 20)
        rows = [[*row[:-1], _short(row[-1], room)] for row in rows]
    lines = _table(header, rows)
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
    cause, fix = saga.get("root_cause"), saga.get("resolution")
    if cause is not None:
        facts = [f"step {cause['step']}"] if cause["step"] else []
        facts += [f"error {cause['error']}"] if cause["error"] else []
        said = f"  [{', '.join(facts)}]" if facts else ""
        lines.append(f"root cause: {cause['detail']}{said}  at {_time(cause['at'])}")
    if saga["failure"] and (
        cause is None or (saga["status"] == "FAILED" and saga["failure"] != cause["detail"])
    ):
        lines.append(f"failure: {saga['failure']}")  # why it is stuck now
    if fix is not None:
        done = _DONE_BY.get(fix["action"], fix["action"])
        lines.append(f"{done} by {fix['actor']} at {_time(fix['at'])}: {fix['reason']}")
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


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def dead_letter_list(page: dict[str, Any]) -> list[str]:
    """Each dead-letter queue's depth, then the messages, oldest first in each queue."""
    lines = [
        f"{q['dead_letter_queue']}: "
        + (f"unreadable ({q['error']})" if q.get("error") else f"{q['depth']} message(s)")
        for q in page["queues"]
    ]
    items = page["items"]
    if not items:
        return [*lines, "", "no dead letters match"]
    rows = [
        (
            i["id"],
            i["queue"],
            i["reason"],
            _age(i["age_s"]),
            i["saga_id"] or "-",
            str(i["replays"]),
            _short(i["detail"], 50),
        )
        for i in items
    ]
    header = ("ID", "QUEUE", "REASON", "AGE", "SAGA", "REPLAYS", "DETAIL")
    lines += ["", *_table(header, rows)]
    if page["truncated"]:
        lines.append("(more: narrow the filters or raise --limit)")
    return lines


def dead_letter(d: dict[str, Any]) -> list[str]:
    lines = [
        f"id:           {d['id']}",
        f"queue:        {d['queue']} (dead-letter queue {d['dead_letter_queue']})",
        f"reason:       {d['reason']}",
        f"detail:       {d['detail']}",
        f"saga:         {d['saga_id'] or '-'}",
        f"type:         {d['message_type'] or '-'}",
        f"dead-lettered {_time(d['dead_lettered_at'])} ({_age(d['age_s'])} ago)",
        f"replays:      {d['replays']}",
        f"size:         {d['size']} bytes" + (f", {d['copies']} copies" if d["copies"] > 1 else ""),
        "headers:",
        *(f"  {k}: {v}" for k, v in sorted(d["headers"].items())),
        f"body ({d['body_format']}{', truncated' if d['body_truncated'] else ''}):",
        d["body"],
    ]
    return lines


def dead_letter_result(result: dict[str, Any]) -> list[str]:
    past = {"replay": "replayed", "discard": "discarded"}[result["action"]]
    messages = result["messages"]
    lines = [f"{past} by {result['actor']}: {len(messages)} message(s) ({result['reason']})"]
    for m in messages:
        to = f" -> {m['queue']}" if m["outcome"] == "replayed" else ""
        why = f": {m['why']}" if m.get("why") else ""
        lines.append(f"  {m['outcome']} {m['id']} from {m['dead_letter_queue']}{to}{why}")
    if result["truncated"]:
        lines.append("(a queue was longer than one scan: run it again for the rest)")
    return lines


def batch_preview(preview: dict[str, Any], first: int = 20) -> list[str]:
    """A dry run: how many, and the first ``first`` of them with the step and why."""
    action, items = preview["action"], preview["items"]
    if not items:
        return [f"{action}: no saga matches"]
    lines = [
        f"{action}: {preview['matched']} sagas match: {preview['would_apply']} accept it, "
        f"{preview['would_skip']} would be skipped"
    ]
    rows = [
        [
            s["saga_id"],
            s["name"],
            s["status"],
            s["at_step"] or "",
            (s["why"] or "") if s["allowed"] else f"skipped: {s['refusal']}",
        ]
        for s in items[:first]
    ]
    lines += _table(["SAGA ID", "NAME", "STATUS", "STEP", "WHY"], rows)
    if len(items) > first:
        lines.append(f"... and {len(items) - first} more (--json lists them all)")
    if preview["truncated"]:
        lines.append("more sagas match than --limit: run it again for the rest")
    return lines


def batch_progress(progress: dict[str, Any]) -> str:
    p = progress
    return (
        f"{p['action']}: {p['done']}/{p['total']} done "
        f"(applied {p['applied']}, skipped {p['skipped']}, failed {p['failed']})"
    )


def batch_result(progress: dict[str, Any]) -> list[str]:
    """The summary, then every saga that was skipped or failed, and why."""
    lines = [batch_progress(progress)]
    for r in progress["results"]:
        if r["outcome"] in ("skipped", "failed"):
            lines.append(f"  {r['outcome']} {r['saga_id']} ({r['name'] or '?'}): {r['why']}")
    if progress["truncated"]:
        lines.append("more sagas matched than --limit: run it again for the rest")
    return lines
