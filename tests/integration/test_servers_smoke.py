"""The real-server fixtures work: PostgreSQL over TCP, Dovecot over plain/STARTTLS/TLS.

These are the ground truth the daemon's integration tests stand on, so each claim the
fixtures' docstrings make is exercised here against the real servers.
"""

from __future__ import annotations

import imaplib
import os
import re
import ssl
import subprocess
from collections.abc import Iterator

import asyncpg
import pytest
import trio
import trio_asyncio

from tests.conftest import REQUIRE_SERVERS_ENV, unavailable
from tests.servers.dovecot import DovecotServer, DovecotUser
from tests.servers.postgres import PostgresServer, fetch_sql

INSERT = (
    'INSERT INTO "MailConnection" (id, "userId", email, "imapHost", "imapPort", "imapUser", '
    '"encryptedPassword") VALUES ($1, $2, $3, $4, $5, $6, $7)'
)
MESSAGE = b"From: a@example.test\r\nTo: b@example.test\r\nSubject: smoke\r\n\r\nhello\r\n"


# --------------------------------------------------------------------------- helpers


def imap_login(dovecot: DovecotServer, user: DovecotUser) -> imaplib.IMAP4:
    imap = imaplib.IMAP4(dovecot.host, dovecot.plain_port, timeout=10)
    imap.login(user.email, user.password)
    return imap


def exists_count(imap: imaplib.IMAP4) -> int:
    typ, data = imap.select("INBOX")
    assert typ == "OK", data
    return int(data[0] or b"0")


# --------------------------------------------------------------------------- skip/fail


@pytest.fixture
def no_require_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(REQUIRE_SERVERS_ENV, raising=False)
    yield


def test_unavailable_skips_by_default(no_require_env: None) -> None:
    with pytest.raises(pytest.skip.Exception, match="no frobnicator"):
        unavailable("no frobnicator")


def test_unavailable_fails_when_ci_requires_servers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(REQUIRE_SERVERS_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="no frobnicator"):
        unavailable("no frobnicator")


