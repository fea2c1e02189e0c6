"""Folders beside INBOX (``TRIO_IDLE_FOLDERS``) against the IMAP test server with Gmail's
folder names and no NOTIFY, the real daemon in-process: mail filed into Junk is scanned
with ``folder`` within a tick, on the session's one connection; a folder deleted while
watched is reported once and then left alone."""

from __future__ import annotations

from collections.abc import Callable

import trio

from tests.harness import running_daemon
from tests.reliability.rig import Rig, mailbox_name

A = mailbox_name(1, "folders")
SPAM = "[Gmail]/Spam"


def _mail(n: int) -> bytes:
    return f"From: s{n}@example.test\r\nSubject: junk #{n}\r\n\r\nbody {n}\r\n".encode()


async def test_junk_mail_is_scanned_with_its_folder_and_a_deleted_folder_is_reported_once(
    rig: Rig,
) -> None:
    source = rig.source(A)
    server = rig.server
    server.add_mailbox(A, "[Gmail]/All Mail", special_use=("\\All",))
    server.add_mailbox(A, SPAM, special_use=("\\Junk",))
    server.append(A, _mail(0), SPAM)  # old Junk mail: not new to the first session
    settings = rig.settings(TRIO_IDLE_FOLDERS="INBOX,\\Junk", TRIO_IDLE_TICK_INTERVAL="1s")
    async with running_daemon(settings, source) as daemon:
        with trio.fail_after(15):
            await rig.idle(A)
            spam = server.mailbox(A, SPAM)
            uid = server.append(A, _mail(1), SPAM)
            await rig.backend.wait_for_requests(1, email=A, finished=True)
            (scan,) = rig.backend.requests_for(A)
            assert scan.problems == []
            assert scan.body["folder"] == SPAM and scan.body["mailbox"] == SPAM
            assert scan.body["reason"] == "tick"
            assert scan.body["sinceUid"] == uid == 2
            assert scan.body["uidValidity"] == spam.uidvalidity
            # checked on the IDLE connection itself: one login, no other connection
            assert server.stats.logins == 1

            # INBOX scans still say nothing of a folder
            server.append(A, _mail(2))
            await rig.backend.wait_for_requests(2, email=A, finished=True)
            assert "folder" not in rig.backend.requests_for(A)[1].body

            server.delete_mailbox(A, SPAM)
            await rig.log(f"[idle/{A}] folder {SPAM} no longer exists")
            statuses = server.stats.commands["STATUS"]
            dones = server.stats.commands["DONE"]
            await server.wait_for(lambda: server.stats.commands["DONE"] >= dones + 3)
            assert server.stats.commands["STATUS"] == statuses  # not asked again
            # a new connection does not report it again either
            session = await rig.idle(A)
            server.bye(A)
            await rig.idle(A, after=session)
            await rig.quiet(daemon, A)
    assert len(rig.logs.matching("no longer exists")) == 1
    assert rig.logs.matching("not found on the server") == []
    assert len(rig.backend.requests_for(A)) == 2


