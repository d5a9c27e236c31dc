"""The README's Python blocks are run, so the first example a user copies works (a ```py block
is a sketch of a larger program: examples/trip has it whole, and a test runs that)."""

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_python_blocks_run() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {"__name__": "readme"})


def test_the_readme_example_runs_quietly_in_a_fresh_interpreter() -> None:
    """The harness keeps the orchestrator's info lines out of a user's test output: the first
    example prints nothing at all (it used to print a log line per transition)."""
    [block, *_] = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    done = subprocess.run(
        [sys.executable, "-c", block], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == "", (done.stdout + done.stderr)[:2000]
