"""The ``saga`` command line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from typer.core import TyperCommand, TyperGroup, TyperOption
from typer.models import DefaultPlaceholder

from saga import __version__
from saga.admin import render
from saga.admin.client import DEFAULT_URL, AdminClient, AdminError, default_actor
from saga.admin.times import parse_time
from saga.core.errors import ConfigError
from saga.core.state import SagaStatus
from saga.secrets import redact_url
from saga.settings import load_settings

# The orchestrator, SQLAlchemy and OpenTelemetry are imported by the commands that use them, so
# the operator commands (list, show, retry, ...) start in a fraction of the time.


class _FlagsTakeNoValue:
    """Help without a value type beside a flag: typer shows ``--json <bool>`` (and
    ``--help <bool>``), which reads as if the flag wanted an argument."""

    def get_params(self, ctx: Any) -> list[Any]:  # typer's own click types are private
        params: list[Any] = super().get_params(ctx)  # type: ignore[misc]
        for param in params:
            if isinstance(param, TyperOption) and param.is_flag and param.metavar is None:
                param.metavar = ""  # what the help shows as the value's type
        return params


class _Command(_FlagsTakeNoValue, TyperCommand):
    pass


class _Group(_FlagsTakeNoValue, TyperGroup):
    pass


app = typer.Typer(
    name="saga",
    help="A saga orchestrator over RabbitMQ with a transactional outbox.",
    no_args_is_help=True,
    add_completion=False,
    cls=_Group,
)
schema_app = typer.Typer(
    help="Message contracts: AsyncAPI and JSON Schema export.", no_args_is_help=True, cls=_Group
)
app.add_typer(schema_app, name="schema")
dlq_app = typer.Typer(
    help="Dead letters: list, show, replay or discard what the deployment could not apply.",
    no_args_is_help=True,
    cls=_Group,
)
app.add_typer(dlq_app, name="dlq")
batch_app = typer.Typer(
    help="Retry, abort or resolve every saga a filter matches: a dry run, a confirmation, "
    "then the action on each saga through the engine.",
    no_args_is_help=True,
    cls=_Group,
)
app.add_typer(batch_app, name="batch")


@app.command()
def version() -> None:
    """Print the installed version."""
    typer.echo(__version__)


def _fail(exc: Exception) -> NoReturn:
    """``error: ...`` on one line (a driver's message may hold several) and exit status 2."""
    lines = [line.strip() for line in redact_url(str(exc)).splitlines() if line.strip()]
    typer.echo(f"error: {'; '.join(lines) or type(exc).__name__}", err=True)
    raise typer.Exit(code=2)


@app.command()
def run(
    migrate: Annotated[
        bool, typer.Option("--migrate", help="Apply missing schema migrations before starting.")
    ] = False,
) -> None:
    """Run the orchestrator service (settings from SAGA_* environment variables)."""
    from saga.orchestrator.loader import load_registry  # noqa: PLC0415
    from saga.orchestrator.service import OrchestratorService  # noqa: PLC0415
    from saga.process import launch  # noqa: PLC0415

    try:
        settings = load_settings(**({"auto_migrate": True} if migrate else {}))
        if not settings.definitions:
            raise ConfigError(
                "SAGA_DEFINITIONS is not set: point it at your Registry, e.g. "
                "SAGA_DEFINITIONS=myapp.sagas:registry"
            )
        registry = load_registry(settings.definitions)
    except ConfigError as exc:
        _fail(exc)
    service = OrchestratorService(settings, registry)
    launch("saga-orchestrator", service.serve, log_level=settings.log_level)


@app.command()
def migrate() -> None:
    """Apply missing schema migrations to SAGA_DATABASE_URL and print the version."""
    try:
        settings = load_settings()
    except ConfigError as exc:
        _fail(exc)
    from sqlalchemy.exc import SQLAlchemyError  # noqa: PLC0415

    from saga.store.faults import describe_error  # noqa: PLC0415
    from saga.store.sql import SqlStore  # noqa: PLC0415

    async def go() -> tuple[list[int], int]:
        store = SqlStore(settings.database_url)
        try:
            applied = await store.migrate()
            return applied, await store.current_version()
        finally:
            await store.close()

    try:
        applied, version = asyncio.run(go())
    except ConfigError as exc:  # the database cannot be reached: the line `saga run` prints
        _fail(exc)
    except (OSError, SQLAlchemyError) as exc:
        _fail(
            ConfigError(
                f"cannot migrate {redact_url(settings.database_url)}: {describe_error(exc)}"
            )
        )
    typer.echo(f"schema at version {version}" + (f" (applied {applied})" if applied else ""))


# --- the admin API's client commands (the orchestrator serves the API: SAGA_ADMIN_PORT) ------

AdminUrl = Annotated[
    str,
    typer.Option(
        "--url", envvar="SAGA_ADMIN_URL", help="The orchestrator's admin API.", show_envvar=True
    ),
]
AdminToken = Annotated[
    str | None,
    typer.Option(
        "--token",
        envvar="SAGA_ADMIN_TOKEN",
        help="The orchestrator's SAGA_ADMIN_TOKEN (prefer the variable: arguments show in ps).",
        show_default=False,
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print the API's JSON answer as it is.")]
SagaIdArg = Annotated[str, typer.Argument(help="The saga id, or enough of its start to be unique.")]
Reason = Annotated[str, typer.Option("--reason", "-r", help="Why; goes into the saga's history.")]
Actor = Annotated[
    str | None,
    typer.Option(
        "--actor",
        envvar="SAGA_ACTOR",
        help="Who acts, for the saga's history.  [default: user@host]",
        show_default=False,
    ),
]


@contextlib.contextmanager
def _admin(url: str, token: str | None, actor: str | None = None) -> Iterator[AdminClient]:
    """A client of the admin API; its errors end the command with their exit status."""
    try:
        if not token:
            raise AdminError(
                "no admin token: set SAGA_ADMIN_TOKEN (or pass --token) to the orchestrator's "
                "SAGA_ADMIN_TOKEN"
            )
        with AdminClient(url, token, actor=actor) as client:
            yield client
    except AdminError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None


def _show(found: Any, as_json: bool, lines: Callable[[], list[str]]) -> None:
    typer.echo(json.dumps(found, indent=2) if as_json else "\n".join(lines()))


def _when(text: str | None, option: str) -> datetime | None:
    try:
        return None if text is None else parse_time(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=option) from None


def _terminal_width() -> int | None:
    """The terminal's width (or $COLUMNS); None when printing to a pipe, so that a script
    reading the table gets every note whole."""
    return shutil.get_terminal_size((0, 0)).columns or None


@app.command("list")
def list_sagas(
    status: Annotated[
        list[SagaStatus] | None,
        typer.Option("--status", "-s", case_sensitive=False, help="Any of these; repeatable."),
    ] = None,
    name: Annotated[str | None, typer.Option("--name", help="The saga's name.")] = None,
    since: Annotated[
        str | None, typer.Option("--since", help="Created since: 30m, 1h, 2d, 1w or ISO (UTC).")
    ] = None,
    until: Annotated[
        str | None, typer.Option("--until", help="Created before: an age or ISO time.")
    ] = None,
    key: Annotated[str | None, typer.Option("--key", help="The saga's business key.")] = None,
    saga_id: Annotated[
        str | None, typer.Option("--id", help="A saga id or the start of one.")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=500, help="Sagas per page.")] = 50,
    cursor: Annotated[
        str | None, typer.Option("--cursor", help="Continue where the last page ended.")
    ] = None,
    as_json: AsJson = False,
    url: AdminUrl = DEFAULT_URL,
    token: AdminToken = None,
) -> None:
    """List sagas, newest first."""
    since_at, until_at = _when(since, "--since"), _when(until, "--until")
    with _admin(url, token) as client:
        page = client.list_sagas(
            statuses=[s.value for s in status or ()],
            name=name,
            since=since_at,
            until=until_at,
            key=key,
            q=saga_id,
            limit=limit,
            cursor=cursor,
        )
    _show(page, as_json, lambda: render.saga_list(page, _terminal_width()))


@app.command()
def show(
    saga_id: SagaIdArg,
    full: Annotated[
        bool,
        typer.Option("--full", help="Every history entry: a run of retries is not one line."),
    ] = False,
    as_json: AsJson = False,
    url: AdminUrl = DEFAULT_URL,
    token: AdminToken = None,
) -> None:
    """Show a saga: what it waits on, its steps and the timeline of what happened to it."""
    with _admin(url, token) as client:
        saga = client.get_saga(saga_id)
    _show(saga, as_json, lambda: render.saga_timeline(saga, full=full))


def _act(
    action: str,
    saga_id: str,
    reason: str,
    actor: str | None,
    url: str,
    token: str | None,
    as_json: bool,
    data: dict[str, Any] | None = None,
) -> None:
    with _admin(url, token, actor or default_actor()) as client:
        result = client.act(saga_id, action, reason, data)
    _show(result, as_json, lambda: render.action_result(action, result))


@app.command()
def retry(
    saga_id: SagaIdArg,
    reason: Reason,
    actor: Actor = None,
    as_json: AsJson = False,
    url: AdminUrl = DEFAULT_URL,
    token: AdminToken = None,
) -> None:
    """Retry a FAILED saga's stuck step (action or compensation) with a new retry budget."""
    _act("retry", saga_id, reason, actor, url, token, as_json)


@app.command()
def abort(
    saga_id: SagaIdArg,
    reason: Reason,
    actor: Actor = None,
    as_json: AsJson = False,
    url: AdminUrl = DEFAULT_URL,
    token: AdminToken = None,
) -> None:
    """Abort a RUNNING saga (before its pivot): what may have taken effect is compensated."""
    _act("abort", saga_id, reason, actor, url, token, as_json)


@app.command()
def resolve(
    saga_id: SagaIdArg,
    reason: Reason,
    data: Annotated[
        str | None,
        typer.Option(
            "--data", help="A stuck action's output as a JSON object, e.g. '{\"id\": 7}'."
        ),
    ] = None,
    actor: Actor = None,
    as_json: AsJson = False,
    url: AdminUrl = DEFAULT_URL,
    token: AdminToken = None,
) -> None:
    """Mark a FAILED saga's stuck step as done by hand, and carry on from there."""
    parsed: dict[str, Any] | None = None
    if data is not None:
        try:
            parsed = json.loads(data)
        except ValueError as exc:
            raise typer.BadParameter(f"not JSON: {exc}", param_hint="--data") from None
        if not isinstance(parsed, dict):
            raise typer.BadParameter("give a JSON object, e.g. '{\"id\": 7}'", param_hint="--data")
    _act("resolve", saga_id, reason, actor, url, token, as_json, parsed)


@app.command()
def definitions(
    as_json: AsJson = False, url: AdminUrl = DEFAULT_URL, token: AdminToken = None
) -> None:
    """List the saga definitions the orchestrator runs, with their steps."""
    with _admin(url, token) as client:
        found = client.definitions()
    _show(found, as_json, lambda: render.definitions(found))


# --- batch actions -------------------------------------------------------------------------

BatchStatus = Annotated[
    list[SagaStatus] | None,
    typer.Option("--status", "-s", case_sensitive=False, help="Any of these; repeatable."),
]
BatchName = Annotated[str | None, typer.Option("--name", help="The saga's name.")]
BatchKey = Annotated[str | None, typer.Option("--key", help="The saga's business key.")]
BatchId = Annotated[str | None, typer.Option("--id", help="A saga id or the start of one.")]
BatchSince = Annotated[
    str | None, typer.Option("--since", help="Created since: 30m, 1h, 2d, 1w or ISO (UTC).")
]
BatchUntil = Annotated[
    str | None,
    typer.Option("--until", help="Created before: an age (older than 1h: --until 1h) or ISO."),
]
BatchCause = Annotated[
    str | None,
    typer.Option(
        "--cause", help="A piece of the failure or root cause, e.g. undeliverable_address."
    ),
]
BatchAll = Annotated[bool, typer.Option("--all", help="Every saga (without filters).")]
BatchLimit = Annotated[
    int, typer.Option("--limit", min=1, max=1000, help="Sagas to act on at most (oldest first).")
]
DryRun = Annotated[
    bool, typer.Option("--dry-run", help="Show how many and which sagas; change nothing.")
]
Yes = Annotated[
    bool, typer.Option("--yes", "-y", help="Do not ask for confirmation (needed without a TTY).")
]
BatchReason = Annotated[
    str | None,
    typer.Option("--reason", "-r", help="Why; goes into each saga's history (not for --dry-run)."),
]
#: seconds between two looks at a running batch's progress
_POLL = 0.3


def _batch(
    action: str,
    flt: dict[str, Any],
    every: bool,
    limit: int,
    dry_run: bool,
    yes: bool,
    reason: str | None,
    actor: str | None,
    url: str,
    token: str | None,
    as_json: bool,
) -> None:
    """Dry run, show it, confirm, then run on exactly the sagas shown and follow progress."""
    since_at, until_at = _when(flt.pop("since"), "--since"), _when(flt.pop("until"), "--until")
    flt.update(
        since=since_at.isoformat() if since_at else None,
        until=until_at.isoformat() if until_at else None,
    )
    flt = {k: v for k, v in flt.items() if v}
    if not flt and not every:
        raise typer.BadParameter(
            "give filters (--status, --name, --key, --id, --since, --until, --cause) or --all",
            param_hint="filters",
        )
    if not dry_run and not reason:
        raise typer.BadParameter("say why: it goes into each saga's history", param_hint="--reason")
    if not dry_run and not yes and not sys.stdin.isatty():
        typer.echo(
            f"error: refusing to {action} sagas without a terminal to confirm on: "
            "pass --yes (after a --dry-run) to act without asking",
            err=True,
        )
        raise typer.Exit(2)
    body: dict[str, Any] = {"filter": flt, "all": every, "limit": limit}
    with _admin(url, token, actor or default_actor()) as client:
        preview = client.batch(action, {**body, "dry_run": True})
        if dry_run:
            _show(preview, as_json, lambda: render.batch_preview(preview))
            return
        # what is about to happen, before the question (on stderr when stdout is JSON)
        typer.echo("\n".join(render.batch_preview(preview)), err=as_json)
        ids = [item["saga_id"] for item in preview["items"]]
        if not ids:
            return
        if not yes and not _confirmed(f"{action} these {len(ids)} sagas? [y/N] "):
            typer.echo("nothing done", err=True)
            raise typer.Exit(1)
        progress = client.batch(action, {**body, "reason": reason, "saga_ids": ids})
        shown = ""
        while progress["state"] != "finished":
            line = render.batch_progress(progress)
            if line != shown and not as_json:
                typer.echo(line, err=True)
                shown = line
            time.sleep(_POLL)
            progress = client.batch_progress(progress["batch_id"])
    _show(progress, as_json, lambda: render.batch_result(progress))
    if progress["failed"]:
        raise typer.Exit(1)


def _confirmed(question: str) -> bool:
    """Ask on stderr and read the answer from stdin, so stdout holds only the report (click's
    prompt writes a space to stdout)."""
    typer.echo(question, err=True, nl=False)
    return sys.stdin.readline().strip().lower() in ("y", "yes")


@batch_app.command("retry")
def batch_retry(
    reason: BatchReason = None,
    status: BatchStatus = None,
    name: BatchName = None,
    key: BatchKey = None,
    saga_id: BatchId = None,
    since: BatchSince = None,
    until: BatchUntil = None,
    cause: BatchCause = None,
    every: BatchAll = False,
    limit: BatchLimit = 100,
    dry_run: DryRun = False,
    yes: Yes = False,
    actor: Actor = None,
    as_json: AsJson = False,
    url: AdminUrl = DEFAULT_URL,
    token: AdminToken = None,
) -> None:
    """Retry the stuck step of every matching saga (FAILED ones; others are skipped)."""
    flt = _batch_filter(status, name, key, saga_id, since, until, cause)
    _batch("retry", flt, every, limit, dry_run, yes, reason, actor, url, token, as_json)


@batch_app.command("abort")
def batch_abort(
    reason: BatchReason = None,
    status: BatchStatus = None,
    name: BatchName = None,
    key: BatchKey = None,
    saga_id: BatchId = None,
    since: BatchSince = None,
    until: BatchUntil = None,
    cause: BatchCause = None,
    every: BatchAll = False,
    limit: BatchLimit = 100,
    dry_run: DryRun = False,
    yes: Yes = False,
    actor: Actor = None,
    as_json: AsJson = False,
    url: AdminUrl = DEFAULT_URL,
    token: AdminToken = None,
) -> None:
    """Abort every matching saga (RUNNING before its pivot; others are skipped): each one
    compensates what may have taken effect."""
    flt = _batch_filter(status, name, key, saga_id, since, until, cause)
    _batch("abort", flt, every, limit, dry_run, yes, reason, actor, url, token, as_json)


@batch_app.command("resolve")
def batch_resolve(
    reason: BatchReason = None,
    status: BatchStatus = None,
    name: BatchName = None,
    key: BatchKey = None,
    saga_id: BatchId = None,
    since: BatchSince = None,
    until: BatchUntil = None,
    cause: BatchCause = None,
    every: BatchAll = False,
    limit: BatchLimit = 100,
    dry_run: DryRun = False,
    yes: Yes = False,
    actor: Actor = None,
    as_json: AsJson = False,
    url: AdminUrl = DEFAULT_URL,
    token: AdminToken = None,
) -> None:
    """Mark the stuck step of every matching saga as done by hand (FAILED ones; no step
    output: resolve a stuck action that needs one with `saga resolve --data`)."""
    flt = _batch_filter(status, name, key, saga_id, since, until, cause)
    _batch("resolve", flt, every, limit, dry_run, yes, reason, actor, url, token, as_json)


def _batch_filter(
    status: list[SagaStatus] | None,
    name: str | None,
    key: str | None,
    saga_id: str | None,
    since: str | None,
    until: str | None,
    cause: str | None,
) -> dict[str, Any]:
    return {
        "status": [s.value for s in status or ()],
        "name": name,
        "key": key,
        "q": saga_id,
        "since": since,
        "until": until,
        "reason": cause,
    }


# --- dead letters --------------------------------------------------------------------------

DlqQueue = Annotated[
    str | None, typer.Option("--queue", "-q", help="Only this queue (or its .dlq).")
]
DlqCause = Annotated[
    str | None,
    typer.Option("--cause", help="Only this dead-letter reason: invalid_json, poison, ..."),
]
DlqSaga = Annotated[str | None, typer.Option("--saga", help="Only this saga's messages.")]
DlqSince = Annotated[
    str | None, typer.Option("--since", help="Dead-lettered since: 30m, 1h, 2d, 1w or ISO (UTC).")
]
DlqUntil = Annotated[
    str | None, typer.Option("--until", help="Dead-lettered before: an age or ISO time.")
]
QueueArg = Annotated[
    str | None,
    typer.Argument(help="The queue (or its .dlq) the message is in.", show_default=False),
]
MessageArg = Annotated[
    str | None,
    typer.Argument(help="The message's id, as `saga dlq list` gives it.", show_default=False),
]
DlqReason = Annotated[str, typer.Option("--reason", "-r", help="Why; goes into the audit log.")]


@dlq_app.command("list")
def dlq_list(
    queue: DlqQueue = None,
    cause: DlqCause = None,
    saga_id: DlqSaga = None,
    since: DlqSince = None,
    until: DlqUntil = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=500, help="Messages at most.")] = 100,
    as_json: AsJson = False,
    url: AdminUrl = DEFAULT_URL,
    token: AdminToken = None,
) -> None:
    """List the messages in the dead-letter queues (they stay there), oldest first."""
    since_at, until_at = _when(since, "--since"), _when(until, "--until")
    with _admin(url, token) as client:
        page = client.dead_letters(
            queue=queue, cause=cause, saga_id=saga_id, since=since_at, until=until_at, limit=limit
        )
    _show(page, as_json, lambda: render.dead_letter_list(page))


