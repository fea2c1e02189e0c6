"""Folders with an IDLE connection of their own (``TRIO_IDLE_FOLDER_WATCH=idle``) against
the IMAP test server with Gmail's folder names, the real daemon in-process: mail filed
into Junk is pushed and scanned without any tick, on the folder's own connection (no
STATUS on the mailbox's); the folder sessions live and die with their connection's
subtree; a dropped folder connection reconnects alone; the provider's connection limit
caps how many folders get one."""

from __future__ import annotations

import attrs
import pytest
import trio

from tests.harness import running_daemon
from tests.reliability.rig import Rig, mailbox_name
from tests.reliability.test_design_card import task_names_under
from trio_idle.accounts import providers

A = mailbox_name(1, "own")
B = mailbox_name(2, "own")
SPAM = "[Gmail]/Spam"
ARCHIVE = "Archive"
#: a tick never comes during a test: whatever is scanned was pushed
NO_TICK = {"TRIO_IDLE_TICK_INTERVAL": "1h", "TRIO_IDLE_FOLDER_WATCH": "idle"}


def _mail(n: int) -> bytes:
    return f"From: s{n}@example.test\r\nSubject: junk #{n}\r\n\r\nbody {n}\r\n".encode()


def _spam_sessions(rig: Rig, user: str) -> list[int]:
    return [s.id for s in rig.server.sessions(user) if s.selected == SPAM and s.idling]


async def _both_idle(rig: Rig, user: str, after: int = 0) -> tuple[int, int]:
    """Wait until ``user`` idles on INBOX and on Junk (a Junk session newer than
    ``after``); their session ids."""
    server = rig.server
    found: dict[str, int] = {}

    def check() -> bool:
        for s in server.sessions(user):
            if (
                s.idling
                and s.selected in ("INBOX", SPAM)
                and (s.selected == "INBOX" or s.id > after)
            ):
                found[s.selected] = s.id
        return len(found) == 2

    await server.wait_for(check)
    return found["INBOX"], found[SPAM]


async def test_junk_mail_is_pushed_on_its_own_connection_and_scanned_without_a_tick(
    rig: Rig,
) -> None:
    source = rig.source(A)
    server = rig.server
    server.add_mailbox(A, SPAM, special_use=("\\Junk",))
    server.append(A, _mail(0), SPAM)  # old Junk mail: not new to the first session
    settings = rig.settings(
        TRIO_IDLE_FOLDERS="INBOX,\\Junk", TRIO_IDLE_SCAN_ENVELOPES="true", **NO_TICK
    )
    async with running_daemon(settings, source) as daemon:
        with trio.fail_after(15):
            await _both_idle(rig, A)
            # Junk is examined (read-only), never selected; nobody polls it with STATUS
            assert server.stats.commands["EXAMINE"] == 1
            assert server.stats.commands["SELECT"] == 1
            spam = server.mailbox(A, SPAM)
            uid = server.append(A, _mail(1), SPAM)
            await rig.backend.wait_for_requests(1, email=A, finished=True)
            (scan,) = rig.backend.requests_for(A)
            assert scan.problems == []
            assert scan.body["folder"] == SPAM and scan.body["mailbox"] == SPAM
            assert scan.body["reason"] == "exists"  # pushed, not found by a tick
            assert scan.body["sinceUid"] == uid == 2
            assert scan.body["uidValidity"] == spam.uidvalidity
            # the envelope desk of the folder's own session answered
            assert [m["subject"] for m in scan.body["messages"]] == ["junk #1"]
            await rig.log(f"[idle/{A}] folder {SPAM}: exists-event received (new mail)")

            # INBOX scans still say nothing of a folder
            server.append(A, _mail(2))
            await rig.backend.wait_for_requests(2, email=A, finished=True)
            assert "folder" not in rig.backend.requests_for(A)[1].body
            (shown,) = daemon.reconciler.snapshot()[0]["folders"]
            assert shown["name"] == SPAM and shown["watch"] == "idle"
            await rig.quiet(daemon, A)
        # the INBOX connection sent no STATUS for a folder that has its own connection
        assert server.stats.commands["STATUS"] == 0
        assert server.stats.logins == 2 and rig.logs.matching("capped") == []


async def test_removing_the_connection_ends_its_folder_sessions_with_a_logout(rig: Rig) -> None:
    source = rig.source(A, B)
    server = rig.server
    for user in (A, B):
        server.add_mailbox(user, SPAM, special_use=("\\Junk",))
    settings = rig.settings(TRIO_IDLE_FOLDERS="INBOX,\\Junk", **NO_TICK)
    async with running_daemon(settings, source) as daemon:
        with trio.fail_after(20):
            await _both_idle(rig, A)
            b_sessions = await _both_idle(rig, B)
            assert any(n.startswith("folder:") for n in task_names_under(f"conn:{A}")), (
                "the folder session runs inside the connection's own subtree"
            )
            handle = rig.handle(daemon, A)
            source.rows = [r for r in source.rows if r["id"] != A]
            attempts = daemon.status().refresh_attempts
            daemon.request_refresh()
            await daemon.wait_refreshed(after=attempts)
            await handle.finished.wait()
            assert task_names_under(f"conn:{A}") == []
            await server.wait_for(lambda: not server.sessions(A))
            # both of A's connections said LOGOUT: INBOX's and Junk's
            assert [e.event for e in server.log if e.user == A].count("LOGOUT") == 2
            # B untouched: the same two connections, and its Junk still pushes
            assert await _both_idle(rig, B) == b_sessions
            server.append(B, _mail(1), SPAM)
            await rig.backend.wait_for_requests(1, email=B, finished=True)
            assert rig.backend.requests_for(B)[0].body["folder"] == SPAM
            await rig.quiet(daemon, B)


