"""``trio-idle status``: the running daemon's ``/status`` as a table, with an exit code
for scripts.

The daemon is asked over HTTP at the address of its settings (``TRIO_IDLE_STATUS_ADDR``,
else ``TRIO_IDLE_HEALTH_ADDR``; a wildcard listen address is asked on loopback) with
``Authorization: Bearer $TRIO_IDLE_STATUS_TOKEN``. No proxy from the environment, no
redirects, the whole exchange bounded by :data:`TIMEOUT` (a cancel scope), the answer by
:data:`MAX_ANSWER_BYTES`.

Exit codes (:func:`verdict`): :data:`EXIT_OK` every connection listed is watched and its
account health is ``ok`` or ``degraded`` (polled), and the daemon is ready;
:data:`EXIT_NOT_OK` some are not (or the daemon is not ready, or ``--connection`` names
none it runs); :data:`EXIT_CONFIG` the settings do not say where or how to ask, or the
daemon refused the token (401) or has ``/status`` off (404); :data:`EXIT_UNREACHABLE`
nothing answered, or not with a ``/status`` body.

Every text of the answer comes from servers, rows or the daemon's own error texts: each
cell passes through :data:`~trio_idle.core.scrub.PLAIN` (control characters escaped, cut),
so a hostile IMAP server or row cannot write terminal escapes or forge lines. Pure except
:func:`fetch_status`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Final

import attrs
import httpx
import trio

from trio_idle import __version__
from trio_idle.core.config import ConfigError, Settings
from trio_idle.core.errors import EXIT_CONFIG
from trio_idle.core.scrub import PLAIN, Scrubber
from trio_idle.core.secret import Secret

EXIT_OK: Final = 0
EXIT_NOT_OK: Final = 1
EXIT_UNREACHABLE: Final = 3

#: seconds for the whole request (connect, send, answer)
TIMEOUT: Final = 10.0
#: the largest answer read (10,000 connections are ≈ 5 MB of JSON)
MAX_ANSWER_BYTES: Final = 64 << 20
#: the widest a cell gets (an error text is the longest)
CELL_CHARS: Final = 120
#: session states of a watched mailbox (:mod:`trio_idle.mailbox.session_states`)
WATCHED: Final = frozenset({"idle", "polling"})
#: account health states that count as fine: ``degraded`` is a server without IDLE, polled
HEALTHY: Final = frozenset({"ok", "degraded"})
COLUMNS: Final = ("ID", "EMAIL", "STATE", "HEALTH", "LAST PUSH", "LAST SCAN", "LAST ERROR")


class StatusUnavailable(Exception):
    """No ``/status`` answer; ``code`` is the exit code (config or unreachable), the
    message log-safe (never the token)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def status_url(settings: Settings) -> str:
    """Where ``/status`` is served, from the daemon's settings; :class:`ConfigError`
    if it is not served (no address or no token)."""
    health = settings.health
    if health.status_token is None:
        raise ConfigError("TRIO_IDLE_STATUS_TOKEN", "is required: /status is off without it")
    addr = health.status_addr if health.status_addr is not None else health.health_addr
    if addr is None:
        raise ConfigError(
            "TRIO_IDLE_STATUS_ADDR",
            "or TRIO_IDLE_HEALTH_ADDR is required: where the daemon serves /status",
        )
    host, port = addr
    # a wildcard listen address is reached on loopback (the daemon listens there too)
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/status"


async def fetch_status(url: str, token: Secret, limit: float = TIMEOUT) -> dict[str, Any]:
    """GET ``url`` with the bearer token; the JSON body, or :class:`StatusUnavailable`.

    The whole exchange runs in a cancel scope of ``limit`` seconds; cancellation (or the
    limit) abandons the request and closes the client."""
    headers = {
        "authorization": f"Bearer {token.reveal()}",
        "user-agent": f"trio-idle-status/{__version__}",
    }
    with trio.move_on_after(limit) as scope:
        body, status = await _get(url, headers, token)
    if scope.cancelled_caught:
        raise StatusUnavailable(EXIT_UNREACHABLE, f"{url}: no answer within {limit:g}s")
    if status == 401:
        raise StatusUnavailable(EXIT_CONFIG, f"{url}: 401: the daemon refused the token")
    if status == 404:
        raise StatusUnavailable(
            EXIT_CONFIG,
            f"{url}: 404: /status is off there (TRIO_IDLE_STATUS_TOKEN is not set in the "
            "daemon's environment, or TRIO_IDLE_STATUS_ADDR serves it elsewhere)",
        )
    if status != 200:
        raise StatusUnavailable(EXIT_UNREACHABLE, f"{url}: answered HTTP {status}")
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("connections"), list):
        raise StatusUnavailable(EXIT_UNREACHABLE, f"{url}: the answer is not a /status body")
    return parsed


