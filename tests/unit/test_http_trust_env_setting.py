"""TRIO_IDLE_HTTP_TRUST_ENV: off unless asked for; a boolean with one-line errors."""

from __future__ import annotations

import pytest

from trio_idle.core.config import ConfigError, parse_settings
from trio_idle.core.values import parse_bool

BASE_ENV = {
    "ADMIN_SECRET": "adm1n-s3cret-VALUE",
    "ENCRYPTION_KEY": "0123456789abcdef0123456789abcdef-key",
    "DATABASE_URL": "postgresql://app:pw@db.internal:5432/mail",
}


def test_proxies_from_the_environment_are_off_by_default() -> None:
    assert parse_settings(BASE_ENV).webhook.http_trust_env is False


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("true", True),
        ("TRUE", True),
        (" yes ", True),
        ("1", True),
        ("false", False),
        ("No", False),
        ("0", False),
    ],
)
def test_parse_bool(text: str, value: bool) -> None:
    assert parse_bool(text) is value
    s = parse_settings({**BASE_ENV, "TRIO_IDLE_HTTP_TRUST_ENV": text})
    assert s.webhook.http_trust_env is value


@pytest.mark.parametrize("text", ["maybe", "on", "2", "tru", "-1"])
def test_parse_bool_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="expected true or false"):
        parse_bool(text)


def test_a_bad_value_names_the_variable() -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings({**BASE_ENV, "TRIO_IDLE_HTTP_TRUST_ENV": "maybe"})
    assert str(info.value) == (
        "TRIO_IDLE_HTTP_TRUST_ENV: expected true or false (also 1/0, yes/no), got 'maybe'"
    )


def test_the_flag_wins_over_the_environment() -> None:
    environ = {**BASE_ENV, "TRIO_IDLE_HTTP_TRUST_ENV": "false"}
    assert parse_settings(environ, {"http_trust_env": "true"}).webhook.http_trust_env is True
    with pytest.raises(ConfigError, match=r"^--http-trust-env: "):
        parse_settings(environ, {"http_trust_env": "sometimes"})
