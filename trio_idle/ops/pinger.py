"""Outbound health pings in the healthchecks.io / Uptime Kuma "push" style.

Every ``ping_interval`` (the first one interval after start) the daemon's health is
assessed (:func:`trio_idle.ops.health.assess_health`: only what the operator must fix; one
user's wrong password never sends ``/fail``) and:

- healthy: ``GET <TRIO_IDLE_PING_URL>``;
- unhealthy: ``GET <TRIO_IDLE_PING_URL><TRIO_IDLE_PING_FAIL_SUFFIX>?reason=<text>`` — the
  reasons joined with ``"; "``, cut to :data:`MAX_REASON_CHARS`, URL-encoded, appended
  with ``&`` when the suffix already has a query (e.g. ``?status=down`` for Uptime Kuma).

A ping that fails (network error, timeout, non-2xx) is logged and counted
(``ping_errors``), never fatal, and not retried before the next interval; a timeout's
text names the limit that fired. The URL is treated as a secret (it embeds the check's
token): it is never logged. Only the status of the answer is looked at: its body is never
read (the connection is closed instead); redirects are followed. The requests go over an
:class:`~trio_idle.backend.client.HttpClient` of their own (the receiver is not the
backend: no backend watch); proxies named in the environment are used only with
``trust_env`` (setting ``TRIO_IDLE_HTTP_TRUST_ENV``).

Cancellation: :func:`run_pinger` loops until cancelled; an in-flight ping is abandoned.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final
from urllib.parse import urlencode

import trio
from loguru import logger

from trio_idle.backend.client import HttpClient, HttpFailure, Limits, Timeouts
from trio_idle.core.secret import Secret
from trio_idle.core.stats import Stats
from trio_idle.ops.health import Health

MAX_REASON_CHARS: Final = 200
MAX_PING_TIMEOUT: Final = 10.0
#: how far a ping's deadline lies past its phases' timeout
PING_GRACE: Final = 1.0


def ping_target(url: str, fail_suffix: str, health: Health) -> str:
    """The URL to GET for this verdict (pure)."""
    if health.ok:
        return url
    reason = health.summary()[:MAX_REASON_CHARS]
    target = url + fail_suffix
    return f"{target}{'&' if '?' in target else '?'}{urlencode({'reason': reason})}"


async def ping_once(client: HttpClient, target: str) -> str | None:
    """GET ``target`` within the client's limits; ``None`` on a 2xx answer, else a
    log-safe description (never the URL)."""
    outcome = await client.request("GET", target, read_body=False, follow_redirects=True)
    if isinstance(outcome, HttpFailure):
        return outcome.text("ping receiver")
    if 200 <= outcome.status < 300:
        return None
    return f"HTTP {outcome.status}"


def ping_client(interval: float, trust_env: bool, stats: Stats | None = None) -> HttpClient:
    """The pinger's client: each phase at most :data:`MAX_PING_TIMEOUT` (and no longer
    than ``interval``), one ping at a time."""
    limit = min(MAX_PING_TIMEOUT, interval)
    return HttpClient(
        timeouts=Timeouts(limit, limit, limit, limit + PING_GRACE),
        limits=Limits(1),
        trust_env=trust_env,
        stats=stats,
    )


async def run_pinger(
    url: Secret,
    fail_suffix: str,
    interval: float,
    assess: Callable[[], Health],
    stats: Stats,
    trust_env: bool = False,
) -> None:
    """Ping every ``interval`` seconds until cancelled. Logs health transitions.

    ``trust_env``: go through the proxy the environment names (``HTTP_PROXY`` ...);
    otherwise connect directly."""
    client = ping_client(interval, trust_env, stats)
    previous: Health | None = None
    try:
        while True:
            await trio.sleep(interval)
            health = assess()
            if previous is not None and health.ok != previous.ok:
                if health.ok:
                    logger.info("[idle/health] healthy again")
                else:
                    logger.warning(f"[idle/health] unhealthy: {health.summary()}")
            elif previous is None and not health.ok:
                logger.warning(f"[idle/health] unhealthy: {health.summary()}")
            previous = health
            error = await ping_once(client, ping_target(url.reveal(), fail_suffix, health))
            if error is None:
                stats.inc("pings_sent", "ok" if health.ok else "fail")
            else:
                stats.inc("ping_errors")
                logger.warning(f"[idle/health] health ping failed: {error}")
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(1.0):
            await client.aclose()
