"""The web dashboard (static files, plain JavaScript, no build step) and the API it needs
beyond the saga endpoints: the overview and the published contracts."""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from saga.admin.deadletters import dead_letter_queues
from saga.core.state import SagaStatus
from saga.protocol import export

if TYPE_CHECKING:
    from saga.orchestrator.service import OrchestratorService

__all__ = ["Overview", "install", "overview_of"]

STATIC = Path(__file__).parent / "static"
#: the overview's window: sagas started this long ago or later
WINDOW = timedelta(hours=1)
#: throughput is measured over the last few minutes of that window
THROUGHPUT = timedelta(minutes=5)


class SagaStats(BaseModel):
    name: str
    finished: int
    completed: int
    compensated: int
    failed: int
    p50_ms: float | None
    p95_ms: float | None


class OldestRunning(BaseModel):
    saga_id: str
    name: str
    created_at: datetime
    age_s: float


class Overview(BaseModel):
    counts: dict[str, int] = Field(description="sagas in each status, all time")
    window_s: float = Field(description="the by-saga figures cover sagas started this recently")
    throughput_per_min: float = Field(description="sagas that ended per minute, last 5 minutes")
    by_saga: list[SagaStats]
    oldest_running: OldestRunning | None
    dead_letters: dict[str, int | None] | None = Field(
        description="messages waiting in each dead-letter queue (null: unknown); null without "
        "a broker connection"
    )


def overview_of(
    counts: dict[SagaStatus, int],
    finished: Iterable[tuple[str, SagaStatus, datetime, datetime]],
    oldest: tuple[Any, str, datetime] | None,
    dead_letters: dict[str, int | None] | None,
    now: datetime,
) -> Overview:
    """The overview from the store's figures (pure, so it is tested without a database)."""
    durations: dict[str, list[float]] = {}
    by_status: dict[str, dict[SagaStatus, int]] = {}
    recent = 0
    for name, status, created, updated in finished:
        durations.setdefault(name, []).append((updated - created).total_seconds() * 1000)
        by_status.setdefault(name, {}).setdefault(status, 0)
        by_status[name][status] += 1
        if updated >= now - THROUGHPUT:
            recent += 1
    stats = []
    for name in sorted(durations):
        values = sorted(durations[name])
        stats.append(
            SagaStats(
                name=name,
                finished=len(values),
                completed=by_status[name].get(SagaStatus.COMPLETED, 0),
                compensated=by_status[name].get(SagaStatus.COMPENSATED, 0),
                failed=by_status[name].get(SagaStatus.FAILED, 0),
                p50_ms=_quantile(values, 0.50),
                p95_ms=_quantile(values, 0.95),
            )
        )
    return Overview(
        counts={s.value: counts.get(s, 0) for s in SagaStatus},
        window_s=WINDOW.total_seconds(),
        throughput_per_min=recent / (THROUGHPUT.total_seconds() / 60),
        by_saga=stats,
        oldest_running=None
        if oldest is None
        else OldestRunning(
            saga_id=str(oldest[0]),
            name=oldest[1],
            created_at=oldest[2],
            age_s=max((now - oldest[2]).total_seconds(), 0.0),
        ),
        dead_letters=dead_letters,
    )


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def install(app: FastAPI, api: APIRouter, service: OrchestratorService) -> None:
    """Add the overview and contracts to ``api`` (before it is included in ``app``) and serve
    the dashboard at ``/ui``."""

    @api.get("/overview", response_model=Overview, tags=["dashboard"])
    async def overview() -> Overview:
        """Counts by status, throughput, p50/p95 duration by saga, the oldest running saga
        and dead-letter depth: the dashboard's first page."""
        now = datetime.now(UTC)
        store = service.store
        counts, finished, oldest = await asyncio.gather(
            store.status_counts(), store.recent_finished(now - WINDOW), store.oldest_running()
        )
        return overview_of(counts, finished, oldest, await _dead_letters(service), now)

    @api.get("/asyncapi.json", tags=["contracts"])
    async def asyncapi_json() -> dict[str, Any]:
        """The AsyncAPI 3.0 document of this deployment: its sagas' commands and replies on its
        queues (``saga schema export`` writes the same, with one JSON Schema per message)."""
        return export.document(service.registry, service.topology)

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/ui/")

    @app.get("/asyncapi.json", include_in_schema=False)
    async def asyncapi_alias() -> RedirectResponse:
        return RedirectResponse("/api/asyncapi.json")  # same origin: the token goes along

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> FileResponse:
        """Browsers ask for it on every page of this origin (the API docs too): answer with the
        dashboard's icon rather than a 404."""
        return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml")

    @app.get("/asyncapi", include_in_schema=False)
    async def contracts_page() -> RedirectResponse:
        return RedirectResponse("/ui/#/contracts")

    app.mount("/ui", StaticFiles(directory=STATIC, html=True), name="dashboard")


async def _dead_letters(service: OrchestratorService) -> dict[str, int | None] | None:
    broker = service.broker
    if broker is None or not broker.is_connected():
        return None
    names = list(dead_letter_queues(service.topology, service.registry))
    try:
        depths = await asyncio.wait_for(
            asyncio.gather(*(broker.ready_count(n) for n in names)), timeout=3
        )
    except Exception:  # a broker hiccup must not fail the page
        return None
    return dict(zip(names, depths, strict=True))
