"""The whole loop against a real Dovecot: APPEND → IDLE push → scan POST → log lines."""

from __future__ import annotations

import trio
from trio_idle_testing.backend import ScanBackend

from tests.harness import (
    ADMIN_SECRET,
    ListSource,
    LogCapture,
    make_settings,
    poll_until,
    row,
    running_daemon,
)
from tests.integration.dovecot_log import all_logged_out, wait_session_ends
from tests.servers.dovecot import DovecotServer, DovecotUser

MESSAGE = b"From: casino@spam.test\r\nSubject: Free spins\r\n\r\nJackpot!\r\n"


async def test_append_triggers_contracted_scan_post(
    dovecot: DovecotServer, dovecot_user: DovecotUser, backend: ScanBackend, logs: LogCapture
) -> None:
    user = dovecot_user
    settings = make_settings(
        backend.url, TRIO_IDLE_IMAP_SECURITY="starttls", TRIO_IDLE_CA_FILE=str(dovecot.ca_file)
    )
    source = ListSource(
        [row("conn-1", user.email, user.password, dovecot.plain_port, user_id="user-42")]
    )
    async with running_daemon(settings, source):
        with trio.fail_after(15):
            await logs.wait_for(f"[idle/{user.email}] connected (127.0.0.1:{dovecot.plain_port})")
        await dovecot.aappend(user.email, user.password, MESSAGE)
        with trio.fail_after(15):
            requests = await backend.wait_for_requests(1, email=user.email, finished=True)
            await logs.wait_for(f"[idle/{user.email}] scan-triggered → scanned=1 blocked=0")

    request = requests[0]
    assert request.method == "POST"
    assert request.path == "/api/mail/scan-internal"
    assert request.headers["x-admin-secret"] == ADMIN_SECRET
    assert request.headers["content-type"] == "application/json"
    assert request.headers["user-agent"].startswith("trio-idle/")
    assert request.headers["x-scan-id"]
    uid_validity = request.body.get("uidValidity")
    assert isinstance(uid_validity, int) and uid_validity > 0  # Dovecot's, whatever it is
    assert request.body == {
        "connectionId": "conn-1",
        "userId": "user-42",
        "email": user.email,
        "mailbox": "INBOX",
        "reason": "exists",
        # the range (docs/backend-contract.md): the first message of a fresh mailbox
        "uidValidity": uid_validity,
        "sinceUid": 1,
    }
    assert request.problems == []
    assert len(logs.matching(f"[idle/{user.email}] exists-event received (new mail)")) == 1
    # the secret never reaches the logs
    assert ADMIN_SECRET not in logs.text() and user.password not in logs.text()


async def test_implicit_tls_verifies_with_ca_file(
    dovecot: DovecotServer, dovecot_user: DovecotUser, backend: ScanBackend, logs: LogCapture
) -> None:
    user = dovecot_user
    settings = make_settings(
        backend.url, TRIO_IDLE_IMAP_SECURITY="tls", TRIO_IDLE_CA_FILE=str(dovecot.ca_file)
    )
    async with running_daemon(
        settings, ListSource([row("c", user.email, user.password, dovecot.tls_port)])
    ):
        with trio.fail_after(15):
            await logs.wait_for(f"[idle/{user.email}] connected (127.0.0.1:{dovecot.tls_port})")
        await dovecot.aappend(user.email, user.password, MESSAGE)
        with trio.fail_after(15):
            await backend.wait_for_requests(1, email=user.email, finished=True)


async def test_tls_without_ca_file_fails_with_clear_error(
    dovecot: DovecotServer, dovecot_user: DovecotUser, backend: ScanBackend, logs: LogCapture
) -> None:
    user = dovecot_user
    settings = make_settings(backend.url, TRIO_IDLE_IMAP_SECURITY="tls")
    async with running_daemon(
        settings, ListSource([row("c", user.email, user.password, dovecot.tls_port)])
    ):
        with trio.fail_after(15):
            lines = await logs.wait_for(f"[idle/{user.email}] connect failed: TLS certificate")
            await logs.wait_for(f"[idle/{user.email}] reconnecting in 0.2s (attempt 2)")
    assert "not trusted" in lines[0] and "--ca-file" in lines[0]
    assert not logs.matching(f"[idle/{user.email}] connected")
    assert dovecot.connections(user.email) == 0


