"""A saga that uses the whole saga language, for the dashboard and command-line tests (a
SAGA_DEFINITIONS target): a step, a conditional step, a parallel group, a last step; a deadline
and the ``continue`` compensation policy. The scripted participant (tests.support.responder)
serves it: each saga's input says what every step answers.
"""

from __future__ import annotations

from datetime import timedelta

from saga import Parallel, Registry, RetryPolicy, SagaDefinition, Step
from saga.core.state import SagaContext
from tests.support.sagas import PARTICIPANTS

_once = RetryPolicy(max_attempts=1)
_undo = RetryPolicy(max_attempts=2, initial_backoff=timedelta(milliseconds=50))
#: long enough that a busy machine never times a step out: the script decides
_wait = timedelta(seconds=120)


def wants_gift(ctx: SagaContext) -> bool:
    """The gift step runs only for an order that asks for one."""
    return bool(ctx.input.get("gift"))


def _step(name: str, participant: str, **kw: object) -> Step:
    return Step(
        name,
        participant=participant,
        action=f"{participant}.{name}",
        compensation=f"{participant}.undo_{name}",
        timeout=_wait,
        retry=_once,
        compensation_retry=_undo,
        **kw,  # type: ignore[arg-type]
    )


FANOUT = SagaDefinition(
    "fanout",
    1,
    [
        _step("reserve", "alpha"),
        _step("gift", "alpha", when=wants_gift),
        Parallel(_step("hotel", "beta"), _step("flight", "gamma")),
        Step(
            "confirm",
            participant="gamma",
            action="gamma.confirm",
            timeout=_wait,
            retry=_once,
            compensatable=False,
        ),
    ],
    deadline=timedelta(minutes=10),
    on_compensation_failure="continue",
)


def registry() -> Registry:
    return Registry([FANOUT], participants=PARTICIPANTS)
