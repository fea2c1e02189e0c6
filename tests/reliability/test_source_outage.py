"""PostgreSQL stopped in the middle of a refresh, then started again.

A stronger companion of ``tests/integration/test_postgres_source.py::
test_database_outage_keeps_sessions_and_recovers`` (real Dovecot, stop between refreshes):
here the database goes down while a refresh's query is running, the sessions must not only
survive but keep working (new mail scanned, a dropped connection reconnected and caught up
without the database), and after the restart the refresh recovers by itself — a row added
then gets its session — without restarting the sessions that were running.
"""

from __future__ import annotations

from typing import Any

import trio

from tests.harness import running_daemon
from tests.integration.test_postgres_source import insert
from tests.reliability.rig import Rig
from tests.servers.postgres import PostgresServer
from trio_idle.accounts.source_postgres import PostgresSource
from trio_idle.core.config import DEFAULT_QUERY
from trio_idle.core.secret import Secret

A = "alice@rel.test"
B = "bob@rel.test"
#: the default query, made to take half a second so a refresh can be caught mid-query
SLOW_QUERY = DEFAULT_QUERY.replace('FROM "MailConnection"', 'FROM "MailConnection", pg_sleep(0.5)')


class ObservedSource(PostgresSource):
    """The real source, telling the test when a fetch starts."""

    def __init__(self, dsn: str) -> None:
        super().__init__(Secret(dsn), SLOW_QUERY, 2.0)
        self.started = 0
        self._changed = trio.Event()

    async def fetch(self) -> list[dict[str, Any]]:
        self.started += 1
        self._changed.set()
        self._changed = trio.Event()
        return await super().fetch()

    async def next_fetch(self) -> None:
        """Return once a fetch newer than the current one has started."""
        wanted = self.started + 1
        while self.started < wanted:
            await self._changed.wait()


async def test_postgres_stopped_during_a_refresh(
    postgres: PostgresServer, pg_dsn: str, rig: Rig
) -> None:
    assert SLOW_QUERY != DEFAULT_QUERY
    a_row, b_row = rig.add(A, B)
    await insert(pg_dsn, a_row)
    source = ObservedSource(pg_dsn)
    settings = rig.settings(DATABASE_URL=pg_dsn, TRIO_IDLE_REFRESH_INTERVAL="200ms")
    async with running_daemon(settings, source) as daemon:
        with trio.fail_after(20):
            first = await rig.idle(A)
            await rig.log("[idle/db] refreshed — 1 active connections, 1 sessions")
        handle = rig.handle(daemon, A)
        try:
            with trio.fail_after(20):
                await source.next_fetch()  # the query (0.5 s) is running now
                await trio.to_thread.run_sync(postgres.stop)
                line = (await rig.log("[idle/db] refresh failed"))[0]
            assert "keeping 1 sessions on the last good list" in line
            assert postgres.password not in rig.logs.text()
            with trio.fail_after(20):
                # sessions keep working without the database: IDLE, reconnect, catch-up
                rig.ledger.append(A, "database down")
                await rig.ledger.settle(10)
                rig.server.drop(A, "rst")
                await rig.log(f"[idle/{A}] connection lost")
                rig.ledger.append(A, "database down, IMAP reconnecting")
                await rig.idle(A, after=first)
                await rig.ledger.settle(10)
                await rig.log("[idle/db] refresh failed", count=2)  # still retrying
        finally:
            await trio.to_thread.run_sync(postgres.start)
        await insert(pg_dsn, b_row)
        with trio.fail_after(20):
            await rig.log("[idle/db] refreshed — 2 active connections, 2 sessions")
            await rig.idle(B)
            rig.ledger.append(B, "row added after the outage")
            await rig.ledger.settle(10)
        assert rig.handle(daemon, A) is handle  # not restarted by the refreshes
        assert handle.memory.sessions == 2  # the first, and the one after the drop
