"""``saga chaos``: a seeded soak of the demo stack under a nemesis, judged by the checker."""

from __future__ import annotations

import asyncio
import json
import random
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from saga.logs import configure_logging
from saga_tools.chaos.plan import FAULT_KINDS, ChaosPlan, make_plan
from saga_tools.chaos.runner import DEFAULT_POSTGRES, SoakError, run_soak

app = typer.Typer(
    name="chaos",
    help="Chaos soak: N checkouts on a private RabbitMQ node while a nemesis kills processes, "
    "the broker and connections; then a checker counts lost, duplicated or misordered effects.",
    no_args_is_help=True,
    add_completion=False,
)

Directory = Annotated[
    Path | None,
    typer.Option(
        "--dir", help="Where the plan, logs, databases and report go (default: a new temp dir)."
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print the report as JSON.")]
Postgres = Annotated[
    str,
    typer.Option(
        "--postgres",
        help="With --backend postgresql: the server on which the soak creates (and drops) a "
        "database of its own.",
    ),
]


def _progress(line: str) -> None:
    print(f"  {line}", file=sys.stderr, flush=True)


def _soak(plan: ChaosPlan, directory: Path | None, as_json: bool, postgres: str) -> None:
    where = directory or Path(tempfile.mkdtemp(prefix=f"saga-chaos-{plan.seed}-"))
    print(
        f"chaos soak: seed {plan.seed}, {len(plan.sagas)} sagas, {len(plan.schedule)} faults; "
        f"plan and report in {where}",
        file=sys.stderr,
    )
    for fault in plan.schedule:
        target = f" {fault.target}" if fault.target else ""
        print(f"    at {fault.at:7.2f}s {fault.kind}{target}", file=sys.stderr)
    configure_logging("WARNING")
    try:
        report = asyncio.run(run_soak(plan, where, _progress, postgres))
    except SoakError as exc:
        typer.echo(f"error: the soak could not run: {exc}", err=True)
        raise typer.Exit(code=2) from None
    typer.echo(json.dumps(report.to_dict(), indent=1) if as_json else report.render())
    if not report.ok:
        typer.echo(
            f"replay exactly: saga chaos replay {where / 'plan.json'}\n"
            f"keep as a regression case: cp {where / 'plan.json'} "
            f"tests/chaos/regressions/seed-{plan.seed}.json",
            err=True,
        )
        raise typer.Exit(code=1)


@app.command()
def run(
    sagas: Annotated[int, typer.Option(min=1, help="Checkouts to run.")] = 200,
    seed: Annotated[int | None, typer.Option(help="Seed of the mix and the faults.")] = None,
    rate: Annotated[float, typer.Option(min=0.1, help="Checkouts started per second.")] = 40.0,
    fault_every: Annotated[
        float, typer.Option(min=0.2, help="Seconds between faults, on average.")
    ] = 3.0,
    faults: Annotated[
        str | None,
        typer.Option(
            help=f"Comma-separated fault kinds: {', '.join(FAULT_KINDS)} (default: every kind "
            "the stack's shape allows)."
        ),
    ] = None,
    max_in_flight: Annotated[
        int | None,
        typer.Option(min=1, help="The orchestrator's SAGA_MAX_IN_FLIGHT (default: its own)."),
    ] = None,
    nodes: Annotated[
        int,
        typer.Option(
            help="RabbitMQ nodes: 1, a private node; 3, a private cluster with quorum queues, "
            "partitioned by netfilter (root and iptables)."
        ),
    ] = 1,
    backend: Annotated[
        str, typer.Option(help="The orchestrators' database: sqlite or postgresql.")
    ] = "sqlite",
    instances: Annotated[
        int, typer.Option(min=1, help="Orchestrator processes (several need postgresql).")
    ] = 1,
    postgres: Postgres = DEFAULT_POSTGRES,
    directory: Directory = None,
    as_json: AsJson = False,
) -> None:
    """Run a new seeded soak. Exit 0: every counter is 0; 1: the checker found a violation;
    2: the soak itself could not run."""
    kinds = None if faults is None else [k.strip() for k in faults.split(",") if k.strip()]
    try:
        plan = make_plan(
            seed if seed is not None else random.SystemRandom().randrange(1, 2**31),
            sagas,
            rate=rate,
            fault_every=fault_every,
            kinds=kinds,
            max_in_flight=max_in_flight,
            nodes=nodes,
            instances=instances,
            backend=backend,
        )
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from None
    _soak(plan, directory, as_json, postgres)


@app.command()
def replay(
    plan_file: Annotated[Path, typer.Argument(help="A plan.json saved by an earlier soak.")],
    postgres: Postgres = DEFAULT_POSTGRES,
    directory: Directory = None,
    as_json: AsJson = False,
) -> None:
    """Run a saved plan again: the same sagas, injected failures and fault schedule."""
    try:
        plan = ChaosPlan.load(plan_file)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        typer.echo(f"error: cannot read {plan_file}: {exc}", err=True)
        raise typer.Exit(code=2) from None
    _soak(plan, directory, as_json, postgres)
