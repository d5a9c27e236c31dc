"""The ``saga`` console script against a running orchestrator's admin API: what it prints and
the exit status scripts rely on (0 ok, 1 refused, 2 usage, settings or connection)."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import re
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from saga import cli
from tests.admin.conftest import TOKEN, Stack, free_port, start_admin_service
from tests.conftest import require_rabbitmq
from tests.crash.helpers import Processes, delete_topology, orchestrator_env, wait_exit
from tests.crash.helpers import wait_for_output as wait_output
from tests.integration.harness import Harness
from tests.support import fanout

pytestmark = pytest.mark.rabbitmq

ACTOR = "cli-tester"


def _saga_script() -> str:
    """The console script installed next to this interpreter."""
    beside = Path(sys.executable).with_name("saga")
    found = str(beside) if beside.exists() else shutil.which("saga")
    if found is None:
        pytest.fail("the `saga` console script is not installed: pip install -e .")
    return found


@dataclass
class Ran:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


async def saga(*args: str, url: str, token: str | None = TOKEN, columns: int = 200) -> Ran:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGA_")}
    env.update(SAGA_ADMIN_URL=url, SAGA_ACTOR=ACTOR, NO_COLOR="1", COLUMNS=str(columns))
    if token is not None:
        env["SAGA_ADMIN_TOKEN"] = token
    proc = await asyncio.create_subprocess_exec(
        _saga_script(),
        *args,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return Ran(proc.returncode, out.decode(), err.decode())


async def saga_all(*calls: tuple[str, ...], url: str) -> list[Ran]:
    """Independent invocations, a few at a time: each one's start-up is most of its cost."""
    slots = asyncio.Semaphore(3)

    async def one(args: tuple[str, ...]) -> Ran:
        async with slots:
            return await saga(*args, url=url)

    return list(await asyncio.gather(*(one(args) for args in calls)))


async def test_list_show_and_definitions(stack: Stack) -> None:
    completed = await stack.start("trip", {}, key="cli-ok")
    compensated = await stack.start("trip", {"beta": ["fail"]})
    failed = await stack.start("trip", {"gamma": ["fail"], "beta~undo": ["fail"]})
    await stack.wait(completed, ["COMPLETED"])
    await stack.wait(compensated, ["COMPENSATED"])
    await stack.wait(failed, ["FAILED"])
    unknown = "0" * 8 + "-0000-4000-8000-" + "0" * 12

    (
        defs, defs_json, listed, only_failed, first_page, by_key, too_old, bad_since, shown,
        by_prefix, not_found,
    ) = await saga_all(
        ("definitions",),
        ("definitions", "--json"),
        ("list",),
        ("list", "--status", "failed", "--json"),
        ("list", "-s", "COMPLETED", "-s", "compensated", "--limit", "1"),
        ("list", "--key", "cli-ok", "--json"),
        ("list", "--until", "2000-01-01T00:00:00Z"),
        ("list", "--since", "yesterday"),
        ("show", compensated),
        ("show", compensated[:10], "--json"),  # the start of an id
        ("show", unknown),
        url=stack.url,
    )  # fmt: skip

    assert defs.code == 0, defs.err
    assert "trip v1" in defs.out
    assert "beta (pivot)" in defs.out
    assert "alpha.undo" in defs.out
    assert sorted(d["name"] for d in defs_json.json()) == ["hold", "ordered", "pivoted", "trip"]

    assert listed.code == 0, listed.err
    assert listed.out.splitlines()[0].split()[:3] == ["SAGA", "ID", "NAME"]
    rows = listed.out.splitlines()[1:]
    assert [row.split()[0] for row in rows] == [failed, compensated, completed]  # newest first
    assert "stuck at beta" in rows[0]
    assert "cli-ok" in rows[2]
    assert [s["saga_id"] for s in only_failed.json()["items"]] == [failed]
    assert [s["saga_id"] for s in by_key.json()["items"]] == [completed]
    assert (too_old.code, too_old.out.strip()) == (0, "no sagas match")
    assert bad_since.code == 2
    assert "use an age (30m, 1h, 2d, 1w) or an ISO time" in bad_since.err

    assert first_page.code == 0, first_page.err
    assert first_page.out.splitlines()[1].split()[0] == compensated
    more = first_page.out.splitlines()[-1]
    assert more.startswith("more: --cursor ")
    cursor = more.removeprefix("more: --cursor ")
    next_page = await saga(
        "list", "-s", "completed", "-s", "compensated", "--since", "1h", "--cursor", cursor,
        "--json", url=stack.url,
    )  # fmt: skip
    assert [s["saga_id"] for s in next_page.json()["items"]] == [completed]
    assert next_page.json()["next_cursor"] is None

    assert shown.code == 0, shown.err
    assert shown.out.startswith(f"saga {compensated}  trip v1  COMPENSATED")
    assert "root cause: step beta failed: refused  [step beta, error refused]  at " in shown.out
    timeline = shown.out.split("TIME (UTC)")[1].splitlines()[1:]
    undo = [line for line in timeline if "sent alpha.undo to alpha" in line]
    assert len(undo) == 1
    assert undo[0].startswith("<<")
    assert " undo " in undo[0]
    forward = [line for line in timeline if "sent alpha.do to alpha" in line]
    assert not forward[0].startswith("<<")
    assert " do " in forward[0]
    assert " #1 " in forward[0]
    assert any(line.startswith("<<") and "compensated" in line for line in timeline)

    assert by_prefix.code == 0, by_prefix.err
    assert by_prefix.json()["saga_id"] == compensated
    assert by_prefix.json()["history"][0]["kind"] == "started"
    assert not_found.code == 1
    assert f"no saga with id {unknown}" in not_found.err


