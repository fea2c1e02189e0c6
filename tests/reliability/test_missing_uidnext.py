"""Servers whose SELECT answer has no ``[UIDNEXT n]`` (Courier-IMAP 5; RFC 3501 requires
it): the daemon learns UIDNEXT another way (STATUS, else FETCH of the last message's
UID), so catch-up and ``sinceUid`` never rely on message counts.

What a user would notice without it: one old message deleted and one new one arrived
while the daemon was disconnected leave the count unchanged, and the new mail is never
scanned.
"""

from __future__ import annotations

import pytest
import trio
import trio_asyncio
from trio_idle_testing import ImapTestServer
from trio_idle_testing.backend import ScanRequest

from tests.fixtures import mail_connection
from tests.harness import ListSource, row, running_daemon
from tests.reliability.rig import PASSWORD, Rig, mailbox_name
from tests.reliability.scripted_server import Peer, ScriptedServer
from trio_idle.imap.client import ImapTimeouts
from trio_idle.imap.connect import connect
from trio_idle.imap.responses import MailboxState

A = mailbox_name(1, "courier")
TIMEOUTS = ImapTimeouts(connect=5, command=5, keepalive_idle=60)


def _old_mail(server: ImapTestServer, user: str, count: int) -> list[int]:
    return [
        server.append(user, f"Subject: old {n}\r\nFrom: t@x.test\r\n\r\nold\r\n".encode())
        for n in range(count)
    ]


async def _select(server: ImapTestServer, user: str) -> MailboxState:
    conn = mail_connection("c", user_id=None, email=user, port=server.port, password=PASSWORD)
    async with trio_asyncio.open_loop():
        imap = await connect(conn, security="plain", context=None, timeouts=TIMEOUTS)
        try:
            await imap.login(user, PASSWORD)
            state = await imap.select("INBOX")
            await imap.idle_start()  # the connection is still usable afterwards
        finally:
            with trio.CancelScope(shield=True):
                await imap.logout(1.0)
    return state


@pytest.mark.parametrize(
    ("fault", "expected_uidnext", "extra"),
    [
        (None, 5, {}),  # the server says it: nothing more is asked
        ("no_select_uidnext", 5, {"STATUS": 1, "SELECT": 1}),  # STATUS, SELECT again
        # STATUS without it either: FETCH of the last message's UID (4 was expunged: 3 + 1)
        ("no_status_uidnext", 4, {"STATUS": 1, "SELECT": 1, "FETCH": 1}),
    ],
)
async def test_select_learns_uidnext_the_server_left_out(
    server: ImapTestServer, fault: str | None, expected_uidnext: int, extra: dict[str, int]
) -> None:
    server.add_user(A, PASSWORD)
    uids = _old_mail(server, A, 4)
    server.expunge(A, uids[-1])  # UIDNEXT 5, last message's UID 3
    if fault is not None:
        server.faults(A).no_select_uidnext = True
        setattr(server.faults(A), fault, True)
    with trio.fail_after(10):
        state = await _select(server, A)
    assert state == MailboxState(exists=3, uidnext=expected_uidnext, uidvalidity=1000)
    commands = server.stats.commands
    assert {c: commands[c] for c in ("SELECT", "STATUS", "FETCH")} == {
        "SELECT": 1 + extra.get("SELECT", 0),
        "STATUS": extra.get("STATUS", 0),
        "FETCH": extra.get("FETCH", 0),
    }


async def test_an_empty_mailbox_without_any_uidnext_starts_at_one(server: ImapTestServer) -> None:
    server.add_user(A, PASSWORD)
    server.faults(A).no_select_uidnext = server.faults(A).no_status_uidnext = True
    with trio.fail_after(10):
        state = await _select(server, A)
    assert state == MailboxState(exists=0, uidnext=1, uidvalidity=1000)
    assert server.stats.commands["FETCH"] == 0


def _range(request: ScanRequest) -> tuple[object, object]:
    return request.body.get("uidValidity"), request.body.get("sinceUid")


