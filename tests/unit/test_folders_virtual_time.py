"""Folders beside INBOX on the session's own connection (virtual time): LIST once, STATUS
per tick, a scan requested for the folder whose UIDNEXT moved; a missing folder is
reported once and never asked about again."""

from __future__ import annotations

import attrs
import trio
from trio_idle_testing.fake_imap import FakeImapServer

from tests.unit.session_rig import CONN, TICK, connected, make_rig, running, settled
from tests.unit.test_session_virtual_time import MemoryBackend
from trio_idle.core.stats import Stats
from trio_idle.state.records import ScannedState
from trio_idle.state.store import StateStore


async def test_mail_filed_into_junk_requests_a_junk_scan_within_one_tick(
    autojump_clock: trio.abc.Clock,
) -> None:
    rig = make_rig(folders=("INBOX", "\\Junk"))
    rig.server.add_folder("[Gmail]/Spam", attributes=["\\Junk", "\\HasNoChildren"], uidnext=7)
    async with running(rig):
        await connected(rig)
        assert rig.server.commands().count("LIST") == 1
        junk = rig.memory.folders.by_name["[Gmail]/Spam"]
        assert junk.coalescer.requested == 0  # nothing new: first check, no store
        rig.server.deliver_to("[Gmail]/Spam", 2)
        filed_at = trio.current_time()
        await settled(rig, lambda: junk.coalescer.requested == 1)
        assert trio.current_time() - filed_at <= TICK
        assert junk.coalescer.pending_reason == "tick"
        assert junk.scan_range(junk.mailbox).since_uid == 7  # the first new Junk UID
        assert junk.mailbox is not None and junk.mailbox.uidnext == 9
        assert rig.coalescer.requested == 0  # INBOX got nothing
        # DONE, STATUS, IDLE on the one connection: no other was opened
        assert len(rig.server.links) == 1
        assert rig.server.commands()[-3:] == ["DONE", "STATUS", "IDLE"]


async def test_a_missing_folder_is_reported_once_and_not_asked_for_again(
    autojump_clock: trio.abc.Clock,
) -> None:
    rig = make_rig(folders=("INBOX", "\\Junk", "Archive"))
    rig.server.add_folder("Junk", attributes=["\\Junk"])
    async with running(rig):
        await connected(rig)
        rig.server.folders.pop("Junk")  # deleted while watched
        await trio.sleep(5 * TICK)
        rig.server.bye()  # a new connection: LIST again, Archive still missing
        await connected(rig, link=2)
        await trio.sleep(5 * TICK)
    warnings = [t for t in rig.log.texts("warning") if "folder" in t]
    assert warnings == [
        "[idle/alice@example.test] folder Archive not found on the server: not watched",
        "[idle/alice@example.test] folder Junk no longer exists (STATUS refused): not watched",
    ]
    # after its STATUS was refused, Junk was never asked for again on that connection
    statuses = [c for c in rig.server.calls if c.command == "STATUS"]
    assert [c.arg for c in statuses if c.link == 1] == ["Junk", "Junk"]
    assert [c.arg for c in statuses if c.link == 2] == []


async def test_junk_mail_filed_while_down_or_disconnected_is_caught_up_per_folder(
    autojump_clock: trio.abc.Clock,
) -> None:
    # the last run had Junk scanned up to UIDNEXT 4 (its own row, beside INBOX's)
    rows = {
        (CONN.id, "INBOX"): ScannedState(5, 10, 0.0),
        (CONN.id, "Junk"): ScannedState(5, 4, 0.0),
    }
    store = StateStore(MemoryBackend(rows), Stats())
    await store.load()
    rig = make_rig(store=store, folders=("INBOX", "\\Junk"))
    rig.server.add_folder("Junk", attributes=["\\Junk"], uidnext=6)  # 2 filed while down
    async with running(rig):
        await connected(rig)
        junk = rig.memory.folders.by_name["Junk"]
        assert rig.coalescer.requested == 0  # INBOX: nothing new since its row
        assert junk.coalescer.pending_reason == "startup"
        assert junk.scan_range(junk.mailbox).since_uid == 4
        junk.coalescer.take_next()  # the scan went out; the backend accepted it
        assert junk.mailbox is not None
        junk.accepted(junk.mailbox)
        junk.coalescer.done()
        rig.server.drop()
        rig.server.deliver_to("Junk")  # filed while nobody was connected
        await connected(rig, link=2)
        assert junk.coalescer.pending_reason == "reconnect"
        assert junk.scan_range(junk.mailbox).since_uid == 6
    assert junk.coalescer.requested == 2