async def test_show_collapses_a_run_of_retries_and_list_shows_the_step(stack: Stack) -> None:
    """beta's refund fails (retryably) four times, its whole budget: `saga show` prints the
    run as one line and what the saga waits on, `--full` every attempt; `saga list` has the
    step each saga is at."""
    stuck = await stack.start("trip", {"gamma": ["fail"], "beta~undo": ["retry"] * 4})
    held = await stack.start("hold", {"beta": ["silent"]})
    done = await stack.start("trip", {})
    await stack.wait(stuck, ["FAILED"])
    await stack.wait(held, ["RUNNING"], step="beta")
    await stack.wait(done, ["COMPLETED"])

    shown, full, listed, running = await saga_all(
        ("show", stuck), ("show", stuck, "--full"), ("list",), ("show", held), url=stack.url
    )

    assert shown.code == 0, shown.err
    timeline = shown.out.split("TIME (UTC)")[1].splitlines()[1:]
    [run] = [line for line in timeline if " retried " in line]
    assert run.startswith("<<") and " undo " in run and " #1-#4 " in run
    assert "beta.undo \N{MULTIPLICATION SIGN}4, busy, " in run and " apart, last at " in run
    assert not [line for line in timeline if "sent beta.undo" in line]
    assert [line for line in timeline if "needs an operator" in line]  # the outcome stays
    assert "--full shows them all" in shown.out
    lines = shown.out.splitlines()
    [pending] = [line for line in lines if line.startswith("pending: ")]
    assert pending.startswith("pending: beta (undo) beta.undo at beta, attempt 4 of 4, ")
    assert "waits for an operator" in pending and pending.endswith("last error: busy")
    assert "actions: retry, resolve" in lines

    assert full.code == 0, full.err
    every = full.out.split("TIME (UTC)")[1].splitlines()[1:]
    assert len([line for line in every if "sent beta.undo to beta" in line]) == 4
    assert not [line for line in every if " retried " in line]

    assert running.code == 0, running.err
    [pending] = [line for line in running.out.splitlines() if line.startswith("pending: ")]
    assert pending.startswith("pending: beta (do) beta.do at beta, attempt 1 of 1, ")
    assert "reply due by " in pending
    assert "actions: abort" in running.out.splitlines()

    assert listed.code == 0, listed.err
    header, *rows = listed.out.splitlines()
    assert header.split()[:6] == ["SAGA", "ID", "NAME", "STATUS", "STEP", "CREATED"]
    steps = {row.split()[0]: row.split()[4] for row in rows}
    assert steps == {stuck: "beta", held: "beta", done: "-"}


