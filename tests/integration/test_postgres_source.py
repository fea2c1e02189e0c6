"""The connection list from a real PostgreSQL drives the sessions on a real Dovecot."""

from __future__ import annotations

from typing import Any

import trio

from tests.harness import LogCapture, make_settings, poll_until, row, running_daemon
from tests.servers.dovecot import DovecotServer
from tests.servers.postgres import PostgresServer, insert_mail_connections, run_asyncpg
from trio_idle.config import DEFAULT_QUERY
from trio_idle.secret import Secret
from trio_idle.source_postgres import PostgresSource
from trio_idle.testing.backend import ScanBackend


async def sql(dsn: str, statement: str, *args: object) -> None:
    async def go(conn: object) -> None:
        await conn.execute(statement, *args)  # type: ignore[attr-defined]

    await trio.to_thread.run_sync(run_asyncpg, dsn, go)


async def insert(dsn: str, r: dict[str, Any]) -> None:
    await trio.to_thread.run_sync(insert_mail_connections, dsn, r)


async def test_rows_start_restart_and_stop_sessions(
    pg_dsn: str, dovecot: DovecotServer, backend: ScanBackend, logs: LogCapture
) -> None:
    a, b = dovecot.new_user("pga"), dovecot.new_user("pgb")
    await insert(pg_dsn, row("a", a.email, a.password, dovecot.plain_port))
    settings = make_settings(
        backend.url,
        DATABASE_URL=pg_dsn,
        TRIO_IDLE_IMAP_SECURITY="plain",
        TRIO_IDLE_REFRESH_INTERVAL="1s",
    )
    source = PostgresSource(Secret(pg_dsn), DEFAULT_QUERY, 10)
    async with running_daemon(settings, source) as daemon:
        with trio.fail_after(20):
            await logs.wait_for(f"[idle/{a.email}] connected")
            await logs.wait_for("[idle/db] refreshed — 1 active connections, 1 sessions")

        # a new row starts its session at the next (timed) refresh
        await insert(pg_dsn, row("b", b.email, b.password, dovecot.plain_port))
        with trio.fail_after(20):
            await logs.wait_for(f"[idle/{b.email}] connected")
            await logs.wait_for("[idle/db] refreshed — 2 active connections, 2 sessions")
            await poll_until(lambda: dovecot.connections(b.email) == 1)

        # a password change restarts only that session
        dovecot.set_password(a.email, "new-password-for-a")
        new_a = row("a", a.email, "new-password-for-a", dovecot.plain_port)
        await sql(
            pg_dsn,
            'UPDATE "MailConnection" SET "encryptedPassword" = $1 WHERE id = $2',
            new_a["encryptedPassword"],
            "a",
        )
        with trio.fail_after(20):
            await logs.wait_for(f"[idle/{a.email}] connected", count=2)
        assert len(logs.matching(f"[idle/{b.email}] connected")) == 1
        assert daemon.reconciler.handles["b"].memory.sessions == 1

        # a deleted row's session is closed on the server side
        await sql(pg_dsn, 'DELETE FROM "MailConnection" WHERE id = $1', "b")
        with trio.fail_after(20):
            await logs.wait_for("[idle/db] refreshed — 1 active connections, 1 sessions")
            await poll_until(lambda: dovecot.connections(b.email) == 0)
        assert dovecot.connections(a.email) == 1

        # isActive = false counts as removed
        await sql(pg_dsn, 'UPDATE "MailConnection" SET "isActive" = false WHERE id = $1', "a")
        with trio.fail_after(20):
            await logs.wait_for("[idle/db] refreshed — 0 active connections, 0 sessions")
            await poll_until(lambda: dovecot.connections(a.email) == 0)


async def test_undecryptable_row_is_skipped_and_logged_once(
    pg_dsn: str, dovecot: DovecotServer, backend: ScanBackend, logs: LogCapture
) -> None:
    good, bad = dovecot.new_user("good"), dovecot.new_user("bad")
    await insert(pg_dsn, row("good", good.email, good.password, dovecot.plain_port))
    await insert(
        pg_dsn,
        row(
            "bad",
            bad.email,
            bad.password,
            dovecot.plain_port,
            key="some-other-key-that-is-32-chars-long!",
        ),
    )
    await insert(
        pg_dsn, row("badhost", bad.email, bad.password, dovecot.plain_port, host="not a host")
    )
    settings = make_settings(
        backend.url,
        DATABASE_URL=pg_dsn,
        TRIO_IDLE_IMAP_SECURITY="plain",
        TRIO_IDLE_REFRESH_INTERVAL="300ms",
    )
    async with running_daemon(settings, PostgresSource(Secret(pg_dsn), DEFAULT_QUERY, 10)):
        with trio.fail_after(20):
            await logs.wait_for(f"[idle/{good.email}] connected")
            await logs.wait_for("[idle/db] refreshed — 3 active connections, 1 sessions", count=3)
    skipped = logs.matching("[idle/db] connection bad skipped: cannot decrypt")
    assert len(skipped) == 1, "a bad row is logged once, not at every refresh"
    assert len(logs.matching("[idle/db] connection badhost skipped: imapHost")) == 1
    assert bad.password not in logs.text()
    assert not logs.matching(f"[idle/{bad.email}] connected")


async def test_database_outage_keeps_sessions_and_recovers(
    postgres: PostgresServer,
    pg_dsn: str,
    dovecot: DovecotServer,
    backend: ScanBackend,
    logs: LogCapture,
) -> None:
    user = dovecot.new_user("outage")
    await insert(pg_dsn, row("o", user.email, user.password, dovecot.plain_port))
    settings = make_settings(
        backend.url,
        DATABASE_URL=pg_dsn,
        TRIO_IDLE_IMAP_SECURITY="plain",
        TRIO_IDLE_REFRESH_INTERVAL="500ms",
        TRIO_IDLE_DB_TIMEOUT="2s",
    )
    async with running_daemon(settings, PostgresSource(Secret(pg_dsn), DEFAULT_QUERY, 2)):
        with trio.fail_after(20):
            await logs.wait_for(f"[idle/{user.email}] connected")
        await trio.to_thread.run_sync(postgres.stop)
        try:
            with trio.fail_after(30):
                line = (await logs.wait_for("[idle/db] refresh failed"))[0]
            assert "keeping 1 sessions on the last good list" in line
            assert postgres.password not in logs.text()
            # the session still works while the database is down
            await dovecot.aappend(user.email, user.password, b"Subject: x\r\n\r\ny\r\n")
            with trio.fail_after(15):
                await backend.wait_for_requests(1, email=user.email, finished=True)
        finally:
            await trio.to_thread.run_sync(postgres.start)
        refreshed_before = len(logs.matching("[idle/db] refreshed"))
        with trio.fail_after(30):
            await logs.wait_for(
                "[idle/db] refreshed — 1 active connections, 1 sessions", count=refreshed_before + 1
            )
        assert len(logs.matching(f"[idle/{user.email}] connected")) == 1
