"""The accepted mark and the range a scan carries (pure; :mod:`trio_idle.state.scan_range`)."""

from __future__ import annotations

from trio_idle.imap.responses import MailboxState
from trio_idle.state.scan_range import ScanMark, ScanRange, advance, on_connect, scan_range

NOW = MailboxState(exists=5, uidnext=20, uidvalidity=7)


def test_the_range_starts_at_the_accepted_mark() -> None:
    assert scan_range(ScanMark(7, 12), NOW) == ScanRange(7, since_uid=12)
    assert scan_range(ScanMark(7, 12), NOW).fields() == {"uidValidity": 7, "sinceUid": 12}


def test_no_mark_or_no_uidnext_means_scan_everything() -> None:
    assert scan_range(None, NOW).fields() == {"uidValidity": 7}
    assert scan_range(ScanMark(7, None), NOW).fields() == {"uidValidity": 7}
    assert scan_range(ScanMark(7, 3), MailboxState(uidnext=4)).fields() == {}
    assert scan_range(ScanMark(7, 3), None).fields() == {}


def test_another_uidvalidity_says_changed_and_gives_no_since_uid() -> None:
    assert scan_range(ScanMark(6, 12), NOW).fields() == {
        "uidValidity": 7,
        "uidValidityChanged": True,
    }


def test_only_a_success_moves_the_mark_and_never_backwards() -> None:
    mark = ScanMark(7, 12)
    assert advance(mark, NOW) == ScanMark(7, 20)
    assert advance(ScanMark(7, 25), NOW) == ScanMark(7, 25)  # an older scan's late 2xx
    assert advance(ScanMark(6, 25), NOW) == ScanMark(7, 20)  # a new UIDVALIDITY restarts it
    assert advance(None, NOW) == ScanMark(7, 20)


def test_a_session_without_catch_up_starts_the_mark_at_uidnext() -> None:
    assert on_connect(None, NOW, scanning=False) == ScanMark(7, 20)
    assert on_connect(None, NOW, scanning=True) is None  # the catch-up scans everything
    assert on_connect(ScanMark(7, 12), NOW, scanning=True) == ScanMark(7, 12)


def test_a_mark_above_the_servers_uidnext_is_lowered_so_new_mail_is_in_range() -> None:
    assert on_connect(ScanMark(7, 30), NOW, scanning=False) == ScanMark(7, 20)
    assert scan_range(on_connect(ScanMark(7, 30), NOW, scanning=False), NOW).since_uid == 20
