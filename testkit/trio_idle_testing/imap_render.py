"""Pure helpers rendering IMAP data for the test server: FETCH items, SEARCH keys, LIST
patterns, flags and INTERNALDATE (no I/O, no session state).

Guarantee: unsupported or malformed input raises :class:`ValueError` (answered ``BAD``).
"""

from __future__ import annotations

import calendar
import datetime
import re
import time
from typing import Final

from .imap_parser import format_flags, quote
from .imap_store import SYSTEM_FLAGS, Message

_MONTHS: Final = ("Jan", "Feb", "Mar", "Apr", "May", "Jun",
                  "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")  # fmt: skip

#: SEARCH keys on flags: key → (flag, must be present).
SEARCH_FLAGS: Final = {
    "SEEN": ("\\Seen", True),
    "UNSEEN": ("\\Seen", False),
    "DELETED": ("\\Deleted", True),
    "UNDELETED": ("\\Deleted", False),
    "FLAGGED": ("\\Flagged", True),
    "UNFLAGGED": ("\\Flagged", False),
    "ANSWERED": ("\\Answered", True),
    "UNANSWERED": ("\\Answered", False),
}


def canonical_flag(flag: str) -> str:
    """System flags in their canonical case (``\\seen`` → ``\\Seen``); keywords unchanged."""
    for system in SYSTEM_FLAGS:
        if system.lower() == flag.lower():
            return system
    return flag


def list_match(pattern: str, name: str) -> bool:
    """LIST wildcard match: ``*`` matches anything, ``%`` anything but ``/``.

    ``INBOX`` matches case-insensitively, other names exactly.
    """
    regex = "".join(
        ".*" if ch == "*" else "[^/]*" if ch == "%" else re.escape(ch) for ch in pattern
    )
    flags = re.IGNORECASE if name == "INBOX" else 0
    return re.fullmatch(regex, name, flags) is not None


def expand_fetch_macros(items: list[str]) -> list[str]:
    """Expand the ``FAST``, ``ALL`` and ``FULL`` macros (``FULL``'s BODY is unsupported)."""
    if items == ["FAST"]:
        return ["FLAGS", "INTERNALDATE", "RFC822.SIZE"]
    if items == ["ALL"]:
        return ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"]
    return items


def _nstring(value: bytes | None) -> bytes:
    """NIL, a quoted string, or a literal for anything a quoted string cannot carry."""
    if value is None:
        return b"NIL"
    if all(32 <= b < 127 for b in value) and len(value) < 1000:
        return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return _literal(value)


def _header_values(header: bytes) -> dict[str, bytes]:
    """The first value of each header field, unfolded, raw bytes (encoded words kept)."""
    out: dict[str, bytes] = {}
    current: str | None = None  # the field being unfolded, if it is a first occurrence
    for line in header.splitlines():
        if not line.strip():
            break
        if line[:1] in (b" ", b"\t"):
            if current is not None:
                out[current] += b" " + line.strip()
            continue
        field, sep, value = line.partition(b":")
        name = field.strip().decode("ascii", "replace").upper()
        current = name if sep and name not in out else None
        if current is not None:
            out[current] = value.strip()
    return out


def _addresses(value: bytes | None) -> bytes:
    """An ENVELOPE address list from a header value (a simple parse: good enough for
    test mail, ``Name <box@host>`` or ``box@host``, comma separated)."""
    if not value:
        return b"NIL"
    parts = []
    for item in value.split(b","):
        item = item.strip()
        if not item:
            continue
        name: bytes | None = None
        if b"<" in item and item.endswith(b">"):
            name_part, _, addr = item[:-1].rpartition(b"<")
            name = name_part.strip().strip(b'"') or None
        else:
            addr = item
        box, at, host = addr.strip().partition(b"@")
        fields = [_nstring(name), b"NIL", _nstring(box), _nstring(host if at else None)]
        parts.append(b"(" + b" ".join(fields) + b")")
    return b"(" + b"".join(parts) + b")" if parts else b"NIL"


def render_envelope(data: bytes) -> bytes:
    """``ENVELOPE (date subject from sender reply-to to cc bcc in-reply-to message-id)``
    from a message's header (sender and reply-to default to from, as RFC 3501 says)."""
    header, _ = _split_message(data)
    fields = _header_values(header)
    sender = _addresses(fields.get("FROM"))
    parts = [
        _nstring(fields.get("DATE")),
        _nstring(fields.get("SUBJECT")),
        sender,
        _addresses(fields.get("SENDER")) if "SENDER" in fields else sender,
        _addresses(fields.get("REPLY-TO")) if "REPLY-TO" in fields else sender,
        _addresses(fields.get("TO")),
        _addresses(fields.get("CC")),
        _addresses(fields.get("BCC")),
        _nstring(fields.get("IN-REPLY-TO")),
        _nstring(fields.get("MESSAGE-ID")),
    ]
    return b"ENVELOPE (" + b" ".join(parts) + b")"


