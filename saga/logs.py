"""structlog set-up: JSON lines when not on a terminal, readable lines on one."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Mapping, MutableMapping
from contextvars import ContextVar, Token
from typing import Any, TypeVar

import structlog

from saga.secrets import redact_event
from saga.telemetry import trace_ids

__all__ = ["bind_message", "configure_logging", "unbind_message"]

M = TypeVar("M")
_Fields = tuple[Callable[[Any], Mapping[str, Any]], Any]

#: the message being handled and how to describe it, for the lines logged meanwhile
_message: ContextVar[_Fields | None] = ContextVar("saga_log_message", default=None)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a line is logged, not when it was set up (a
    test runner swaps and closes its capture streams)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


class _CurrentStderr:
    """``sys.stderr`` as it is when a line is written, for structlog's own lines (as above)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


#: libraries whose log lines repeat, raw and with tracebacks, what the link already logs as
#: one structured event (amqp_connection_lost, amqp_connect_failed, ...)
QUIET_LIBRARIES = ("aiormq", "aio_pika")


class _QuietLibraries(logging.Filter):
    """Keeps the AMQP libraries' own lines out unless the level is DEBUG: a reset connection
    would otherwise print their traceback next to our one-line event, and before the one-line
    error of a process that cannot start. Their Python warnings too (``py.warnings``): aio-pika
    closes a connection dropped unclosed from ``__del__``, and when that runs outside the loop
    the coroutine it made is never awaited, which Python reports as a RuntimeWarning."""

    def __init__(self, verbose: bool):
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if self.verbose:
            return True
        if record.name == "py.warnings":
            text = record.getMessage()
            return not any(f"/{library}/" in text for library in QUIET_LIBRARIES)
        return not record.name.startswith(QUIET_LIBRARIES)


def add_trace_ids(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """The current span's trace and span ids, so a log line leads to its trace (lines about a
    saga's committed steps name their attempt's span themselves)."""
    if "trace_id" not in event:
        event.update(trace_ids())
    return event


def bind_message(fields: Callable[[M], Mapping[str, Any]], message: M) -> Token[_Fields | None]:
    """Every line logged in this context (and the tasks it starts) until :func:`unbind_message`
    carries ``fields(message)``. The fields are built only when a line is logged: most messages
    log nothing, and binding them one by one (structlog's ``bound_contextvars``) would cost a
    context variable per field per message."""
    return _message.set((fields, message))


def unbind_message(token: Token[_Fields | None]) -> None:
    _message.reset(token)


def add_message_fields(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """The fields of the message being handled (:func:`bind_message`); a line's own win."""
    bound = _message.get()
    if bound is not None:
        for key, value in bound[0](bound[1]).items():
            event.setdefault(key, value)
    return event


def configure_logging(level: str | None = None) -> None:
    """Our structlog lines and the stdlib's (aio-pika, SQLAlchemy) share one pipeline, whose
    last step before rendering masks URL passwords (see saga.secrets)."""
    name = (level or os.environ.get("SAGA_LOG_LEVEL", "INFO")).upper()
    numeric = getattr(logging, name, logging.INFO)
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer()
        if sys.stderr.isatty()
        else structlog.processors.JSONRenderer()
    )
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        add_message_fields,
        add_trace_ids,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, redact_event, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
    handler = _StderrHandler()
    handler.addFilter(_QuietLibraries(numeric <= logging.DEBUG))
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                redact_event,
                renderer,
            ],
        )
    )
    # warnings become log lines, through the same pipeline; off and on again, so that the
    # capture is ours even if something (a test runner) replaced warnings.showwarning since
    logging.captureWarnings(False)
    logging.captureWarnings(True)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.WARNING))
