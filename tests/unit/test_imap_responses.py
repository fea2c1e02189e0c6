"""Parsing the IMAP responses the daemon acts on, from plain bytes."""

from __future__ import annotations

import pytest

from trio_idle.imap.responses import (
    MailboxState,
    PushKind,
    catch_up_decision,
    classify_push,
    needs_uidnext,
    parse_fetch_uid,
    parse_mailbox_state,
    parse_status,
    with_learnt_uidnext,
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


# STATUS answers raw as framed (the client captures them before aioimaplib cuts them up)
def test_status_answer() -> None:
    state = parse_status(
        [b"* STATUS INBOX (MESSAGES 3 UIDNEXT 42 UIDVALIDITY 7)\r\n", b"* 4 EXISTS\r\n"]
    )
    assert state == MailboxState(exists=3, uidnext=42, uidvalidity=7)


def test_status_answer_with_quoted_mailbox_other_order_and_lower_case() -> None:
    state = parse_status([b'* status "Sent Items" (uidvalidity 5 messages 0 uidnext 1)'])
    assert state == MailboxState(exists=0, uidnext=1, uidvalidity=5)


def test_status_answer_mailbox_name_with_parentheses_and_numbers() -> None:
    # the items are the last parenthesised group: the name's "(UIDNEXT 9)" is not one
    state = parse_status([b'* STATUS "odd (UIDNEXT 9)" (UIDNEXT 12 UIDVALIDITY 3)\r\n'])
    assert state == MailboxState(exists=None, uidnext=12, uidvalidity=3)


def test_status_answer_without_uidnext_says_so() -> None:
    assert parse_status([b"* STATUS INBOX (MESSAGES 2 UIDVALIDITY 7)"]) == MailboxState(2, None, 7)


@pytest.mark.parametrize(
    "line",
    [
        b"* OK [UIDNEXT 42] Predicted next UID",  # a SELECT line, not a STATUS answer
        b"* 3 FETCH (UID 42)",
        b"* STATUS INBOX",  # no item list
        b"* STATUS INBOX (UIDNEXT 42",  # unterminated
        b"* OK STATUS INBOX (UIDNEXT 42)",  # text that merely mentions STATUS
        b"",
    ],
)
def test_lines_that_are_no_status_answer_say_nothing(line: bytes) -> None:
    assert parse_status([line]) == MailboxState()


def test_select_lines_are_not_read_as_a_status_answer() -> None:
    # a SELECT answer's STATUS-looking text line must not set a UIDNEXT it did not send
    lines = [b"7 EXISTS", b"OK [UIDVALIDITY 9] ok", b"STATUS INBOX (UIDNEXT 99)"]
    assert parse_mailbox_state(lines) == MailboxState(exists=7, uidnext=None, uidvalidity=9)


def test_fetch_uid_of_the_message_asked_for() -> None:
    lines = [b"* 2 FETCH (FLAGS (\\Seen))\r\n", b"* 5 FETCH (UID 17)\r\n"]
    assert parse_fetch_uid(lines, 5) == 17
    assert parse_fetch_uid([b"* 5 FETCH (FLAGS () UID 17)"], 5) == 17
    assert parse_fetch_uid([b"* 2 FETCH (UID 9)"], 5) is None  # another message
    assert parse_fetch_uid([b"* 5 FETCH (FLAGS (\\Seen))"], 5) is None  # no UID item
    assert parse_fetch_uid([], 5) is None


# With a STATUS taken before the SELECT (whose answer had no UIDNEXT)
COURIER_SELECT = MailboxState(exists=3, uidnext=None, uidvalidity=7)


def test_needs_uidnext_only_without_it() -> None:
    assert needs_uidnext(COURIER_SELECT)
    assert not needs_uidnext(MailboxState(3, 42, 7))


def test_learnt_uidnext_is_statuss() -> None:
    learnt = with_learnt_uidnext(COURIER_SELECT, MailboxState(3, 42, 7))
    assert learnt == MailboxState(exists=3, uidnext=42, uidvalidity=7)


def test_mail_between_status_and_select_raises_the_learnt_uidnext_by_the_growth() -> None:
    # two arrived after the STATUS: their UIDs are >= 42, so UIDNEXT >= 44
    learnt = with_learnt_uidnext(MailboxState(5, None, 7), MailboxState(3, 42, 7))
    assert learnt.uidnext == 44
    # an expunge meanwhile lowers the count: never below STATUS's own UIDNEXT
    assert with_learnt_uidnext(MailboxState(2, None, 7), MailboxState(3, 42, 7)).uidnext == 42


def test_uidvalidity_changed_between_status_and_select_learns_nothing_from_status() -> None:
    assert with_learnt_uidnext(COURIER_SELECT, MailboxState(3, 42, 6)) == COURIER_SELECT


def test_uidvalidity_only_from_status_is_taken() -> None:
    learnt = with_learnt_uidnext(MailboxState(3, None, None), MailboxState(3, 42, 7))
    assert learnt == MailboxState(exists=3, uidnext=42, uidvalidity=7)


def test_without_statuss_uidnext_the_last_uid_gives_a_lower_bound() -> None:
    learnt = with_learnt_uidnext(COURIER_SELECT, MailboxState(3, None, 7), last_uid=40)
    assert learnt == MailboxState(exists=3, uidnext=41, uidvalidity=7)


def test_an_empty_mailbox_learns_uidnext_one_and_nothing_learnt_changes_nothing() -> None:
    empty = MailboxState(0, None, 7)
    assert with_learnt_uidnext(empty, MailboxState()) == MailboxState(0, 1, 7)
    assert with_learnt_uidnext(COURIER_SELECT, MailboxState()) == COURIER_SELECT


def test_a_select_with_uidnext_is_kept_as_it_is() -> None:
    selected = MailboxState(3, 42, 7)
    assert with_learnt_uidnext(selected, MailboxState(3, 50, 7), last_uid=60) == selected


def test_learnt_uidnext_catches_one_expunged_and_one_arrived() -> None:
    # counts alone (3 -> 3) miss it; the learnt UIDNEXT moved 42 -> 43
    before = with_learnt_uidnext(COURIER_SELECT, MailboxState(3, 42, 7))
    after = with_learnt_uidnext(COURIER_SELECT, MailboxState(3, 43, 7))
    assert not catch_up_decision(COURIER_SELECT, COURIER_SELECT).scan
    decision = catch_up_decision(before, after)
    assert decision.scan and decision.why == "uidnext 42→43"


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
