"""The publish encoding micro-benchmark runs, on messages both encoders take and agree on.
Never asserts on speed."""

from __future__ import annotations

import pytest

from saga_tools.bench.publish_frames import by_ours, by_pamqp, main, messages


def test_both_encoders_write_the_same_command_bytes(capsys: pytest.CaptureFixture[str]) -> None:
    sample = messages(30)
    assert len(sample[0].body) == 800
    assert by_ours(sample) == by_pamqp(sample)
    main(["--messages", "40", "--rounds", "1"])
    out = capsys.readouterr().out
    assert "µs/message" in out
