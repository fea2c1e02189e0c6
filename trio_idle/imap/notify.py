"""IMAP NOTIFY (RFC 5465): the command a session sends, and the STATUS pushes it brings.

Pure: bytes and strings in, values out, no I/O; tested with plain bytes.

Where a server announces ``NOTIFY``, a session that watches folders beside its selected
mailbox asks for ``MessageNew`` and ``MessageExpunge`` (RFC 5465 §5: MessageNew needs
MessageExpunge) on the selected mailbox — which keeps the ``EXISTS`` pushes of plain
IDLE — and on the other watched folders, for which the server then pushes an untagged
``STATUS <folder> (MESSAGES n UIDNEXT n ...)`` during IDLE when mail arrives (§5.2).
:class:`NotifyWatch` turns those lines into the newest state per watched folder, and
notices ``* OK [NOTIFICATIONOVERFLOW]`` (§5.8: the server gave up; NOTIFY is off).

Everything here tolerates hostile input: a line is at most the framer's ``max_line``,
parsed in linear time; a STATUS for a folder not watched is counted and dropped, a
malformed one counted and dropped; the pending states are at most one per watched
folder.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Final

import attrs

from trio_idle.imap.responses import MailboxState

#: the events asked for, on the selected mailbox and on the others (RFC 5465 §5:
#: MessageNew requires MessageExpunge; no fetch attributes: EXISTS as without NOTIFY)
EVENTS: Final = "(MessageNew MessageExpunge)"

#: a name longer than this is not put on a NOTIFY line (STATUS still checks it)
MAX_NAME: Final = 1000

_STATUS_START = re.compile(rb"^(?:\*\s+)?STATUS\s+", re.IGNORECASE)
_OVERFLOW = re.compile(rb"^(?:\*\s+)?OK\s+\[NOTIFICATIONOVERFLOW\]", re.IGNORECASE)
_QUOTED = re.compile(rb'"((?:[^"\\\r\n]|\\["\\])*)"')
_ATOM = re.compile(rb"[^\s()\"{]+")
# pairs separated by spaces: a number always ends where the next key's space begins, so
# no line can make the match backtrack more than linearly
_ITEMS = re.compile(rb"\(\s*((?:[A-Za-z][A-Za-z0-9.-]{0,39}\s+\d{1,20}(?:\s+|(?=\))))*)\)\s*$")
_ITEM = re.compile(rb"([A-Za-z0-9.-]+)\s+(\d+)")
_UNESCAPE = re.compile(rb"\\([\"\\])")
#: UIDNEXT, UIDVALIDITY and MESSAGES are 32-bit numbers (RFC 3501 §9: number, nz-number)
_MAX_NUMBER: Final = 2**32 - 1


def quotable(name: str) -> bool:
    """Whether ``name`` can go on a command line as an IMAP quoted string: printable
    ASCII (RFC 3501 §9 quoted: no CR, LF or NUL; 8-bit names need a literal), not
    empty, at most :data:`MAX_NAME` characters."""
    return 0 < len(name) <= MAX_NAME and all(" " <= c <= "~" for c in name)


def quote_name(name: str) -> str:
    """``name`` as a quoted string, ``\\`` and ``"`` escaped (:func:`quotable` names)."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def notify_set_args(folders: Sequence[str]) -> tuple[str, ...] | None:
    """The arguments of ``NOTIFY SET`` watching the selected mailbox and ``folders``:

    ``SET (selected (MessageNew MessageExpunge)) (mailboxes ("Junk" "[Gmail]/Spam")
    (MessageNew MessageExpunge))`` (RFC 5465 §6: several mailboxes are one
    parenthesised list). ``None`` when there is no folder, or one cannot be sent as a
    quoted string (:func:`quotable`): the caller keeps checking with STATUS then."""
    if not folders or not all(quotable(f) for f in folders):
        return None
    names = " ".join(quote_name(f) for f in folders)
    return ("SET", f"(selected {EVENTS})", f"(mailboxes ({names}) {EVENTS})")


@attrs.frozen
class NotifyAnswer:
    """How a ``NOTIFY SET`` went: ``in_effect``, else ``why`` not (the server's text,
    unscrubbed, cut to 200 characters); ``refused``: the server answered NO/BAD (it
    was sent)."""

    in_effect: bool
    why: str = ""
    refused: bool = False


@attrs.frozen
class StatusPush:
    """One untagged STATUS line: the mailbox as the server named it, and what it said
    (``MESSAGES`` as ``exists``; an item left out is ``None``)."""

    mailbox: str
    state: MailboxState


def is_status(line: bytes | bytearray) -> bool:
    """Whether ``line`` is an untagged STATUS response (with or without ``* ``)."""
    return _STATUS_START.match(line) is not None