def test_node_bin_runs(node_bin: str) -> None:
    out = subprocess.run([node_bin, "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("v")


# --------------------------------------------------------------------------- PostgreSQL


async def test_asyncpg_via_trio_asyncio_inserts_and_reads(pg_dsn: str) -> None:
    assert re.fullmatch(r"postgresql://postgres:[^@]+@127\.0\.0\.1:\d+/test_\d+", pg_dsn)
    async with trio_asyncio.open_loop():
        conn = await trio_asyncio.aio_as_trio(asyncpg.connect)(pg_dsn)
        try:
            await trio_asyncio.aio_as_trio(conn.execute)(
                INSERT, "c1", "user1", "a@example.test", "127.0.0.1", 143, None, "enc"
            )
            rows = await trio_asyncio.aio_as_trio(conn.fetch)('SELECT * FROM "MailConnection"')
        finally:
            await trio_asyncio.aio_as_trio(conn.close)()
    assert [dict(r) for r in rows] == [
        {
            "id": "c1",
            "userId": "user1",
            "email": "a@example.test",
            "imapHost": "127.0.0.1",
            "imapPort": 143,
            "imapUser": None,
            "encryptedPassword": "enc",
            "isActive": True,  # column default
        }
    ]


@pytest.mark.parametrize("attempt", [1, 2])
async def test_each_test_gets_an_empty_database(pg_dsn: str, attempt: int) -> None:
    # Both parametrizations insert the same primary key: only isolation lets both pass.
    rows = await trio.to_thread.run_sync(fetch_sql, pg_dsn, 'SELECT id FROM "MailConnection"')
    assert rows == []
    await trio.to_thread.run_sync(
        fetch_sql, pg_dsn, INSERT, "same-id", None, "x@example.test", "h", 993, None, "e"
    )


async def test_postgres_stop_start_keeps_data_and_port(
    postgres: PostgresServer, pg_dsn: str
) -> None:
    await trio.to_thread.run_sync(
        fetch_sql, pg_dsn, INSERT, "keep", None, "k@example.test", "h", 993, "k", "e"
    )
    port = postgres.port

    await trio.to_thread.run_sync(postgres.stop)
    assert not postgres.is_running
    with pytest.raises(OSError):  # connection refused while it is down
        await trio.to_thread.run_sync(fetch_sql, pg_dsn, "SELECT 1")

    await trio.to_thread.run_sync(postgres.start)
    assert postgres.port == port
    rows = await trio.to_thread.run_sync(fetch_sql, pg_dsn, 'SELECT id FROM "MailConnection"')
    assert [r["id"] for r in rows] == ["keep"]


# --------------------------------------------------------------------------- Dovecot


def test_plain_login_and_select(dovecot: DovecotServer, dovecot_user: DovecotUser) -> None:
    with imap_login(dovecot, dovecot_user) as imap:
        assert exists_count(imap) == 0
        assert "IDLE" in imap.capabilities
        imap.logout()


def test_wrong_password_is_rejected(dovecot: DovecotServer, dovecot_user: DovecotUser) -> None:
    with imaplib.IMAP4(dovecot.host, dovecot.plain_port, timeout=10) as imap:
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            imap.login(dovecot_user.email, dovecot_user.password + "x")
        imap.logout()


def test_starttls_on_plain_port_verifies_with_ca(
    dovecot: DovecotServer, dovecot_user: DovecotUser
) -> None:
    with imaplib.IMAP4(dovecot.host, dovecot.plain_port, timeout=10) as imap:
        assert "STARTTLS" in imap.capabilities
        imap.starttls(ssl_context=dovecot.ssl_context())
        assert isinstance(imap.sock, ssl.SSLSocket)
        assert imap.sock.version() in {"TLSv1.2", "TLSv1.3"}
        imap.login(dovecot_user.email, dovecot_user.password)
        imap.logout()


@pytest.mark.parametrize("server_hostname", ["127.0.0.1", "localhost"])
def test_implicit_tls_verifies_with_ca_file(
    dovecot: DovecotServer, dovecot_user: DovecotUser, server_hostname: str
) -> None:
    # The certificate has SANs for both; "localhost" also exercises name-based checking.
    ctx = ssl.create_default_context(cafile=str(dovecot.ca_file))
    assert os.path.isfile(dovecot.ca_file)
    with imaplib.IMAP4_SSL(server_hostname, dovecot.tls_port, ssl_context=ctx, timeout=10) as imap:
        assert isinstance(imap.sock, ssl.SSLSocket)
        imap.login(dovecot_user.email, dovecot_user.password)
        imap.logout()


def test_implicit_tls_fails_verification_without_ca(dovecot: DovecotServer) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        imaplib.IMAP4_SSL(
            dovecot.host, dovecot.tls_port, ssl_context=ssl.create_default_context(), timeout=10
        )


async def test_append_then_select_shows_one_exists(
    dovecot: DovecotServer, dovecot_user: DovecotUser
) -> None:
    uid = await dovecot.aappend(dovecot_user.email, dovecot_user.password, MESSAGE)
    assert uid == 1

    def check() -> int:
        with imap_login(dovecot, dovecot_user) as imap:
            count = exists_count(imap)
            imap.logout()
            return count

    assert await trio.to_thread.run_sync(check) == 1


async def test_connections_counts_logged_in_sessions(
    dovecot: DovecotServer, dovecot_user: DovecotUser
) -> None:
    assert dovecot.connections(dovecot_user.email) == 0
    imap = await trio.to_thread.run_sync(imap_login, dovecot, dovecot_user)
    try:
        await dovecot.wait_for_connections(dovecot_user.email, 1, within=5)
    finally:
        await trio.to_thread.run_sync(imap.logout)
    await dovecot.wait_for_connections(dovecot_user.email, 0, within=5)


async def test_idle_sees_appended_mail_quickly(
    dovecot: DovecotServer, dovecot_user: DovecotUser
) -> None:
    stream = await trio.open_tcp_stream(dovecot.host, dovecot.plain_port)
    buf = b""

    async def read_until(pattern: bytes) -> bytes:
        nonlocal buf
        while not re.search(pattern, buf):
            chunk = await stream.receive_some(4096)
            assert chunk, f"connection closed; got {buf!r}"
            buf += chunk
        return buf

    async with stream:
        await read_until(rb"^\* OK")
        await stream.send_all(
            f'a LOGIN "{dovecot_user.email}" "{dovecot_user.password}"\r\n'.encode()
        )
        await read_until(rb"a OK")
        await stream.send_all(b"b SELECT INBOX\r\nc IDLE\r\n")
        await read_until(rb"\+ idling")
        await dovecot.aappend(dovecot_user.email, dovecot_user.password, MESSAGE)
        with trio.fail_after(5):  # mailbox_idle_check_interval = 1 s at worst
            await read_until(rb"\* 1 EXISTS")
        await stream.send_all(b"DONE\r\nd LOGOUT\r\n")
        await read_until(rb"d OK")


async def test_set_password_takes_effect(dovecot: DovecotServer, dovecot_user: DovecotUser) -> None:
    new = dovecot_user.password[::-1] + "-new"
    await trio.to_thread.run_sync(dovecot.set_password, dovecot_user.email, new)

    def try_login(password: str) -> bool:
        with imaplib.IMAP4(dovecot.host, dovecot.plain_port, timeout=10) as imap:
            try:
                imap.login(dovecot_user.email, password)
            except imaplib.IMAP4.error:
                return False
            imap.logout()
            return True

    assert await trio.to_thread.run_sync(try_login, new)
    assert not await trio.to_thread.run_sync(try_login, dovecot_user.password)
