"""The compose file: checked against the code, then run natively (there is no Docker here).

The checks: every service of the project image runs a real console script and subcommand with
options that parse; every environment variable is a setting the program reads; whatever needs
RabbitMQ waits for it to be healthy; the infrastructure has healthchecks; ports bind 127.0.0.1;
only named volumes; the production profile (the ``prod-*`` services) runs orchestrator replicas
on PostgreSQL with quorum queues on both sides, migrated once before they start.

Then each of the orchestrator and the four services runs from its own ``command`` and
``environment``, with compose host names mapped to 127.0.0.1, volumes to a directory of the test
and a private ``SAGA_PREFIX``; the ``orders`` service places its sample checkouts, and every one
must end as its input implies.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import tomllib
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import pytest
import typer.main
import yaml
from typer.exceptions import TyperException

from saga import logs
from saga.core.errors import ConfigError
from saga.participant.settings import ParticipantSettings, load_participant_settings
from saga.settings import Settings, load_settings
from saga.transport.amqp import broker_urls
from saga_demo import payment
from saga_tools.chaos.model import Run, World, check_run, conserved, replay
from saga_tools.chaos.node import free_port
from tests.crash.helpers import REPO, base_env
from tests.e2e.otlp import OtlpReceiver
from tests.e2e.stack import SERVICES, Stack

COMPOSE = REPO / "docker-compose.yml"

#: the programs of the image, their settings, and the subcommands compose may use
SETTINGS: dict[str, type[Settings] | type[ParticipantSettings]] = {
    "saga": Settings,
    "saga-service": ParticipantSettings,
}
LOADERS: dict[str, Callable[[], object]] = {
    "saga": load_settings,
    "saga-service": load_participant_settings,
}
SUBCOMMANDS = {
    "saga": {"run", "migrate"},
    "saga-service": {"order", "payment", "inventory", "shipping", "place-orders"},
}
#: SAGA_* variables read outside the settings classes, and where
EXTRA_SETTINGS = {"SAGA_LOG_LEVEL": logs}
#: standard OpenTelemetry SDK variables (opentelemetry.sdk.environment_variables)
OTEL = frozenset(
    {
        "OTEL_SERVICE_NAME",
        "OTEL_RESOURCE_ATTRIBUTES",
        "OTEL_SDK_DISABLED",
        "OTEL_TRACES_EXPORTER",
        "OTEL_METRICS_EXPORTER",
        "OTEL_LOGS_EXPORTER",
        "OTEL_TRACES_SAMPLER",
        "OTEL_TRACES_SAMPLER_ARG",
        "OTEL_PROPAGATORS",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        "OTEL_EXPORTER_OTLP_HEADERS",
        "OTEL_EXPORTER_OTLP_INSECURE",
        "OTEL_EXPORTER_OTLP_TIMEOUT",
    }
)
INFRASTRUCTURE = ("rabbitmq", "postgres")
STACK = ("orchestrator", *SERVICES)
LOCALHOST = "127.0.0.1"


def _compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(loaded, dict) and isinstance(loaded.get("services"), dict)
    return loaded


SERVICES_OF_COMPOSE: dict[str, dict[str, Any]] = _compose()["services"]


def _scripts() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return dict(project["scripts"])


def _project_image() -> dict[str, dict[str, Any]]:
    """The services built from this repository (or running the image it builds)."""
    images = {s.get("image") for s in SERVICES_OF_COMPOSE.values() if "build" in s}
    return {
        name: s
        for name, s in SERVICES_OF_COMPOSE.items()
        if "build" in s or (s.get("image") is not None and s.get("image") in images)
    }


PROJECT = _project_image()
#: the production profile's services (and its sample-orders tool): the demo stack's commands on
#: PostgreSQL with orchestrator replicas; not run natively here
PRODUCTION = {name: s for name, s in PROJECT.items() if name.startswith("prod-")}


def _environment(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # ["KEY=value", ...]
        env = dict(item.split("=", 1) for item in env)
    return {  # with compose's ${NAME:-default} interpolated, as compose does on load
        str(k): re.sub(
            r"\$\{(\w+):-([^}]*)\}",
            lambda m: os.environ.get(m[1], m[2]),
            "" if v is None else str(v),
        )
        for k, v in env.items()
    }


def _depends_on(service: Mapping[str, Any]) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):  # the short form only waits for the start
        return dict.fromkeys(deps, "service_started")
    return {name: (d or {}).get("condition", "service_started") for name, d in deps.items()}


def _parse(program: str, args: list[str]) -> tuple[str, dict[str, Any]]:
    """(subcommand, its parameters) as ``program`` would parse ``args``; raises the program's
    usage error (a TyperException) when they do not parse."""
    module_name, _ = _scripts()[program].split(":", 1)
    group = typer.main.get_command(importlib.import_module(module_name).app)
    ctx = group.make_context(program, list(args))
    name, sub, rest = group.resolve_command(ctx, list(args))  # type: ignore[attr-defined]
    return name, sub.make_context(name, rest, parent=ctx).params


# --- the file ----------------------------------------------------------------------------


def test_the_project_image_runs_the_stack() -> None:
    assert set(PROJECT) - set(PRODUCTION) == {*STACK, "orders"}, sorted(PROJECT)
    assert set(PRODUCTION) == {"prod-migrate", *(f"prod-{n}" for n in (*STACK, "orders"))}


def test_the_production_profile_runs_replicas_on_postgresql_with_quorum_queues() -> None:
    default_prefix = _environment(PROJECT["orchestrator"])["SAGA_PREFIX"]
    for name, service in PRODUCTION.items():
        env = _environment(service)
        profiles = service.get("profiles") or []
        assert "production" in profiles or name == "prod-orders", f"{name}: profiles {profiles}"
        if "SAGA_RABBITMQ_URL" in env:  # both sides declare the shared queues: alike
            assert env.get("SAGA_QUORUM_QUEUES") == "true", f"{name}: classic queues"
            assert env.get("SAGA_PREFIX") != default_prefix, f"{name}: the demo's queue names"
        urls = [env[k] for k in ("SAGA_DATABASE_URL", "SAGA_SERVICES_DATABASE_URL") if k in env]
        for url in urls:
            assert url.startswith("postgresql+asyncpg://") and "@postgres:" in url, (name, url)
        if urls:
            assert _depends_on(service).get("postgres") == "service_healthy", name
        if name != "prod-migrate":  # the same programs as the demo stack, without migrating
            demo = [a for a in PROJECT[name.removeprefix("prod-")]["command"] if a != "--migrate"]
            assert service["command"] == demo, name
    assert "production" in SERVICES_OF_COMPOSE["postgres"]["profiles"]
    assert PRODUCTION["prod-migrate"]["command"] == ["saga", "migrate"]
    orchestrator = PRODUCTION["prod-orchestrator"]
    assert int(orchestrator["deploy"]["replicas"]) >= 2
    assert not orchestrator.get("ports"), "replicas would clash on a fixed host port"
    deps = _depends_on(orchestrator)
    assert deps.get("prod-migrate") == "service_completed_successfully", deps


def test_the_production_profile_takes_the_nodes_of_a_cluster(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    nodes = ",".join(f"amqp://app:pw@rabbit-{n}:5672/shop" for n in (1, 2, 3))
    monkeypatch.setenv("SAGA_PROD_RABBITMQ_URL", nodes)
    connected = {n: _environment(s) for n, s in PRODUCTION.items() if n != "prod-migrate"}
    assert {"prod-orchestrator", "prod-payment", "prod-orders"} <= set(connected)
    for name, env in connected.items():
        assert env.get("SAGA_RABBITMQ_URL") == nodes, name
        assert len(broker_urls(env["SAGA_RABBITMQ_URL"])) == 3, name


@pytest.mark.parametrize("name", sorted(PROJECT))
def test_the_command_is_a_console_script_with_a_real_subcommand(name: str) -> None:
    command = PROJECT[name].get("command")
    assert isinstance(command, list) and command, f"{name}: command {command!r} is not a list"
    program, *args = (str(a) for a in command)
    scripts = _scripts()
    assert program in scripts, f"{name}: {program!r} is not one of {sorted(scripts)}"
    assert program in SETTINGS, f"{name}: no settings known for {program!r}"
    assert args, f"{name}: {program} without a subcommand only prints its help"
    assert args[0] in SUBCOMMANDS[program], f"{name}: {program} {args[0]} is not expected here"
    try:  # the subcommand exists and the options parse, exactly as the program parses them
        subcommand, _ = _parse(program, args)
    except TyperException as exc:
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        pytest.fail(f"{name}: {' '.join(command)}: {message}", pytrace=False)
    assert subcommand == args[0]


@pytest.mark.parametrize("name", sorted(PROJECT))
def test_every_variable_is_a_setting_its_program_reads(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    program = str(PROJECT[name]["command"][0])
    settings = SETTINGS[program]
    env = _environment(PROJECT[name])
    unknown = []
    for key in env:
        if key.startswith("SAGA_"):
            field = key.removeprefix("SAGA_").lower()
            if field in settings.model_fields:
                continue
            reader = EXTRA_SETTINGS.get(key)
            if reader is not None and key in inspect.getsource(reader):
                continue
            unknown.append(f"{key} (not a field of {settings.__name__})")
        elif key not in OTEL:
            unknown.append(f"{key} (neither SAGA_* nor a known OTEL_* variable)")
    assert not unknown, f"{name}: unknown variables: {', '.join(unknown)}"
    # and the values are valid: the program would start with them
    for key in [k for k in os.environ if k.startswith("SAGA_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    try:
        LOADERS[program]()
    except ConfigError as exc:
        pytest.fail(f"{name}: {exc}", pytrace=False)


@pytest.mark.parametrize("name", sorted(SERVICES_OF_COMPOSE))
def test_whatever_needs_rabbitmq_waits_until_it_is_healthy(name: str) -> None:
    deps = _depends_on(SERVICES_OF_COMPOSE[name])
    if "rabbitmq" in deps:
        assert deps["rabbitmq"] == "service_healthy", f"{name} waits only for rabbitmq to start"
    uses = any("@rabbitmq:" in v for v in _environment(SERVICES_OF_COMPOSE[name]).values())
    if uses:  # directly, or through services that wait for it healthy
        seen: set[str] = set()
        todo = [name]
        while todo:
            current = todo.pop()
            if current in seen:
                continue
            seen.add(current)
            todo += [d for d in _depends_on(SERVICES_OF_COMPOSE[current]) if d != "rabbitmq"]
        healthy = [
            s
            for s in seen
            if _depends_on(SERVICES_OF_COMPOSE[s]).get("rabbitmq") == "service_healthy"
        ]
        assert healthy, f"{name} talks to rabbitmq but nothing it depends on waits for it"


@pytest.mark.parametrize("name", INFRASTRUCTURE)
def test_the_infrastructure_has_a_healthcheck(name: str) -> None:
    check = SERVICES_OF_COMPOSE[name].get("healthcheck") or {}
    assert not check.get("disable"), f"{name}: healthcheck disabled"
    test = check.get("test")
    assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, (
        f"{name}: healthcheck test {test!r}"
    )


@pytest.mark.parametrize(
    "name", sorted(n for n, s in SERVICES_OF_COMPOSE.items() if s.get("ports"))
)
def test_published_ports_bind_localhost_only(name: str) -> None:
    for port in SERVICES_OF_COMPOSE[name]["ports"]:
        if isinstance(port, dict):
            assert port.get("host_ip") == LOCALHOST, f"{name}: {port} binds every interface"
        else:
            assert str(port).startswith(f"{LOCALHOST}:"), f"{name}: {port!r} binds every interface"


@pytest.mark.parametrize(
    "name", sorted(n for n, s in SERVICES_OF_COMPOSE.items() if s.get("volumes"))
)
def test_only_named_volumes(name: str) -> None:
    declared = set(_compose().get("volumes") or {})
    for volume in SERVICES_OF_COMPOSE[name]["volumes"]:
        source = str(volume).split(":")[0]
        assert source in declared, f"{name}: {volume!r} is not a named volume of the file"


# --- the stack, run natively -------------------------------------------------------------


def _volumes(service: Mapping[str, Any], root: Path) -> dict[str, Path]:
    """Container path -> a directory of the test, for each named volume of ``service``."""
    mounts = {}
    for volume in service.get("volumes") or []:
        source, target = str(volume).split(":")[:2]
        assert not source.startswith((".", "/")), f"bind mount {volume!r}: only named volumes"
        mounts[target] = root / source
        mounts[target].mkdir(parents=True, exist_ok=True)
    return mounts


def _native(
    name: str, stack: Stack, receiver: OtlpReceiver | None = None
) -> tuple[list[str], dict[str, str]]:
    """``name``'s command and environment as they run here: spans go to ``receiver`` in place
    of Jaeger, and /metrics to a free port on 127.0.0.1."""
    service = PROJECT[name]
    hosts = sorted(SERVICES_OF_COMPOSE, key=len, reverse=True)
    mounts = _volumes(service, stack.directory)
    compose_env = _environment(service)
    assert compose_env.get("SAGA_PREFIX") == "saga", "expected the default prefix to replace"
    env = base_env()
    for key, value in compose_env.items():
        native = value
        for host in hosts:
            native = re.sub(rf"(?<=[@/]){re.escape(host)}(?=:\d)", LOCALHOST, native)
        for target, local in mounts.items():
            native = re.sub(rf"(?<![\w.]){re.escape(target)}(?=/|$)", str(local), native)
        env[key] = native
    env["SAGA_PREFIX"] = stack.prefix  # never the shared broker's default names
    if receiver is not None and "OTEL_EXPORTER_OTLP_ENDPOINT" in env:
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == f"http://{LOCALHOST}:4318", env
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.endpoint
        env["OTEL_BSP_SCHEDULE_DELAY"] = "100"
    for port, host in (
        ("SAGA_METRICS_PORT", "SAGA_METRICS_HOST"),
        ("SAGA_ADMIN_PORT", "SAGA_ADMIN_HOST"),
    ):
        if port in env:
            env[port] = str(free_port())
            env[host] = LOCALHOST
    return [str(a) for a in service["command"]], env


@pytest.mark.rabbitmq
async def test_the_compose_stack_runs_natively_and_the_sample_orders_finish(
    stack: Stack, receiver: OtlpReceiver
) -> None:
    procs = {}
    metrics = {}
    for name in STACK:
        argv, env = _native(name, stack, receiver)
        metrics[name] = int(env["SAGA_METRICS_PORT"])
        if name == "orchestrator":
            admin = (int(env["SAGA_ADMIN_PORT"]), env["SAGA_ADMIN_TOKEN"])
        assert env["SAGA_RABBITMQ_URL"] == stack.rabbitmq_url, env["SAGA_RABBITMQ_URL"]
        if name == "orchestrator":
            assert env["SAGA_DATABASE_URL"] == stack.database_url, env["SAGA_DATABASE_URL"]
        else:
            assert env["SAGA_DATA_DIR"] == str(stack.data_dir), env["SAGA_DATA_DIR"]
        procs[name] = stack.processes.spawn(name, argv, env)
    await stack.started(procs.values())
    before = await stack.snapshot()
    world = World.seeded()
    assert before == {
        "balances": {
            name: world.accounts[customer].balance
            for name, customer in sorted(payment.CUSTOMERS.items())
        },
        "stock": world.available,
    }, "fresh services hold the demo seed"

    argv, env = _native("orders", stack, receiver)
    placer = stack.processes.spawn("orders", argv, env)
    code = await stack.wait_exit(placer, within=60)
    if code != 0:
        stack.fail(f"orders: {' '.join(argv)} exited with {code}")
    ids = [UUID(line) for line in placer.stdout.read_text().split()]
    count = int(argv[argv.index("--count") + 1])
    assert len(ids) == count == len(set(ids)), placer.describe()

    states = await stack.wait_terminal(ids, 90, watch=list(procs.values()))
    await stack.wait_quiet()
    checkouts = {i: dict(states[i].context.input) for i in ids}
    run = Run(checkouts, states, await stack.histories(ids), await stack.processed())
    after = await stack.snapshot()
    expected, problems = replay(world, checkouts, run.rows)
    problems += check_run(run, expected)
    problems += conserved(checkouts, states, before, after)
    if problems:
        stack.fail(f"{len(problems)} problems:\n" + "\n".join(problems[:40]))

    # /metrics of every process answers, and the orchestrator's counts are the store's
    finished = Counter(s.status.value.lower() for s in states.values())
    async with httpx.AsyncClient(timeout=5) as client:
        for name, port in metrics.items():
            text = (await client.get(f"http://{LOCALHOST}:{port}/metrics")).text
            assert "saga_relay_published_total" in text, name
        orchestrator = (
            await client.get(f"http://{LOCALHOST}:{metrics['orchestrator']}/metrics")
        ).text
    for status, count in finished.items():
        line = f'saga_finished_total{{saga_name="checkout",status="{status}"}} {float(count)}'
        assert line in orchestrator, (line, orchestrator)

    # the dashboard's API answers with the compose token and sees every saga
    async with httpx.AsyncClient(timeout=5) as client:
        listed = await client.get(
            f"http://{LOCALHOST}:{admin[0]}/api/sagas",
            params={"limit": 500},
            headers={"Authorization": f"Bearer {admin[1]}"},
        )
    assert listed.status_code == 200, listed.text
    assert {UUID(s["saga_id"]) for s in listed.json()["items"]} == set(ids)

    # Jaeger's view: each saga one trace, begun by the client that placed it, with spans of
    # every process of the stack, each under the service name compose gives it.
    stack.processes.stop_all()  # SIGTERM: the batched spans are exported on the way out
    names = {_environment(PROJECT[n]).get("OTEL_SERVICE_NAME") for n in STACK}
    assert {s.service for s in receiver.spans} >= names | {"saga-client"}, names
    for saga_id in ids:
        traces = {s.trace_id for s in receiver.spans if s.attributes.get("saga.id") == str(saga_id)}
        assert len(traces) == 1, (saga_id, traces)


def test_the_postgres_profile_runs_the_orchestrator_on_postgresql_as_the_comment_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The header said `--profile postgres` and "point SAGA_DATABASE_URL at it", but the
    orchestrator's URL was fixed in the file: the comment's command must do what it says."""
    header = COMPOSE.read_text().split("\n\n", 1)[0]
    command = re.search(r"#\s+(SAGA_DATABASE_URL=(\S+)) \\\n#\s+docker compose (.*?)\s+#", header)
    assert command is not None, header
    assignment, url, args = command.groups()
    assert args.split() == ["--profile", "postgres", "up", "-d"], args
    postgres = SERVICES_OF_COMPOSE["postgres"]
    assert "postgres" in postgres["profiles"]
    database = _environment(postgres)
    assert url == (
        f"postgresql+asyncpg://postgres:{database['POSTGRES_PASSWORD']}@postgres:5432/"
        f"{database['POSTGRES_DB']}"
    )
    assert _environment(PROJECT["orchestrator"])["SAGA_DATABASE_URL"].startswith("sqlite")
    monkeypatch.setenv(*assignment.split("=", 1))
    assert _environment(PROJECT["orchestrator"])["SAGA_DATABASE_URL"] == url
