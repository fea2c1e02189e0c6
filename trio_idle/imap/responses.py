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
_STATUS_ITEM_RE = re.compile(rb"\b(MESSAGES|UIDNEXT|UIDVALIDITY)\s+(\d+)", re.IGNORECASE)
_BYE_RE = re.compile(rb"^\*?\s*BYE\b", re.IGNORECASE)


@attrs.frozen
class MailboxState:
    """What a SELECT/STATUS told us about a mailbox. ``None`` when the server did not say."""

    exists: int | None = None
    uidnext: int | None = None
    uidvalidity: int | None = None


def parse_mailbox_state(lines: Iterable[bytes | bytearray]) -> MailboxState:
    """Extract EXISTS, UIDNEXT and UIDVALIDITY from SELECT (or STATUS) response lines."""
    exists = uidnext = uidvalidity = None
    for raw in lines:
        line = bytes(raw)
        if m := _EXISTS_RE.match(line):
            exists = int(m.group(1))
        if m := _UIDNEXT_RE.search(line):
            uidnext = int(m.group(1))
        if m := _UIDVALIDITY_RE.search(line):
            uidvalidity = int(m.group(1))
        if b"STATUS" in line.upper() and b"(" in line:
            for key, value in _STATUS_ITEM_RE.findall(line.split(b"(", 1)[1]):
                k = key.upper()
                if k == b"MESSAGES":
                    exists = int(value)
                elif k == b"UIDNEXT":
                    uidnext = int(value)
                else:
                    uidvalidity = int(value)
    return MailboxState(exists=exists, uidnext=uidnext, uidvalidity=uidvalidity)


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
    void, so we scan; a moved UIDNEXT means mail arrived while nobody listened. Servers
    that omit UIDNEXT fall back to comparing EXISTS.
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
