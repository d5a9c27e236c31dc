"""The admin HTTP API: list and inspect sagas with their history, start sagas, and the operator
actions (retry, abort, resolve).

Operator actions are events like any other: they go through ``Orchestrator.submit`` and the pure
engine, which writes them to the saga's history with the actor and the reason, or refuses them
(the API answers 409 with the engine's reason and the log keeps who tried; the history does not
change). Everything under ``/api`` needs ``Authorization: Bearer <SAGA_ADMIN_TOKEN>``;
``/healthz``, ``/readyz`` and the OpenAPI pages (``/docs``, ``/openapi.json``) are public,
since they hold nothing about any saga.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from datetime import UTC, datetime
from enum import Enum
from typing import TYPE_CHECKING, Annotated, Any, Literal
from uuid import UUID

import sqlalchemy as sa
import structlog
from fastapi import (
    APIRouter,
    Depends,
    FastAPI,
    Header,
    HTTPException,
    Path,
    Query,
    Request,
    Security,
)
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route

from saga import __version__
from saga.admin import dashboard
from saga.admin.batch import (
    Action as BatchAction,
)
from saga.admin.batch import (
    Batches,
    BatchPreview,
    BatchProgress,
    BatchRequest,
    SelectionChangedError,
)
from saga.admin.deadletters import DeadLetters, Match
from saga.admin.models import (
    CAUSE_KINDS,
    ActionRequest,
    ActionResult,
    DeadLetterActionResult,
    DeadLetterBulkRequest,
    DeadLetterDetail,
    DeadLetterPage,
    DefinitionView,
    ErrorBody,
    Health,
    Readiness,
    ResolveRequest,
    SagaDetail,
    SagaPage,
    StartRequest,
    StartResult,
    definition_view,
    history_view,
    saga_detail,
    saga_summary,
)
from saga.admin.times import parse_time
from saga.core.errors import ConcurrencyError, InvalidInputError, MessageError, UnknownSagaError
from saga.core.state import SagaState, SagaStatus
from saga.orchestrator.admission import InFlightLimitError
from saga.orchestrator.runtime import Outcome, Result
from saga.ports import SagaFilter
from saga.store.faults import database_fault, describe_error

if TYPE_CHECKING:
    from saga.orchestrator.service import OrchestratorService

__all__ = ["ACTOR_HEADER", "DEFAULT_ACTOR", "READY_TIMEOUT", "create_app"]

log = structlog.get_logger("saga.admin")

#: seconds the readiness checks may take in all; a database that does not answer is a failure
READY_TIMEOUT = 2.0
#: who performs an operator action, as written to the saga's history (a label the caller
#: chooses: the token is what authorizes, and it is shared)
ACTOR_HEADER = "X-Saga-Actor"
DEFAULT_ACTOR = "admin-api"

_AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "no bearer token, or a malformed one"},
    403: {"model": ErrorBody, "description": "the token is wrong"},
    422: {"model": ErrorBody, "description": "a parameter or the body is invalid"},
    503: {"model": ErrorBody, "description": "the database cannot be reached"},
}
_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "no saga with this id"}
}
_REFUSED: dict[int | str, dict[str, Any]] = {
    409: {"model": ErrorBody, "description": "the action does not apply in the saga's state"}
}


#: documents the scheme in OpenAPI (the docs' Authorize button); the check is ``authorized``
_BEARER = HTTPBearer(auto_error=False, description="the orchestrator's SAGA_ADMIN_TOKEN")

Actor = Annotated[
    str | None,
    Header(
        alias=ACTOR_HEADER,
        max_length=100,
        description=f"who acts, for the history (default `{DEFAULT_ACTOR}`)",
    ),
]


class _JsonBodyRoute(APIRoute):
    """A body that cannot even be decoded (not UTF-8, say) answers 422 like any other body
    that is not the JSON asked for, as the OpenAPI document says: FastAPI answers 400."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def handler(request: Request) -> Response:
            try:
                return await handle(request)
            except StarletteHTTPException as exc:  # FastAPI raises Starlette's own here
                cause = exc.__cause__
                if exc.status_code != 400 or not isinstance(cause, ValueError):
                    raise  # only a body that could not be decoded (UnicodeDecodeError, ...)
                why = f"not JSON: {cause}" if str(cause) else "not JSON"
                error = {"type": "json_invalid", "loc": ("body",), "msg": why, "input": None}
                raise RequestValidationError([error]) from cause

        return handler


