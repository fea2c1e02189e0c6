"""``trio-idle status`` without a daemon: where it asks, how it judges, what it prints
(tests/reliability/test_status_command.py asks a real one)."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.harness import make_settings
from trio_idle.core.config import ConfigError
from trio_idle.ops.status_client import EXIT_NOT_OK, EXIT_OK, render, status_url, verdict

TOKEN = "st-0123456789abcdef0123"


def _connection(
    conn_id: str, state: str = "idle", health: str | None = "ok", **more: Any
) -> dict[str, Any]:
    return {
        "id": conn_id,
        "email": f"{conn_id}@x.test",
        "host": "imap.x.test:993",
        "state": state,
        "last_error": None,
        "health": None if health is None else {"state": health, "reason": None, "message": ""},
        "last_push": "2026-12-01T22:06:25.123Z",
        "last_scan": None,
        **more,
    }


def _body(*connections: dict[str, Any], ready: bool = True) -> dict[str, Any]:
    return {
        "ready": ready,
        "reasons": [] if ready else ["only 1 of 2 sessions are idle or polling (need 90%)"],
        "sessions_up": 1,
        "sessions_total": len(connections),
        "connections_in_source": len(connections),
        "connections": list(connections),
    }


def test_the_verdict_is_ok_only_when_every_connection_is_watched_and_healthy() -> None:
    assert verdict(_body(_connection("a"), _connection("p", "polling", "degraded"))).code == EXIT_OK
    assert verdict(_body(_connection("new", "connecting", None))).code == EXIT_NOT_OK
    failed = _connection("b", "auth-failed", "auth_failed")
    assert verdict(_body(_connection("a"), failed)).code == EXIT_NOT_OK
    assert verdict(_body(_connection("a"), failed), only="a").code == EXIT_OK
    assert verdict(_body(_connection("a")), only="nope").code == EXIT_NOT_OK
    assert verdict(_body(_connection("a"), ready=False)).code == EXIT_NOT_OK


CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202e]")


def test_every_text_from_status_is_scrubbed_before_the_terminal() -> None:
    hostile = "\x1b[2J\x1b]0;owned\x07fake\nline\r\u202eevil"
    body = _body(
        _connection(
            hostile,
            "backing-off\x1b[31m",
            "unreachable",
            email=hostile,
            last_error=f"connection lost: {hostile}",
            last_push=hostile,
        ),
        ready=False,
    )
    body["reasons"] = [hostile]
    body["last_refresh_error"] = hostile
    out = render(body)
    assert not CONTROL.search(out.replace("\n", "")), out
    lines = out.splitlines()
    # header, one row, blank, summary, refresh error, two reasons: nobody forged a line
    assert len(lines) == 7, lines
    assert lines[1].count("\\x1b") >= 3


def test_the_table_shows_state_health_pushes_scans_and_errors() -> None:
    failed = _connection("b", "auth-failed", "auth_failed")
    failed["health"].update(reason="invalid_credentials", message="NO nope")
    out = render(_body(_connection("a", last_scan="2026-12-01T22:06:26.000Z"), failed))
    header, a, b = out.splitlines()[:3]
    assert header.split() == [
        "ID",
        "EMAIL",
        "STATE",
        "HEALTH",
        "LAST",
        "PUSH",
        "LAST",
        "SCAN",
        "LAST",
        "ERROR",
    ]
    assert a.split() == [
        "a",
        "a@x.test",
        "idle",
        "ok",
        "2026-12-01T22:06:25.123Z",
        "2026-12-01T22:06:26.000Z",
        "-",
    ]
    assert "auth_failed/invalid_credentials" in b and b.endswith("NO nope")


def test_where_status_is_asked() -> None:
    def settings(**env: str) -> Any:
        return make_settings("http://127.0.0.1:1", **env)

    assert status_url(settings(TRIO_IDLE_HEALTH_ADDR="9310", TRIO_IDLE_STATUS_TOKEN=TOKEN)) == (
        "http://127.0.0.1:9310/status"
    )
    both = settings(
        TRIO_IDLE_HEALTH_ADDR="0.0.0.0:9310",
        TRIO_IDLE_STATUS_ADDR="[::]:9311",
        TRIO_IDLE_STATUS_TOKEN=TOKEN,
    )
    assert status_url(both) == "http://[::1]:9311/status"
    with pytest.raises(ConfigError, match="TRIO_IDLE_STATUS_TOKEN"):
        status_url(settings(TRIO_IDLE_HEALTH_ADDR="9310"))
    with pytest.raises(ConfigError, match="TRIO_IDLE_STATUS_ADDR"):
        status_url(settings(TRIO_IDLE_STATUS_TOKEN=TOKEN))
