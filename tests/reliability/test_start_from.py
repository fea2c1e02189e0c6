"""``TRIO_IDLE_START_FROM=now``: the cutover from another daemon whose backend already
scanned every mailbox. The real daemon in-process, the IMAP test server, the test backend
and a real SQLite state file.

What a backend team would notice: on the first start with ``now`` no mailbox is scanned
for the mail it already held (10,000 mailboxes: 10,000 full scans saved), yet the first
new mail after the start is scanned with ``sinceUid`` = the UIDNEXT recorded at start; a
start with stored state is unaffected; a UIDVALIDITY change still scans everything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
from trio_idle_testing.backend import ScanRequest

from tests.harness import ListSource, running_daemon
from tests.reliability.rig import Rig, mailbox_name
from trio_idle.core.config import Settings

A, B = mailbox_name(1, "from"), mailbox_name(2, "from")
OLD_MAIL = 3  # already scanned by the previous daemon's backend: UIDs 1..3, UIDNEXT 4


def _range(request: ScanRequest) -> tuple[Any, Any, Any]:
    body = request.body
    return body.get("uidValidity"), body.get("sinceUid"), body.get("uidValidityChanged")


def _settings(rig: Rig, tmp_path: Path, start_from: str) -> Settings:
    return rig.settings(
        TRIO_IDLE_STATE="sqlite",
        TRIO_IDLE_STATE_PATH=str(tmp_path / "state.sqlite3"),
        TRIO_IDLE_START_FROM=start_from,
    )


def _with_old_mail(rig: Rig, *names: str) -> ListSource:
    source = rig.source(*names)
    for name in names:
        for n in range(OLD_MAIL):  # not in the ledger: nobody owes it a scan any more
            rig.server.append(name, f"Subject: old #{n}\r\n\r\nscanned before\r\n".encode())
    return source


@pytest.mark.parametrize(("start_from", "scans"), [("full", 2), ("now", 0)])
async def test_a_first_start_scans_existing_mail_only_with_full(
    rig: Rig, tmp_path: Path, start_from: str, scans: int
) -> None:
    source = _with_old_mail(rig, A, B)
    async with running_daemon(_settings(rig, tmp_path, start_from), source) as daemon:
        with trio.fail_after(10):
            await rig.all_idle([A, B])
            # the startup decision (and its scan request) comes before IDLE: counted now
            assert daemon.stats.get("catch_up_scans", "startup") == scans
            assert daemon.stats.get("started_from_now") == 2 - scans
            await rig.backend.wait_for_requests(scans, finished=True)
            await rig.quiet(daemon, A)  # a startup scan still pending would absorb the push
            uid = rig.ledger.append(A).uid  # the first mail after the start
            assert uid == OLD_MAIL + 1
            await rig.backend.wait_for_requests(scans + 1, finished=True)
            await rig.quiet(daemon, A)
            await rig.quiet(daemon, B)
    startup = [r for r in rig.backend.requests if r.reason == "startup"]
    assert len(startup) == scans
    assert all(_range(r) == (1000, None, None) for r in startup)  # everything, as before
    pushed = [r for r in rig.backend.requests_for(A) if r.reason != "startup"]
    assert [_range(r) for r in pushed] == [(1000, OLD_MAIL + 1, None)]
    rig.ledger.check()


async def test_the_recorded_uidnext_carries_over_and_a_start_with_state_is_unaffected(
    rig: Rig, tmp_path: Path
) -> None:
    source = _with_old_mail(rig, A, B)
    async with running_daemon(_settings(rig, tmp_path, "now"), source) as daemon:
        with trio.fail_after(10):
            await rig.all_idle([A, B])
            assert daemon.stats.get("started_from_now") == 2
    assert rig.backend.requests == []  # nothing new, nothing scanned
    rig.ledger.append(B, note="while the daemon was stopped")
    # a second start, still with `now`: both mailboxes have state, so it does not apply
    async with running_daemon(_settings(rig, tmp_path, "now"), ListSource(rig.rows(A, B))) as d:
        with trio.fail_after(10):
            await rig.all_idle([A, B])
            assert d.stats.get("started_from_now") == 0
            await rig.backend.wait_for_requests(1, email=B, finished=True)
            await rig.quiet(d, B)
            assert d.stats.get("catch_up_scans", "startup") == 1  # B only: A had nothing new
    (catch_up,) = rig.backend.requests
    assert catch_up.email == B and catch_up.reason == "startup"
    assert _range(catch_up) == (1000, OLD_MAIL + 1, None)  # the UIDNEXT recorded at start
    rig.ledger.check()


async def test_a_uidvalidity_change_still_scans_everything(rig: Rig, tmp_path: Path) -> None:
    source = _with_old_mail(rig, A, B)
    async with running_daemon(_settings(rig, tmp_path, "now"), source) as daemon:
        with trio.fail_after(10):
            first = await rig.idle(A)
            await rig.idle(B)
            await rig.server.restart(new_uidvalidity=True)  # while running: a reconnect
            await rig.idle(A, after=first)
            await rig.backend.wait_for_requests(2, finished=True)
            await rig.quiet(daemon, A)
            await rig.quiet(daemon, B)
    assert sorted((r.email, r.reason, _range(r)) for r in rig.backend.requests) == [
        (A, "reconnect", (1001, None, True)),
        (B, "reconnect", (1001, None, True)),
    ]
    rig.backend.requests.clear()
    rig.server.set_uidvalidity(A, 1002)  # while stopped: the next start compares with it
    settings = _settings(rig, tmp_path, "now")
    async with running_daemon(settings, ListSource(rig.rows(A, B))) as daemon:
        with trio.fail_after(10):
            await rig.all_idle([A, B])
            await rig.backend.wait_for_requests(1, email=A, finished=True)
            await rig.quiet(daemon, A)
    (changed,) = rig.backend.requests
    assert changed.email == A and changed.reason == "startup"
    assert _range(changed) == (1002, None, True)
