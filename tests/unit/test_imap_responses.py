"""Parsing the IMAP responses the daemon acts on, from plain bytes."""

from __future__ import annotations

import pytest

from trio_idle.imap.responses import (
    MailboxState,
    PushKind,
    catch_up_decision,
    classify_push,
    parse_mailbox_state,
)

# SELECT response lines as aioimaplib hands them over (untagged "* " stripped)
SELECT_LINES = [
    b"FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)",
    b"OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft \\*)] Flags permitted.",
    b"3 EXISTS",
    b"0 RECENT",
    b"OK [UIDVALIDITY 1700000000] UIDs valid",
    b"OK [UIDNEXT 42] Predicted next UID",
    b"[READ-WRITE] Select completed (0.001 + 0.000 secs).",
]


def test_select_response() -> None:
    assert parse_mailbox_state(SELECT_LINES) == MailboxState(
        exists=3, uidnext=42, uidvalidity=1700000000
    )


def test_select_response_as_bytearrays() -> None:
    state = parse_mailbox_state(bytearray(line) for line in SELECT_LINES)
    assert state == MailboxState(exists=3, uidnext=42, uidvalidity=1700000000)


def test_select_without_uidnext() -> None:
    state = parse_mailbox_state([b"7 EXISTS", b"OK [UIDVALIDITY 9] ok"])
    assert state == MailboxState(exists=7, uidnext=None, uidvalidity=9)


def test_empty_response_says_nothing() -> None:
    assert parse_mailbox_state([]) == MailboxState(None, None, None)


def test_status_line() -> None:
    state = parse_mailbox_state(
        [b"STATUS INBOX (MESSAGES 3 UIDNEXT 42 UIDVALIDITY 7)", b"STATUS completed."]
    )
    assert state == MailboxState(exists=3, uidnext=42, uidvalidity=7)


def test_status_line_with_quoted_mailbox_and_other_order() -> None:
    state = parse_mailbox_state([b'STATUS "Sent Items" (UIDVALIDITY 5 MESSAGES 0 UIDNEXT 1)'])
    assert state == MailboxState(exists=0, uidnext=1, uidvalidity=5)


@pytest.mark.parametrize(
    ("line", "kind", "number"),
    [
        (b"* 5 EXISTS", PushKind.EXISTS, 5),
        (b"5 EXISTS", PushKind.EXISTS, 5),
        (b"* 123456 exists", PushKind.EXISTS, 123456),
        (b"* 2 EXPUNGE", PushKind.EXPUNGE, 2),
        (b"2 EXPUNGE", PushKind.EXPUNGE, 2),
        (b"* BYE bye", PushKind.BYE, None),
        (b"BYE Server shutting down", PushKind.BYE, None),
        (b"* OK Still here", PushKind.OTHER, None),
        (b"* 3 FETCH (FLAGS (\\Seen))", PushKind.OTHER, None),
        (b"* 1 RECENT", PushKind.OTHER, None),
        (b"* OK [UIDNEXT 5] next", PushKind.OTHER, None),
        (b"", PushKind.OTHER, None),
    ],
)
def test_classify_push(line: bytes, kind: PushKind, number: int | None) -> None:
    assert classify_push(line) == (kind, number)


def test_classify_push_accepts_bytearray() -> None:
    assert classify_push(bytearray(b"* 9 EXISTS")) == (PushKind.EXISTS, 9)


# -- catch-up after a (re)connect -----------------------------------------------------

SEEN = MailboxState(exists=3, uidnext=42, uidvalidity=7)


def test_first_session_does_not_scan() -> None:
    decision = catch_up_decision(None, SEEN)
    assert decision.scan is False
    assert decision.why == "first session"


def test_uidnext_moved_scans() -> None:
    decision = catch_up_decision(SEEN, MailboxState(exists=3, uidnext=44, uidvalidity=7))
    assert decision.scan is True
    assert "42" in decision.why and "44" in decision.why


def test_same_state_does_not_scan() -> None:
    assert catch_up_decision(SEEN, SEEN).scan is False


def test_uidnext_same_but_exists_dropped_does_not_scan() -> None:
    # messages deleted while away: nothing new to scan
    assert catch_up_decision(SEEN, MailboxState(1, 42, 7)).scan is False


def test_uidvalidity_changed_scans() -> None:
    decision = catch_up_decision(SEEN, MailboxState(exists=3, uidnext=42, uidvalidity=8))
    assert decision.scan is True
    assert "uidvalidity" in decision.why


def test_no_uidnext_but_exists_changed_scans() -> None:
    before = MailboxState(exists=3, uidnext=None, uidvalidity=7)
    decision = catch_up_decision(before, MailboxState(exists=4, uidnext=None, uidvalidity=7))
    assert decision.scan is True
    assert "exists" in decision.why


def test_no_uidnext_and_exists_unchanged_does_not_scan() -> None:
    before = MailboxState(exists=3, uidnext=None, uidvalidity=7)
    assert catch_up_decision(before, before).scan is False


def test_server_that_says_nothing_scans_to_be_safe() -> None:
    assert catch_up_decision(MailboxState(), MailboxState()).scan is True