async def test_starttls_without_ca_file_fails(
    dovecot: DovecotServer, dovecot_user: DovecotUser, backend: ScanBackend, logs: LogCapture
) -> None:
    user = dovecot_user
    settings = make_settings(backend.url, TRIO_IDLE_IMAP_SECURITY="starttls")
    async with running_daemon(
        settings, ListSource([row("c", user.email, user.password, dovecot.plain_port)])
    ):
        with trio.fail_after(15):
            await logs.wait_for(f"[idle/{user.email}] connect failed: TLS certificate")


async def test_wrong_password_is_an_auth_failure_with_long_backoff(
    dovecot: DovecotServer, dovecot_user: DovecotUser, backend: ScanBackend, logs: LogCapture
) -> None:
    user = dovecot_user
    settings = make_settings(
        backend.url, TRIO_IDLE_IMAP_SECURITY="plain", TRIO_IDLE_AUTH_BACKOFF="10m"
    )
    async with running_daemon(
        settings, ListSource([row("c", user.email, "not-the-password", dovecot.plain_port)])
    ) as daemon:
        with trio.fail_after(15):
            lines = await logs.wait_for(f"[idle/{user.email}] authentication failed")
        assert "next login attempt in 10min" in lines[0]
        assert "not-the-password" not in logs.text()
        assert daemon.stats.get("connect_attempts") == 1
        assert daemon.reconciler.snapshot()[0]["state"] == "auth-failed"


async def test_tick_noop_finds_mail_and_renewal_reissues_idle(
    dovecot: DovecotServer, dovecot_user: DovecotUser, backend: ScanBackend, logs: LogCapture
) -> None:
    """With short intervals the session renews IDLE and ticks (DONE, NOOP, IDLE) and stays up."""
    user = dovecot_user
    settings = make_settings(
        backend.url,
        TRIO_IDLE_IMAP_SECURITY="plain",
        TRIO_IDLE_TICK_INTERVAL="1s",
        TRIO_IDLE_IDLE_RENEW="1500ms",
    )
    async with running_daemon(
        settings, ListSource([row("c", user.email, user.password, dovecot.plain_port)])
    ) as daemon:
        with trio.fail_after(15):
            await logs.wait_for(f"[idle/{user.email}] idle renewing (1.5s threshold)", count=2)
        await dovecot.aappend(user.email, user.password, MESSAGE)
        with trio.fail_after(15):
            await backend.wait_for_requests(1, email=user.email, finished=True)
        assert daemon.stats.get("connects") == 1  # ticks and renewals never reconnected
        assert dovecot.connections(user.email) == 1


async def test_removed_session_logs_out(
    dovecot: DovecotServer, dovecot_user: DovecotUser, backend: ScanBackend, logs: LogCapture
) -> None:
    user = dovecot_user
    settings = make_settings(backend.url, TRIO_IDLE_IMAP_SECURITY="plain")
    source = ListSource([row("c", user.email, user.password, dovecot.plain_port)])
    async with running_daemon(settings, source) as daemon:
        with trio.fail_after(15):
            await logs.wait_for(f"[idle/{user.email}] connected")
            await poll_until(lambda: dovecot.connections(user.email) == 1)
        source.rows = []
        daemon.request_refresh()
        with trio.fail_after(15):
            await logs.wait_for("[idle/db] refreshed — 0 active connections, 0 sessions")
            await poll_until(lambda: dovecot.connections(user.email) == 0)
            ends = await wait_session_ends(dovecot, user.email)
        assert all_logged_out(ends), ends  # LOGOUT, not a closed socket
