"""What an operator sees of the LISTEN/NOTIFY listener: ``/status`` and ``/metrics`` over
real HTTP while the listener talks to a real Postgres.

The listener connects as a role of its own, so a test can refuse its logins
(``ALTER ROLE ... NOLOGIN``) and keep it down for as long as it looks, then let it back.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import trio
from trio_idle_testing import ImapTestServer
from trio_idle_testing.backend import ScanBackend

from tests.cluster.helpers import kill_listener_connection, listening_daemon
from tests.harness import ListSource, make_settings, row, running_daemon
from tests.ops.helpers import sample
from tests.servers.postgres import execute_sql, insert_mail_connections
from trio_idle.cluster.listener import NotifyListener, NotifySql
from trio_idle.core.scrub import MASK
from trio_idle.runtime.daemon import Daemon

STATUS_TOKEN = "st-listener-0f1e2d3c4b5a69788796a5b4c3d2e1f0"
BEARER = {"authorization": f"Bearer {STATUS_TOKEN}"}
#: the listener role's password: a leak-guard sentinel (tests/leak_guard.py)
LISTEN_PASSWORD = "S3ntinel-listen-pw"
_roles = itertools.count(1)


@pytest.fixture
def listen_role(pg_dsn: str) -> Iterator[str]:
    """A login role of its own for the listener (roles are cluster-wide: dropped after)."""
    name = f"listen_op_{next(_roles)}_{urlsplit(pg_dsn).path.strip('/')}"
    execute_sql(pg_dsn, f"CREATE ROLE {name} LOGIN PASSWORD '{LISTEN_PASSWORD}'")
    yield name
    execute_sql(
        pg_dsn,
        f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{name}'",
    )
    execute_sql(pg_dsn, f"DROP ROLE IF EXISTS {name}")


def listen_url(pg_dsn: str, role: str, database: str | None = None) -> str:
    parts = urlsplit(pg_dsn)
    db = database if database is not None else parts.path.strip("/")
    return f"postgresql://{role}:{LISTEN_PASSWORD}@{parts.hostname}:{parts.port}/{db}"


def start_daemon(
    pg_dsn: str, backend: ScanBackend, url: str
) -> AbstractAsyncContextManager[Daemon]:
    """The listening daemon with ``/status`` (behind :data:`STATUS_TOKEN`) and ``/metrics``."""
    return listening_daemon(
        pg_dsn,
        backend,
        url,
        TRIO_IDLE_HEALTH_ADDR="127.0.0.1:0",
        TRIO_IDLE_STATUS_TOKEN=STATUS_TOKEN,
    )


class Operator:
    """Reads ``/status`` and ``/metrics`` like an operator would, over HTTP."""

    def __init__(self, http: httpx.AsyncClient, secrets: list[str]) -> None:
        self.http = http
        self.secrets = secrets

    async def listener(self) -> Any:
        """The ``listener`` object of ``/status`` (``None`` when the listener is off)."""
        r = await self.http.get("/status", headers=BEARER)
        assert r.status_code == 200
        for secret in self.secrets:
            assert secret not in r.text
        return r.json()["listener"]

    async def metrics(self) -> str:
        r = await self.http.get("/metrics")
        assert r.status_code == 200
        for secret in self.secrets:
            assert secret not in r.text
        return r.text


async def test_status_and_metrics_follow_the_listener_up_notified_down_and_back(
    pg_dsn: str, listen_role: str, server: ImapTestServer, backend: ScanBackend
) -> None:
    await trio.to_thread.run_sync(execute_sql, pg_dsn, NotifySql().install)
    url = listen_url(pg_dsn, listen_role)
    async with start_daemon(pg_dsn, backend, url) as daemon:
        listener = daemon.listener
        assert listener is not None and daemon.supervisor is not None
        assert daemon.supervisor.health_url is not None
        async with httpx.AsyncClient(base_url=daemon.supervisor.health_url) as http:
            op = Operator(http, [LISTEN_PASSWORD, url, urlsplit(pg_dsn).password or "?"])
            await up_notified_down_and_back(op, listener, pg_dsn, listen_role, server)


async def up_notified_down_and_back(
    op: Operator, listener: NotifyListener, pg_dsn: str, role: str, server: ImapTestServer
) -> None:
    with trio.fail_after(10):
        await listener.wait_listening(1)
    status = await op.listener()
    assert status["connected"] is True and status["channel"] == "trio_idle_connections"
    assert (status["connections"], status["reconnects"]) == (1, 0)
    assert status["failures"] == {"connect": 0, "lost": 0, "heartbeat": 0}
    assert status["notifications"] == 0 and status["last_notification_age_seconds"] is None
    assert status["last_error"] is None and status["state_age_seconds"] is not None
    metrics = await op.metrics()
    assert sample(metrics, "trio_idle_listener_connected") == 1
    assert sample(metrics, "trio_idle_listener_connected_since_timestamp_seconds") > 0
    assert sample(metrics, "trio_idle_listener_connections_total") == 1
    assert sample(metrics, "trio_idle_listener_last_notification_timestamp_seconds") == 0

    # a row change: one statement, one notification
    email = "notified@listen.test"
    server.add_user(email, "pw-notified")
    await trio.to_thread.run_sync(
        insert_mail_connections, pg_dsn, row("notified", email, "pw-notified", server.port)
    )
    with trio.fail_after(5):
        await listener.wait_view(lambda v: v.notifications >= 1)
    status = await op.listener()
    assert status["notifications"] == 1
    assert status["last_notification_age_seconds"] is not None
    metrics = await op.metrics()
    assert sample(metrics, "trio_idle_listener_notifications_total") == 1
    assert sample(metrics, "trio_idle_listener_last_notification_timestamp_seconds") > 0

    # the listener's role may no longer log in, and its connection is killed: it stays
    # down (each reconnect is refused) until the role may log in again
    await trio.to_thread.run_sync(execute_sql, pg_dsn, f"ALTER ROLE {role} NOLOGIN")
    await kill_listener_connection(pg_dsn)
    with trio.fail_after(10):
        await listener.wait_view(lambda v: v.failures["connect"] >= 1)
    status = await op.listener()
    assert status["connected"] is False
    assert status["failures"]["lost"] == 1 and status["failures"]["heartbeat"] == 0
    # Postgres's own words, as the listener got them
    assert "InvalidAuthorizationSpecificationError" in status["last_error"]
    assert "not permitted to log in" in status["last_error"]
    metrics = await op.metrics()
    assert sample(metrics, "trio_idle_listener_connected") == 0
    assert sample(metrics, "trio_idle_listener_connected_since_timestamp_seconds") == 0
    assert sample(metrics, "trio_idle_listener_failures_total", reason="lost") == 1
    assert sample(metrics, "trio_idle_listener_failures_total", reason="connect") >= 1

    await trio.to_thread.run_sync(execute_sql, pg_dsn, f"ALTER ROLE {role} LOGIN")
    with trio.fail_after(40):  # the reconnect backoff doubles from 1 s up to 30 s
        await listener.wait_listening(2)
    status = await op.listener()
    assert status["connected"] is True
    assert (status["connections"], status["reconnects"]) == (2, 1)
    assert status["last_error"] is not None  # why it went down stays visible
    metrics = await op.metrics()
    assert sample(metrics, "trio_idle_listener_connected") == 1
    assert sample(metrics, "trio_idle_listener_connections_total") == 2


async def test_a_postgres_error_quoting_the_password_reaches_status_masked(
    pg_dsn: str, listen_role: str, backend: ScanBackend
) -> None:
    # Postgres names the missing database in its error: here that name is the password
    url = listen_url(pg_dsn, listen_role, database=LISTEN_PASSWORD)
    async with start_daemon(pg_dsn, backend, url) as daemon:
        listener = daemon.listener
        assert listener is not None and daemon.supervisor is not None
        assert daemon.supervisor.health_url is not None
        with trio.fail_after(10):
            await listener.wait_view(lambda v: v.failures["connect"] >= 1)
        async with httpx.AsyncClient(base_url=daemon.supervisor.health_url) as http:
            op = Operator(http, [LISTEN_PASSWORD, url])
            status = await op.listener()
            metrics = await op.metrics()
    assert status["connected"] is False and status["connections"] == 0
    assert "InvalidCatalogNameError" in status["last_error"]
    assert f'database "{MASK}" does not exist' in status["last_error"]
    assert sample(metrics, "trio_idle_listener_connected") == 0
    assert sample(metrics, "trio_idle_listener_failures_total", reason="connect") >= 1


async def test_without_a_listen_url_status_and_metrics_say_nothing_of_it(
    backend: ScanBackend,
) -> None:
    settings = make_settings(
        backend.url, TRIO_IDLE_HEALTH_ADDR="127.0.0.1:0", TRIO_IDLE_STATUS_TOKEN=STATUS_TOKEN
    )
    async with running_daemon(settings, ListSource()) as daemon:
        assert daemon.supervisor is not None and daemon.supervisor.health_url is not None
        async with httpx.AsyncClient(base_url=daemon.supervisor.health_url) as http:
            op = Operator(http, [])
            assert await op.listener() is None
            assert "trio_idle_listener_" not in await op.metrics()