@dlq_app.command("show")
def dlq_show(
    queue: Annotated[str, typer.Argument(help="The queue (or its .dlq) the message is in.")],
    message_id: Annotated[str, typer.Argument(help="The message's id, as the list gives it.")],
    as_json: AsJson = False,
    url: AdminUrl = DEFAULT_URL,
    token: AdminToken = None,
) -> None:
    """Show one dead letter: why, its headers and its body."""
    with _admin(url, token) as client:
        found = client.dead_letter(queue, message_id)
    _show(found, as_json, lambda: render.dead_letter(found))


def _settle(
    action: str,
    queue: str | None,
    message_id: str | None,
    match: dict[str, Any],
    every: bool,
    reason: str,
    limit: int,
    actor: str | None,
    url: str,
    token: str | None,
    as_json: bool,
) -> None:
    """One message (QUEUE ID), or every one the filters (or --all) take."""
    if message_id is not None:
        if any(v is not None for v in match.values()) or every:
            raise typer.BadParameter("give QUEUE ID, or filters, not both", param_hint="ID")
    elif queue is not None:
        raise typer.BadParameter(
            "give the message's id after the queue (or --queue with filters)", param_hint="ID"
        )
    elif not every and all(v is None for v in match.values()):
        raise typer.BadParameter(
            "give QUEUE ID, filters (--queue, --cause, --saga, --since, --until), or --all",
            param_hint="filters",
        )
    with _admin(url, token, actor or default_actor()) as client:
        if queue is not None and message_id is not None:
            result = client.settle_dead_letter(action, queue, message_id, reason)
        else:
            result = client.settle_dead_letters(
                action,
                {k: v for k, v in match.items() if v is not None} | {"all": every},
                reason,
                limit,
            )
    _show(result, as_json, lambda: render.dead_letter_result(result))