async def test_a_dropped_folder_connection_reconnects_alone_and_catches_up(rig: Rig) -> None:
    source = rig.source(A)
    server = rig.server
    server.add_mailbox(A, SPAM, special_use=("\\Junk",))
    settings = rig.settings(TRIO_IDLE_FOLDERS="INBOX,\\Junk", **NO_TICK)
    async with running_daemon(settings, source) as daemon:
        with trio.fail_after(20):
            inbox, junk = await _both_idle(rig, A)
            handle = rig.handle(daemon, A)
            (session,) = [s for s in server.sessions(A) if s.id == junk]
            # the server drops the Junk connection; mail arrives before it is back
            session.drop("rst")
            await rig.log(f"[idle/{A}] folder {SPAM}: connection lost")
            server.append(A, _mail(1), SPAM)
            again = await _both_idle(rig, A, after=junk)
            assert again[0] == inbox, "the INBOX session was disturbed"
            await rig.backend.wait_for_requests(1, email=A, finished=True)
            (scan,) = rig.backend.requests_for(A)
            assert scan.body["folder"] == SPAM and scan.body["reason"] == "reconnect"
            assert scan.body["sinceUid"] == 1
            # the INBOX session is the one it was, connected once, and still pushes
            assert handle.memory.sessions == 1
            server.append(A, _mail(2))
            await rig.backend.wait_for_requests(2, email=A, finished=True)
            assert "folder" not in rig.backend.requests_for(A)[1].body
            await rig.quiet(daemon, A)
    assert rig.logs.matching(f"[idle/{A}] connection lost") == []


async def test_the_provider_connection_limit_leaves_the_folders_past_it_on_status(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the test server's preset (generic) allows 2 connections per account
    limited = attrs.evolve(providers.GENERIC_PRESET, max_connections=2)
    monkeypatch.setitem(providers._BY_NAME, providers.GENERIC, limited)
    source = rig.source(A)
    server = rig.server
    server.add_mailbox(A, SPAM, special_use=("\\Junk",))
    server.add_mailbox(A, ARCHIVE)
    settings = rig.settings(
        TRIO_IDLE_FOLDERS=f"INBOX,\\Junk,{ARCHIVE}",
        TRIO_IDLE_FOLDER_WATCH="idle",
        TRIO_IDLE_TICK_INTERVAL="1s",
    )
    async with running_daemon(settings, source) as daemon:
        with trio.fail_after(20):
            _, junk = await _both_idle(rig, A)
            await rig.log("IMAP connections per account")
            # Junk has its own connection, Archive is checked with STATUS on INBOX's
            server.append(A, _mail(1), ARCHIVE)
            await rig.backend.wait_for_requests(1, email=A, finished=True)
            (scan,) = rig.backend.requests_for(A)
            assert scan.body["folder"] == ARCHIVE and scan.body["reason"] == "tick"
            server.append(A, _mail(2), SPAM)
            await rig.backend.wait_for_requests(2, email=A, finished=True)
            assert rig.backend.requests_for(A)[1].body["folder"] == SPAM
            # a reconnect of the mailbox does not warn again
            inbox = [s for s in server.sessions(A) if s.selected == "INBOX"]
            inbox[0].drop("rst")
            await rig.log(f"[idle/{A}] connected", count=2)
            # the mailbox's reconnect handed Junk over again: its connection untouched
            assert (await _both_idle(rig, A))[1] == junk
            await rig.quiet(daemon, A)
            # one folder session ever (Junk's); never more than 2 connections at once
            assert server.stats.commands["EXAMINE"] == 1
            assert max(len(o.sessions) for o in server.overlaps(A)) == 2
    (warning,) = rig.logs.matching("IMAP connections per account")
    assert A in warning and "allows 2" in warning and ARCHIVE in warning
    assert daemon.stats.get("folder_connections_capped") == 1


async def test_a_folder_deleted_while_it_has_its_own_connection_is_reported_once(
    rig: Rig,
) -> None:
    source = rig.source(A)
    server = rig.server
    server.add_mailbox(A, SPAM, special_use=("\\Junk",))
    settings = rig.settings(TRIO_IDLE_FOLDERS="INBOX,\\Junk", **NO_TICK)
    async with running_daemon(settings, source) as daemon:
        with trio.fail_after(20):
            inbox, junk = await _both_idle(rig, A)
            server.delete_mailbox(A, SPAM)
            (session,) = [s for s in server.sessions(A) if s.id == junk]
            session.drop("rst")  # its reconnect finds the folder gone
            await rig.log(f"[idle/{A}] folder {SPAM} no longer exists (EXAMINE refused)")
            await server.wait_for(lambda: server.connections(A) == 1)
            examines = server.stats.commands["EXAMINE"]
            # the mailbox's next connection lists the folders again: nothing more is said,
            # no folder session is started, and INBOX still pushes
            server.bye(A)
            await rig.idle(A, after=inbox)
            server.append(A, _mail(1))
            await rig.backend.wait_for_requests(1, email=A, finished=True)
            await rig.quiet(daemon, A)
            assert server.stats.commands["EXAMINE"] == examines == 2
            assert server.connections(A) == 1
    assert len(rig.logs.matching("no longer exists")) == 1
    assert rig.logs.matching("not found on the server") == []
    assert daemon.stats.get("folders_missing") == 1