async def test_junk_and_inbox_coalesce_separately_during_a_backend_stall(rig: Rig) -> None:
    source = rig.source(A)
    server = rig.server
    server.add_mailbox(A, SPAM, special_use=("\\Junk",))
    settings = rig.settings(
        TRIO_IDLE_FOLDERS="INBOX,\\Junk",
        TRIO_IDLE_TICK_INTERVAL="1s",
        TRIO_IDLE_SCAN_TIMEOUT="60s",  # the held scans wait, never time out and retry
    )
    async with running_daemon(settings, source) as daemon:
        with trio.fail_after(20):
            await rig.idle(A)
            gate = rig.backend.hold(A)
            server.append(A, _mail(1), SPAM)
            await rig.backend.wait_for_requests(1, email=A)  # Junk's scan, held
            server.append(A, _mail(2))
            # INBOX's scan does not wait behind Junk's: its own coalescer, its own task
            await rig.backend.wait_for_requests(2, email=A)
            junk = daemon.reconciler.handles[A].memory.folders.by_name[SPAM]

            def seen_up_to(uidnext: int) -> Callable[[], bool]:
                # the daemon has read the STATUS answer showing it (a STATUS the server
                # counts may have been answered before the append reached the folder)
                return lambda: junk.mailbox is not None and (junk.mailbox.uidnext or 0) >= uidnext

            for uid, n in enumerate(range(3, 6), start=2):  # more Junk mail, across ticks
                server.append(A, _mail(n), SPAM)
                await server.wait_for(seen_up_to(uid + 1))
            assert junk.coalescer.active and junk.coalescer.pending == 1
            (shown,) = daemon.reconciler.snapshot()[0]["folders"]  # what /status shows
            assert shown["name"] == SPAM and shown["scan_active"] and shown["scan_pending"]
            gate.release()
            await rig.logs.wait_until(
                lambda: not junk.coalescer.active and not junk.coalescer.pending
            )
            await rig.quiet(daemon, A)
    bodies = [r.body for r in rig.backend.requests_for(A)]
    spam = [b for b in bodies if b.get("folder") == SPAM]
    inbox = [b for b in bodies if "folder" not in b]
    assert len(inbox) == 1
    # a burst of four Junk messages across ticks: one active + one pending, two scans;
    # the second starts where the first's range ended
    assert [b["sinceUid"] for b in spam] == [1, 2]


async def test_junk_scans_list_their_envelopes_and_inbox_mail_during_the_visit_is_scanned(
    rig: Rig,
) -> None:
    """With envelopes on, a Junk scan lists the new Junk mail: the session visits Junk
    (EXAMINE, UID SEARCH/FETCH) and SELECTs INBOX again. Junk's EXISTS during the visit
    is not INBOX mail (no scan, no count), and INBOX mail that arrives while the session
    is in Junk is announced from the SELECT back, with the right range."""
    source = rig.source(A)
    server = rig.server
    server.add_mailbox(A, SPAM, special_use=("\\Junk",))
    settings = rig.settings(
        TRIO_IDLE_FOLDERS="INBOX,\\Junk",
        TRIO_IDLE_TICK_INTERVAL="1s",
        TRIO_IDLE_SCAN_ENVELOPES="true",
    )
    during_visit: list[bytes] = []  # delivered to INBOX as the next EXAMINE arrives
    examined: list[int] = []

    def on_command(user: str, name: str) -> None:
        if user == A and name == "EXAMINE":
            examined.append(len(server.mailbox(A).messages))
            if during_visit:
                server.append(A, during_visit.pop())

    server.on_command = on_command
    async with running_daemon(settings, source) as daemon:
        with trio.fail_after(20):
            await rig.idle(A)
            uid = server.append(A, _mail(1), SPAM)
            await rig.backend.wait_for_requests(1, email=A, finished=True)
            await rig.quiet(daemon, A)
            (junk,) = rig.backend.requests_for(A)
            assert junk.body["folder"] == SPAM and junk.body["sinceUid"] == uid == 1
            ((listed),) = junk.body["messages"]
            assert listed["uid"] == uid and listed["subject"] == "junk #1"
            assert listed["from"]["address"] == "s1@example.test"
            # Junk's "* 1 EXISTS" (INBOX had none) was not counted as INBOX mail
            assert examined == [0]
            assert server.stats.commands["SELECT"] == 2  # the connect's, the visit's

            # INBOX mail delivered while the session is in Junk
            during_visit.append(_mail(10))
            server.append(A, _mail(2), SPAM)
            await rig.backend.wait_for_requests(3, email=A, finished=True)
            await rig.quiet(daemon, A)
            assert examined == [0, 0] and server.mailbox(A).exists == 1
            bodies = [r.body for r in rig.backend.requests_for(A)[1:]]
            (junk2,) = [b for b in bodies if b.get("folder") == SPAM]
            (inbox,) = [b for b in bodies if "folder" not in b]
            assert [m["subject"] for m in junk2["messages"]] == ["junk #2"]
            assert junk2["sinceUid"] == 2
            assert inbox["sinceUid"] == 1 and inbox["reason"] == "exists"
            assert [m["subject"] for m in inbox["messages"]] == ["junk #10"]

            # the INBOX count is right after the visits: the next mail's range starts at it
            uid = server.append(A, _mail(11))
            await rig.backend.wait_for_requests(4, email=A, finished=True)
            await rig.quiet(daemon, A)
            last = rig.backend.requests_for(A)[3].body
            assert "folder" not in last and last["sinceUid"] == uid == 2
            assert [m["subject"] for m in last["messages"]] == ["junk #11"]
    assert len(rig.backend.requests_for(A)) == 4
    assert rig.logs.matching("connection lost") == []