async def test_show_and_definitions_speak_the_saga_language(harness: Harness) -> None:
    """The fanout saga (tests.support.fanout): `saga definitions` numbers a parallel group's
    members as one place (3a., 3b.), marks the conditional step and states the deadline and
    the compensation policy; `saga show` names both members in flight, the skipped step, the
    time left to the deadline, and every stuck compensation of a saga FAILED under the
    continue policy."""
    service = await start_admin_service(harness, fanout.registry())
    await harness.start_responder()
    url = f"http://127.0.0.1:{service.settings.admin_port}"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=15) as client:
        stack = Stack(harness, service, url, client)
        held = await stack.start("fanout", {"hotel": ["silent"], "flight": ["silent"]})
        stuck = await stack.start(
            "fanout", {"confirm": ["fail"], "hotel~undo": ["fail"], "flight~undo": ["fail"]}
        )
        # the group's members are sent together: at hotel, both are in flight
        await stack.wait(held, ["RUNNING"], step="hotel")
        await stack.wait(stuck, ["FAILED"])
        page = (await client.get("/api/sagas", params={"status": "RUNNING"})).json()
        [item] = [i for i in page["items"] if i["saga_id"] == held]
        assert (item["at_step"], item["at_steps"]) == ("hotel+flight", ["hotel", "flight"])

    defs, running, failed, listed = await saga_all(
        ("definitions",), ("show", held), ("show", stuck), ("list",), url=url
    )

    assert listed.code == 0, listed.err
    steps = {row.split()[0]: row.split()[4] for row in listed.out.splitlines()[1:]}
    assert steps == {held: "hotel+flight", stuck: "flight"}

    assert defs.code == 0, defs.err
    lines = defs.out.splitlines()
    assert lines[0] == "fanout v1"
    assert lines[1].startswith("  deadline: 10m; on compensation failure: continue (")
    rows = {line.split()[1]: line.split()[:3] for line in lines[3:]}
    assert rows == {
        "reserve": ["1.", "reserve", "-"],
        "gift": ["2.", "gift", "if"],
        "hotel": ["3a.", "hotel", "parallel"],
        "flight": ["3b.", "flight", "parallel"],
        "confirm": ["4.", "confirm", "-"],
    }

    assert running.code == 0, running.err
    lines = running.out.splitlines()
    assert "in flight: hotel, flight (in parallel)" in lines
    # each member with its own try and its own reply deadline, not only the one due first
    at = lines.index("pending: hotel+flight (do, in parallel)")
    for line, name in zip(lines[at + 1 : at + 3], ["hotel", "flight"], strict=True):
        assert line.startswith(f"  {name}: attempt 1 of 1, last sent "), line
        assert ", reply due by " in line, line
    assert "skipped: gift (condition false: nothing sent or undone)" in lines
    [deadline] = [line for line in lines if line.startswith("deadline: ")]
    assert re.fullmatch(r"deadline: \S+ \S+ \((9|10)m left\)", deadline), deadline
    [gift] = [line for line in lines if line.startswith("gift ")]
    assert gift.split()[:3] == ["gift", "alpha", "SKIPPED"]
    assert any(" step_skipped " in line for line in lines)

    assert failed.code == 0, failed.err
    lines = failed.out.splitlines()
    assert "stuck compensations: flight, hotel (newest first; each needs a retry or a resolve)" in (
        lines
    )
    # the deadline bounds the forward run only: a compensating or FAILED saga has none
    assert not [line for line in lines if line.startswith("deadline: ")]
    assert not [line for line in lines if line.startswith("in flight: ")]


