"""NOTIFY (RFC 5465) for the folders beside INBOX, on the session's one connection, in
virtual time: where the server announces it, mail filed into Junk during IDLE requests a
Junk scan at once (no tick passes) and the folders are not polled with STATUS every tick
— only once after each connect; a refusal or a later overflow goes back to STATUS every
tick, said once; ``TRIO_IDLE_NOTIFY=off`` never asks."""

from __future__ import annotations

import trio
import trio.testing
from trio_idle_testing.fake_imap import FakeImapServer

from tests.unit.session_rig import TICK, Rig, connected, default_server, make_rig, running, settled
from trio_idle.imap.responses import MailboxState

JUNK_LINE = (
    "[idle/alice@example.test] folder Junk: new mail pushed (NOTIFY STATUS, uidnext 7→8): scan"
)


def notify_rig(server: FakeImapServer | None = None, notify: str = "auto") -> Rig:
    server = server or default_server()
    server.notify = True
    server.add_folder("Junk", attributes=["\\Junk"], uidnext=7)
    return make_rig(server, folders=("INBOX", "\\Junk"), imap_notify=notify)


def statuses(rig: Rig, link: int = 1) -> int:
    return sum(1 for c in rig.server.calls if c.command == "STATUS" and c.link == link)


async def test_junk_mail_pushed_during_idle_is_scanned_at_once_and_never_polled(
    autojump_clock: trio.abc.Clock,
) -> None:
    rig = notify_rig()
    async with running(rig):
        await connected(rig)
        # NOTIFY before the connect's STATUS check: mail between the two is pushed
        assert rig.server.commands(1)[-4:] == ["LIST", "NOTIFY", "STATUS", "IDLE"]
        junk = rig.memory.folders.by_name["Junk"]
        rig.server.deliver_to("Junk")
        filed_at = trio.current_time()
        await trio.testing.wait_all_tasks_blocked()
        assert junk.coalescer.requested == 1 and junk.coalescer.pending_reason == "exists"
        assert trio.current_time() == filed_at  # no tick, no wait: pushed
        assert junk.scan_range(junk.mailbox).since_uid == 7
        assert rig.log.texts("info").count(JUNK_LINE) == 1
        assert rig.stats.get("folder_scans", "exists") == 1
        assert rig.coalescer.requested == 0  # INBOX got nothing
        await trio.sleep(10 * TICK)
        # ten ticks: NOOPs, no DONE/STATUS/IDLE for the folders
        assert statuses(rig) == 1
        assert rig.server.commands(1).count("NOOP") >= 9
    assert rig.stats.get("notify_fallbacks") == 0


async def test_the_catch_up_check_after_a_reconnect_still_runs_under_notify(
    autojump_clock: trio.abc.Clock,
) -> None:
    rig = notify_rig()
    async with running(rig):
        await connected(rig)
        junk = rig.memory.folders.by_name["Junk"]
        rig.server.drop()
        rig.server.deliver_to("Junk")  # filed while nobody was connected: not pushed
        await connected(rig, link=2)
        assert statuses(rig, 2) == 1
        assert junk.coalescer.pending_reason == "reconnect"


async def test_inbox_pushes_are_unchanged_under_notify(autojump_clock: trio.abc.Clock) -> None:
    rig = notify_rig()
    async with running(rig):
        await connected(rig)
        rig.server.deliver(2)
        await settled(rig, lambda: rig.coalescer.requested == 1)
        assert rig.coalescer.pending_reason == "exists"
        assert "[idle/alice@example.test] exists-event received (new mail)" in rig.log.texts("info")


