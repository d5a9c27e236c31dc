"""Bearer auth, liveness and readiness (with the broker or the database gone), and the server's
own life: a port that is taken, signals left to the orchestrator, a clean stop."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

import saga.admin.app as admin_app
from saga.core.errors import ConfigError
from saga.orchestrator.service import OrchestratorService
from saga.settings import load_settings
from saga.store.sql import SqlStore
from tests.admin.conftest import TOKEN, Stack, admin_registry, free_port, start_admin_service
from tests.integration.harness import Harness

pytestmark = pytest.mark.rabbitmq


async def test_bearer_token_is_required_and_compared_in_constant_time(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    compared: list[tuple[bytes, bytes]] = []

    class SpyHmac:
        @staticmethod
        def compare_digest(a: bytes, b: bytes) -> bool:
            compared.append((a, b))
            return hmac.compare_digest(a, b)

    monkeypatch.setattr(admin_app, "hmac", SpyHmac)
    async with httpx.AsyncClient(base_url=stack.url) as anonymous:
        missing = await anonymous.get("/api/sagas")
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"].startswith("Bearer")
        assert "missing bearer token" in missing.json()["detail"]

        for header in ("Basic dXNlcjpwYXNz", "Bearer", "", f"Token {TOKEN}", "Bearer a b"):
            malformed = await anonymous.get("/api/sagas", headers={"Authorization": header})
            assert malformed.status_code == 401, header
            assert malformed.headers["www-authenticate"].startswith("Bearer")
            assert "malformed Authorization header" in malformed.json()["detail"]
        assert compared == []  # nothing to compare yet

        for path in ("/api/sagas", "/api/definitions", f"/api/sagas/{'0' * 32}"):
            wrong = await anonymous.get(path, headers={"Authorization": f"Bearer {TOKEN}x"})
            assert wrong.status_code == 403
            assert wrong.json()["detail"] == "wrong token: use the orchestrator's SAGA_ADMIN_TOKEN"
        posted = await anonymous.post(
            f"/api/sagas/{'0' * 32}/retry",
            json={"reason": "x"},
            headers={"Authorization": "Bearer nope"},
        )
        assert posted.status_code == 403
        assert compared[0] == (f"{TOKEN}x".encode(), TOKEN.encode())

        right = await anonymous.get("/api/sagas", headers={"Authorization": f"bearer {TOKEN}"})
        assert right.status_code == 200
        assert compared[-1] == (TOKEN.encode(), TOKEN.encode())

        # public: liveness, readiness and the API's description
        for path in ("/healthz", "/readyz", "/openapi.json", "/docs"):
            assert (await anonymous.get(path)).status_code == 200, path
        assert (await anonymous.get("/healthz")).json() == {"status": "ok"}
        spec = (await anonymous.get("/openapi.json")).json()
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert {"/api/sagas", "/api/sagas/{saga_id}", "/api/definitions"} <= set(spec["paths"])
    retry = spec["paths"]["/api/sagas/{saga_id}/retry"]["post"]
    assert {"401", "403", "404", "409", "422"} <= set(retry["responses"])


async def test_a_rotated_token_file_applies_at_once(tmp_path: Path) -> None:
    """No broker needed: the app over a service that was never started, through ASGI."""
    token_file = tmp_path / "token"
    token_file.write_text("first-token-0123456789\n")
    settings = load_settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'saga.db'}", admin_token_file=token_file
    )
    service = OrchestratorService(settings, admin_registry())
    await service.store.migrate()
    transport = httpx.ASGITransport(app=admin_app.create_app(service))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://admin") as client:

            async def status(token: str) -> int:
                answer = await client.get(
                    "/api/definitions", headers={"Authorization": f"Bearer {token}"}
                )
                return answer.status_code

            assert await status("first-token-0123456789") == 200
            token_file.write_text("second-token-0123456789")
            assert await status("first-token-0123456789") == 403
            assert await status("second-token-0123456789") == 200
            token_file.unlink()
            gone = await client.get(
                "/api/sagas", headers={"Authorization": "Bearer second-token-0123456789"}
            )
            assert gone.status_code == 503
            assert "cannot read SAGA_ADMIN_TOKEN_FILE" in gone.json()["detail"]
    finally:
        await service.store.close()


async def test_readyz_is_ready_then_names_the_broker_when_it_is_gone(stack: Stack) -> None:
    ready = await stack.client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {
        "ready": True,
        "checks": {"database": None, "migrations": None, "broker": None, "consumers": None},
    }
    assert stack.service.broker is not None
    await stack.service.broker.close()  # the service's own connection, not the server

    down = await stack.client.get("/readyz")
    assert down.status_code == 503
    body = down.json()
    assert body["ready"] is False
    assert body["checks"]["broker"] == "no connection to RabbitMQ"
    assert body["checks"]["database"] is None
    assert (await stack.client.get("/healthz")).status_code == 200  # alive all the same


@contextlib.asynccontextmanager
async def _swapped_store(service: OrchestratorService, url: str) -> AsyncIterator[None]:
    """Point the service at a database that is not there; put its own store back after."""
    own = service.store
    service.store = SqlStore(url)
    try:
        yield
    finally:
        dead, service.store = service.store, own
        await dead.close()


async def test_readyz_and_the_api_say_when_the_database_is_unreachable(stack: Stack) -> None:
    async with _swapped_store(
        stack.service, f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/test"
    ):
        down = await stack.client.get("/readyz")
        assert down.status_code == 503
        checks = down.json()["checks"]
        assert checks["database"].startswith("unreachable:")
        assert checks["migrations"] == "unknown: the database is unreachable"
        assert checks["broker"] is None

        listed = await stack.client.get("/api/sagas")
        assert listed.status_code == 503
        assert listed.json()["detail"].startswith("the database cannot be reached:")
    assert (await stack.client.get("/readyz")).status_code == 200


async def test_readyz_does_not_hang_on_a_database_that_does_not_answer(stack: Stack) -> None:
    """A server that accepts connections and never says a word: the check gives up in time."""
    peers: list[asyncio.StreamWriter] = []

    async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peers.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with _swapped_store(
            stack.service, f"postgresql+asyncpg://postgres@127.0.0.1:{port}/test"
        ):
            began = time.monotonic()
            down = await stack.client.get("/readyz")
            took = time.monotonic() - began
            assert down.status_code == 503
            checks = down.json()["checks"]
            assert checks["database"] == f"no answer within {admin_app.READY_TIMEOUT:g} s"
            assert checks["broker"] is None
            assert took < admin_app.READY_TIMEOUT + 3
            assert peers  # it did connect: the database hung, it was not refused
    finally:
        for writer in peers:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_the_server_leaves_signals_to_the_orchestrator_and_stops_with_it(
    harness: Harness,
) -> None:
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    service = await start_admin_service(harness)
    port = service.settings.admin_port
    assert {sig: signal.getsignal(sig) for sig in before} == before
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
    await harness.stop_service(service)
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass


async def test_a_taken_port_is_a_clear_config_error(harness: Harness) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        service = OrchestratorService(
            harness.settings(admin_port=port, admin_token=TOKEN), admin_registry()
        )
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}") as failed:
            await service.start()
        assert "SAGA_ADMIN_PORT" in str(failed.value)
    # the failed start released everything: the same database starts fine on a free port
    started = await start_admin_service(harness)
    async with httpx.AsyncClient() as client:
        answer = await client.get(f"http://127.0.0.1:{started.settings.admin_port}/healthz")
    assert answer.status_code == 200


async def test_an_unexpected_error_answers_500_naming_only_its_type(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = load_settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'saga.db'}", admin_token=TOKEN
    )
    service = OrchestratorService(settings, admin_registry())

    def broken() -> None:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(service.registry, "all", broken)
    transport = httpx.ASGITransport(app=admin_app.create_app(service), raise_app_exceptions=False)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://admin") as client:
        answer = await client.get("/api/definitions", headers=headers)
    assert answer.status_code == 500
    assert answer.json() == {
        "detail": "internal error (RuntimeError); the orchestrator's log has the details"
    }
    await service.store.close()
