"""``SAGA_RABBITMQ_URL`` as a list of cluster nodes: accepted, split, rejected, redacted.

No broker needed: settings validation, the split, the redaction of every URL of a list in
reprs, errors and log lines, and the error when no node of a list answers.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import structlog

from saga.core.errors import ConfigError
from saga.logs import configure_logging
from saga.participant.settings import ParticipantSettings, load_participant_settings
from saga.secrets import redact, redact_url
from saga.settings import AmqpSettings, Settings, load_settings
from saga.transport.amqp import broker_urls, connect, connect_once
from saga.transport.link import Link
from saga_tools.chaos.node import free_port

SECRET = "Sw0rdfish-9"
OTHER = "Hunter-22"
THREE = (
    f"amqp://app:{SECRET}@rabbit-1:5672/shop,"
    f"amqp://app:{SECRET}@rabbit-2:5672/shop, "
    f"amqp://app:{OTHER}@rabbit-3/shop"
)


# --- accepted and split ----------------------------------------------------------------


@pytest.mark.parametrize("cls", [AmqpSettings, Settings, ParticipantSettings])
def test_a_list_of_nodes_is_accepted_as_it_is(cls: type[AmqpSettings]) -> None:
    settings = cls(rabbitmq_url=THREE)
    assert settings.rabbitmq_url == THREE  # connect() splits it; nothing else changes
    assert broker_urls(settings.rabbitmq_url) == [
        f"amqp://app:{SECRET}@rabbit-1:5672/shop",
        f"amqp://app:{SECRET}@rabbit-2:5672/shop",
        f"amqp://app:{OTHER}@rabbit-3/shop",
    ]


def test_one_url_stays_one_url_even_with_a_comma_in_its_password() -> None:
    assert broker_urls("amqp://guest:guest@127.0.0.1:5672/") == [
        "amqp://guest:guest@127.0.0.1:5672/"
    ]
    assert broker_urls("amqp://u:pa,ss@h/") == ["amqp://u:pa,ss@h/"]
    assert broker_urls("amqp://u:pa,ss@h1/,amqp://u:pa,ss@h2/") == [
        "amqp://u:pa,ss@h1/",
        "amqp://u:pa,ss@h2/",
    ]


def test_tls_files_need_every_node_on_amqps(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not checked here")
    both = "amqps://u:p@h1:5671/,amqps://u:p@h2:5671/"
    assert AmqpSettings(rabbitmq_url=both, rabbitmq_ca_file=ca).tls.ca_file == ca
    with pytest.raises(ValueError, match="not amqps://"):
        AmqpSettings(rabbitmq_url="amqp://h1/,amqp://h2/", rabbitmq_ca_file=ca)


# --- rejected, naming the bad entry without its password ---------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            f"amqp://app:{SECRET}@h1/,http://app:{SECRET}@h2/",
            "entry 2 of 2 (http://app:***@h2/): use amqp://",
        ),
        (
            f"amqp://app:{SECRET}@h1/,h2:5672",
            "amqp://app:***@h1/,h2:5672: a comma that does not start another amqp:// URL",
        ),
        (f"amqp://app:{SECRET}@h1/,", "amqp://app:***@h1/,: a comma that does not start"),
        (
            f"amqp://app:{SECRET}@h1/,amqp://app:{SECRET}@h2:99999/,amqp://h3/",
            "entry 2 of 3 (amqp://app:***@h2:99999/): needs a host, and a port (if any) from 1",
        ),
        (f"amqp://app:{SECRET}@h1/,amqp:///", "entry 2 of 2 (amqp:///): needs a host"),
        (
            f"amqp://app:{SECRET}@h1/,amqps://app:{SECRET}@h2/",
            "amqp://app:***@h1/,amqps://app:***@h2/ mixes amqp:// and amqps://",
        ),
        (f"redis://app:{SECRET}@h1/", "redis://app:***@h1/: use amqp://user:password@host"),
        ("", "empty: use amqp://user:password@host"),
    ],
)
def test_a_bad_entry_is_named_without_its_password(value: str, expected: str) -> None:
    for load in (load_settings, load_participant_settings):
        with pytest.raises(ConfigError) as caught:
            load(rabbitmq_url=value)
        message = str(caught.value)
        assert f"SAGA_RABBITMQ_URL: {expected}" in message, message
        assert SECRET not in message
    with pytest.raises(ValueError) as direct:  # a bare ValidationError leaves the input out
        AmqpSettings(rabbitmq_url=value)
    assert SECRET not in str(direct.value)


# --- redacted everywhere -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            THREE,
            "amqp://app:***@rabbit-1:5672/shop,amqp://app:***@rabbit-2:5672/shop, "
            "amqp://app:***@rabbit-3/shop",
        ),
        # a node without a password but with a port does not swallow the next node's URL
        ("amqp://h1:5672/,amqp://u:pw@h2/", "amqp://h1:5672/,amqp://u:***@h2/"),
        ("amqp://h1,amqp://u:pw@h2:5672/v", "amqp://h1,amqp://u:***@h2:5672/v"),
        ("amqp://u:pa,ss@h1/,amqp://u:pa,ss@h2/", "amqp://u:***@h1/,amqp://u:***@h2/"),
        (
            "at amqp://a:one@h1/,amqp://b:two@h2/: refused",
            "at amqp://a:***@h1/,amqp://b:***@h2/: refused",
        ),
    ],
)
def test_every_url_of_a_list_is_redacted(text: str, expected: str) -> None:
    assert redact(text) == expected
    assert redact_url(text) == expected


@pytest.mark.parametrize("cls", [AmqpSettings, Settings, ParticipantSettings])
def test_reprs_hide_every_password_of_the_list(cls: type[AmqpSettings]) -> None:
    settings = cls(rabbitmq_url=THREE)
    for text in (repr(settings), str(settings)):
        assert SECRET not in text and OTHER not in text
        assert text.count("app:***@") == 3


def test_log_lines_hide_every_password_of_the_list(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO")
    try:
        structlog.get_logger("t").info("connecting", url=THREE)
        logging.getLogger("sqlalchemy.pool").warning('Connection attempt to "%s" failed', THREE)
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    err = capsys.readouterr().err
    assert "connecting" in err and "Connection attempt" in err
    assert SECRET not in err and OTHER not in err


async def test_the_link_shows_its_node_without_the_password() -> None:
    link = Link(broker_urls(THREE))
    assert link.node == "amqp://app:***@rabbit-1:5672/shop"
    assert link.port == 5672 and SECRET not in link.node


async def test_no_reachable_node_is_one_error_naming_each_without_passwords() -> None:
    closed = [free_port(), free_port()]
    value = ",".join(f"amqp://app:{SECRET}@127.0.0.1:{p}/" for p in closed)
    for open_connection in (connect, connect_once):
        with pytest.raises(ConfigError) as caught:
            await open_connection(value, connect_timeout=2)
        message = str(caught.value)
        assert message.startswith(f"cannot reach RabbitMQ at amqp://app:***@127.0.0.1:{closed[0]}/")
        for port in closed:
            assert f"amqp://app:***@127.0.0.1:{port}/: " in message
        assert SECRET not in message


async def test_a_bad_list_given_to_connect_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"SAGA_RABBITMQ_URL: .*mixes amqp:// and amqps://"):
        await connect("amqp://h1/,amqps://h2/")
