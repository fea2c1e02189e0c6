"""The connection list from a real PostgreSQL drives the sessions on a real Dovecot."""

from __future__ import annotations

from typing import Any

import trio
from trio_idle_testing.backend import ScanBackend

from tests.harness import KEY, LogCapture, make_settings, poll_until, row, running_daemon
from tests.servers.dovecot import DovecotServer
from tests.servers.postgres import PostgresServer, insert_mail_connections, run_asyncpg
from trio_idle.accounts.connections import AUTH_OAUTH2, AUTH_PASSWORD, build_connections
from trio_idle.accounts.source_postgres import PostgresSource
from trio_idle.core.config import DEFAULT_QUERY
from trio_idle.core.crypto import derive_key, encrypt_password
from trio_idle.core.secret import Secret
from trio_idle.imap.asyncio_loop import open_asyncio_loop


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


# -- the optional columns of issue 12 (authType, encryptedRefreshToken, imapSecurity) -----

OPTIONAL_COLUMNS = ("authType", "encryptedRefreshToken", "imapSecurity", "imapFolderWatch")


async def fetch_default(dsn: str) -> list[dict[str, Any]]:
    async with open_asyncio_loop():
        return await PostgresSource(Secret(dsn), DEFAULT_QUERY, 10).fetch()


async def add_optional_columns(dsn: str) -> None:
    """The columns as a Prisma backend would add them (authType as an enum)."""
    await sql(dsn, "CREATE TYPE \"AuthType\" AS ENUM ('password', 'oauth2')")
    await sql(
        dsn,
        'ALTER TABLE "MailConnection" ADD COLUMN "authType" "AuthType", '
        'ADD COLUMN "encryptedRefreshToken" text, ADD COLUMN "imapSecurity" text',
    )


async def test_default_query_on_a_table_without_the_optional_columns(pg_dsn: str) -> None:
    await insert(pg_dsn, row("old", "old@example.test", "pw-old", 993))
    rows = await fetch_default(pg_dsn)
    assert len(rows) == 1
    assert all(rows[0][c] is None for c in OPTIONAL_COLUMNS)
    good, problems = build_connections(rows, derive_key(KEY))
    assert not problems
    assert good["old"].auth == AUTH_PASSWORD and good["old"].security is None


async def test_default_query_reads_the_optional_columns_when_the_table_has_them(
    pg_dsn: str,
) -> None:
    await add_optional_columns(pg_dsn)
    key = derive_key(KEY)
    refresh = "1//pg-refresh-token-sentinel-L"
    await insert(pg_dsn, row("pw", "pw@example.test", "pw-1", 993))
    await insert(pg_dsn, {**row("oa", "oa@gmail.com", "unused", 993), "encryptedPassword": ""})
    await sql(
        pg_dsn,
        'UPDATE "MailConnection" SET "authType" = \'oauth2\', "encryptedRefreshToken" = $1, '
        "\"imapHost\" = '', \"imapSecurity\" = NULL WHERE id = 'oa'",
        encrypt_password(refresh, key),
    )
    await sql(pg_dsn, "UPDATE \"MailConnection\" SET \"imapSecurity\" = 'starttls' WHERE id = 'pw'")
    await insert(pg_dsn, row("bad", "bad@example.test", "pw-2", 993))
    await sql(pg_dsn, "UPDATE \"MailConnection\" SET \"imapSecurity\" = 'ssl' WHERE id = 'bad'")
    rows = await fetch_default(pg_dsn)
    good, problems = build_connections(rows, key)
    assert sorted(good) == ["oa", "pw"]
    assert (good["pw"].auth, good["pw"].security) == (AUTH_PASSWORD, "starttls")
    oauth = good["oa"]
    assert (oauth.auth, oauth.host, oauth.provider) == (AUTH_OAUTH2, "imap.gmail.com", "gmail")
    assert oauth.refresh_token is not None and oauth.refresh_token.reveal() == refresh
    assert [(p.connection_id, p.message.split(":")[0]) for p in problems] == [
        ("bad", "imapSecurity")
    ]


async def test_a_row_s_imap_security_overrides_the_global_setting(
    pg_dsn: str, dovecot: DovecotServer, backend: ScanBackend, logs: LogCapture
) -> None:
    """Globally TLS; the row that says plain connects to Dovecot's plaintext port, the row
    that says nothing tries TLS there and fails."""
    await add_optional_columns(pg_dsn)
    plain, default = dovecot.new_user("pgplain"), dovecot.new_user("pgdefault")
    await insert(pg_dsn, row("plain", plain.email, plain.password, dovecot.plain_port))
    await insert(pg_dsn, row("default", default.email, default.password, dovecot.plain_port))
    await sql(pg_dsn, "UPDATE \"MailConnection\" SET \"imapSecurity\" = 'plain' WHERE id = 'plain'")
    settings = make_settings(backend.url, DATABASE_URL=pg_dsn, TRIO_IDLE_IMAP_SECURITY="tls")
    async with running_daemon(settings, PostgresSource(Secret(pg_dsn), DEFAULT_QUERY, 10)):
        with trio.fail_after(20):
            await logs.wait_for(f"[idle/{plain.email}] connected")
            await logs.wait_for(f"[idle/{default.email}] connect failed")
            await poll_until(lambda: dovecot.connections(plain.email) == 1)
        assert not logs.matching(f"[idle/{default.email}] connected")
        assert dovecot.connections(default.email) == 0


async def test_the_optional_folder_watch_column(pg_dsn: str) -> None:
    """``imapFolderWatch`` where the table has it: ``idle`` is read, NULL is the global
    setting, and a bad value keeps the row (``status``, one warning) instead of skipping it."""
    await sql(pg_dsn, 'ALTER TABLE "MailConnection" ADD COLUMN "imapFolderWatch" text')
    for conn_id, value in (("idle", "idle"), ("none", None), ("bad", "push")):
        await insert(pg_dsn, row(conn_id, f"{conn_id}@example.test", "pw-1", 993))
        await sql(
            pg_dsn,
            'UPDATE "MailConnection" SET "imapFolderWatch" = $1 WHERE id = $2',
            value,
            conn_id,
        )
    good, problems = build_connections(await fetch_default(pg_dsn), derive_key(KEY))
    assert not problems
    assert {i: c.folder_watch for i, c in good.items()} == {
        "idle": "idle",
        "none": None,
        "bad": "status",
    }
    assert good["bad"].warnings and good["bad"].warnings[0].startswith("imapFolderWatch")
