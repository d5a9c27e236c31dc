"""The public surface is pinned: a rename or a removal is a decision, made here, not an accident.

Each public module says what it exports in ``__all__``; everything else is internal. The names
below are what docs/ and the README use; the test fails when a module gains or loses one.
"""

from __future__ import annotations

import importlib
import inspect

import pytest

PUBLIC = {
    "saga": [
        "JSON",
        "Command",
        "CompensationPolicy",
        "ConcurrencyError",
        "ConfigError",
        "DefinitionError",
        "Direction",
        "FieldError",
        "HistoryEntry",
        "HistoryKind",
        "InvalidInputError",
        "MessageError",
        "Parallel",
        "Registry",
        "RetryPolicy",
        "SagaContext",
        "SagaDefinition",
        "SagaError",
        "SagaState",
        "SagaStatus",
        "Step",
        "StepStatus",
        "Transition",
        "UnknownSagaError",
        "__version__",
    ],
    "saga.orchestrator": [
        "Orchestrator",
        "OrchestratorService",
        "Outcome",
        "Result",
        "Settings",
        "load_registry",
        "load_settings",
    ],
    "saga.participant": [
        "ALREADY_COMPENSATED",
        "BusinessError",
        "Handler",
        "Ledger",
        "Participant",
        "ParticipantSettings",
        "TransientError",
        "UTCDateTime",
        "load_participant_settings",
    ],
    "saga.protocol": [
        "DEFAULT_MAX_BYTES",
        "SCHEMA_VERSION",
        "CommandEnvelope",
        "CommonFailure",
        "Contract",
        "ContractError",
        "JsonObject",
        "Name",
        "ReasonCode",
        "ReplyEnvelope",
        "StartSaga",
        "Topology",
        "command_id",
        "dump_data",
        "idempotency_key",
        "parse",
        "parse_data",
        "reply_id",
        "saga_id_for_key",
    ],
    "saga.client": ["SagaClient", "StartRefusedError"],
    "saga.testing": ["FakeClock", "Harness", "Reply", "fail", "ok", "silence"],
    "saga.testing.conformance": ["CASES", "Case", "Check", "Target", "render", "run_conformance"],
}


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_the_exported_names_are_exactly_the_pinned_ones(module: str) -> None:
    found = importlib.import_module(module)
    assert sorted(found.__all__) == sorted(PUBLIC[module])


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_every_exported_name_exists_and_classes_and_functions_say_why(module: str) -> None:
    found = importlib.import_module(module)
    assert found.__doc__, f"{module} has no module docstring"
    for name in found.__all__:
        value = getattr(found, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            assert inspect.getdoc(value), f"{module}.{name} has no docstring"