def _split_message(data: bytes) -> tuple[bytes, bytes]:
    """(header block including the blank line, body)."""
    for separator in (b"\r\n\r\n", b"\n\n"):
        cut = data.find(separator)
        if cut >= 0:
            return data[: cut + len(separator)], data[cut + len(separator) :]
    return data, b""


def _header_fields(header: bytes, names: set[str], keep: bool) -> bytes:
    out: list[bytes] = []
    include = False
    for line in header.splitlines(keepends=True):
        if line in (b"\r\n", b"\n"):
            break
        if line[:1] in (b" ", b"\t"):
            if include:
                out.append(line)
            continue
        field = line.split(b":", 1)[0].strip().decode("ascii", "replace").upper()
        include = (field in names) == keep
        if include:
            out.append(line)
    return b"".join(out) + b"\r\n"


def _literal(data: bytes) -> bytes:
    return b"{%d}\r\n" % len(data) + data


def fetch_item(item: str, message: Message) -> tuple[bytes, bool]:
    """Render one FETCH item; the bool says whether it sets ``\\Seen``."""
    if item == "UID":
        return b"UID %d" % message.uid, False
    if item == "FLAGS":
        return f"FLAGS {format_flags(message.flags)}".encode(), False
    if item == "RFC822.SIZE":
        return b"RFC822.SIZE %d" % len(message.data), False
    if item == "ENVELOPE":
        return render_envelope(message.data), False
    if item == "INTERNALDATE":
        return f"INTERNALDATE {quote(format_internaldate(message.internaldate))}".encode(), False
    header, body = _split_message(message.data)
    if item == "RFC822":
        return b"RFC822 " + _literal(message.data), True
    if item == "RFC822.HEADER":
        return b"RFC822.HEADER " + _literal(header), False
    if item == "RFC822.TEXT":
        return b"RFC822.TEXT " + _literal(body), True
    peek = item.startswith("BODY.PEEK[")
    if not (peek or item.startswith("BODY[")):
        raise ValueError(f"unsupported FETCH item {item}")
    section, _, partial = item[item.index("[") + 1 :].partition("]")
    if section == "":
        data = message.data
    elif section == "HEADER":
        data = header
    elif section == "TEXT":
        data = body
    elif section.startswith(("HEADER.FIELDS ", "HEADER.FIELDS.NOT ")):
        keyword, _, names = section.partition(" ")
        wanted = {n.upper() for n in names.strip("()").split()}
        data = _header_fields(header, wanted, keep=keyword == "HEADER.FIELDS")
    else:
        raise ValueError(f"unsupported BODY section {section}")
    label = f"BODY[{section}]"
    if partial:
        if not (partial.startswith("<") and partial.endswith(">")):
            raise ValueError(f"bad partial {partial}")
        start_s, _, count_s = partial[1:-1].partition(".")
        start = int(start_s)
        data = data[start : start + int(count_s)] if count_s else data[start:]
        label += f"<{start}>"
    return label.encode() + b" " + _literal(data), not peek


def format_internaldate(timestamp: float) -> str:
    """UNIX time → ``17-Jul-1996 09:44:25 +0000`` (always UTC, locale-independent)."""
    t = time.gmtime(timestamp)
    month = _MONTHS[t.tm_mon - 1]
    clock = f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"
    return f"{t.tm_mday:02d}-{month}-{t.tm_year} {clock} +0000"


def parse_internaldate(text: str, default: float) -> float:
    """``"17-Jul-1996 02:44:25 -0700"`` → UNIX time; ``default`` if unparseable."""
    try:
        day_s, month_s, rest = text.strip().split("-", 2)
        year_s, clock, zone = rest.split(" ")
        month = _MONTHS.index(month_s.capitalize()) + 1
        hour, minute, second = (int(x) for x in clock.split(":"))
        offset = (int(zone[1:3]) * 60 + int(zone[3:5])) * (-1 if zone[0] == "-" else 1)
        naive = datetime.datetime(int(year_s), month, int(day_s), hour, minute, second)
    except (ValueError, IndexError):
        return default
    return calendar.timegm(naive.timetuple()) - offset * 60