async def test_a_visit_that_finds_inbox_renumbered_catches_up_and_a_failed_one_reconnects(
    rig: Rig,
) -> None:
    """The SELECT back shows INBOX's UIDVALIDITY changed: the catch-up (every UID void),
    on the same connection. The connection dropped during a visit: the Junk scan goes
    with its range only, the session reconnects (in INBOX) and INBOX mail delivered
    during that visit is scanned by the catch-up."""
    source = rig.source(A)
    server = rig.server
    server.add_mailbox(A, SPAM, special_use=("\\Junk",))
    settings = rig.settings(
        TRIO_IDLE_FOLDERS="INBOX,\\Junk",
        TRIO_IDLE_TICK_INTERVAL="1s",
        TRIO_IDLE_SCAN_ENVELOPES="true",
    )
    at_examine: list[Callable[[], object]] = []
    at_select: list[Callable[[], object]] = []

    def on_command(user: str, name: str) -> None:
        if user == A and name == "EXAMINE" and at_examine:
            at_examine.pop()()
        elif user == A and name == "SELECT" and at_select:
            at_select.pop()()

    server.on_command = on_command
    async with running_daemon(settings, source) as daemon:
        with trio.fail_after(25):
            session = await rig.idle(A)
            old_validity = server.mailbox(A).uidvalidity
            at_examine.append(lambda: server.set_uidvalidity(A, old_validity + 1, "INBOX"))
            server.append(A, _mail(1), SPAM)
            await rig.backend.wait_for_requests(2, email=A, finished=True)
            await rig.quiet(daemon, A)
            await rig.log(f"[idle/{A}] catch-up scan (uidvalidity changed)")
            bodies = [r.body for r in rig.backend.requests_for(A)]
            (inbox,) = [b for b in bodies if "folder" not in b]
            assert inbox["reason"] == "reconnect" and inbox["uidValidityChanged"] is True
            assert inbox["uidValidity"] == old_validity + 1 and "sinceUid" not in inbox
            assert server.stats.logins == 1  # the same connection goes on

            # the connection drops as the SELECT back arrives; INBOX mail came meanwhile
            at_examine.append(lambda: server.append(A, _mail(10)))
            at_select.append(lambda: server.drop(A))
            server.append(A, _mail(2), SPAM)
            await rig.idle(A, after=session)
            await rig.backend.wait_for_requests(4, email=A, finished=True)
            await rig.quiet(daemon, A)
    bodies = [r.body for r in rig.backend.requests_for(A)[2:]]
    (junk,) = [b for b in bodies if b.get("folder") == SPAM]
    (inbox,) = [b for b in bodies if "folder" not in b]
    assert "messages" not in junk and junk["sinceUid"] == 2  # the range only
    # the catch-up's range holds the mail delivered during the failed visit (UID 1)
    assert inbox["reason"] == "reconnect" and inbox["sinceUid"] == 1
    assert server.mailbox(A).uidnext == 2
    assert len(rig.logs.matching(f"[idle/{A}] connection lost")) == 1
    assert server.stats.logins == 2