async def test_operator_actions_and_their_exit_status(stack: Stack) -> None:
    stuck = await stack.start("trip", {"gamma": ["fail"], "beta~undo": ["fail"]})
    held = await stack.start("hold", {"beta": ["silent"]})
    pivoted = await stack.start("pivoted", {"gamma": ["fail"]})
    await stack.wait(stuck, ["FAILED"])
    await stack.wait(held, ["RUNNING"], step="beta")
    await stack.wait(pivoted, ["FAILED"])
    url = stack.url

    retried, aborted, *refused = await saga_all(
        ("retry", stuck, "--reason", "ledger fixed"),
        ("abort", held, "-r", "customer cancelled", "--actor", "carol"),
        ("resolve", pivoted, "--reason", "x", "--data", "{bad"),
        ("resolve", pivoted, "--reason", "x", "--data", "[1]"),
        ("resolve", pivoted),
        ("resolve", pivoted, "--reason", "  "),
        url=url,
    )
    assert retried.code == 0, retried.err
    assert retried.out.splitlines()[0] == f"retry: saga {stuck} is now COMPENSATING"
    assert "  operator beta (undo): retry: ledger fixed" in retried.out
    done = await stack.wait(stuck, ["COMPENSATED"])
    assert [h["actor"] for h in done["history"] if h["kind"] == "operator"] == [ACTOR]

    assert aborted.code == 0, aborted.err
    done = await stack.wait(held, ["COMPENSATED"])
    assert [h["actor"] for h in done["history"] if h["kind"] == "operator"] == ["carol"]

    for ran, why in zip(
        refused, ("not JSON", "give a JSON object", "--reason", "reason"), strict=True
    ):
        assert ran.code == 2
        assert why in ran.err
    assert (await stack.saga(pivoted))["status"] == "FAILED"

    again, resolved = await saga_all(
        ("retry", stuck, "--reason", "once more"),
        (
            "resolve",
            pivoted,
            "--reason",
            "shipped by hand",
            "--data",
            '{"tracking": "T-9"}',
            "--json",
        ),
        url=url,
    )
    assert again.code == 1
    assert again.err.strip() == (
        "error: refused: OperatorRetry rejected: only a FAILED saga can be retried; "
        "this one is COMPENSATED"
    )
    assert resolved.code == 0, resolved.err
    assert resolved.json()["saga"]["status"] == "COMPLETED"
    assert (await stack.saga(pivoted))["outputs"]["gamma"] == {"tracking": "T-9"}


async def test_a_retried_saga_shows_its_root_cause_and_its_fix_in_full(stack: Stack) -> None:
    """``saga show`` and ``saga list`` name the first failure and the operator's retry, not
    the compensation failure the retry fixed; the NOTE column uses the terminal's width."""
    stuck = await stack.start("trip", {"gamma": ["fail"], "beta~undo": ["fail"]})
    await stack.wait(stuck, ["FAILED"])
    reason = "beta's ledger fixed by hand after the outage"
    retried = await saga("retry", stuck, "--reason", reason, url=stack.url)
    assert retried.code == 0, retried.err
    await stack.wait(stuck, ["COMPENSATED"])

    shown, wide, narrow = await asyncio.gather(
        saga("show", stuck, url=stack.url),
        saga("list", "--id", stuck, url=stack.url, columns=250),
        saga("list", "--id", stuck, url=stack.url, columns=120),
    )
    assert shown.code == 0, shown.err
    head = shown.out.split("STEP ")[0]
    assert "root cause: step gamma failed: refused  [step gamma, error refused]" in head
    fixed = [line for line in head.splitlines() if line.startswith(f"retried by {ACTOR} at ")]
    assert len(fixed) == 1
    assert fixed[0].endswith(f": {reason}")
    assert "compensation of beta failed" not in head  # that was fixed: not why it compensated

    note = f"step gamma failed: refused; retried by {ACTOR}: {reason}"
    assert len(note) > 60
    assert wide.code == 0, wide.err
    assert wide.out.splitlines()[1].endswith(note)
    assert narrow.code == 0, narrow.err
    row = narrow.out.splitlines()[1]
    assert len(row) <= 120
    assert row.endswith("...")
    cut = row[row.index("step gamma") :].removesuffix("...")
    assert note.startswith(cut)
    assert len(cut) >= 20