async def _get(url: str, headers: Mapping[str, str], token: Secret) -> tuple[bytes, int]:
    try:
        async with (
            httpx.AsyncClient(trust_env=False, follow_redirects=False, timeout=None) as client,
            client.stream("GET", url, headers=headers) as response,
        ):
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_ANSWER_BYTES:
                    raise StatusUnavailable(EXIT_UNREACHABLE, f"{url}: answer too large")
            return bytes(body), response.status_code
    except httpx.HTTPError as exc:
        # httpx's texts name the URL and the socket error; the token is masked all the same
        text = Scrubber([token.reveal()]).scrub(f"{type(exc).__name__}: {exc}")
        raise StatusUnavailable(EXIT_UNREACHABLE, f"{url}: {text}") from None


def _text(value: object, limit: int = CELL_CHARS) -> str:
    if value is None or value == "":
        return "-"
    return PLAIN.scrub(value, limit)


def _connections(body: Mapping[str, Any], only: str | None) -> list[Mapping[str, Any]]:
    found = [c for c in body.get("connections", ()) if isinstance(c, Mapping)]
    if only is not None:
        found = [c for c in found if c.get("id") == only]
    return found


def _health(connection: Mapping[str, Any]) -> Mapping[str, Any] | None:
    health = connection.get("health")
    return health if isinstance(health, Mapping) else None


def connection_ok(connection: Mapping[str, Any]) -> bool:
    """Watched (IDLE or polling) with no account health other than ok/degraded."""
    health = _health(connection)
    healthy = health is None or health.get("state") in HEALTHY
    return connection.get("state") in WATCHED and healthy


@attrs.frozen
class Verdict:
    code: int
    reasons: tuple[str, ...]


def verdict(body: Mapping[str, Any], only: str | None = None) -> Verdict:
    """The exit code for ``body`` (``only``: judge that connection alone), with why."""
    reasons: list[str] = []
    if body.get("ready") is not True:
        why = body.get("reasons")
        detail = "; ".join(_text(r) for r in why) if isinstance(why, list) and why else "-"
        reasons.append(f"daemon not ready: {detail}")
    connections = _connections(body, only)
    if only is not None and not connections:
        reasons.append(f"no connection {_text(only)} runs in this daemon")
    bad = [c for c in connections if not connection_ok(c)]
    if bad:
        reasons.append(f"{len(bad)} of {len(connections)} connections not ok")
    return Verdict(EXIT_NOT_OK if reasons else EXIT_OK, tuple(reasons))


def _health_cell(connection: Mapping[str, Any]) -> str:
    health = _health(connection)
    if health is None:
        return "-"
    state, reason = health.get("state"), health.get("reason")
    return _text(state if not reason else f"{state}/{reason}")


def rows(body: Mapping[str, Any], only: str | None = None) -> list[tuple[str, ...]]:
    """One scrubbed row of :data:`COLUMNS` per connection."""
    out: list[tuple[str, ...]] = []
    for c in _connections(body, only):
        health = _health(c)
        error = c.get("last_error")
        if not error and health is not None and health.get("state") not in (None, "ok"):
            error = health.get("message")
        out.append(
            (
                _text(c.get("id"), 60),
                _text(c.get("email"), 80),
                _text(c.get("state"), 20),
                _health_cell(c),
                _text(c.get("last_push"), 30),
                _text(c.get("last_scan"), 30),
                _text(error),
            )
        )
    return out


def render(body: Mapping[str, Any], only: str | None = None) -> str:
    """The table, a summary line and the verdict's reasons (every text scrubbed)."""
    table: list[tuple[str, ...]] = [COLUMNS, *rows(body, only)]
    widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS) - 1)]
    lines = [
        "  ".join([*(r[i].ljust(widths[i]) for i in range(len(widths))), r[-1]]).rstrip()
        for r in table
    ]
    up, total = body.get("sessions_up"), body.get("sessions_total")
    ready = "ready" if body.get("ready") is True else "NOT ready"
    lines.append("")
    lines.append(
        f"daemon {ready}: {_text(up)}/{_text(total)} sessions watching, "
        f"{_text(body.get('connections_in_source'))} connections in the source"
    )
    if body.get("last_refresh_error"):
        lines.append(f"last refresh error: {_text(body.get('last_refresh_error'))}")
    skipped = body.get("skipped_rows")
    if isinstance(skipped, list) and skipped:
        lines.append(f"{len(skipped)} rows skipped (see `trio-idle check`)")
    lines.extend(verdict(body, only).reasons)
    return "\n".join(lines)


def format_unavailable(problem: StatusUnavailable) -> Sequence[str]:
    """The lines for stderr when there is no answer."""
    what = "configuration error" if problem.code == EXIT_CONFIG else "daemon unreachable"
    return [f"trio-idle: status: {what}: {problem}"]
