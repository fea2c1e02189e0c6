"""IMAP NOTIFY (RFC 5465), pure: the command a session sends, the STATUS lines it reads,
and what the push monitor does with them. Plain bytes in, values out."""

from __future__ import annotations

import pytest

from trio_idle.imap.notify import (
    NotifyWatch,
    notify_set_args,
    parse_status_push,
    quotable,
    stale,
    status_lines_for,
)
from trio_idle.imap.push_monitor import PushMonitor
from trio_idle.imap.responses import MailboxState, parse_status

# -- the command -----------------------------------------------------------------------


def test_notify_set_asks_for_new_mail_and_expunges_on_the_selected_mailbox_and_the_folders() -> (
    None
):
    args = notify_set_args(["Junk", "[Gmail]/Spam"])
    assert args is not None
    assert " ".join(("NOTIFY", *args)).encode() == (
        b"NOTIFY SET (selected (MessageNew MessageExpunge)) "
        b'(mailboxes ("Junk" "[Gmail]/Spam") (MessageNew MessageExpunge))'
    )


def test_a_folder_name_is_quoted_with_its_quotes_and_backslashes_escaped() -> None:
    args = notify_set_args(['a"b\\c', "Spam (old)"])
    assert args is not None
    assert args[2] == '(mailboxes ("a\\"b\\\\c" "Spam (old)") (MessageNew MessageExpunge))'


@pytest.mark.parametrize(
    "name",
    ["", "bad\r\nA1 LOGOUT", "nul\x00", "Entwürfe", "tab\there", "x" * 1001],
)
def test_a_name_that_cannot_be_a_quoted_string_keeps_the_connection_off_notify(name: str) -> None:
    # CR/LF would end the line (a second command), 8-bit needs a literal: no NOTIFY line
    assert not quotable(name)
    assert notify_set_args(["Junk", name]) is None


def test_no_folder_no_notify() -> None:
    assert notify_set_args([]) is None


# -- the STATUS a server pushes ------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "mailbox", "state"),
    [
        (b'* STATUS "Junk" (MESSAGES 3 UIDNEXT 7 UIDVALIDITY 9)', "Junk", MailboxState(3, 7, 9)),
        (b"* STATUS Spamverdacht (MESSAGES 1 UIDNEXT 2)\r\n", "Spamverdacht", MailboxState(1, 2)),
        (b'STATUS "[Gmail]/Spam" (UIDNEXT 12)', "[Gmail]/Spam", MailboxState(None, 12)),
        (b'* status "a\\"b\\\\c" (uidnext 4 unseen 2)', 'a"b\\c', MailboxState(None, 4)),
        (b'* STATUS "Spam (old)" (MESSAGES 0)', "Spam (old)", MailboxState(0)),
        (b"* STATUS INBOX ()", "INBOX", MailboxState()),
        (b"* STATUS Junk (HIGHESTMODSEQ 17 UIDNEXT 5)", "Junk", MailboxState(None, 5)),
    ],
)
def test_a_pushed_status_gives_the_mailbox_and_its_numbers(
    line: bytes, mailbox: str, state: MailboxState
) -> None:
    push = parse_status_push(line)
    assert push is not None
    assert (push.mailbox, push.state) == (mailbox, state)


@pytest.mark.parametrize(
    "line",
    [
        b"* 3 EXISTS",
        b"* OK Still here",
        b"* STATUS",
        b"* STATUS Junk",
        b"* STATUS {4}",  # a literal name: not readable from the line
        b'* STATUS "Junk (MESSAGES 1)',  # unbalanced quote
        b"* STATUS Junk (MESSAGES x)",
        b"* STATUS Junk (MESSAGES 1",
        b"* STATUS Junk (MESSAGES 1) trailing",
        b"* STATUS Junk (UIDNEXT 4294967296)",  # above 32 bits
        b"* STATUS Junk (UIDNEXT 1 UIDNEXT)",
        b"* STATUS Junk(UIDNEXT 1)",
        b"* STATUS \xff\xfe (UIDNEXT 1 \x00)",
    ],
)
def test_garbage_is_not_a_status(line: bytes) -> None:
    assert parse_status_push(line) is None