async def _saga_on_a_terminal(*args: str, url: str, answer: bytes) -> Ran:
    """``saga`` with its stdin on a pseudo-terminal, typing ``answer`` to its prompt."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGA_")}
    env.update(SAGA_ADMIN_URL=url, SAGA_ACTOR=ACTOR, SAGA_ADMIN_TOKEN=TOKEN, NO_COLOR="1")
    leader, follower = pty.openpty()
    try:
        proc = await asyncio.create_subprocess_exec(
            _saga_script(),
            *args,
            env=env,
            stdin=follower,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        os.write(leader, answer)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        os.close(leader)
        os.close(follower)
    assert proc.returncode is not None
    return Ran(proc.returncode, out.decode(), err.decode())


async def test_batch_dry_run_confirmation_and_summary(stack: Stack) -> None:
    stuck = [await stack.start("trip", {"gamma": ["fail"], "beta~undo": ["fail"]}) for _ in "ab"]
    held = await stack.start("hold", {"beta": ["silent"]})
    pivoted = await stack.start("pivoted", {"gamma": ["fail"]})
    for saga_id in [*stuck, pivoted]:
        await stack.wait(saga_id, ["FAILED"])
    await stack.wait(held, ["RUNNING"], step="beta")
    before = {i: (await stack.saga(i))["history"] for i in [*stuck, held, pivoted]}

    # the dry run lists them and changes nothing; without --yes and a TTY nothing is done
    dry, no_tty, no_filter = await saga_all(
        ("batch", "retry", "--name", "trip", "--status", "failed", "--dry-run"),
        ("batch", "retry", "--name", "trip", "--status", "failed", "-r", "gateway back"),
        ("batch", "abort", "-r", "everything", "--yes"),
        url=stack.url,
    )
    assert dry.code == 0, dry.err
    assert dry.out.splitlines()[0] == "retry: 2 sagas match: 2 accept it, 0 would be skipped"
    assert all(any(line.startswith(i) for line in dry.out.splitlines()) for i in stuck)
    assert "step gamma failed: refused" in dry.out
    assert no_tty.code == 2
    assert "refusing to retry sagas without a terminal" in no_tty.err
    assert "--yes" in no_tty.err
    assert no_filter.code == 2
    assert "give filters" in no_filter.err
    assert {i: (await stack.saga(i))["history"] for i in before} == before

    retried = await saga(
        "batch", "retry", "--name", "trip", "-s", "failed", "-r", "gateway back", "--yes",
        url=stack.url,
    )  # fmt: skip
    assert retried.code == 0, retried.err
    assert retried.out.splitlines()[-1] == "retry: 2/2 done (applied 2, skipped 0, failed 0)"
    for saga_id in stuck:
        done = await stack.wait(saga_id, ["COMPENSATED"])
        operators = [(h["actor"], h["detail"]) for h in done["history"] if h["kind"] == "operator"]
        assert operators == [(ACTOR, "retry: gateway back")]

    # on a terminal it asks; the FAILED saga past its pivot is skipped with the engine's reason
    aborted = await _saga_on_a_terminal(
        "batch", "abort", "-s", "running", "-s", "failed", "-r", "stop them",
        url=stack.url,
        answer=b"y\n",
    )  # fmt: skip
    assert aborted.code == 0, aborted.err
    assert "abort these 2 sagas? [y/N] " in aborted.err
    lines = aborted.out.splitlines()
    assert lines[0] == "abort: 2 sagas match: 1 accept it, 1 would be skipped"
    assert "abort: 2/2 done (applied 1, skipped 1, failed 0)" in lines, aborted.out
    assert f"  skipped {pivoted} (pivoted): OperatorAbort rejected: " in aborted.out
    await stack.wait(held, ["COMPENSATED"])
    assert (await stack.saga(pivoted))["history"] == before[pivoted]


async def test_errors_name_the_cause(stack: Stack) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    wrong, no_token, unreachable, elsewhere = await asyncio.gather(
        saga("list", url=stack.url, token="wrong-token-0123456789"),
        saga("list", url=stack.url, token=None),
        saga("definitions", url=nowhere),
        # --url wins over SAGA_ADMIN_URL; a path that is not the API says so
        saga("show", "--url", f"{stack.url}/elsewhere", "0" * 32, url=nowhere),
    )
    assert wrong.code == 2
    assert "forbidden: wrong token" in wrong.err
    assert no_token.code == 2
    assert "no admin token: set SAGA_ADMIN_TOKEN" in no_token.err
    assert unreachable.code == 2
    assert f"cannot connect to the admin API at {nowhere}" in unreachable.err
    assert "SAGA_ADMIN_PORT" in unreachable.err
    assert elsewhere.code == 2
    assert "Not Found" in elsewhere.err
    assert "the admin API?" in elsewhere.err


@pytest.mark.parametrize(
    "command",
    [
        "list",
        "show",
        "retry",
        "abort",
        "resolve",
        "definitions",
        "batch retry",
        "batch abort",
        "batch resolve",
    ],
)
def test_every_command_has_help(command: str) -> None:
    """In-process (the console script runs the same app): help needs no server."""
    ran = CliRunner().invoke(cli.app, [*command.split(), "--help"], env={"COLUMNS": "200"})
    assert ran.exit_code == 0, ran.output
    assert "--url" in ran.output
    assert "SAGA_ADMIN_TOKEN" in ran.output


@pytest.mark.parametrize(
    "command",
    [
        "",
        "run",
        "migrate",
        "list",
        "show",
        "retry",
        "resolve",
        "definitions",
        "schema export",
        "batch",
        "batch abort",
        "dlq",
        "dlq list",
        "bench",
        "chaos",
        "chaos run",
    ],
)
def test_help_shows_no_value_type_beside_a_flag(command: str) -> None:
    """A flag takes no value: `--json <bool>` or `--help <bool>` would read as if it did; the
    commands that plugins add (bench, chaos) included."""
    cli._add_plugins()
    ran = CliRunner().invoke(cli.app, [*command.split(), "--help"], env={"COLUMNS": "200"})
    assert ran.exit_code == 0, ran.output
    assert "<bool>" not in ran.output
    flags = [line for line in ran.output.splitlines() if "--help" in line]
    assert len(flags) == 1
    assert re.search(r"--help\s+Show this message and exit", flags[0]), flags[0]
    if command in ("list", "show", "definitions"):
        json_flag = next(line for line in ran.output.splitlines() if "--json" in line)
        assert re.search(r"--json\s+Print the API's JSON answer", json_flag), json_flag


async def test_saga_run_serves_the_admin_api_and_stops_on_sigterm(
    tmp_path: Path, unique: str
) -> None:
    """The real ``saga run`` process with SAGA_ADMIN_PORT set, and the CLI against it."""
    rabbitmq_url = require_rabbitmq()
    prefix = f"adm-run-{unique}"
    port = free_port()
    env = orchestrator_env(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'saga.db'}",
        rabbitmq_url=rabbitmq_url,
        prefix=prefix,
    )
    env.update(SAGA_ADMIN_PORT=str(port), SAGA_ADMIN_TOKEN=TOKEN)
    processes = Processes(tmp_path)
    try:
        orchestrator = processes.spawn("orchestrator", ["-m", "saga", "run", "--migrate"], env)
        await wait_output(orchestrator, "orchestrator_started", within=30)
        url = f"http://127.0.0.1:{port}"
        ran = await saga("definitions", url=url)
        assert ran.code == 0, ran.err
        assert "trip v1" in ran.out
        ran = await saga("list", url=url)
        assert (ran.code, ran.out.strip()) == (0, "no sagas match")

        orchestrator.popen.send_signal(signal.SIGTERM)
        assert await wait_exit(orchestrator, within=20) == 0, orchestrator.describe()
        assert "orchestrator_stopped" in orchestrator.output()
        ran = await saga("list", url=url)
        assert ran.code == 2
        assert "cannot connect" in ran.err
    finally:
        processes.stop_all()
        await delete_topology(rabbitmq_url, prefix)