@pytest.mark.parametrize("status_uidnext", [True, False], ids=["status", "fetch"])
async def test_one_expunged_and_one_arrived_while_disconnected_is_scanned(
    rig: Rig, status_uidnext: bool
) -> None:
    source = rig.source(A)
    old = _old_mail(rig.server, A, 3)
    faults = rig.server.faults(A)
    faults.no_select_uidnext = True  # Courier-IMAP 5
    faults.no_status_uidnext = not status_uidnext
    async with running_daemon(rig.settings(), source) as daemon:
        with trio.fail_after(10):
            first = await rig.idle(A)
            rig.server.drop(A)  # no checkpoint until the changes: nobody is connected
            rig.server.expunge(A, old[0])
            new = rig.ledger.append(A, note="while down, one old message expunged")
            assert rig.server.mailbox(A).exists == 3  # as the last session saw it
            await rig.idle(A, after=first)
        # counts alone (3 -> 3) never scan it
        await rig.ledger.settle(5, [new], context="one expunged, one arrived while down")
        (catch_up,) = rig.backend.requests_for(A)
        assert catch_up.reason == "reconnect"
        assert _range(catch_up) == (1000, new.uid)  # exactly the mail not accepted yet
        with trio.fail_after(10):
            await rig.quiet(daemon, A)
    rig.ledger.check()


async def test_first_session_without_select_uidnext_gives_pushes_their_since_uid(
    rig: Rig,
) -> None:
    source = rig.source(A)
    _old_mail(rig.server, A, 3)
    rig.server.faults(A).no_select_uidnext = True
    async with running_daemon(rig.settings(), source) as daemon:
        with trio.fail_after(10):
            await rig.idle(A)
            for count in (1, 2):
                uid = rig.ledger.append(A).uid
                await rig.backend.wait_for_requests(count, email=A, finished=True)
                assert _range(rig.backend.requests_for(A)[count - 1]) == (1000, uid)
                await rig.quiet(daemon, A)
    rig.ledger.check()


C = "courier@rel.test"


async def _courier_with_mail_during_status(peer: Peer) -> None:
    """A Courier-like server (no UIDNEXT in SELECT) where message UID 10 arrives between
    the first SELECT and the STATUS (reported in STATUS's answer), and UID 11 before the
    first tick (reported in its NOOP's answer). Nothing else ever arrives."""
    await peer.send(b"* OK [CAPABILITY IMAP4rev1 IDLE] courier-ish ready\r\n")
    exists = 3
    while True:
        tag, name = await peer.command()
        if name == b"CAPABILITY":
            await peer.send(b"* CAPABILITY IMAP4rev1 IDLE\r\n" + tag + b" OK done\r\n")
        elif name == b"LOGIN":
            await peer.send(tag + b" OK LOGIN completed\r\n")
        elif name == b"SELECT":
            await peer.send(
                b"* %d EXISTS\r\n* OK [UIDVALIDITY 7] ok\r\n" % exists
                + tag
                + b" OK [READ-WRITE] SELECT completed\r\n"
            )
        elif name == b"STATUS":
            exists = 4
            await peer.send(
                b"* 4 EXISTS\r\n* STATUS INBOX (UIDNEXT 11 UIDVALIDITY 7 MESSAGES 4)\r\n"
                + tag
                + b" OK STATUS completed\r\n"
            )
        elif name == b"NOOP":
            untagged = b""
            if exists == 4:
                exists, untagged = 5, b"* 5 EXISTS\r\n"
            await peer.send(untagged + tag + b" OK NOOP completed\r\n")
        elif name == b"IDLE":
            await peer.send(b"+ idling\r\n")
            if await peer.line() != b"DONE":
                return
            await peer.send(tag + b" OK IDLE terminated\r\n")
        elif name == b"LOGOUT":
            await peer.send(b"* BYE bye\r\n" + tag + b" OK LOGOUT completed\r\n")
            return
        else:
            await peer.send(tag + b" BAD unexpected\r\n")


async def test_mail_counted_during_status_is_not_announced_twice(
    rig: Rig, nursery: trio.Nursery
) -> None:
    # UID 10 is in the second SELECT's count and below STATUS's UIDNEXT 11: announcing it
    # too would raise the mark to 12 and the scan of UID 11 would skip it.
    scripted = ScriptedServer(_courier_with_mail_during_status)
    await nursery.start(scripted.serve)
    source = ListSource([row(C, C, "x", scripted.port)])
    settings = rig.settings(TRIO_IDLE_TICK_INTERVAL="1s")
    async with running_daemon(settings, source) as daemon:
        with trio.fail_after(10):
            requests = rig.backend.requests
            await rig.logs.wait_until(lambda: any(r.reason == "tick" for r in requests))
            await rig.quiet(daemon, C)
    assert [(r.reason, _range(r)) for r in rig.backend.requests_for(C)] == [("tick", (7, 11))]
