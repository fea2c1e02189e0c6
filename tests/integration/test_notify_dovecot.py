"""NOTIFY (RFC 5465) against real Dovecot (2.3): with NOTIFY announced (and
``mailbox_list_index = yes``, as Dovecot's documentation asks for it), mail delivered into
the Junk folder (Spamverdacht, marked ``\\Junk``) during IDLE is scanned with no tick at
all — Dovecot pushes ``* STATUS Spamverdacht (MESSAGES n UIDNEXT n UNSEEN n)`` (no
UIDVALIDITY: the one the connect's check learnt is kept); a Dovecot whose capability list
leaves NOTIFY out gets the folders checked with STATUS every tick."""

from __future__ import annotations

import imaplib
from collections.abc import Iterator

import pytest
import trio
from trio_idle_testing.backend import ScanBackend

from tests.conftest import unavailable
from tests.harness import ListSource, LogCapture, make_settings, row, running_daemon
from tests.servers import ServerUnavailable
from tests.servers.dovecot import DovecotServer

#: Dovecot 2.3's capabilities after login, without NOTIFY (``imap_capability`` replaces them)
NO_NOTIFY_CAPABILITIES = (
    "IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE SORT THREAD=REFERENCES MULTIAPPEND "
    "UNSELECT CHILDREN NAMESPACE UIDPLUS LIST-EXTENDED I18NLEVEL=1 CONDSTORE QRESYNC ESEARCH "
    "ESORT SEARCHRES WITHIN CONTEXT=SEARCH LIST-STATUS BINARY MOVE LITERAL+ SPECIAL-USE"
)


def _own_dovecot(extra_config: str) -> Iterator[DovecotServer]:
    try:
        server = DovecotServer(extra_config=extra_config)
    except ServerUnavailable as exc:
        unavailable(f"Dovecot unavailable: {exc}")
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="module")
def dovecot_notify() -> Iterator[DovecotServer]:
    yield from _own_dovecot("mailbox_list_index = yes\n")


@pytest.fixture(scope="module")
def dovecot_without_notify() -> Iterator[DovecotServer]:
    yield from _own_dovecot(f"protocol imap {{\n  imap_capability = {NO_NOTIFY_CAPABILITIES}\n}}\n")


def _create(dovecot: DovecotServer, user: str, password: str, folder: str) -> None:
    with imaplib.IMAP4(dovecot.host, dovecot.plain_port, timeout=10) as imap:
        imap.login(user, password)
        typ, _ = imap.create(folder)
        assert typ == "OK"
        imap.logout()


def _capabilities(dovecot: DovecotServer, user: str, password: str) -> set[str]:
    with imaplib.IMAP4(dovecot.host, dovecot.plain_port, timeout=10) as imap:
        imap.login(user, password)
        typ, data = imap.capability()
        imap.logout()
    assert typ == "OK"
    return set(data[0].decode().split())


async def test_junk_mail_delivered_during_idle_is_scanned_without_a_tick(
    dovecot_notify: DovecotServer, backend: ScanBackend, logs: LogCapture
) -> None:
    dovecot = dovecot_notify
    user = dovecot.new_user("notify")
    _create(dovecot, user.email, user.password, "Spamverdacht")
    assert "NOTIFY" in _capabilities(dovecot, user.email, user.password)
    settings = make_settings(
        backend.url,
        TRIO_IDLE_IMAP_SECURITY="plain",
        TRIO_IDLE_FOLDERS="INBOX,\\Junk",
        TRIO_IDLE_TICK_INTERVAL="1h",  # only NOTIFY can explain a scan in time
    )
    source = ListSource([row("notify", user.email, user.password, dovecot.plain_port)])
    async with running_daemon(settings, source) as daemon:
        with trio.fail_after(20):
            await logs.wait_for(f"[idle/{user.email}] folders Spamverdacht: watched with NOTIFY")
            await dovecot.wait_for_connections(user.email, 1)
            uid = await dovecot.aappend(
                user.email, user.password, b"Subject: spam\r\n\r\nbuy\r\n", "Spamverdacht"
            )
            await backend.wait_for_requests(1, email=user.email, finished=True)
            await logs.wait_for(
                f"[idle/{user.email}] folder Spamverdacht: new mail pushed (NOTIFY STATUS"
            )
            # and INBOX is pushed as always (EXISTS) beside it
            await dovecot.aappend(user.email, user.password, b"Subject: hi\r\n\r\nhi\r\n")
            await backend.wait_for_requests(2, email=user.email, finished=True)
    junk, inbox = (r.body for r in backend.requests_for(user.email))
    assert junk["folder"] == "Spamverdacht" and junk["reason"] == "exists"
    assert junk["sinceUid"] == uid == 1
    assert isinstance(junk["uidValidity"], int)  # kept from the check: the push has none
    assert "folder" not in inbox and inbox["reason"] == "exists"
    assert daemon.stats.get("notify_fallbacks") == 0
    assert daemon.stats.get("notify_status_ignored") == 0


async def test_without_notify_announced_the_folders_are_checked_with_status_every_tick(
    dovecot_without_notify: DovecotServer, backend: ScanBackend, logs: LogCapture
) -> None:
    dovecot = dovecot_without_notify
    user = dovecot.new_user("nonotify")
    _create(dovecot, user.email, user.password, "Spamverdacht")
    assert "NOTIFY" not in _capabilities(dovecot, user.email, user.password)
    settings = make_settings(
        backend.url,
        TRIO_IDLE_IMAP_SECURITY="plain",
        TRIO_IDLE_FOLDERS="INBOX,\\Junk",
        TRIO_IDLE_TICK_INTERVAL="1s",
    )
    source = ListSource([row("nonotify", user.email, user.password, dovecot.plain_port)])
    async with running_daemon(settings, source):
        with trio.fail_after(20):
            await logs.wait_for(f"[idle/{user.email}] connected")
            await dovecot.wait_for_connections(user.email, 1)
            uid = await dovecot.aappend(
                user.email, user.password, b"Subject: spam\r\n\r\nbuy\r\n", "Spamverdacht"
            )
            await backend.wait_for_requests(1, email=user.email, finished=True)
    (scan,) = (r.body for r in backend.requests_for(user.email))
    assert scan["folder"] == "Spamverdacht" and scan["reason"] == "tick"
    assert scan["sinceUid"] == uid == 1
    assert logs.matching("watched with NOTIFY") == []
    assert len(logs.matching(f"[idle/{user.email}] folder Spamverdacht: scan (uidnext")) == 1