async def test_a_refused_notify_falls_back_to_status_every_tick_said_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    server = default_server()
    server.notify_refusal = "NO [BADEVENT] (MessageNew MessageExpunge)"
    rig = notify_rig(server)
    async with running(rig):
        await connected(rig)
        junk = rig.memory.folders.by_name["Junk"]
        rig.server.deliver_to("Junk")
        filed_at = trio.current_time()
        await settled(rig, lambda: junk.coalescer.requested == 1)
        assert trio.current_time() - filed_at <= TICK  # found by a tick's STATUS
        assert junk.coalescer.pending_reason == "tick"
        await trio.sleep(5 * TICK)
        assert statuses(rig) >= 6
    warnings = [t for t in rig.log.texts("warning") if "NOTIFY" in t]
    assert warnings == [
        "[idle/alice@example.test] NOTIFY refused: NO [BADEVENT] (MessageNew MessageExpunge): "
        "checking the folders with STATUS every tick on this connection"
    ]
    assert rig.stats.get("notify_fallbacks", "refused") == 1


async def test_an_overflow_checks_the_folders_at_once_then_every_tick(
    autojump_clock: trio.abc.Clock,
) -> None:
    rig = notify_rig()
    async with running(rig):
        await connected(rig)
        junk = rig.memory.folders.by_name["Junk"]
        before = statuses(rig)
        rig.server.folders["Junk"] = MailboxState(1, 8, 5)  # filed, the push lost
        rig.server.notify_overflow()
        at = trio.current_time()
        await settled(rig, lambda: statuses(rig) == before + 1)
        assert trio.current_time() == at  # at once, not at the next tick
        assert junk.coalescer.requested == 1
        await trio.sleep(5 * TICK)
        assert statuses(rig) >= before + 5
        rig.server.deliver_to("Junk")  # NOTIFY is off now: no push, the tick finds it
        await settled(rig, lambda: junk.coalescer.requested == 2)
        assert junk.coalescer.pending_reason == "tick" or junk.coalescer.active
    assert rig.stats.get("notify_fallbacks", "overflow") == 1
    assert len([t for t in rig.log.texts("warning") if "NOTIFICATIONOVERFLOW" in t]) == 1


async def test_notify_off_never_asks_and_polls_every_tick(autojump_clock: trio.abc.Clock) -> None:
    rig = notify_rig(notify="off")
    async with running(rig):
        await connected(rig)
        junk = rig.memory.folders.by_name["Junk"]
        rig.server.deliver_to("Junk")
        await settled(rig, lambda: junk.coalescer.requested == 1)
        assert junk.coalescer.pending_reason == "tick"
    assert "NOTIFY" not in rig.server.commands()


async def test_a_status_pushed_for_a_folder_not_watched_is_counted_and_ignored(
    autojump_clock: trio.abc.Clock,
) -> None:
    rig = notify_rig()
    async with running(rig):
        await connected(rig)
        rig.server.link.monitor.untagged(b'* STATUS "Trash" (MESSAGES 9 UIDNEXT 99)')
        rig.server.link.monitor.untagged(b"* STATUS {5}")
        rig.server.deliver_to("Junk")  # wakes the session, which counts what it skipped
        await trio.testing.wait_all_tasks_blocked()
        assert rig.stats.get("notify_status_ignored", "unwatched") == 1
        assert rig.stats.get("notify_status_ignored", "malformed") == 1
        assert set(rig.memory.folders.by_name) == {"Junk"}


async def test_a_push_older_than_the_folders_known_state_moves_nothing_back(
    autojump_clock: trio.abc.Clock,
) -> None:
    rig = notify_rig()
    async with running(rig):
        await connected(rig)
        junk = rig.memory.folders.by_name["Junk"]
        rig.server.deliver_to("Junk", 2)
        await trio.testing.wait_all_tasks_blocked()
        assert junk.mailbox == MailboxState(2, 9, 5) and junk.coalescer.requested == 1
        # a push the server sent before the newer state (read late): not applied
        rig.server.link.monitor.untagged(b'* STATUS "Junk" (MESSAGES 1 UIDNEXT 8)')
        await trio.testing.wait_all_tasks_blocked()
        assert junk.mailbox == MailboxState(2, 9, 5) and junk.coalescer.requested == 1
        assert junk.scan_range(junk.mailbox).since_uid == 7