async def test_a_rows_own_folders_win_over_the_setting(autojump_clock: trio.abc.Clock) -> None:
    rig = make_rig()  # TRIO_IDLE_FOLDERS: INBOX only
    rig.server.add_folder("Junk", attributes=["\\Junk"])
    async with running(rig, attrs.evolve(CONN, folders=("INBOX", "\\Junk"))):
        await connected(rig)
        rig.server.deliver_to("Junk")
        await settled(rig, lambda: "Junk" in rig.memory.folders.by_name)
        junk = rig.memory.folders.by_name["Junk"]
        await settled(rig, lambda: junk.coalescer.requested == 1)


async def test_a_server_without_idle_checks_the_folders_on_its_poll(
    autojump_clock: trio.abc.Clock,
) -> None:
    server = FakeImapServer(exists=3, uidnext=10, uidvalidity=5, idle=False)
    server.add_folder("Junk", attributes=["\\Junk"])
    rig = make_rig(server, folders=("INBOX", "\\Junk"))
    async with running(rig):
        await connected(rig)
        junk = rig.memory.folders.by_name["Junk"]
        server.deliver_to("Junk")
        filed_at = trio.current_time()
        seen = len(server.calls)
        # the server's wait wakes on commands it receives, not on what the session does
        # with the answer: wait for the next poll's STATUS, then until the session blocks
        await settled(rig, lambda: any(c.command == "STATUS" for c in server.calls[seen:]))
        assert junk.coalescer.requested == 1
        assert trio.current_time() - filed_at <= TICK
        assert junk.coalescer.pending_reason == "tick"
        assert "IDLE" not in server.commands()


async def test_a_folder_envelope_request_is_served_by_a_visit_idling_or_polling(
    autojump_clock: trio.abc.Clock,
) -> None:
    for idle in (True, False):
        server = FakeImapServer(exists=3, uidnext=10, uidvalidity=5, idle=idle)
        server.add_folder("Junk", attributes=["\\Junk"], uidnext=7)
        rig = make_rig(server, folders=("INBOX", "\\Junk"))
        async with running(rig):
            await connected(rig)
            junk = rig.memory.folders.by_name["Junk"]
            server.deliver_to("Junk", 2)
            seen = len(server.calls)
            asked_at = trio.current_time()
            found = await junk.desk.ask(7, 50)
            assert trio.current_time() - asked_at < TICK  # served at once, not on a tick
            assert found is not None and found.uids == (7, 8)
            assert found.envelopes is not None
            assert [e.subject for e in found.envelopes] == ["Junk message 7", "Junk message 8"]
            visit = [c.command for c in server.calls[seen:]]
            middle = ["EXAMINE", "UID SEARCH", "SELECT"]
            expected = ["DONE", *middle, "IDLE"] if idle else middle
            assert visit[: len(expected)] == expected
            assert rig.coalescer.requested == 0  # Junk's mail is not INBOX mail
        assert await junk.desk.ask(7, 50) is None  # no session: the range only


async def test_a_folder_created_after_it_was_reported_missing_is_watched_from_the_next_connection(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Missing at connect: reported once, not asked for on that connection. Created by the
    user meanwhile: the next connection's LIST finds it, its mail is scanned, and nothing
    is reported again."""
    rig = make_rig(folders=("INBOX", "Archive"))
    async with running(rig):
        await connected(rig)
        rig.server.add_folder("Archive", uidnext=3)  # created while this connection runs
        await trio.sleep(3 * TICK)
        assert "Archive" not in rig.memory.folders.by_name  # not on this connection
        rig.server.bye()  # the next connection lists the folders again
        await connected(rig, link=2)
        archive = rig.memory.folders.by_name["Archive"]
        rig.server.deliver_to("Archive")
        await settled(rig, lambda: archive.coalescer.requested == 1)
        assert archive.scan_range(archive.mailbox).since_uid == 3
    warnings = [t for t in rig.log.texts("warning") if "folder" in t]
    assert warnings == [
        "[idle/alice@example.test] folder Archive not found on the server: not watched"
    ]
    statuses = [c for c in rig.server.calls if c.command == "STATUS"]
    assert {c.arg for c in statuses if c.link == 1} == set()
    assert {c.arg for c in statuses if c.link == 2} == {"Archive"}
