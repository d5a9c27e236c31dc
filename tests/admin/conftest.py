"""Fixtures of the admin API tests: a real orchestrator service (real RabbitMQ, a SQLite file or
a PostgreSQL schema of its own) with the admin API on a free port, the scripted participant,
and an HTTP client that goes through that port.

``backend`` is ``sqlite`` unless a test parametrizes it indirectly with ``postgres``.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from saga import Registry, RetryPolicy, SagaDefinition, Step
from saga.orchestrator.service import OrchestratorService
from saga_demo.contracts.checkout import CheckoutInput
from tests.conftest import require_postgres, require_rabbitmq
from tests.integration.harness import Harness
from tests.support.sagas import PARTICIPANTS

TOKEN = "admin-test-token-0123456789"

_quick = RetryPolicy(max_attempts=1)
_fast = RetryPolicy(max_attempts=3, initial_backoff=timedelta(milliseconds=50))
_undo = RetryPolicy(max_attempts=4, initial_backoff=timedelta(milliseconds=50))

#: the integration tests' saga, with timeouts long enough that a busy machine never times a
#: step out: what happens is what the participant's script says
TRIP = SagaDefinition(
    "trip",
    1,
    [
        Step(
            name,
            participant=name,
            action=f"{name}.do",
            compensation=f"{name}.undo",
            timeout=timedelta(seconds=30),
            retry=_fast,
            compensation_retry=_undo,
        )
        for name in PARTICIPANTS
    ],
)

#: alpha, then beta, which waits a minute for its reply: a saga that stays RUNNING
HOLD = SagaDefinition(
    "hold",
    1,
    [
        Step("alpha", participant="alpha", action="alpha.do", compensation="alpha.undo"),
        Step(
            "beta",
            participant="beta",
            action="beta.do",
            compensation="beta.undo",
            timeout=timedelta(seconds=60),
            retry=_quick,
        ),
    ],
)

#: beta is the pivot: when gamma fails after it, the saga is FAILED for an operator
PIVOTED = SagaDefinition(
    "pivoted",
    1,
    [
        Step("alpha", participant="alpha", action="alpha.do", compensation="alpha.undo"),
        Step("beta", participant="beta", action="beta.do", pivot=True),
        Step("gamma", participant="gamma", action="gamma.do", retry=_quick),
    ],
)


#: a saga with an input model (the demo checkout's): its input is checked before it starts
ORDERED = SagaDefinition(
    "ordered",
    1,
    [Step("alpha", participant="alpha", action="alpha.do", compensation="alpha.undo")],
    input_model=CheckoutInput,
)


def admin_registry() -> Registry:
    return Registry([TRIP, HOLD, PIVOTED, ORDERED], participants=PARTICIPANTS)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Stack:
    harness: Harness
    service: OrchestratorService
    url: str
    client: httpx.AsyncClient  # authorized, on the real port

    async def start(self, name: str, script: dict[str, Any], key: str | None = None) -> str:
        body: dict[str, Any] = {"name": name, "input": {"script": script}, "key": key}
        answer = await self.client.post("/api/sagas", json=body)
        assert answer.status_code in (200, 201), answer.text
        return str(answer.json()["saga"]["saga_id"])

    async def saga(self, saga_id: str) -> dict[str, Any]:
        answer = await self.client.get(f"/api/sagas/{saga_id}")
        assert answer.status_code == 200, answer.text
        found: dict[str, Any] = answer.json()
        return found

    async def wait(
        self,
        saga_id: str,
        statuses: Iterable[str],
        *,
        timeout: float = 20.0,  # noqa: ASYNC109
        step: str | None = None,
    ) -> dict[str, Any]:
        """Poll the API until the saga has one of ``statuses`` (and is at ``step``)."""
        wanted = set(statuses)
        deadline = time.monotonic() + timeout
        while True:
            saga = await self.saga(saga_id)
            if saga["status"] in wanted and (step is None or saga["current_step"] == step):
                return saga
            if time.monotonic() > deadline:
                lines = "\n  ".join(
                    f"{h['kind']} {h['step']} {h['direction']} #{h['attempt']}: {h['detail']}"
                    for h in saga["history"]
                )
                pytest.fail(f"saga {saga_id} is {saga['status']}, not {wanted}:\n  {lines}")
            await asyncio.sleep(0.05)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    return str(getattr(request, "param", "sqlite"))


@pytest.fixture
async def harness(backend: str, tmp_path: Path, unique: str) -> AsyncIterator[Harness]:
    rabbitmq_url = require_rabbitmq()
    if backend == "postgres":
        database_url, schema = require_postgres(), f"saga_admin_{unique}"
    else:
        database_url, schema = f"sqlite+aiosqlite:///{tmp_path / 'saga.db'}", None
    world = Harness(
        prefix=f"adm-{unique}",
        rabbitmq_url=rabbitmq_url,
        database_url=database_url,
        schema=schema,
        log=tmp_path / "responder.jsonl",
    )
    try:
        yield world
    finally:
        await world.cleanup()


async def start_admin_service(
    harness: Harness, registry: Registry | None = None, **overrides: object
) -> OrchestratorService:
    """Like ``Harness.start_service``, with the admin API on and the admin test sagas (or
    ``registry``)."""
    settings: dict[str, object] = {"admin_port": free_port(), "admin_token": TOKEN}
    settings.update(overrides)
    service = OrchestratorService(harness.settings(**settings), registry or admin_registry())
    if harness.schema is not None:
        store = harness.new_store()
        service.store = store
        service.orchestrator.store = store
    await service.start()
    harness.services.append(service)
    return service


@pytest.fixture
async def stack(harness: Harness) -> AsyncIterator[Stack]:
    """The orchestrator with its admin API, the scripted participant, an authorized client."""
    service = await start_admin_service(harness)
    await harness.start_responder()
    url = f"http://127.0.0.1:{service.settings.admin_port}"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=15) as client:
        yield Stack(harness, service, url, client)
