"""NOTIFY (RFC 5465) against the IMAP test server, the real daemon in-process: with the
server announcing NOTIFY, mail appended to Junk during IDLE reaches the backend as a Junk
scan with no tick at all (the tick is an hour), and the folders are not polled with
STATUS however many ticks pass; a server refusing NOTIFY gets STATUS every tick instead,
said once."""

from __future__ import annotations

import trio

from tests.harness import running_daemon
from tests.reliability.rig import Rig, mailbox_name

A = mailbox_name(1, "notify")
SPAM = "[Gmail]/Spam"


def _mail(n: int) -> bytes:
    return f"From: s{n}@example.test\r\nSubject: junk #{n}\r\n\r\nbody {n}\r\n".encode()


async def test_junk_mail_appended_during_idle_is_scanned_without_any_tick(rig: Rig) -> None:
    source = rig.source(A)
    server = rig.server
    server.notify_capability = True
    server.add_mailbox(A, SPAM, special_use=("\\Junk",))
    settings = rig.settings(TRIO_IDLE_FOLDERS="INBOX,\\Junk", TRIO_IDLE_TICK_INTERVAL="1h")
    async with running_daemon(settings, source) as daemon:
        with trio.fail_after(15):
            await rig.idle(A)
            assert server.stats.commands["NOTIFY"] == 1
            (line,) = [raw for _, raw in server.command_lines if b" NOTIFY " in raw]
            assert line.split(b" ", 1)[1] == (
                b"NOTIFY SET (selected (MessageNew MessageExpunge)) "
                b'(mailboxes ("[Gmail]/Spam") (MessageNew MessageExpunge))'
            )
            assert server.stats.bad == 0
            assert server.stats.commands["STATUS"] == 1  # the check after connecting
            uid = server.append(A, _mail(1), SPAM)
            await rig.backend.wait_for_requests(1, email=A, finished=True)
            (scan,) = rig.backend.requests_for(A)
            assert scan.problems == []
            assert scan.body["folder"] == SPAM and scan.body["reason"] == "exists"
            assert scan.body["sinceUid"] == uid == 1
            await rig.log(f"[idle/{A}] folder {SPAM}: new mail pushed (NOTIFY STATUS")
            # pushed: no DONE, no STATUS, no tick's NOOP ran for it
            assert server.stats.commands["STATUS"] == 1
            assert server.stats.commands["NOOP"] == 0
            # INBOX is pushed as always
            server.append(A, _mail(2))
            await rig.backend.wait_for_requests(2, email=A, finished=True)
            assert rig.backend.requests_for(A)[1].body["reason"] == "exists"
            await rig.quiet(daemon, A)
    assert daemon.stats.get("notify_fallbacks") == 0


async def test_under_notify_the_folders_are_not_polled_every_tick(rig: Rig) -> None:
    source = rig.source(A)
    server = rig.server
    server.notify_capability = True
    server.add_mailbox(A, SPAM, special_use=("\\Junk",))
    settings = rig.settings(TRIO_IDLE_FOLDERS="INBOX,\\Junk", TRIO_IDLE_TICK_INTERVAL="1s")
    async with running_daemon(settings, source):
        with trio.fail_after(20):
            await rig.idle(A)
            await server.wait_for(lambda: server.stats.commands["NOOP"] >= 4)  # 4 ticks
            assert server.stats.commands["STATUS"] == 1  # only after connecting
            # a new connection checks once more (catch-up), then never again
            session = await rig.idle(A)
            server.bye(A)
            await rig.idle(A, after=session)
            noops = server.stats.commands["NOOP"]
            await server.wait_for(lambda: server.stats.commands["NOOP"] >= noops + 3)
            assert server.stats.commands["STATUS"] == 2


async def test_a_server_refusing_notify_gets_status_every_tick_said_once(rig: Rig) -> None:
    source = rig.source(A)
    server = rig.server
    server.notify_capability = True
    server.notify_refusal = "NO [NOTIFICATIONOVERFLOW] too many notifications"
    server.add_mailbox(A, SPAM, special_use=("\\Junk",))
    settings = rig.settings(TRIO_IDLE_FOLDERS="INBOX,\\Junk", TRIO_IDLE_TICK_INTERVAL="1s")
    async with running_daemon(settings, source) as daemon:
        with trio.fail_after(20):
            await rig.idle(A)
            server.append(A, _mail(1), SPAM)
            await rig.backend.wait_for_requests(1, email=A, finished=True)
            (scan,) = rig.backend.requests_for(A)
            assert scan.body["folder"] == SPAM and scan.body["reason"] == "tick"
            statuses = server.stats.commands["STATUS"]
            await server.wait_for(lambda: server.stats.commands["STATUS"] >= statuses + 2)
            await rig.quiet(daemon, A)
    warnings = rig.logs.matching("NOTIFY refused")
    assert len(warnings) == 1 and "[NOTIFICATIONOVERFLOW]" in warnings[0]
    assert "checking the folders with STATUS every tick" in warnings[0]
    assert daemon.stats.get("notify_fallbacks", "refused") == 1


async def test_an_overflow_later_goes_back_to_status_every_tick(rig: Rig) -> None:
    source = rig.source(A)
    server = rig.server
    server.notify_capability = True
    server.add_mailbox(A, SPAM, special_use=("\\Junk",))
    settings = rig.settings(TRIO_IDLE_FOLDERS="INBOX,\\Junk", TRIO_IDLE_TICK_INTERVAL="1s")
    async with running_daemon(settings, source) as daemon:
        with trio.fail_after(20):
            await rig.idle(A)
            assert server.notification_overflow(A) == 1
            await rig.log(f"[idle/{A}] NOTIFY overflow")
            await server.wait_for(lambda: server.stats.commands["STATUS"] >= 3)
            server.append(A, _mail(1), SPAM)  # no push now: a tick's STATUS finds it
            await rig.backend.wait_for_requests(1, email=A, finished=True)
            assert rig.backend.requests_for(A)[0].body["reason"] == "tick"
            await rig.quiet(daemon, A)
    assert daemon.stats.get("notify_fallbacks", "overflow") == 1
