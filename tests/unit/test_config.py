"""Configuration parsing: defaults, precedence, durations and one-line errors."""

from __future__ import annotations

import pytest

from trio_idle.core.config import ConfigError, Settings, parse_settings
from trio_idle.core.values import parse_duration

ADMIN = "adm1n-s3cret-VALUE"
KEY = "0123456789abcdef0123456789abcdef-key"  # 36 chars
DB_PASSWORD = "db-pa55w0rd-XYZ"
DB_URL = f"postgresql://app:{DB_PASSWORD}@db.internal:5432/mail"

BASE_ENV: dict[str, str] = {
    "ADMIN_SECRET": ADMIN,
    "ENCRYPTION_KEY": KEY,
    "DATABASE_URL": DB_URL,
}


def env(**extra: str) -> dict[str, str]:
    return {**BASE_ENV, **extra}


def config_error(environ: dict[str, str], overrides: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        parse_settings(environ, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


# -- defaults -----------------------------------------------------------------------


def test_defaults_match_the_documented_values() -> None:
    s = parse_settings(BASE_ENV)
    assert s.timers.refresh_interval == 300.0
    assert s.timers.idle_renew_interval == 25 * 60
    assert s.timers.tick_interval == 120.0
    assert s.webhook.backend_url == "http://127.0.0.1:3016"
    assert s.webhook.scan_url == "http://127.0.0.1:3016/api/mail/scan-internal"
    assert s.backoff.backoff_initial == 5.0
    assert s.backoff.backoff_max == 300.0
    assert s.imap.mailbox == "INBOX"
    assert s.connections.source == "postgres"
    assert s.webhook.admin_secret.reveal() == ADMIN
    assert s.connections.database_url is not None and s.connections.database_url.reveal() == DB_URL


def test_production_switches_the_default_backend_port_to_3015() -> None:
    s = parse_settings(env(NODE_ENV="production"))
    assert s.webhook.backend_url == "http://127.0.0.1:3015"


def test_other_node_env_keeps_port_3016() -> None:
    assert parse_settings(env(NODE_ENV="staging")).webhook.backend_url == "http://127.0.0.1:3016"


def test_explicit_backend_url_wins_over_node_env() -> None:
    s = parse_settings(env(NODE_ENV="production", BACKEND_URL="https://api.example.com:8443/"))
    assert s.webhook.backend_url == "https://api.example.com:8443"
    assert s.webhook.scan_url == "https://api.example.com:8443/api/mail/scan-internal"


# -- precedence ---------------------------------------------------------------------


def test_environment_beats_default() -> None:
    assert parse_settings(env(TRIO_IDLE_TICK_INTERVAL="30s")).timers.tick_interval == 30.0


def test_cli_override_beats_environment() -> None:
    s = parse_settings(
        env(TRIO_IDLE_TICK_INTERVAL="30s", BACKEND_URL="http://env-host:1"),
        {"tick_interval": "45s", "backend_url": "http://flag-host:2"},
    )
    assert s.timers.tick_interval == 45.0
    assert s.webhook.backend_url == "http://flag-host:2"


def test_empty_environment_value_counts_as_unset() -> None:
    assert parse_settings(env(TRIO_IDLE_TICK_INTERVAL="")).timers.tick_interval == 120.0


def test_file_source_needs_no_database_url() -> None:
    environ = {"ADMIN_SECRET": ADMIN, "ENCRYPTION_KEY": KEY}
    s = parse_settings(environ, {"source": "file", "connections_file": "/etc/conns.toml"})
    assert s.connections.source == "file"
    assert s.connections.connections_file == "/etc/conns.toml"
    assert s.connections.database_url is None


def test_sha256_derivation_accepts_a_short_key() -> None:
    s = parse_settings(env(ENCRYPTION_KEY="short", TRIO_IDLE_KEY_DERIVATION="sha256"))
    assert s.connections.key_derivation == "sha256"


# -- durations ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("120", 120.0),
        ("2m", 120.0),
        ("25min", 1500.0),
        ("500ms", 0.5),
        ("1.5h", 5400.0),
        ("30s", 30.0),
        (" 45 sec ", 45.0),
        ("2M", 120.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["-5", "0", "0ms", "abc", "5 days", "", "1,5h"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="positive duration"):
        parse_duration(text)


def test_duration_env_var_goes_through_parse_duration() -> None:
    s = parse_settings(env(TRIO_IDLE_IDLE_RENEW="25min", TRIO_IDLE_CONNECT_TIMEOUT="500ms"))
    assert s.timers.idle_renew_interval == 1500.0
    assert s.timers.connect_timeout == 0.5


# -- errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "name", "expected"),
    [
        ({"ENCRYPTION_KEY": "x" * 31}, "ENCRYPTION_KEY", "at least 32 characters"),
        ({"BACKEND_URL": "ftp://x"}, "BACKEND_URL", "http:// or https://"),
        ({"BACKEND_URL": "http://"}, "BACKEND_URL", "with a host"),
        ({"BACKEND_URL": "http://h:notaport"}, "BACKEND_URL", "numeric port"),
        ({"TRIO_IDLE_TICK_INTERVAL": "-5"}, "TRIO_IDLE_TICK_INTERVAL", "positive duration"),
        ({"TRIO_IDLE_REFRESH_INTERVAL": "0"}, "TRIO_IDLE_REFRESH_INTERVAL", "positive duration"),
        (
            {"TRIO_IDLE_CONNECT_CONCURRENCY": "2.5"},
            "TRIO_IDLE_CONNECT_CONCURRENCY",
            "positive integer",
        ),
        (
            {"TRIO_IDLE_CONNECT_CONCURRENCY": "many"},
            "TRIO_IDLE_CONNECT_CONCURRENCY",
            "positive integer",
        ),
        (
            {"TRIO_IDLE_KEY_DERIVATION": "md5"},
            "TRIO_IDLE_KEY_DERIVATION",
            "expected one of utf8-prefix, sha256",
        ),
        (
            {"TRIO_IDLE_BACKOFF_INITIAL": "10m"},
            "TRIO_IDLE_BACKOFF_INITIAL",
            "must not exceed TRIO_IDLE_BACKOFF_MAX",
        ),
        ({"TRIO_IDLE_CONNECT_RATE": "0"}, "TRIO_IDLE_CONNECT_RATE", "positive number"),
        ({"TRIO_IDLE_SCAN_PATH": "api/scan"}, "TRIO_IDLE_SCAN_PATH", "starting with '/'"),
        ({"TRIO_IDLE_LOG_LEVEL": "loud"}, "TRIO_IDLE_LOG_LEVEL", "expected one of"),
    ],
)
def test_bad_value_names_the_variable_and_what_was_expected(
    extra: dict[str, str], name: str, expected: str
) -> None:
    message = config_error(env(**extra))
    assert message.startswith(f"{name}: ")
    assert expected in message


@pytest.mark.parametrize("missing", ["ADMIN_SECRET", "ENCRYPTION_KEY", "DATABASE_URL"])
def test_missing_required_variable(missing: str) -> None:
    environ = dict(BASE_ENV)
    del environ[missing]
    message = config_error(environ)
    assert message.startswith(f"{missing}: ")
    assert "required" in message


def test_missing_connections_file_for_file_source() -> None:
    message = config_error(env(TRIO_IDLE_SOURCE="file"))
    assert message.startswith("TRIO_IDLE_CONNECTIONS_FILE: ")
    assert "required" in message
    assert "--connections-file" in message


def test_error_in_cli_override_names_the_flag() -> None:
    message = config_error(BASE_ENV, {"tick_interval": "soon"})
    assert message.startswith("--tick-interval: ")
    assert "'soon'" in message


def test_backend_url_with_out_of_range_port() -> None:
    assert config_error(env(BACKEND_URL="http://h:70000")).startswith("BACKEND_URL: ")


def test_short_encryption_key_error_does_not_echo_the_key() -> None:
    key = "tooShortKey-9f8e7d"
    message = config_error(env(ENCRYPTION_KEY=key))
    assert key not in message
    assert f"got {len(key)}" in message


def test_database_url_with_bad_scheme_does_not_echo_the_url() -> None:
    url = f"mysql://app:{DB_PASSWORD}@db.internal/mail"
    message = config_error(env(DATABASE_URL=url))
    assert message.startswith("DATABASE_URL: ")
    assert "postgresql://" in message  # says what was expected
    assert DB_PASSWORD not in message
    assert "db.internal" not in message


def test_settings_repr_contains_no_secret() -> None:
    s = parse_settings(env(TRIO_IDLE_SIGNING_SECRET="s1gning-S3CRET"))
    text = repr(s) + str(s)
    for secret in (ADMIN, KEY, DB_PASSWORD, DB_URL, "s1gning-S3CRET"):
        assert secret not in text
    assert "Secret('********')" in text


def test_settings_is_frozen() -> None:
    s = Settings()
    with pytest.raises(AttributeError):
        s.timers.tick_interval = 1.0  # type: ignore[misc]
