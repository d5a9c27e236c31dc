"""Plain-text views of the admin API's answers for the command line: tables and a timeline.

Pure functions from the JSON the API returns to lines of text, so they are easy to test and
the command line stays thin. Compensation lines carry ``<<`` and ``undo``, so a reader sees at
a glance where the saga went backwards.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "action_result",
    "dead_letter",
    "dead_letter_list",
    "dead_letter_result",
    "definitions",
    "language",
    "pending",
    "retry_run",
    "saga_list",
    "saga_timeline",
    "why",
]

_DEFINITION_HEADER = (
    *("", "STEP", "RUNS", "PARTICIPANT", "ACTION", "COMPENSATION"),
    *("TIMEOUT", "TRIES", "UNDO TRIES"),
)
#: what ``on_compensation_failure`` means, in the words of ``saga definitions``
_POLICY = {
    "halt": "halt (a compensation that fails for good stops the compensation)",
    "continue": "continue (older steps are still compensated; FAILED names every stuck one)",
}
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


def _seconds(value: float) -> str:
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.1f} s"


def _duration(seconds: float) -> str:
    """``45s``, ``10m``, ``1h30m``: a deadline or the time left to it."""
    whole = round(seconds)
    if whole < 120:
        return f"{whole}s"
    hours, minutes = divmod(whole // 60, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m"


def language(saga: dict[str, Any], now: datetime | None = None) -> list[str]:
    """What the saga language adds to a saga: every member of a parallel group in flight,
    the steps skipped because their condition was false, the saga's own deadline with the
    time left while it runs forward, and every stuck compensation (several under the
    ``continue`` policy), so none is missed when only the newest is ``stuck_step``."""
    lines = []
    in_flight = saga.get("in_flight") or []
    if len(in_flight) > 1:
        lines.append(f"in flight: {', '.join(in_flight)} (in parallel)")
    skipped = [st["name"] for st in saga["steps"] if st["status"] == "SKIPPED"]
    if skipped:
        lines.append(f"skipped: {', '.join(skipped)} (condition false: nothing sent or undone)")
    if saga.get("expires_at"):
        line = f"deadline: {_time(saga['expires_at'])}"
        if saga["status"] == "RUNNING" and saga["direction"] == "action":
            left = (
                datetime.fromisoformat(saga["expires_at"]) - (now or datetime.now(UTC))
            ).total_seconds()
            line += (
                f" ({_duration(left)} left)" if left >= 0 else f" (passed {_duration(-left)} ago)"
            )
        lines.append(line)
    stuck = saga.get("stuck_steps") or []
    if len(stuck) > 1:
        lines.append(
            f"stuck compensations: {', '.join(stuck)} (newest first; each needs a retry or a "
            "resolve)"
        )
    return lines


def retry_run(run: dict[str, Any]) -> str:
    """A run of attempts in one line, e.g. ``payment.refund \N{MULTIPLICATION SIGN}10,
    injected_transient, 3.6 s to 8.4 s apart``: what a reader needs of the thirty entries it
    stands for."""
    parts = [f"{run['command'] or run['step']} \N{MULTIPLICATION SIGN}{run['attempts']}"]
    if run["errors"]:
        parts.append(", ".join(run["errors"]))
    low, high = run["min_interval_s"], run["max_interval_s"]
    if low is not None and high is not None:
        low_text, high_text = _seconds(low), _seconds(high)
        same = low_text == high_text
        parts.append(f"{low_text} apart" if same else f"{low_text} to {high_text} apart")
    parts.append(f"last at {_time(run['last_at'])}")
    return ", ".join(parts)


def pending(saga: dict[str, Any]) -> list[str]:
    """The step the saga waits on: which try it is, what went wrong last, what happens next,
    and what an operator may do."""
    p = saga.get("pending")
    lines = []
    members = (p or {}).get("members") or []
    if members:  # a parallel group: each member has its own attempt and deadline
        names = "+".join(m["step"] for m in members)
        lines.append(f"pending: {names} (do, in parallel)")
        lines += [f"  {m['step']}: {', '.join(_attempt_facts(m, saga))}" for m in members]
    elif p is not None:
        direction = "undo" if p["direction"] == "compensation" else "do"
        head = f"pending: {p['step']} ({direction})" + (
            f" {p['command']} at {p['participant']}" if p["command"] else ""
        )
        lines.append(", ".join([head, *_attempt_facts(p, saga)]))
    if "allowed_actions" in saga:
        allowed = saga["allowed_actions"]
        lines.append("actions: " + (", ".join(allowed) if allowed else "none apply"))
    return lines


def _attempt_facts(p: dict[str, Any], saga: dict[str, Any]) -> list[str]:
    """Which try of its budget a pending step (or group member) is on, when it was sent, what
    happens next, and what went wrong last."""
    budget = "forever" if p["max_attempts"] is None else str(p["max_attempts"])
    facts = [f"attempt {p['attempt']} of {budget}"]
    if p["attempts_sent"] != p["attempt"]:
        facts.append(f"{p['attempts_sent']} sent in all")
    if p["last_sent_at"]:
        facts.append(f"last sent {_time(p['last_sent_at'])}")
    if p["next_retry_at"]:
        facts.append(f"next try {_time(p['next_retry_at'])}")
    elif p["reply_deadline"]:
        facts.append(f"reply due by {_time(p['reply_deadline'])}")
    elif saga["status"] == "FAILED":
        facts.append("waits for an operator")
    if p["last_error"]:
        facts.append(f"last error: {p['last_error']}")
    return facts


def saga_list(page: dict[str, Any], width: int | None = None) -> list[str]:
    """The page as a table; the NOTE column (:func:`why`) is cut so that a line fits in
    ``width`` characters (None: never cut, for a pipe), but never to fewer than 20."""
    items = page["items"]
    if not items:
        return ["no sagas match"]
    header = ["SAGA ID", "NAME", "STATUS", "STEP", "CREATED (UTC)", "KEY", "NOTE"]
    rows = [
        [
            s["saga_id"],
            f"{s['name']} v{s['definition_version']}",
            s["status"],
            s.get("at_step") or "-",
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


def saga_timeline(
    saga: dict[str, Any], full: bool = False, now: datetime | None = None
) -> list[str]:
    """The saga, what it waits on, its steps with attempts and timings, and its history in
    order: each run of retries in one line (the API's ``retry_runs``), or, with ``full``,
    every entry. ``now`` (default: the clock) gives the time left to the saga's deadline."""
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
    lines += pending(saga)
    lines += language(saga, now)
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
    runs = {} if full else {run["first"]: run for run in saga.get("retry_runs", [])}
    rows = []
    i = 0
    while i < len(history):
        h, run = history[i], runs.get(i)
        backwards = h["direction"] == "compensation" or h["kind"] in _BACKWARDS
        elapsed = (datetime.fromisoformat(h["at"]) - start).total_seconds() if start else 0.0
        direction = {"action": "do", "compensation": "undo"}.get(h["direction"] or "", "")
        if run is not None:
            tried = f"#{run['first_attempt']}-#{run['last_attempt']}"
            kind, what = "retried", retry_run(run)
            i = run["last"] + 1
        else:
            tried = "" if h["attempt"] is None else f"#{h['attempt']}"
            kind, what = h["kind"], h["detail"] + (f"  [by {h['actor']}]" if h["actor"] else "")
            i += 1
        rows.append(
            ["<<" if backwards else "", _time(h["at"]), f"+{elapsed:.3f}s", h["step"] or "",
             direction, tried, kind, what]
        )  # fmt: skip
    lines += _table(["", "TIME (UTC)", "ELAPSED", "STEP", "DIR", "TRY", "EVENT", "WHAT"], rows)
    if runs:
        lines.append("(each `retried` line stands for a run of attempts: --full shows them all)")
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
        deadline = d.get("deadline_s")
        policy = d.get("on_compensation_failure", "halt")
        lines.append(f"{d['name']} v{d['version']}")
        lines.append(
            "  deadline: "
            + ("none" if deadline is None else _duration(deadline))
            + f"; on compensation failure: {_POLICY.get(policy, policy)}"
        )
        rows = []
        for number, st in _numbered(d["steps"]):
            tries = st["retry"]["max_attempts"]
            undo_tries = st["compensation_retry"]["max_attempts"]
            runs = []
            if st.get("group") is not None:
                runs.append("parallel")
            if st.get("conditional"):
                runs.append("if ...")
            rows.append(
                [
                    number,
                    st["name"] + (" (pivot)" if st["pivot"] else ""),
                    ", ".join(runs) or "-",
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


def _numbered(steps: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """Each step with its place: ``2.`` for a step on its own, ``3a.``, ``3b.`` for the members
    of a parallel group, which share one place in the order."""
    out: list[tuple[str, dict[str, Any]]] = []
    unit, member, previous = 0, 0, None
    for st in steps:
        group = st.get("group")
        if group is not None and group == previous:
            member += 1
        else:
            unit, member = unit + 1, 0
        previous = group
        out.append((f"{unit}{'' if group is None else chr(ord('a') + member)}.", st))
    return out


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
