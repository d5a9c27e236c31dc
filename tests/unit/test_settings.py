import pytest

from saga.core.errors import ConfigError
from saga.orchestrator.loader import load_registry
from saga.settings import load_settings


def test_defaults_are_sqlite_and_local_rabbitmq(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("SAGA_DATABASE_URL", "SAGA_RABBITMQ_URL", "SAGA_PREFETCH"):
        monkeypatch.delenv(var, raising=False)
    s = load_settings()
    assert s.is_sqlite and s.database_url.startswith("sqlite+aiosqlite:///")
    assert s.rabbitmq_url.startswith("amqp://")


def test_bad_values_name_the_variable_and_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGA_PREFETCH", "0")
    monkeypatch.setenv("SAGA_DATABASE_URL", "mysql://x")
    with pytest.raises(ConfigError) as info:
        load_settings()
    text = str(info.value)
    assert "SAGA_PREFETCH: Input should be greater than or equal to 1" in text
    assert "SAGA_DATABASE_URL" in text and "postgresql+asyncpg://" in text


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("nocolon", "expected module:attribute"),
        ("no_such_module_xyz:registry", "cannot import 'no_such_module_xyz'"),
        ("tests.support.sagas:missing", "has no attribute 'missing'"),
        ("tests.support.sagas:PARTICIPANTS", "is not a saga.Registry"),
    ],
)
def test_definitions_path_errors_are_clear(path: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_registry(path)


def test_definitions_path_accepts_a_factory() -> None:
    assert load_registry("tests.support.sagas:registry").names() == ["trip"]
