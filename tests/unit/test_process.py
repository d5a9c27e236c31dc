"""The process life cycle in one loop: serve()'s start deadline, a signal during start-up, a stop
that overruns, the loop's bounded end, the AMQP libraries' log lines and the broker hints."""

from __future__ import annotations

import asyncio
import gc
import io
import logging
import os
import signal
import sys
import warnings

import aiormq
import pytest

from saga.core.errors import ConfigError
from saga.logs import configure_logging
from saga.loop import GC_THRESHOLD, run
from saga.process import StartError, StopTimeoutError, serve, starting
from saga.transport.link import reach_error


async def test_a_start_past_its_deadline_is_cancelled_closed_and_named() -> None:
    events: list[str] = []

    async def start() -> None:
        starting("declaring the topology", lambda: "the connection was lost")
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            events.append("start cancelled")
            raise

    async def stop() -> None:
        events.append("stopped")

    with pytest.raises(StartError) as caught:
        await serve(start, stop, start_timeout=0.2, stop_timeout=1)
    assert str(caught.value) == (
        "did not start within 0.2s (SAGA_START_TIMEOUT), still declaring the topology "
        "(last failure: the connection was lost)"
    )
    assert events == ["start cancelled", "stopped"]


async def test_sigterm_during_start_cancels_it_and_stops_cleanly() -> None:
    events: list[str] = []

    async def start() -> None:
        starting("connecting")
        asyncio.get_running_loop().call_later(0.1, os.kill, os.getpid(), signal.SIGTERM)
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            events.append("start cancelled")
            raise

    async def stop() -> None:
        events.append("stopped")

    await asyncio.wait_for(serve(start, stop, start_timeout=20, stop_timeout=1), 5)
    assert events == ["start cancelled", "stopped"]


async def test_a_failed_start_is_one_start_error_naming_the_step() -> None:
    async def start() -> None:
        starting("consuming q")
        raise TimeoutError

    async def stop() -> None:
        pass

    with pytest.raises(StartError, match=r"^could not start \(consuming q\): TimeoutError$"):
        await serve(start, stop, start_timeout=5)


async def test_a_config_error_from_start_goes_up_as_it_is() -> None:
    async def start() -> None:
        raise ConfigError("set SAGA_X")

    async def stop() -> None:
        pass

    with pytest.raises(ConfigError, match=r"^set SAGA_X$"):
        await serve(start, stop)


async def test_a_stop_that_overruns_is_abandoned_and_said() -> None:
    async def start() -> None:
        asyncio.get_running_loop().call_later(0.05, os.kill, os.getpid(), signal.SIGTERM)

    async def stop() -> None:
        await asyncio.sleep(30)

    with pytest.raises(StopTimeoutError, match=r"did not stop within 0\.2s \(SAGA_SHUTDOWN"):
        await asyncio.wait_for(serve(start, stop, stop_timeout=0.2), 5)


def test_the_loop_ends_even_when_a_task_swallows_its_cancellation() -> None:
    async def stubborn() -> None:
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                continue  # what a buggy library does

    async def main() -> str:
        asyncio.get_running_loop().create_task(stubborn(), name="stubborn")
        await asyncio.sleep(0)
        return "done"

    import saga.loop  # noqa: PLC0415

    grace, saga.loop.LEFTOVER_GRACE = saga.loop.LEFTOVER_GRACE, 0.2
    try:
        assert run(main()) == "done"
    finally:
        saga.loop.LEFTOVER_GRACE = grace


def test_the_amqp_libraries_lines_show_only_at_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    for level, shown in (("WARNING", False), ("DEBUG", True)):
        stream = io.StringIO()
        monkeypatch.setattr(sys, "stderr", stream)
        monkeypatch.setattr(warnings, "filters", [])  # every warning shown, each time
        monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
        configure_logging(level)
        logging.getLogger("aiormq.connection").warning("Cancelling cause reader exited")
        logging.getLogger("aio_pika.robust_connection").error("error when creating transport")
        logging.getLogger("sqlalchemy.pool").warning("a pool line")
        # what aio-pika's Connection.__del__ leaves when it runs outside the loop
        warnings.warn_explicit(
            "coroutine 'Connection.close' was never awaited",
            RuntimeWarning,
            "/site-packages/aio_pika/connection.py",
            252,
        )
        warnings.warn_explicit("a warning of ours", UserWarning, "/app/saga/x.py", 1)
        text = stream.getvalue()
        assert ("Cancelling cause reader" in text) is shown, text
        assert ("error when creating transport" in text) is shown, text
        assert ("Connection.close' was never awaited" in text) is shown, text
        assert "a pool line" in text
        assert "a warning of ours" in text  # other warnings: a log line, not raw stderr
    configure_logging("INFO")
    logging.captureWarnings(False)


def test_the_broker_error_says_what_to_check_by_how_it_failed() -> None:
    url = "amqp://guest:secret@127.0.0.1:5672/"
    refused = aiormq.exceptions.AMQPConnectionError(111, "Connect call failed")
    login = aiormq.exceptions.ProbableAuthenticationError("ACCESS_REFUSED")
    reset = aiormq.exceptions.AMQPConnectionError("Server connection unexpectedly closed")
    assert "Is it running?" in str(reach_error(url, ["x"], [refused]))
    assert "Is it running?" in str(reach_error(url, ["x"], [TimeoutError()]))
    assert "check the user and password" in str(reach_error(url, ["x"], [login]))
    handshake = str(reach_error(url, ["x"], [reset]))
    assert "did not complete the AMQP handshake" in handshake
    assert "Is it running?" not in handshake
    assert "secret" not in handshake


def test_the_loop_collects_less_often_and_gives_the_threshold_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def threshold() -> int:
        return gc.get_threshold()[0]

    before = gc.get_threshold()
    monkeypatch.delenv("SAGA_GC_THRESHOLD", raising=False)
    assert run(threshold()) == GC_THRESHOLD
    monkeypatch.setenv("SAGA_GC_THRESHOLD", "700")  # CPython's own
    assert run(threshold()) == 700
    assert gc.get_threshold() == before
    for wrong in ("99", "99999999999", "lots"):
        monkeypatch.setenv("SAGA_GC_THRESHOLD", wrong)
        with pytest.raises(ConfigError, match="from 100 to 100000000"):
            run(threshold())