def parse_status_push(line: bytes | bytearray) -> StatusPush | None:
    """The mailbox and items of an untagged ``STATUS`` line, or ``None`` when it is not
    one or is malformed (a literal mailbox name, unbalanced quotes, junk in the item
    list, a number above 32 bits). Linear in the line's length."""
    raw = bytes(line).rstrip(b"\r\n")
    start = _STATUS_START.match(raw)
    if start is None:
        return None
    rest = raw[start.end() :]
    if rest[:1] == b'"':
        quoted = _QUOTED.match(rest)
        if quoted is None:
            return None
        name = _UNESCAPE.sub(rb"\1", quoted.group(1))
        rest = rest[quoted.end() :]
    else:
        atom = _ATOM.match(rest)
        if atom is None:  # a literal ({n}) or nothing
            return None
        name = atom.group(0)
        rest = rest[atom.end() :]
    if not rest[:1].isspace():
        return None
    items = _ITEMS.match(rest.lstrip())
    if items is None:
        return None
    values: dict[bytes, int] = {}
    for key, number in _ITEM.findall(items.group(1)):
        value = int(number)
        if value > _MAX_NUMBER:
            return None
        values[key.upper()] = value
    state = MailboxState(
        exists=values.get(b"MESSAGES"),
        uidnext=values.get(b"UIDNEXT"),
        uidvalidity=values.get(b"UIDVALIDITY"),
    )
    return StatusPush(name.decode("ascii", "replace"), state)


def status_lines_for(lines: Iterable[bytes | bytearray], mailbox: str) -> list[bytes]:
    """Of a STATUS command's untagged answer, the lines about ``mailbox``: under NOTIFY
    a server may push another folder's STATUS while the command runs, and its numbers
    must not pass for this folder's. Lines whose mailbox cannot be read are kept (as
    without NOTIFY)."""
    kept: list[bytes] = []
    for raw in lines:
        line = bytes(raw)
        if is_status(line):
            push = parse_status_push(line)
            if push is not None and not same_mailbox(push.mailbox, mailbox):
                continue
        kept.append(line)
    return kept


def same_mailbox(a: str, b: str) -> bool:
    """Whether two mailbox names are one mailbox (INBOX is case-insensitive)."""
    return a == b or (a.upper() == "INBOX" and b.upper() == "INBOX")


def merged(old: MailboxState | None, new: MailboxState) -> MailboxState:
    """``new``, with what it left out taken from ``old`` (a push may carry MESSAGES
    only, e.g. after an expunge: the folder's UIDNEXT is then still the one known)."""
    if old is None:
        return new
    return MailboxState(
        exists=new.exists if new.exists is not None else old.exists,
        uidnext=new.uidnext if new.uidnext is not None else old.uidnext,
        uidvalidity=new.uidvalidity if new.uidvalidity is not None else old.uidvalidity,
    )


def stale(known: MailboxState | None, pushed: MailboxState) -> bool:
    """Whether ``pushed`` (merged with ``known``) is older than what is ``known``: a
    lower UIDNEXT in the same UIDVALIDITY. A push collected while the connection's own
    STATUS check ran may be answered before it and taken after it; applied, it would
    move the folder's state (and its mark) back, and the next scan would repeat mail."""
    return (
        known is not None
        and known.uidnext is not None
        and pushed.uidnext is not None
        and known.uidvalidity == pushed.uidvalidity
        and pushed.uidnext < known.uidnext
    )


class NotifyWatch:
    """What NOTIFY pushed for one connection since the session last looked.

    Fed every untagged line by the :class:`~trio_idle.imap.push_monitor.PushMonitor`
    (:meth:`feed`, synchronous, cheap for any other line); the session takes the
    :attr:`pending` states (:meth:`take`) and the counters. Bounded: one pending state
    per watched folder, counters for the rest. Not thread-safe (one trio task feeds it,
    the same or another task of that thread takes)."""

    __slots__ = ("folders", "ignored", "malformed", "overflow", "pending")

    def __init__(self, folders: Iterable[str]) -> None:
        #: the watched folders, as the server names them (the NOTIFY line's)
        self.folders: frozenset[str] = frozenset(folders)
        #: the newest pushed state of each watched folder not taken yet
        self.pending: dict[str, MailboxState] = {}
        #: STATUS pushes for folders not watched (taken by the session to count)
        self.ignored = 0
        #: STATUS lines that could not be read
        self.malformed = 0
        #: the server sent ``* OK [NOTIFICATIONOVERFLOW]``: NOTIFY is off on this connection
        self.overflow = False

    def _watched(self, name: str) -> str | None:
        if name in self.folders:
            return name
        if name.upper() == "INBOX":
            return next((f for f in self.folders if f.upper() == "INBOX"), None)
        return None

    def feed(self, line: bytes | bytearray) -> bool:
        """One untagged line: whether the session must wake (a watched folder's STATUS,
        or the overflow). Never raises."""
        if is_status(line):
            push = parse_status_push(line)
            if push is None:
                self.malformed += 1
                return False
            name = self._watched(push.mailbox)
            if name is None:
                self.ignored += 1
                return False
            self.pending[name] = merged(self.pending.get(name), push.state)
            return True
        if _OVERFLOW.match(line):
            self.overflow = True
            return True
        return False

    @property
    def waiting(self) -> bool:
        """Whether something waits for the session (a pushed state or the overflow)."""
        return bool(self.pending) or self.overflow

    def take(self) -> dict[str, MailboxState]:
        """The pending states (then none)."""
        pending, self.pending = self.pending, {}
        return pending

    def take_counts(self) -> tuple[int, int]:
        """``(ignored, malformed)`` since the last call (then zero)."""
        counts = (self.ignored, self.malformed)
        self.ignored = self.malformed = 0
        return counts