def _dlq_filter(
    queue: str | None, cause: str | None, saga_id: str | None, since: str | None, until: str | None
) -> dict[str, Any]:
    since_at, until_at = _when(since, "--since"), _when(until, "--until")
    return {
        "queue": queue,
        "reason": cause,
        "saga_id": saga_id,
        "since": since_at.isoformat() if since_at else None,
        "until": until_at.isoformat() if until_at else None,
    }


Every = Annotated[bool, typer.Option("--all", help="Every dead letter (without filters).")]
BulkLimit = Annotated[
    int, typer.Option("--limit", min=1, max=1000, help="Messages to act on at most.")
]


@dlq_app.command("replay")
def dlq_replay(
    reason: DlqReason,
    queue_arg: QueueArg = None,
    message_id: MessageArg = None,
    queue: DlqQueue = None,
    cause: DlqCause = None,
    saga_id: DlqSaga = None,
    since: DlqSince = None,
    until: DlqUntil = None,
    every: Every = False,
    limit: BulkLimit = 100,
    actor: Actor = None,
    as_json: AsJson = False,
    url: AdminUrl = DEFAULT_URL,
    token: AdminToken = None,
) -> None:
    """Send dead letters back to the queue they came from (QUEUE ID, or filters): each is
    published with a confirm, then taken off its dead-letter queue."""
    match = _dlq_filter(queue, cause, saga_id, since, until)
    _settle(
        "replay", queue_arg, message_id, match, every, reason, limit, actor, url, token, as_json
    )


