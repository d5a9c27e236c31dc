import re
from datetime import timedelta

import pytest

from saga import DefinitionError, Registry, RetryPolicy, SagaDefinition, Step, UnknownSagaError


def step(name: str, **kw: object) -> Step:
    kw.setdefault("participant", "svc")
    kw.setdefault("action", f"svc.{name}")
    if "compensation" not in kw and not kw.get("pivot") and kw.get("compensatable", True):
        kw["compensation"] = f"svc.undo-{name}"
    return Step(name, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ([], "at least one step"),
        ([step("a"), step("a")], "step 'a': duplicate step name"),
        ([step("a", participant="nobody")], "step 'a': unknown participant 'nobody'"),
        ([step("a", compensation=None)], "step 'a': compensatable step has no compensation"),
        ([step("a", pivot=True), step("b", pivot=True)], "only one step can be the pivot"),
        ([step("a", pivot=True, compensation="svc.x")], "step 'a': the pivot, a step is never"),
        ([step("a", pivot=True), step("b")], "step 'b': after the pivot"),
        ([step("Bad Name")], "step name 'Bad Name' must match"),
        ([step("a", timeout=timedelta(0))], "step 'a': timeouts must be positive"),
    ],
)
def test_registration_fails_fast_naming_saga_and_step(steps: list[Step], message: str) -> None:
    registry = Registry(participants=["svc"])
    with pytest.raises(DefinitionError, match=re.escape(message)) as info:
        registry.register(SagaDefinition("trip", 3, steps))
    assert str(info.value).startswith("saga 'trip' v3")


def test_valid_shapes_register() -> None:
    registry = Registry(participants=["svc"])
    registry.register(SagaDefinition("a", 1, [step("x"), step("read", compensatable=False)]))
    registry.register(
        SagaDefinition(
            "b",
            1,
            [
                step("x"),
                step("pivot", pivot=True),
                step("after", pivot=False, compensation=None, compensatable=False),
            ],
        )
    )
    assert registry.names() == ["a", "b"]


def test_versions_coexist_and_latest_is_default() -> None:
    registry = Registry()
    v1 = registry.register(SagaDefinition("trip", 1, [step("a")]))
    v2 = registry.register(SagaDefinition("trip", 2, [step("a"), step("b")]))
    assert registry.get("trip") is v2
    assert registry.get("trip", 1) is v1
    with pytest.raises(DefinitionError, match="registered already"):
        registry.register(SagaDefinition("trip", 2, [step("a")]))
    with pytest.raises(UnknownSagaError, match=r"no version 9 \(registered: \[1, 2\]\)"):
        registry.get("trip", 9)
    with pytest.raises(UnknownSagaError, match="no saga named 'nope'"):
        registry.get("nope")


def test_retry_policy_validates_and_computes_bounded_deterministic_backoff() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError, match="jitter"):
        RetryPolicy(jitter=1.5)
    p = RetryPolicy(
        initial_backoff=timedelta(seconds=1),
        multiplier=2,
        max_backoff=timedelta(seconds=5),
        jitter=0.2,
    )
    delays = [p.delay(tries, "saga-1", "step") for tries in range(1, 6)]
    assert delays == [p.delay(tries, "saga-1", "step") for tries in range(1, 6)]
    for tries, d in enumerate(delays, start=1):
        base = min(2 ** (tries - 1), 5)
        assert base * 0.8 <= d.total_seconds() <= base * 1.2
    assert p.delay(1, "saga-1", "step") != p.delay(1, "saga-2", "step")
    assert not p.exhausted(2) and p.exhausted(3)
    assert not RetryPolicy(max_attempts=None).exhausted(10**6)
