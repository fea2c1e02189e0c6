"""Pure parsing of the few IMAP server responses the daemon cares about.

No I/O: functions take the response lines as aioimaplib hands them over (bytes, with
the leading ``"* "`` already stripped for untagged lines) and are tested with plain bytes.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable

import attrs

_EXISTS_RE = re.compile(rb"^\*?\s*(\d+)\s+EXISTS\b", re.IGNORECASE)
_EXPUNGE_RE = re.compile(rb"^\*?\s*(\d+)\s+EXPUNGE\b", re.IGNORECASE)
_UIDNEXT_RE = re.compile(rb"\[UIDNEXT\s+(\d+)\]", re.IGNORECASE)
_UIDVALIDITY_RE = re.compile(rb"\[UIDVALIDITY\s+(\d+)\]", re.IGNORECASE)
_STATUS_RE = re.compile(rb"^(?:\*\s+)?STATUS\s", re.IGNORECASE)
_STATUS_ITEM_RE = re.compile(rb"\b(MESSAGES|UIDNEXT|UIDVALIDITY)\s+(\d+)", re.IGNORECASE)
_FETCH_UID_RE = re.compile(rb"^(?:\*\s+)?(\d+)\s+FETCH\s+\(.*?\bUID\s+(\d+)", re.IGNORECASE)
_BYE_RE = re.compile(rb"^\*?\s*BYE\b", re.IGNORECASE)


@attrs.frozen
class MailboxState:
    """What a SELECT/STATUS told us about a mailbox. ``None`` when the server did not say."""

    exists: int | None = None
    uidnext: int | None = None
    uidvalidity: int | None = None


def parse_mailbox_state(lines: Iterable[bytes | bytearray]) -> MailboxState:
    """Extract EXISTS, UIDNEXT and UIDVALIDITY from SELECT response lines."""
    exists = uidnext = uidvalidity = None
    for raw in lines:
        line = bytes(raw)
        if m := _EXISTS_RE.match(line):
            exists = int(m.group(1))
        if m := _UIDNEXT_RE.search(line):
            uidnext = int(m.group(1))
        if m := _UIDVALIDITY_RE.search(line):
            uidvalidity = int(m.group(1))
    return MailboxState(exists=exists, uidnext=uidnext, uidvalidity=uidvalidity)


def parse_status(lines: Iterable[bytes | bytearray]) -> MailboxState:
    """MESSAGES (as ``exists``), UIDNEXT and UIDVALIDITY from a STATUS answer.

    Reads the ``STATUS <mailbox> (<item> <number> ...)`` line (with or without ``"* "``);
    the item list is the last parenthesised group, so a mailbox name holding ``(`` or a
    literal does not confuse it. Other lines (EXISTS pushed meanwhile, the tagged OK) are
    ignored; an item the server left out is ``None``.
    """
    exists = uidnext = uidvalidity = None
    for raw in lines:
        line = bytes(raw).rstrip()
        if not _STATUS_RE.match(line) or not line.endswith(b")") or b"(" not in line:
            continue
        for key, value in _STATUS_ITEM_RE.findall(line[line.rindex(b"(") + 1 : -1]):
            k = key.upper()
            if k == b"MESSAGES":
                exists = int(value)
            elif k == b"UIDNEXT":
                uidnext = int(value)
            else:
                uidvalidity = int(value)
    return MailboxState(exists=exists, uidnext=uidnext, uidvalidity=uidvalidity)


def parse_fetch_uid(lines: Iterable[bytes | bytearray], number: int) -> int | None:
    """The UID of message ``number`` from the answer to ``FETCH <number> (UID)``, or
    ``None`` if the answer does not hold it (FETCH lines of other messages — flag updates
    the server slips in — are ignored)."""
    for raw in lines:
        if (m := _FETCH_UID_RE.match(bytes(raw))) and int(m.group(1)) == number:
            return int(m.group(2))
    return None


def needs_uidnext(selected: MailboxState) -> bool:
    """Whether a SELECT answer lacks the UIDNEXT that catch-up and ``sinceUid`` rely on
    (RFC 3501 requires it; Courier-IMAP leaves it out), so it must be learnt otherwise."""
    return selected.uidnext is None


def with_learnt_uidnext(
    selected: MailboxState, status: MailboxState, last_uid: int | None = None
) -> MailboxState:
    """``selected`` (the answer of a SELECT) completed with a UIDNEXT learnt otherwise.

    ``status`` is the answer of a STATUS issued *before* that SELECT; ``last_uid`` the
    UID of the SELECT's last message (``FETCH <exists> (UID)``), used when the STATUS
    gave no UIDNEXT. Either way the result is a lower bound of the server's UIDNEXT at
    SELECT time, and every message that arrives after that SELECT (and is announced by
    an EXISTS) has a UID at or above it — exactly what the session's arithmetic needs
    (:meth:`~trio_idle.mailbox.session._Watch.announce` adds the announced count; a mark set
    from it never skips new mail).

    Messages that arrived between the STATUS and the SELECT are in the SELECT's count,
    never announced; each has its own UID at or above the STATUS's UIDNEXT, so that
    UIDNEXT plus the growth of the count (SELECT's EXISTS minus STATUS's MESSAGES) is
    still a lower bound, and above the previous session's UIDNEXT when only they are
    new: the catch-up scan covers them. A UIDVALIDITY that changed between the two
    makes the STATUS's UIDNEXT meaningless: it is not used. Nothing learnt: ``selected``
    as it was (the session falls back to comparing counts).
    """
    if selected.uidnext is not None:
        return selected
    uidvalidity = selected.uidvalidity if selected.uidvalidity is not None else status.uidvalidity
    if status.uidnext is not None and status.uidvalidity in (None, uidvalidity):
        grown = 0
        if selected.exists is not None and status.exists is not None:
            grown = max(0, selected.exists - status.exists)
        return MailboxState(selected.exists, status.uidnext + grown, uidvalidity)
    if last_uid is not None:
        return MailboxState(selected.exists, last_uid + 1, uidvalidity)
    if selected.exists == 0:  # an empty mailbox: every UID to come is at least 1
        return MailboxState(0, 1, uidvalidity)
    return selected


class PushKind(enum.Enum):
    """What an untagged line pushed during IDLE means to us."""

    EXISTS = "exists"
    EXPUNGE = "expunge"
    BYE = "bye"
    OTHER = "other"  # keepalives ("OK Still here"), FETCH flag updates, RECENT, ...


def classify_push(line: bytes | bytearray) -> tuple[PushKind, int | None]:
    """Classify one untagged line; returns the message number for EXISTS/EXPUNGE."""
    if m := _EXISTS_RE.match(line):
        return PushKind.EXISTS, int(m.group(1))
    if m := _EXPUNGE_RE.match(line):
        return PushKind.EXPUNGE, int(m.group(1))
    if _BYE_RE.match(line):
        return PushKind.BYE, None
    return PushKind.OTHER, None


@attrs.frozen
class CatchUp:
    """Decision after comparing a fresh mailbox state with the last one seen."""

    scan: bool
    why: str


def catch_up_decision(previous: MailboxState | None, current: MailboxState) -> CatchUp:
    """Should a (re)connect trigger a scan? Only when mail may have arrived unseen.

    ``previous`` is what the last session of this connection saw (``None``: never
    connected in this process). A changed UIDVALIDITY means every UID we knew is
    void, so we scan; a moved UIDNEXT means mail arrived while nobody listened. A server
    that omits UIDNEXT from SELECT has it learnt otherwise (:func:`with_learnt_uidnext`);
    only when that failed too are counts compared — and they miss one message
    expunged plus one arrived.
    """
    if previous is None:
        return CatchUp(False, "first session")
    if (
        previous.uidvalidity is not None
        and current.uidvalidity is not None
        and previous.uidvalidity != current.uidvalidity
    ):
        return CatchUp(True, "uidvalidity changed")
    if previous.uidnext is not None and current.uidnext is not None:
        if current.uidnext > previous.uidnext:
            return CatchUp(True, f"uidnext {previous.uidnext}→{current.uidnext}")
        return CatchUp(False, "uidnext unchanged")
    if previous.exists is not None and current.exists is not None:
        if current.exists != previous.exists:
            return CatchUp(True, f"exists {previous.exists}→{current.exists}")
        return CatchUp(False, "exists unchanged")
    return CatchUp(True, "server gave no UIDNEXT or EXISTS")