def test_hostile_lines_cost_linear_time() -> None:
    # each ~1 MB (the framer's default max_line): parsed without backtracking blow-up
    for line in (
        b"* STATUS x (" + b"A 1 " * 250_000 + b"B",
        b"* STATUS x (A " + b"1" * 1_000_000,
        b'* STATUS "' + b"\\" * 1_000_000,
        b"* STATUS " + b"x" * 1_000_000,
    ):
        assert parse_status_push(line) is None


def test_a_status_answer_keeps_only_its_own_folders_line() -> None:
    # under NOTIFY a push for Junk may come inside the answer to STATUS Archive
    answer = [
        b'* STATUS "Junk" (MESSAGES 9 UIDNEXT 99 UIDVALIDITY 1)',
        b'* STATUS "Archive" (UIDNEXT 5 UIDVALIDITY 2)',
    ]
    assert parse_status(status_lines_for(answer, "Archive")) == MailboxState(None, 5, 2)
    assert parse_status(status_lines_for([b"* STATUS inbox (UIDNEXT 3)"], "INBOX")).uidnext == 3


# -- what the monitor collects -------------------------------------------------------


async def test_a_watched_folders_status_wakes_the_session_and_keeps_the_newest_state() -> None:
    monitor = PushMonitor()
    monitor.exists = 4
    monitor.notify = NotifyWatch(["Junk"])
    assert not monitor.pending()
    monitor.untagged(b'* STATUS "Junk" (MESSAGES 1 UIDNEXT 2 UIDVALIDITY 7)')
    monitor.untagged(b'* STATUS "Junk" (MESSAGES 2)')  # an expunge and a new one: MESSAGES
    assert monitor.pending()
    assert monitor.notify.take() == {"Junk": MailboxState(2, 2, 7)}
    assert not monitor.pending()
    monitor.untagged(b"* 5 EXISTS")  # the selected mailbox's pushes are as before
    assert monitor.take_new_mail() == 1


async def test_status_for_a_folder_not_watched_and_garbage_are_counted_not_kept() -> None:
    monitor = PushMonitor()
    watch = monitor.notify = NotifyWatch(["Junk"])
    for n in range(1000):  # a hostile server naming folders: memory stays bounded
        monitor.untagged(f'* STATUS "Other{n}" (UIDNEXT {n + 1})'.encode())
    monitor.untagged(b"* STATUS {5}")
    monitor.untagged(b"* STATUS Junk (UIDNEXT x)")
    assert not monitor.pending() and watch.pending == {}
    assert watch.take_counts() == (1000, 2)
    assert watch.take_counts() == (0, 0)


async def test_notification_overflow_wakes_the_session() -> None:
    monitor = PushMonitor()
    monitor.notify = NotifyWatch(["Junk"])
    monitor.untagged(b"* OK [NOTIFICATIONOVERFLOW] too many")
    assert monitor.pending() and monitor.notify.overflow


async def test_without_notify_a_status_line_is_nothing() -> None:
    monitor = PushMonitor()
    monitor.untagged(b'* STATUS "Junk" (UIDNEXT 2)')
    monitor.untagged(b"* OK [NOTIFICATIONOVERFLOW]")
    assert not monitor.pending()


def test_a_push_older_than_what_is_known_is_stale() -> None:
    known = MailboxState(5, 9, 1)
    assert stale(known, MailboxState(4, 8, 1))  # collected during the check that saw 9
    assert not stale(known, MailboxState(5, 9, 1))
    assert not stale(known, MailboxState(6, 10, 1))
    assert not stale(known, MailboxState(1, 2, 7))  # a new UIDVALIDITY: not comparable
    assert not stale(None, MailboxState(1, 2, 7))
    assert not stale(MailboxState(5, None, 1), MailboxState(1, 2, 1))