@dlq_app.command("discard")
def dlq_discard(
    reason: DlqReason,
    queue_arg: QueueArg = None,
    message_id: MessageArg = None,
    queue: DlqQueue = None,
    cause: DlqCause = None,
    saga_id: DlqSaga = None,
    since: DlqSince = None,
    until: DlqUntil = None,
    every: Every = False,
    limit: BulkLimit = 100,
    actor: Actor = None,
    as_json: AsJson = False,
    url: AdminUrl = DEFAULT_URL,
    token: AdminToken = None,
) -> None:
    """Take dead letters off their dead-letter queue for good (QUEUE ID, or filters)."""
    match = _dlq_filter(queue, cause, saga_id, since, until)
    _settle(
        "discard", queue_arg, message_id, match, every, reason, limit, actor, url, token, as_json
    )


@schema_app.command("export")
def schema_export(
    directory: Annotated[Path, typer.Argument(help="Directory to write the documents to.")],
    definitions: Annotated[
        str,
        typer.Option(
            envvar="SAGA_DEFINITIONS",
            help="module:attribute of your Registry; without it, the protocol's envelopes only.",
        ),
    ] = "",
    prefix: Annotated[
        str, typer.Option(envvar="SAGA_PREFIX", help="The deployment's queue name prefix.")
    ] = "saga",
) -> None:
    """Write the AsyncAPI 3.0 document (asyncapi.json), the JSON Schema bundle and one JSON
    Schema per message model (messages/) of your sagas to DIRECTORY: every file, or none."""
    try:
        from saga.orchestrator.loader import load_registry  # noqa: PLC0415
        from saga.protocol.export import export as export_contracts  # noqa: PLC0415
        from saga.transport.topology import Topology  # noqa: PLC0415

        registry = load_registry(definitions) if definitions else None
        topology = Topology(prefix=prefix)
        written = export_contracts(directory, registry, topology)
    except (ConfigError, ValueError) as exc:
        _fail(exc)
    except OSError as exc:
        _fail(ConfigError(f"cannot write to {directory}: {exc.strerror or exc}"))
    scope = f"sagas of {definitions}" if definitions else "the protocol only: no SAGA_DEFINITIONS"
    typer.echo(f"wrote {len(written)} files to {directory} ({scope}, prefix {prefix!r})")


