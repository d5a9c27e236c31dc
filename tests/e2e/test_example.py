"""examples/trip as a user would run it: the wheel built and installed in a fresh virtual
environment, the project copied outside the repository, its saga run end to end on RabbitMQ by
the installed ``saga run`` and its two services, its contracts exported, and both services put
through ``saga conformance``. Nothing of the repository is importable there but the wheel."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import pytest

from saga.transport.topology import Topology
from tests.admin.conftest import free_port
from tests.conftest import require_rabbitmq
from tests.support.processes import running, tail

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "example-token-0123456789"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with the project's wheel (and its dependencies) only."""
    where = tmp_path_factory.mktemp("wheel")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w",
         str(where / "dist"), str(ROOT)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    [wheel] = (where / "dist").glob("saga-*.whl")
    venv = where / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", str(wheel)],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return venv


def test_the_wheel_installs_three_namespaced_packages_and_nothing_generic(installed: Path) -> None:
    [site] = (installed / "lib").glob("python3*/site-packages")
    [record] = site.glob("saga-*.dist-info/RECORD")
    tops = {line.split("/", 1)[0] for line in record.read_text().splitlines()}
    tops = {t for t in tops if not t.endswith(".dist-info") and not t.startswith("..")}
    assert tops == {"saga", "saga_demo", "saga_tools"}
    imported = subprocess.run(
        [str(installed / "bin" / "python"), "-c",
         "import saga.orchestrator, saga.participant, saga.protocol, saga.testing, saga.client;"
         "import importlib.util as u;"
         "print([n for n in ('contracts', 'services', 'tools') if u.find_spec(n)])"],
        capture_output=True, text=True, cwd=installed, check=True,
    )  # fmt: skip
    assert imported.stdout.strip() == "[]"


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, f"exited:\n{tail(log)}"
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        assert time.monotonic() < deadline, f"no admin API:\n{tail(log)}"
        time.sleep(0.2)


def _saga(url: str, saga_id: str, wanted: set[str], logs: list[Path]) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    deadline = time.monotonic() + 60
    while True:
        answer = httpx.get(f"{url}/api/sagas/{saga_id}", headers=headers, timeout=5)
        if answer.status_code == 200 and answer.json()["status"] in wanted:
            found: dict[str, Any] = answer.json()
            return found
        if time.monotonic() > deadline:
            pytest.fail(f"saga {saga_id}: {answer.text[:2000]}\n" + "\n".join(map(tail, logs)))
        time.sleep(0.2)


def _rows(database: Path, query: str) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(database)) as conn:
        return list(conn.execute(query))


async def _delete_topology(url: str, prefix: str) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        topology = Topology(prefix=prefix)
        for queue in topology.queues(["flights", "hotels"]):
            await channel.queue_delete(queue.name)
        for exchange in topology.exchanges():
            await channel.exchange_delete(exchange.name)


async def test_the_example_project_runs_exports_and_conforms_on_the_installed_wheel(
    installed: Path, tmp_path: Path, unique: str
) -> None:
    url = require_rabbitmq()
    project = tmp_path / "trip-project"
    shutil.copytree(ROOT / "examples" / "trip", project)
    bin_ = installed / "bin"
    prefix = f"ex-{unique}"
    admin = free_port()
    env = {
        "PATH": f"{bin_}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "SAGA_PREFIX": prefix,
        "SAGA_RABBITMQ_URL": url,
        "SAGA_DATA_DIR": str(tmp_path / "data"),
        "SAGA_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'orchestrator.db'}",
        "SAGA_DEFINITIONS": "trip.sagas:registry",  # found in the current directory
        "SAGA_ADMIN_PORT": str(admin),
        "SAGA_ADMIN_TOKEN": TOKEN,
    }
    api = f"http://127.0.0.1:{admin}"
    logs = [tmp_path / n for n in ("orchestrator.log", "flights.log", "hotels.log")]
    python = str(bin_ / "python")
    try:
        with (
            running([str(bin_ / "saga"), "run", "--migrate"], env, logs[0], cwd=project) as orch,
            running([python, "-m", "trip.flights"], env, logs[1], cwd=project),
            running([python, "-m", "trip.hotels"], env, logs[2], cwd=project),
        ):
            await asyncio.to_thread(_wait_http, api, orch, logs[0])

            def book(*trip: str) -> subprocess.CompletedProcess[str]:
                return subprocess.run(
                    [python, "-m", "trip.book", *trip],
                    cwd=project, env=env, capture_output=True, text=True, timeout=60,
                    check=False,
                )  # fmt: skip

            lisbon = await asyncio.to_thread(book, "Ann", "LH400", "Lisbon", "3", "2027-05-01")
            assert lisbon.returncode == 0, lisbon.stderr
            atlantis = await asyncio.to_thread(book, "Bob", "AF12", "Atlantis", "2", "2027-06-01")
            assert atlantis.returncode == 0, atlantis.stderr
            done = await asyncio.to_thread(_saga, api, lisbon.stdout.strip(), {"COMPLETED"}, logs)
            undone = await asyncio.to_thread(
                _saga, api, atlantis.stdout.strip(), {"COMPENSATED"}, logs
            )
            assert done["input"]["check_in"] == "2027-05-01"
            story = [(h["kind"], h["step"]) for h in undone["history"]]
            failed, undid = ("step_failed", "hotel"), ("step_compensated", "flight")
            assert failed in story and undid in story, story
            assert story.index(failed) < story.index(undid), story
            assert "no_rooms" in json.dumps(undone["history"])
        seats = _rows(tmp_path / "data" / "flights.db", "SELECT flight, cancelled FROM seats")
        assert sorted(seats) == [("AF12", 1), ("LH400", 0)]
        rooms = _rows(tmp_path / "data" / "hotels.db", "SELECT city, cancelled FROM rooms")
        assert rooms == [("Lisbon", 0)]

        exported = await asyncio.to_thread(
            subprocess.run,
            [str(bin_ / "saga"), "schema", "export", str(tmp_path / "contracts")],
            cwd=project, env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert exported.returncode == 0, exported.stderr
        schemas = {p.name for p in (tmp_path / "contracts" / "messages").iterdir()}
        assert {"TripInput.schema.json", "BookFlight.schema.json", "HotelBooked.schema.json"} <= (
            schemas
        )

        # the conformance kit, against both services, with no orchestrator on the reply queue
        payloads = {
            "flights": (
                {"trip": "$saga_id", "traveller": "Cy", "flight": "BA1"},
                {"trip": "$saga_id"},
            ),
            "hotels": (
                {
                    "trip": "$saga_id",
                    "traveller": "Cy",
                    "city": "Porto",
                    "nights": 1,
                    "check_in": "2027-07-01",
                },
                {"trip": "$saga_id"},
            ),
        }
        for name, (payload, undo) in payloads.items():
            with running(
                [python, "-m", f"trip.{name}"], env, tmp_path / f"{name}2.log", cwd=project
            ):
                checked = await asyncio.to_thread(
                    subprocess.run,
                    [
                        str(bin_ / "saga"), "conformance", "--participant", name,
                        "--action", f"{name}.book", "--payload", json.dumps(payload),
                        "--compensation", f"{name}.cancel",
                        "--compensation-payload", json.dumps(undo), "--timeout", "15",
                    ],
                    cwd=project, env=env, capture_output=True, text=True, timeout=300,
                    check=False,
                )  # fmt: skip
            assert checked.returncode == 0, checked.stdout + checked.stderr
            assert "(conforms)" in checked.stdout and " 0 warnings" in checked.stdout
    finally:
        await _delete_topology(url, prefix)