def _utc(value: datetime | None) -> datetime | None:
    """Times without an offset are taken as UTC, like every time the API returns."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def encode_cursor(s: SagaState) -> str:
    """The keyset position after ``s``: opaque to clients, so its format may change."""
    raw = json.dumps([s.created_at.isoformat(), str(s.saga_id)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        at, saga_id = json.loads(raw)
        when = datetime.fromisoformat(at)
        if when.tzinfo is None:
            raise ValueError("no offset")
        return when.astimezone(UTC), UUID(saga_id)
    except (ValueError, TypeError, binascii.Error):
        raise HTTPException(
            422, "cursor: not one this API returned; pass next_cursor back unchanged"
        ) from None


def _time_param(name: str, text: str | None) -> datetime | None:
    """A query parameter in the CLI's time forms (one parser for both); a bad one is a 422
    naming the parameter and the forms that work, like any invalid parameter."""
    if text is None or not text.strip():
        return None
    try:
        return _utc(parse_time(text))
    except ValueError as exc:
        raise RequestValidationError(
            [{"loc": ("query", name), "msg": str(exc), "type": "value_error"}]
        ) from None


def _actor(value: str | None) -> str:
    if value is None:
        return DEFAULT_ACTOR
    actor = value.strip()
    if not actor or not actor.isprintable():
        raise HTTPException(422, f"{ACTOR_HEADER}: give a printable name, e.g. alice@ops")
    return actor


def create_app(service: OrchestratorService) -> FastAPI:
    """The API over ``service`` (started or not: the read endpoints only need its store)."""
    app = FastAPI(
        title="saga admin API",
        version=__version__,
        description=(
            "Inspect sagas and their history, start sagas, and retry, abort or resolve them. "
            "Every /api call needs `Authorization: Bearer <SAGA_ADMIN_TOKEN>`; operator "
            f"actions record the `{ACTOR_HEADER}` header (default `{DEFAULT_ACTOR}`) as who "
            'acted. Errors are `{"detail": "why"}`.'
        ),
        docs_url=None,  # served by _docs_routes, from the package
        redoc_url=None,
    )

    async def authorized(
        request: Request, _doc: Annotated[HTTPAuthorizationCredentials | None, Security(_BEARER)]
    ) -> None:
        """401 without a token or with a malformed one, 403 with a wrong one. The expected
        token is read per request, so a rotated SAGA_ADMIN_TOKEN_FILE applies at once."""
        header = request.headers.get("authorization")
        if header is None:
            raise HTTPException(
                401,
                "missing bearer token: send `Authorization: Bearer <SAGA_ADMIN_TOKEN>`",
                headers={"WWW-Authenticate": 'Bearer realm="saga"'},
            )
        scheme, _, presented = header.partition(" ")
        presented = presented.strip()
        if scheme.lower() != "bearer" or not presented or " " in presented:
            raise HTTPException(
                401,
                "malformed Authorization header: expected `Bearer <token>`",
                headers={"WWW-Authenticate": 'Bearer realm="saga", error="invalid_request"'},
            )
        try:
            expected = service.settings.admin_token_value()
        except OSError as exc:
            raise HTTPException(
                503, f"cannot read SAGA_ADMIN_TOKEN_FILE: {exc.strerror or exc}"
            ) from None
        if expected is None:
            raise HTTPException(503, "no admin token is configured (SAGA_ADMIN_TOKEN is empty)")
        if not hmac.compare_digest(presented.encode(), expected.encode()):
            raise HTTPException(403, "wrong token: use the orchestrator's SAGA_ADMIN_TOKEN")

    api = APIRouter(
        prefix="/api",
        dependencies=[Depends(authorized)],
        responses=_AUTH_ERRORS,
        route_class=_JsonBodyRoute,
    )

    _error_handlers(app, api)
    _docs_routes(app)
    _health_routes(app, service)
    _read_routes(api, service)
    _batch_routes(api, service)  # before /sagas/{id}/<action>, which /sagas/batch/retry matches
    _operator_routes(api, service)
    _dead_letter_routes(api, service)
    dashboard.install(app, api, service)  # the overview, /api/asyncapi.json and /ui
    app.include_router(api)
    return app


def _error_handlers(app: FastAPI, *routers: APIRouter) -> None:
    """Every error answers ``{"detail": "why"}``: validation errors as one readable line.
    ``routers``: those included in ``app``, whose routes a 405 names too."""
    routers_of_app: list[FastAPI | APIRouter] = [app, *routers]

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # loc, msg and type only: "input" would echo what was sent, secrets included
        errors = [
            {"loc": e["loc"], "msg": str(e["msg"]).removeprefix("Value error, "), "type": e["type"]}
            for e in exc.errors()
        ]
        why = "; ".join(f"{'.'.join(str(part) for part in e['loc'])}: {e['msg']}" for e in errors)
        return JSONResponse(jsonable_encoder({"detail": why, "errors": errors}), status_code=422)

    async def _database_error(_request: Request, exc: Exception) -> JSONResponse:
        log.warning("admin_database_error", error=describe_error(exc))
        if database_fault(exc):  # down, unreachable or contended: worth trying again
            detail = f"the database cannot be reached: {describe_error(exc)}"
            return JSONResponse({"detail": detail}, status_code=503)
        return JSONResponse({"detail": f"database error: {describe_error(exc)}"}, 500)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code != 405:
            return await http_exception_handler(request, exc)
        # Starlette's Allow names only the methods of the first route on the path
        allowed = _allowed_methods(routers_of_app, request.url.path)
        detail = f"{request.method} is not allowed on {request.url.path}: use {', '.join(allowed)}"
        return JSONResponse({"detail": detail}, 405, headers={"Allow": ", ".join(allowed)})

    for error in (sa.exc.SQLAlchemyError, OSError, TimeoutError):
        app.add_exception_handler(error, _database_error)

    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        # the message may hold anything: it goes to the log, the answer names only the type
        log.error("admin_request_failed", error=repr(exc))
        detail = f"internal error ({type(exc).__name__}); the orchestrator's log has the details"
        return JSONResponse({"detail": detail}, status_code=500)

    app.add_exception_handler(Exception, _unexpected)


#: where the dashboard's static mount serves the vendored viewers (saga/admin/static/vendor)
_VENDOR = "/ui/vendor"


def _docs_routes(app: FastAPI) -> None:
    """``/docs`` and ``/redoc`` with their scripts, styles and icon from the package: FastAPI's
    defaults load them from a CDN (and ReDoc's fonts from Google), which leaves both pages blank
    on a machine without internet access, where an orchestrator often runs."""
    openapi_url = app.openapi_url or "/openapi.json"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{_VENDOR}/swagger-ui/swagger-ui-bundle.js",
            swagger_css_url=f"{_VENDOR}/swagger-ui/swagger-ui.css",
            swagger_favicon_url=f"{_VENDOR}/swagger-ui/favicon-32x32.png",
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=openapi_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{_VENDOR}/redoc/redoc.standalone.js",
            redoc_favicon_url=f"{_VENDOR}/swagger-ui/favicon-32x32.png",
            with_google_fonts=False,
        )


def _allowed_methods(routers: Sequence[FastAPI | APIRouter], path: str) -> list[str]:
    """Every method some route of ``routers`` serves on ``path``."""
    allowed: set[str] = set()
    for router in routers:
        for route in router.routes:
            if isinstance(route, Route) and route.methods and route.path_regex.match(path):
                allowed |= route.methods
    return sorted(allowed - {"HEAD"})


def _health_routes(app: FastAPI, service: OrchestratorService) -> None:
    @app.get("/healthz", response_model=Health, tags=["health"])
    async def healthz() -> Health:
        """Liveness: the process answers HTTP. Checks nothing else, so a database outage
        never gets the orchestrator restarted (it recovers by itself)."""
        return Health()

    @app.get(
        "/readyz",
        response_model=Readiness,
        tags=["health"],
        responses={503: {"model": Readiness, "description": "some check fails; it says why"}},
    )
    async def readyz() -> JSONResponse:
        """Readiness: database reachable, schema current, broker connected, consumers running.
        Bounded by a timeout, so a database that hangs makes it fail, not hang."""
        checks = await _readiness(service)
        ready = all(why is None for why in checks.values())
        body = Readiness(ready=ready, checks=checks)
        return JSONResponse(body.model_dump(mode="json"), status_code=200 if ready else 503)


def _read_routes(api: APIRouter, service: OrchestratorService) -> None:
    @api.get("/sagas", response_model=SagaPage, tags=["sagas"])
    async def list_sagas(
        status: Annotated[
            list[SagaStatus] | None, Query(description="any of these; repeat the parameter")
        ] = None,
        name: Annotated[str | None, Query(max_length=100)] = None,
        since: Annotated[
            str | None,
            Query(
                max_length=64,
                description="created at or after: an age (30m, 1h, 2d, 1w) or an ISO time "
                "(no offset = UTC), as `saga list --since` takes it",
            ),
        ] = None,
        until: Annotated[
            str | None,
            Query(max_length=64, description="created before: an age or an ISO time"),
        ] = None,
        key: Annotated[str | None, Query(max_length=200, description="the saga's key")] = None,
        q: Annotated[
            str | None, Query(max_length=36, description="a saga id, or the start of one")
        ] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        cursor: Annotated[
            str | None, Query(max_length=200, description="next_cursor of the previous page")
        ] = None,
    ) -> SagaPage:
        """Sagas, newest first, one page at a time (keyset paging: no repeats, no gaps)."""
        since_at, until_at = _time_param("since", since), _time_param("until", until)
        try:
            query = SagaFilter(
                statuses=frozenset(status or ()),
                name=name,
                key=key,
                since=since_at,
                until=until_at,
                id_prefix=q or None,
                newest_first=True,
                start_after=None if cursor is None else decode_cursor(cursor),
                limit=limit + 1,  # one more tells whether there is a next page
            )
        except ValueError as exc:
            raise HTTPException(422, f"q: {exc}") from None
        found = await service.store.list_sagas(query)
        page = found[:limit]
        more = len(found) > limit
        causes = await service.store.histories([s.saga_id for s in page], CAUSE_KINDS)
        return SagaPage(
            items=[saga_summary(s, causes[s.saga_id]) for s in page],
            next_cursor=encode_cursor(page[-1]) if more else None,
        )

    @api.get("/sagas/{saga_id}", response_model=SagaDetail, tags=["sagas"], responses=_NOT_FOUND)
    async def get_saga(saga_id: UUID) -> SagaDetail:
        """The saga, every step with its attempts and timings, and its full history."""
        state = await _load(service, saga_id)
        history = await service.store.history(saga_id)
        try:
            definition = service.registry.get(state.name, state.definition_version)
        except UnknownSagaError:
            definition = None
        return saga_detail(state, history, definition)

    @api.get("/definitions", response_model=list[DefinitionView], tags=["definitions"])
    async def definitions() -> list[DefinitionView]:
        """Every registered saga definition, each version, with its steps."""
        return [definition_view(d) for d in service.registry.all()]


def _batch_routes(api: APIRouter, service: OrchestratorService) -> None:
    """Retry, abort or resolve every saga a filter matches: a dry run first, then a run that
    answers at once with a batch id whose progress ``GET /api/sagas/batch/{id}`` gives."""
    batches = Batches(service)
    tags: list[str | Enum] = ["operator"]

    @api.post(
        "/sagas/batch/{action}",
        response_model=BatchPreview | BatchProgress,
        status_code=202,
        tags=tags,
        responses={
            200: {"model": BatchPreview, "description": "dry_run: which sagas; nothing changed"},
            202: {"model": BatchProgress, "description": "the batch runs: follow its batch_id"},
            409: {
                "model": ErrorBody,
                "description": "expect differs from the selection now: nothing was done",
            },
        },
    )
    async def batch(action: BatchAction, body: BatchRequest, actor: Actor = None) -> JSONResponse:
        """Apply ``action`` to each saga the filter (or ``saga_ids``) selects, oldest first, up
        to ``limit``, each through the engine like a single action: one its state does not
        accept is skipped and reported. With ``dry_run``, answer which sagas and what would
        happen, changing nothing."""
        who = _actor(actor)
        try:
            if body.dry_run:
                preview = await batches.preview(action, body)
                return JSONResponse(preview.model_dump(mode="json"), status_code=200)
            assert body.reason is not None  # BatchRequest requires it unless dry_run
            progress = await batches.start(action, body, actor=who, reason=body.reason)
        except SelectionChangedError as exc:
            raise HTTPException(409, str(exc)) from None
        return JSONResponse(
            progress.model_dump(mode="json"),
            status_code=202,
            headers={"Location": f"/api/sagas/batch/{progress.batch_id}"},
        )

    @api.get(
        "/sagas/batch/{batch_id}",
        response_model=BatchProgress,
        tags=tags,
        responses={404: {"model": ErrorBody, "description": "no such batch (here)"}},
    )
    async def batch_progress(batch_id: UUID) -> BatchProgress:
        """A batch's progress and, per saga, applied / skipped / failed and why. Kept in the
        memory of the orchestrator that runs it (its most recent batches)."""
        found = batches.get(batch_id)
        if found is None:
            raise HTTPException(
                404,
                f"no batch {batch_id} on this orchestrator: batches are kept in the memory of "
                "the instance that ran them, until it restarts; each saga's history has its "
                "action",
            )
        return found


def _operator_routes(api: APIRouter, service: OrchestratorService) -> None:
    @api.post(
        "/sagas",
        response_model=StartResult,
        status_code=201,
        tags=["sagas"],
        responses={
            200: {"model": StartResult, "description": "the key existed: that saga"},
            429: {
                "model": ErrorBody,
                "description": "SAGA_MAX_IN_FLIGHT sagas are in flight: retry after the "
                "Retry-After seconds (nothing was stored)",
            },
        },
    )
    async def start_saga(body: StartRequest) -> JSONResponse:
        """Start a saga; with a ``key``, idempotently: 201 when created, 200 (and the saga
        as it is, whatever input was given now) when that key was used before; 429 when the
        orchestrator is at its bound of sagas in flight (the start queue waits instead)."""
        try:
            definition = service.registry.get(body.name)
        except UnknownSagaError as exc:
            raise HTTPException(422, f"name: {exc}") from None
        size = len(json.dumps(body.input))
        if size > service.settings.max_message_bytes:
            raise HTTPException(
                413,
                f"input is {size} bytes; commands carry it, and they may not exceed "
                f"SAGA_MAX_MESSAGE_BYTES={service.settings.max_message_bytes}",
            )
        try:
            result = await service.orchestrator.begin(
                definition.name, body.input, key=body.key, wait_for_slot=False
            )
        except InFlightLimitError as exc:
            return JSONResponse({"detail": str(exc)}, status_code=429, headers={"Retry-After": "1"})
        except InvalidInputError as exc:
            # the same shape as any request that does not validate, paths under "input"
            errors = [
                {"loc": ["body", "input", *e.loc], "msg": e.msg, "type": e.type} for e in exc.errors
            ]
            why = "; ".join(f"input.{e}" if e.loc else f"input: {e.msg}" for e in exc.errors)
            return JSONResponse({"detail": why, "errors": errors}, status_code=422)
        created, state = result.outcome is Outcome.APPLIED, result.state
        saga_id = state.saga_id
        if created:
            log.info("saga_started_by_api", saga_id=str(saga_id), name=body.name, key=body.key)
        history = [] if created else await service.store.history(saga_id)
        answer = StartResult(created=created, saga=saga_summary(state, history))
        return JSONResponse(
            answer.model_dump(mode="json"),
            status_code=201 if created else 200,
            headers={"Location": f"/api/sagas/{saga_id}"},
        )

    @api.post(
        "/sagas/{saga_id}/retry",
        response_model=ActionResult,
        tags=["operator"],
        responses={**_NOT_FOUND, **_REFUSED},
    )
    async def retry(
        saga_id: UUID,
        body: ActionRequest,
        actor: Actor = None,
    ) -> ActionResult:
        """Retry a FAILED saga's stuck step (its action or its compensation), with a new
        retry budget."""
        who = _actor(actor)
        return await _act(
            service,
            saga_id,
            "retry",
            who,
            body.reason,
            lambda: service.orchestrator.retry(saga_id, actor=who, reason=body.reason),
        )

    @api.post(
        "/sagas/{saga_id}/abort",
        response_model=ActionResult,
        tags=["operator"],
        responses={**_NOT_FOUND, **_REFUSED},
    )
    async def abort(
        saga_id: UUID,
        body: ActionRequest,
        actor: Actor = None,
    ) -> ActionResult:
        """Abort a RUNNING saga before its pivot (or one FAILED at its pivot): the steps
        that may have taken effect are compensated, newest first."""
        who = _actor(actor)
        return await _act(
            service,
            saga_id,
            "abort",
            who,
            body.reason,
            lambda: service.orchestrator.abort(saga_id, actor=who, reason=body.reason),
        )

    @api.post(
        "/sagas/{saga_id}/resolve",
        response_model=ActionResult,
        tags=["operator"],
        responses={**_NOT_FOUND, **_REFUSED},
    )
    async def resolve(
        saga_id: UUID,
        body: ResolveRequest,
        actor: Actor = None,
    ) -> ActionResult:
        """Mark a FAILED saga's stuck step as done by hand (``data`` is its output when it is
        an action), and carry on from there."""
        who = _actor(actor)
        return await _act(
            service,
            saga_id,
            "resolve",
            who,
            body.reason,
            lambda: service.orchestrator.resolve(
                saga_id, actor=who, reason=body.reason, data=body.data
            ),
        )


_NO_DEAD_LETTER: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "no such dead-letter queue, or no such message in it"},
    501: {"model": ErrorBody, "description": "the orchestrator does not run on RabbitMQ"},
}

DeadLetterQueue = Annotated[
    str, Path(max_length=255, description="a queue of the deployment, or its `.dlq`")
]
DeadLetterId = Annotated[
    str, Path(max_length=255, description="the message id (or `sha256:...`) the list gives")
]


def _dead_letter_routes(api: APIRouter, service: OrchestratorService) -> None:
    """Dead letters: read without taking them off their queues, then replay or discard.
    Answers 503 while RabbitMQ cannot be reached (nothing was changed then)."""
    dead = DeadLetters(service)
    tags: list[str | Enum] = ["dead letters"]

    @api.get("/dead-letters", response_model=DeadLetterPage, tags=tags, responses=_NO_DEAD_LETTER)
    async def list_dead_letters(
        queue: Annotated[
            str | None, Query(max_length=255, description="only this queue (or its `.dlq`)")
        ] = None,
        reason: Annotated[str | None, Query(max_length=64, description="the reason")] = None,
        saga_id: UUID | None = None,
        since: Annotated[
            datetime | None, Query(description="dead-lettered at or after (ISO; no offset = UTC)")
        ] = None,
        until: Annotated[
            datetime | None, Query(description="dead-lettered before (ISO; no offset = UTC)")
        ] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 100,
    ) -> DeadLetterPage:
        """The messages in the deployment's dead-letter queues, oldest first in each, with why
        they are there; they stay where they are, in their order."""
        match = Match(reason, saga_id, _utc(since), _utc(until))
        return await dead.listing(queue, match, limit)

    @api.get(
        "/dead-letters/{queue}/{message_id}",
        response_model=DeadLetterDetail,
        tags=tags,
        responses=_NO_DEAD_LETTER,
    )
    async def show_dead_letter(
        queue: DeadLetterQueue, message_id: DeadLetterId
    ) -> DeadLetterDetail:
        """One dead letter: its headers and its body (indented when JSON, the first 64 KiB)."""
        return await dead.show(queue, message_id)

    async def one(
        action: Literal["replay", "discard"],
        queue: str,
        message_id: str,
        body: ActionRequest,
        actor: str | None,
    ) -> DeadLetterActionResult:
        match = Match(id=message_id)
        who = _actor(actor)
        return await dead.act(action, queue, match, 1, actor=who, reason=body.reason)

    @api.post(
        "/dead-letters/{queue}/{message_id}/replay",
        response_model=DeadLetterActionResult,
        tags=tags,
        responses=_NO_DEAD_LETTER,
    )
    async def replay_dead_letter(
        queue: DeadLetterQueue, message_id: DeadLetterId, body: ActionRequest, actor: Actor = None
    ) -> DeadLetterActionResult:
        """Send the message back to the queue it was dead-lettered from (confirmed), then take
        it off the dead-letter queue. At-least-once: receivers dedupe by message id."""
        return await one("replay", queue, message_id, body, actor)

    @api.post(
        "/dead-letters/{queue}/{message_id}/discard",
        response_model=DeadLetterActionResult,
        tags=tags,
        responses=_NO_DEAD_LETTER,
    )
    async def discard_dead_letter(
        queue: DeadLetterQueue, message_id: DeadLetterId, body: ActionRequest, actor: Actor = None
    ) -> DeadLetterActionResult:
        """Take the message off the dead-letter queue for good."""
        return await one("discard", queue, message_id, body, actor)

    async def bulk(
        action: Literal["replay", "discard"], body: DeadLetterBulkRequest, actor: str | None
    ) -> DeadLetterActionResult:
        if body.filter.empty():
            raise HTTPException(
                422,
                "filter: give at least one of queue, reason, saga_id, since, until, or "
                '"all": true to act on every dead letter',
            )
        who = _actor(actor)
        match = Match.of(body.filter)
        return await dead.act(
            action, body.filter.queue, match, body.limit, actor=who, reason=body.reason
        )

    @api.post(
        "/dead-letters/replay",
        response_model=DeadLetterActionResult,
        tags=tags,
        responses=_NO_DEAD_LETTER,
    )
    async def replay_dead_letters(
        body: DeadLetterBulkRequest, actor: Actor = None
    ) -> DeadLetterActionResult:
        """Replay every dead letter the filter matches (up to ``limit``)."""
        return await bulk("replay", body, actor)

    @api.post(
        "/dead-letters/discard",
        response_model=DeadLetterActionResult,
        tags=tags,
        responses=_NO_DEAD_LETTER,
    )
    async def discard_dead_letters(
        body: DeadLetterBulkRequest, actor: Actor = None
    ) -> DeadLetterActionResult:
        """Discard every dead letter the filter matches (up to ``limit``)."""
        return await bulk("discard", body, actor)


async def _readiness(service: OrchestratorService) -> dict[str, str | None]:
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            return await service.readiness()
    except TimeoutError:
        broker = service.broker
        return {
            "database": f"no answer within {READY_TIMEOUT:g} s",
            "migrations": "unknown: the database did not answer",
            "broker": None if broker is not None and broker.is_connected() else "no connection",
            "consumers": "unknown: the checks timed out",
        }
    except Exception as exc:  # a check that breaks is a check that fails
        return {"readiness": f"the checks failed: {describe_error(exc)}"}


async def _load(service: OrchestratorService, saga_id: UUID) -> SagaState:
    state = await service.store.load(saga_id)
    if state is None:
        raise HTTPException(404, f"no saga with id {saga_id}")
    return state


async def _act(
    service: OrchestratorService,
    saga_id: UUID,
    action: str,
    actor: str,
    reason: str,
    submit: Callable[[], Awaitable[Result]],
) -> ActionResult:
    """Run one operator action; 404 for an unknown saga, 409 with the engine's reason when
    the action does not apply (logged with who tried it; the saga's history is untouched)."""
    await _load(service, saga_id)
    try:
        result = await submit()
    except MessageError as exc:
        if exc.reason == "unknown_saga":
            raise HTTPException(404, f"no saga with id {saga_id}") from None
        raise HTTPException(409, f"{action} cannot be applied: {exc.detail}") from None
    except ConcurrencyError as exc:
        raise HTTPException(409, f"{exc}; try again") from None
    transition = result.transition
    entries = [] if transition is None else list(transition.history)
    refused = None if transition is None else transition.refused
    if refused is None:  # a refusal the runtime logged already (operator_action_refused)
        log.info(
            "operator_action",
            saga_id=str(saga_id),
            action=action,
            actor=actor,
            reason=reason,
            outcome=result.outcome.value,
        )
    if result.outcome is not Outcome.APPLIED:
        why = refused or "; ".join(h.detail for h in entries)
        raise HTTPException(409, why or f"the saga is {result.state.status}")
    history = await service.store.history(saga_id)  # the root cause, and this resolution
    return ActionResult(
        saga=saga_summary(result.state, history), entries=[history_view(h) for h in entries]
    )
