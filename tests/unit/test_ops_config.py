"""The supervised-deployment settings: health address, ready share, pings, loop lag."""

from __future__ import annotations

import pytest

from trio_idle.core.config import ConfigError, parse_settings
from trio_idle.core.values import parse_listen_addr

ENV = {
    "ADMIN_SECRET": "adm",
    "ENCRYPTION_KEY": "k" * 40,
    "DATABASE_URL": "postgresql://u:p@127.0.0.1/db",
}


def test_defaults() -> None:
    s = parse_settings(ENV)
    assert s.health.health_addr is None
    assert s.health.ready_share == 0.9
    assert s.health.max_loop_lag == 5.0
    assert s.health.ping_url is None
    assert s.health.ping_interval == 60.0
    assert s.health.ping_fail_suffix == "/fail"


@pytest.mark.parametrize(
    ("text", "addr"),
    [
        ("9310", ("127.0.0.1", 9310)),
        (":9310", ("127.0.0.1", 9310)),
        ("0.0.0.0:9310", ("0.0.0.0", 9310)),
        ("localhost:0", ("localhost", 0)),
        ("[::1]:9310", ("::1", 9310)),
        (" 127.0.0.1:80 ", ("127.0.0.1", 80)),
    ],
)
def test_listen_addr(text: str, addr: tuple[str, int]) -> None:
    assert parse_listen_addr(text) == addr
    assert parse_settings({**ENV, "TRIO_IDLE_HEALTH_ADDR": text}).health.health_addr == addr


@pytest.mark.parametrize("text", ["x", "host:", "70000", "1:2:3", "::1:80", "h:-1"])
def test_bad_listen_addr(text: str) -> None:
    with pytest.raises(ConfigError, match="TRIO_IDLE_HEALTH_ADDR: expected PORT or HOST:PORT"):
        parse_settings({**ENV, "TRIO_IDLE_HEALTH_ADDR": text})


def test_flag_wins() -> None:
    s = parse_settings({**ENV, "TRIO_IDLE_HEALTH_ADDR": "1"}, {"health_addr": "2"})
    assert s.health.health_addr == ("127.0.0.1", 2)


@pytest.mark.parametrize("text", ["1.5", "-0.1", "most"])
def test_ready_share_is_a_fraction(text: str) -> None:
    with pytest.raises(ConfigError, match="TRIO_IDLE_READY_SHARE: expected a number between"):
        parse_settings({**ENV, "TRIO_IDLE_READY_SHARE": text})


def test_ping_url_is_a_secret_never_echoed() -> None:
    url = "https://hc-ping.com/5f2c0d4e-secret-uuid"
    s = parse_settings({**ENV, "TRIO_IDLE_PING_URL": url + "/"})
    assert s.health.ping_url is not None and s.health.ping_url.reveal() == url
    assert "secret-uuid" not in repr(s)
    with pytest.raises(ConfigError) as info:
        parse_settings({**ENV, "TRIO_IDLE_PING_URL": "ftp://hc-ping.com/5f2c-secret-uuid"})
    assert "secret-uuid" not in str(info.value)
    assert str(info.value).startswith("TRIO_IDLE_PING_URL: expected an http")


def test_crypto_commands_need_only_the_key() -> None:
    s = parse_settings(
        {"ENCRYPTION_KEY": "k" * 40}, require=("encryption_key",), require_source=False
    )
    assert s.connections.encryption_key.reveal() == "k" * 40
    with pytest.raises(ConfigError, match="ENCRYPTION_KEY: is required"):
        parse_settings({}, require=("encryption_key",), require_source=False)
