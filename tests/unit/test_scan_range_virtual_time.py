"""The range a session's scans carry and the envelope fetch, in virtual time.

A :class:`~trio_idle_testing.fake_imap.FakeImapServer` session and its scan worker (with
the hooks the reconciler gives it) against a scripted backend: what the backend is told
after coalesced bursts and refusals, and the IMAP commands the envelope fetch costs.
"""

from __future__ import annotations

import json
from contextlib import AbstractAsyncContextManager
from typing import Any

import httpx
import trio
import trio.testing
from trio_idle_testing.fake_imap import FakeImapServer

from tests.fixtures import mock_webhook, webhook_client
from tests.unit.session_rig import (
    Rig,
    closed,
    connected,
    make_rig,
    running,
    scanning,
    settled,
)
from trio_idle.backend.webhook import WebhookClient
from trio_idle.imap.envelope import MAX_ENVELOPES, NewMail
from trio_idle.imap.responses import MailboxState
from trio_idle.mailbox.scan_worker import ScanHooks, ScanPolicy


class Backend:
    """Records scan bodies; answers each with the next scripted status (then 200), a
    held request waits for :attr:`release`."""

    def __init__(self, statuses: list[int] | None = None, hold: bool = False) -> None:
        self.posts: list[dict[str, Any]] = []
        self.statuses = list(statuses or [])
        self.release = trio.Event()
        if not hold:
            self.release.set()

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.posts.append(json.loads(request.content))
        await self.release.wait()
        status = self.statuses.pop(0) if self.statuses else 200
        return httpx.Response(status, json={"scanned": 1, "blocked": 0})

    def ranges(self) -> list[tuple[Any, Any]]:
        return [(p.get("sinceUid"), p.get("uidValidityChanged")) for p in self.posts]


def hooks(rig: Rig, envelopes: bool) -> ScanHooks:
    """What :meth:`trio_idle.mailbox.reconcile.Reconciler._hooks` gives a worker (no store)."""
    memory = rig.memory

    async def new_mail(since: int) -> NewMail | None:
        with trio.move_on_after(60):
            return await memory.desk.ask(since, MAX_ENVELOPES)
        return None

    def on_success(covered: MailboxState) -> None:
        memory.accepted(covered)

    return ScanHooks(
        covered=lambda: memory.mailbox,
        on_success=on_success,
        range_for=memory.scan_range,
        new_mail=new_mail if envelopes else None,
    )


def webhook(backend: Backend) -> WebhookClient:
    return webhook_client("http://backend.invalid/scan", backend)


def scans(rig: Rig, backend: Backend, envelopes: bool) -> AbstractAsyncContextManager[None]:
    """The session's scans sent to ``backend`` for the block (see :func:`scanning`)."""
    return scanning(
        rig, mock_webhook(backend), ScanPolicy("INBOX", 1.0, 60.0), hooks(rig, envelopes)
    )


async def quiet(rig: Rig) -> None:
    await trio.testing.wait_all_tasks_blocked()
    while rig.coalescer.active or rig.coalescer.pending:
        await trio.sleep(1)
        await trio.testing.wait_all_tasks_blocked()


async def test_a_coalesced_scan_carries_the_lowest_uid_not_yet_accepted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rig = make_rig(FakeImapServer(exists=3, uidnext=10, uidvalidity=5))
    server = rig.server
    backend = Backend([400], hold=True)  # the first scan is refused for good
    async with running(rig), scans(rig, backend, envelopes=False):
        await connected(rig)
        server.deliver()  # uid 10: scan 1 goes out and is held
        await trio.testing.wait_all_tasks_blocked()
        for _ in range(5):  # uids 11..15 pushed: one pending scan
            server.deliver()
        server.drop()  # and uid 16 while disconnected: the reconnect's catch-up joins it
        await settled(rig, closed(rig))
        server.deliver()
        await connected(rig, link=2)
        backend.release.set()
        await quiet(rig)
        server.deliver()  # uid 17, after an accepted scan covering up to 16
        await quiet(rig)
    # refused: the pending scan starts where the refused one did; accepted: the next
    # starts right after what it covered
    assert backend.ranges() == [(10, None), (10, None), (17, None)]
    assert rig.memory.mark is not None and rig.memory.mark.uidnext == 18


async def test_a_uidvalidity_change_is_announced_until_a_scan_is_accepted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rig = make_rig(FakeImapServer(exists=3, uidnext=10, uidvalidity=5))
    server = rig.server
    backend = Backend([400])
    async with running(rig), scans(rig, backend, envelopes=False):
        await connected(rig)
        server.renumber(6)
        server.drop()
        await settled(rig, closed(rig))
        await connected(rig, link=2)
        await quiet(rig)
        server.deliver()  # uid 4 in the new numbering
        await quiet(rig)
        server.deliver()
        await quiet(rig)
    assert backend.ranges() == [(None, True), (None, True), (5, None)]
    assert [p["uidValidity"] for p in backend.posts] == [6, 6, 6]


async def test_envelopes_cost_done_search_fetch_idle_and_arrive_with_the_scan(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rig = make_rig(FakeImapServer(exists=3, uidnext=10, uidvalidity=5))
    server = rig.server
    backend = Backend()
    async with running(rig), scans(rig, backend, envelopes=True):
        await connected(rig)
        server.deliver(2)
        await quiet(rig)
        assert server.commands()[4:] == ["DONE", "UID SEARCH", "UID FETCH", "IDLE"]
        assert server.link.idling and len(server.links) == 1
        server.deliver(MAX_ENVELOPES + 1)  # too many: the range only
        await quiet(rig)
    first, second = backend.posts
    assert first["sinceUid"] == 10 and [m["uid"] for m in first["messages"]] == [10, 11]
    assert first["messages"][0]["subject"] == "message 10"
    assert second["sinceUid"] == 12 and "messages" not in second
    assert rig.stats.get("envelope_fetches", "listed") == 1
    assert rig.stats.get("envelope_fetches", "range") == 1


async def test_a_silent_server_fails_the_fetch_but_the_scan_still_goes_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rig = make_rig(FakeImapServer(exists=3, uidnext=10, uidvalidity=5))
    server = rig.server
    backend = Backend()
    async with running(rig), scans(rig, backend, envelopes=True):
        await connected(rig)
        server.go_silent()
        server.link.monitor.untagged(b"* 4 EXISTS")  # pushed just before the silence
        await settled(rig, lambda: len(backend.posts) == 1)
        await connected(rig, link=2)  # the dead connection was replaced
        await quiet(rig)
    assert backend.posts[0]["sinceUid"] == 10 and "messages" not in backend.posts[0]
    assert rig.stats.get("envelope_fetches", "unavailable") == 1


async def test_mail_the_envelope_fetch_finds_moves_the_accepted_mark_past_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rig = make_rig(FakeImapServer(exists=3, uidnext=10, uidvalidity=5))
    server = rig.server
    backend = Backend()
    async with running(rig), scans(rig, backend, envelopes=True):
        await connected(rig)
        server.deliver()  # uid 10, pushed: the scan covers the mailbox up to UIDNEXT 11
        server.push = False
        server.deliver(2)  # uids 11 and 12: their EXISTS comes with the fetch's answers
        await quiet(rig)
    first, second = backend.posts
    assert first["sinceUid"] == 10 and [m["uid"] for m in first["messages"]] == [10, 11, 12]
    # the backend saw 11 and 12 in the first scan: the scan their EXISTS asked for
    # starts after them, at the highest UID fetched + 1
    assert rig.memory.mark is not None and rig.memory.mark.uidnext == 13
    assert second["sinceUid"] == 13 and second["messages"] == []
