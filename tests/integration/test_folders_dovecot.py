"""Against real Dovecot: ``\\Junk`` resolves to the folder Dovecot marks ``\\Junk`` (named
Spamverdacht here, so no provider's fallback name finds it), and mail filed there is
scanned with ``folder``, checked with STATUS on the IDLE connection. Dovecot 2.3
announces NOTIFY, used by default (tests/integration/test_notify_dovecot.py): here it is
switched off (``TRIO_IDLE_NOTIFY=off``), the STATUS path servers without NOTIFY get."""

from __future__ import annotations

import imaplib

import trio
from trio_idle_testing.backend import ScanBackend

from tests.harness import ListSource, LogCapture, make_settings, row, running_daemon
from tests.servers.dovecot import DovecotServer


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
        TRIO_IDLE_NOTIFY="off",
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
