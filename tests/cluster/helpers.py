"""Helpers of the LISTEN/NOTIFY tests: the listening daemon, killing its connection."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import trio
from trio_idle_testing.backend import ScanBackend

from tests.harness import make_settings, running_daemon
from tests.servers.postgres import fetch_sql
from trio_idle.accounts.source_postgres import PostgresSource
from trio_idle.cluster.listener import APPLICATION_NAME
from trio_idle.core.config import DEFAULT_QUERY
from trio_idle.core.secret import Secret
from trio_idle.runtime.daemon import Daemon


@contextlib.asynccontextmanager
async def listening_daemon(
    pg_dsn: str, backend: ScanBackend, listen_url: str, **env: str
) -> AsyncIterator[Daemon]:
    """The daemon on the ``"MailConnection"`` table of ``pg_dsn``, its listener on
    ``listen_url``, refreshing only every hour (so what starts or ends within seconds was
    a notification's doing); ``env`` adds settings. Shut down on exit."""
    settings = make_settings(
        backend.url,
        DATABASE_URL=pg_dsn,
        TRIO_IDLE_LISTEN_URL=listen_url,
        TRIO_IDLE_IMAP_SECURITY="plain",
        TRIO_IDLE_REFRESH_INTERVAL="1h",
        **env,
    )
    source = PostgresSource(Secret(pg_dsn), DEFAULT_QUERY, 10)
    async with running_daemon(settings, source) as daemon:
        yield daemon


async def kill_listener_connection(pg_dsn: str) -> None:
    """Terminate the listener's Postgres connection (as an operator or a failover would);
    fails unless exactly one was there to kill."""
    killed = await trio.to_thread.run_sync(
        fetch_sql,
        pg_dsn,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        f"WHERE application_name = '{APPLICATION_NAME}'",
    )
    assert [r[0] for r in killed] == [True]