def _json_option(text: str, option: str) -> dict[str, Any]:
    """A JSON object given inline or as ``@path``."""
    try:
        raw = Path(text[1:]).read_text(encoding="utf-8") if text.startswith("@") else text
        value = json.loads(raw)
    except OSError as exc:
        raise typer.BadParameter(
            f"cannot read {text[1:]}: {exc.strerror}", param_hint=option
        ) from None
    except ValueError as exc:
        raise typer.BadParameter(f"not JSON: {exc}", param_hint=option) from None
    if not isinstance(value, dict):
        raise typer.BadParameter("give a JSON object", param_hint=option)
    return value


@app.command()
def conformance(
    participant: Annotated[
        str, typer.Option("--participant", "-p", help="The participant's name (its queue).")
    ],
    action: Annotated[str, typer.Option(help="A command type it serves, e.g. flights.book.")],
    compensation: Annotated[str, typer.Option(help="The command type that undoes ACTION.")],
    payload: Annotated[
        str, typer.Option(help='ACTION\'s payload: JSON or @file ("$saga_id", "$uuid" filled in).')
    ] = "{}",
    compensation_payload: Annotated[
        str, typer.Option(help="COMPENSATION's payload: JSON or @file.")
    ] = "{}",
    prefix: Annotated[
        str, typer.Option(envvar="SAGA_PREFIX", help="The deployment's queue name prefix.")
    ] = "saga",
    rabbitmq_url: Annotated[
        str,
        typer.Option(envvar="SAGA_RABBITMQ_URL", help="The broker.", show_default=False),
    ] = "amqp://guest:guest@127.0.0.1:5672/",
    case: Annotated[
        list[str] | None, typer.Option("--case", help="Only these cases; repeatable.")
    ] = None,
    within: Annotated[
        float, typer.Option("--timeout", min=0.5, help="Seconds to wait for each answer.")
    ] = 10.0,
    as_json: AsJson = False,
) -> None:
    """Drive a running participant, in any language, through the protocol's hard cases and
    print a pass/fail table (exit 1 if it does not conform). No orchestrator may consume the
    reply queue meanwhile: use a prefix of its own."""
    from saga.testing.conformance import CASES, Target, render, run_conformance  # noqa: PLC0415

    target = Target(
        participant,
        action,
        _json_option(payload, "--payload"),
        compensation,
        _json_option(compensation_payload, "--compensation-payload"),
        prefix,
    )
    try:
        checks = asyncio.run(
            run_conformance(rabbitmq_url, target, within=within, cases=case or CASES)
        )
    except ConfigError as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps([c.__dict__ for c in checks], indent=2))
    else:
        typer.echo(render(checks, target))
    if any(c.verdict == "FAIL" for c in checks):
        raise typer.Exit(1)


def _add_plugins() -> None:
    """Mount the typer apps registered under the ``saga.commands`` entry point group."""
    for entry in entry_points(group="saga.commands"):
        if entry.name in {c.name for c in app.registered_commands} | {
            g.name for g in app.registered_groups
        }:
            continue
        try:
            plugin = entry.load()
        except ImportError as exc:  # a broken plugin must not take the core commands down
            typer.echo(f"warning: saga {entry.name} is unavailable: {exc}", err=True)
            continue
        _flags_take_no_value(plugin)
        app.add_typer(plugin, name=entry.name)


def _flags_take_no_value(typer_app: typer.Typer) -> None:
    """Every command of ``typer_app`` (and its group) shows its flags without a value type."""
    if isinstance(typer_app.info.cls, DefaultPlaceholder) or typer_app.info.cls in (
        None,
        TyperGroup,
    ):
        typer_app.info.cls = _Group
    for info in typer_app.registered_commands:
        if info.cls in (None, TyperCommand):
            info.cls = _Command


def main() -> None:
    _add_plugins()
    app()


for _typer in (app, schema_app, batch_app, dlq_app):  # ours, without repeating cls= on each
    _flags_take_no_value(_typer)
