"""Against real Dovecot: ``\\Junk`` resolves to the folder Dovecot marks ``\\Junk`` (named
Spamverdacht here, so no provider's fallback name finds it), and mail filed there is
scanned with ``folder``: checked with STATUS on the IDLE connection, or pushed on a connection
of its own with ``TRIO_IDLE_FOLDER_WATCH=idle``. (Dovecot 2.3
announces NOTIFY, which the daemon does not use yet: this is the STATUS path every
server gets today.)"""

from __future__ import annotations

import imaplib

import trio
from trio_idle_testing.backend import ScanBackend

from tests.harness import ListSource, LogCapture, make_settings, row, running_daemon
from tests.servers.dovecot import DovecotServer
from trio_idle.mailbox.session_states import IDLE


def _create(dovecot: DovecotServer, user: str, password: str, folder: str) -> None:
    with imaplib.IMAP4(dovecot.host, dovecot.plain_port, timeout=10) as imap:
        imap.login(user, password)
        typ, _ = imap.create(folder)
        assert typ == "OK"
        imap.logout()


async def test_mail_filed_into_dovecots_junk_is_scanned_with_its_folder(
    dovecot: DovecotServer, backend: ScanBackend, logs: LogCapture
) -> None:
    user = dovecot.new_user("folders")
    _create(dovecot, user.email, user.password, "Spamverdacht")
    await dovecot.aappend(user.email, user.password, b"Subject: old\r\n\r\nold\r\n", "Spamverdacht")
    settings = make_settings(
        backend.url,
        TRIO_IDLE_IMAP_SECURITY="plain",
        TRIO_IDLE_FOLDERS="INBOX,\\Junk",
        TRIO_IDLE_TICK_INTERVAL="1s",
    )
    source = ListSource([row("folders", user.email, user.password, dovecot.plain_port)])
    async with running_daemon(settings, source):
        with trio.fail_after(20):
            await logs.wait_for(f"[idle/{user.email}] connected")
            await dovecot.wait_for_connections(user.email, 1)
            uid = await dovecot.aappend(
                user.email, user.password, b"Subject: spam\r\n\r\nbuy\r\n", "Spamverdacht"
            )
            await backend.wait_for_requests(1, email=user.email, finished=True)
    (scan,) = (r.body for r in backend.requests_for(user.email))
    assert scan["folder"] == "Spamverdacht" and scan["mailbox"] == "Spamverdacht"
    assert scan["reason"] == "tick" and scan["sinceUid"] == uid == 2
    assert logs.matching("not found on the server") == []


async def test_with_folder_watch_idle_dovecots_junk_is_pushed_on_its_own_connection(
    dovecot: DovecotServer, backend: ScanBackend, logs: LogCapture
) -> None:
    """``TRIO_IDLE_FOLDER_WATCH=idle``: Spamverdacht gets an IDLE connection of its own
    (EXAMINE), and mail delivered into it is scanned at once, with no tick (1 h)."""
    user = dovecot.new_user("folderidle")
    _create(dovecot, user.email, user.password, "Spamverdacht")
    await dovecot.aappend(user.email, user.password, b"Subject: old\r\n\r\nold\r\n", "Spamverdacht")
    settings = make_settings(
        backend.url,
        TRIO_IDLE_IMAP_SECURITY="plain",
        TRIO_IDLE_FOLDERS="INBOX,\\Junk",
        TRIO_IDLE_FOLDER_WATCH="idle",
        TRIO_IDLE_TICK_INTERVAL="1h",
        TRIO_IDLE_SCAN_ENVELOPES="true",
    )
    source = ListSource([row("folderidle", user.email, user.password, dovecot.plain_port)])
    async with running_daemon(settings, source) as daemon:
        with trio.fail_after(20):
            await logs.wait_for(f"[idle/{user.email}] folder Spamverdacht: connected")
            await dovecot.wait_for_connections(user.email, 2)
            folders = daemon.reconciler.handles["folderidle"].memory.folders
            # Dovecot confirmed the folder's IDLE (its state is set on "+ idling"); only
            # polled: the session says nothing when it enters IDLE
            while (f := folders.by_name.get("Spamverdacht")) is None or f.state != IDLE:  # noqa: ASYNC110
                await trio.sleep(0.02)
            uid = await dovecot.aappend(
                user.email, user.password, b"Subject: spam\r\n\r\nbuy\r\n", "Spamverdacht"
            )
            await backend.wait_for_requests(1, email=user.email, finished=True)
            await logs.wait_for(f"[idle/{user.email}] folder Spamverdacht: exists-event received")
    (scan,) = (r.body for r in backend.requests_for(user.email))
    assert scan["folder"] == "Spamverdacht" and scan["mailbox"] == "Spamverdacht"
    assert scan["reason"] == "exists" and scan["sinceUid"] == uid == 2
    assert [m["subject"] for m in scan["messages"]] == ["spam"]
    assert logs.matching("not found on the server") == []
