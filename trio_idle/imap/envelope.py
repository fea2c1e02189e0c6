"""Pure parsing of ``UID SEARCH`` and ``UID FETCH (UID ENVELOPE RFC822.SIZE)`` answers.

Input is the raw untagged responses as :class:`~trio_idle.imap.framing.ResponseFramer`
cut them (``* 3 FETCH (... {12}\\r\\n<12 bytes> ...)\\r\\n``, literals inline), so nothing
depends on how aioimaplib splits lines. No I/O; tested with plain bytes.

Every value is data from the mail server, possibly hostile: strings are decoded
(RFC 2047 encoded words, 8-bit text as UTF-8), stripped of control characters and
bounded (:data:`LIMITS`); a field that cannot be read becomes ``None`` and a
response that cannot be parsed is skipped, never an exception. The work per response
is linear in its size and the nesting depth is bounded. Nothing here logs: envelope
fields never reach a log line.
"""

from __future__ import annotations

import email.header
import re
import unicodedata
from collections.abc import Iterable
from typing import Any, Final

import attrs

#: longest text kept per field, in characters (longer: cut, ending in "…")
LIMITS: Final = {"subject": 998, "name": 200, "address": 320, "date": 100, "message_id": 250}
#: raw bytes of one field looked at before decoding (bounds the decoder's work)
MAX_RAW_FIELD: Final = 8 * 1024
#: most envelopes in one scan request; more new messages: the range only
MAX_ENVELOPES: Final = 50
#: parenthesis nesting accepted in one response (an ENVELOPE needs 4)
MAX_DEPTH: Final = 8

_FETCH_RE = re.compile(rb"^\*\s+\d+\s+FETCH\s+", re.IGNORECASE)
_SEARCH_RE = re.compile(rb"^\*\s+SEARCH\b", re.IGNORECASE)


class _ParseError(Exception):
    pass


@attrs.frozen
class Envelope:
    """One new message as its envelope describes it (all text decoded and bounded)."""

    uid: int
    subject: str | None = None
    from_name: str | None = None
    from_address: str | None = None
    #: the Date header as sent (decoded, bounded), not normalised
    date: str | None = None
    message_id: str | None = None
    size: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The ``messages[]`` entry of the scan body (docs/backend-contract.md)."""
        return {
            "uid": self.uid,
            "from": {"name": self.from_name, "address": self.from_address},
            "subject": self.subject,
            "date": self.date,
            "messageId": self.message_id,
            "size": self.size,
        }


@attrs.frozen
class NewMail:
    """What :meth:`~trio_idle.imap.connector.ImapLink.fetch_new` found from a UID on."""

    #: every UID at or above the one asked for, ascending
    uids: tuple[int, ...]
    #: their envelopes (messages expunged meanwhile missing); None: more than the limit
    envelopes: tuple[Envelope, ...] | None = attrs.field(repr=False)


def parse_search(responses: Iterable[bytes]) -> list[int]:
    """The numbers of every ``* SEARCH n n n`` response, ascending, without duplicates.
    Tokens that are not numbers (a hostile server) are ignored."""
    found: set[int] = set()
    for response in responses:
        if not _SEARCH_RE.match(response):
            continue
        for token in response.split()[2:]:
            if token.isdigit() and len(token) <= 10:
                found.add(int(token))
    return sorted(found)


def parse_fetch_envelopes(responses: Iterable[bytes]) -> list[Envelope]:
    """Every parseable ``FETCH`` response with a UID, in UID order (one per UID)."""
    out: dict[int, Envelope] = {}
    for response in responses:
        match = _FETCH_RE.match(response)
        if not match:
            continue
        try:
            items, _ = _parse_value(response, match.end(), 0)
        except (_ParseError, IndexError, ValueError, RecursionError):
            continue
        envelope = _envelope_of(items)
        if envelope is not None:
            out.setdefault(envelope.uid, envelope)
    return [out[uid] for uid in sorted(out)]


# -- the tokenizer -------------------------------------------------------------------

_ATOM_END: Final = frozenset(b' ()\r\n"{')


def _parse_value(data: bytes, pos: int, depth: int) -> tuple[Any, int]:
    """One value at ``pos``: a list (parenthesised), bytes (string, literal, atom) or
    None (NIL). Returns it and the position after it."""
    pos = _skip_spaces(data, pos)
    if pos >= len(data):
        raise _ParseError("end of data")
    first = data[pos]
    if first == ord("("):
        if depth >= MAX_DEPTH:
            raise _ParseError("nested too deeply")
        items: list[Any] = []
        pos += 1
        while True:
            pos = _skip_spaces(data, pos)
            if pos >= len(data):
                raise _ParseError("unclosed list")
            if data[pos] == ord(")"):
                return items, pos + 1
            value, pos = _parse_value(data, pos, depth + 1)
            items.append(value)
    if first == ord('"'):
        return _parse_quoted(data, pos + 1)
    if first == ord("{"):
        close = data.index(b"}", pos)
        count = data[pos + 1 : close].rstrip(b"+")
        if not count.isdigit() or len(count) > 10:
            raise _ParseError("bad literal")
        start = close + 1
        if data[start : start + 2] == b"\r\n":
            start += 2
        elif data[start : start + 1] == b"\n":
            start += 1
        end = start + int(count)
        if end > len(data):
            raise _ParseError("short literal")
        return data[start:end], end
    end = pos
    while end < len(data) and data[end] not in _ATOM_END:
        end += 1
    if end == pos:
        raise _ParseError("unexpected character")
    atom = data[pos:end]
    return (None if atom.upper() == b"NIL" else atom), end


def _parse_quoted(data: bytes, pos: int) -> tuple[bytes, int]:
    out = bytearray()
    while True:
        end = data.find(b'"', pos)
        backslash = data.find(b"\\", pos, end if end >= 0 else len(data))
        if end < 0:
            raise _ParseError("unclosed string")
        if backslash < 0:
            out += data[pos:end]
            return bytes(out), end + 1
        out += data[pos:backslash]
        out += data[backslash + 1 : backslash + 2]
        pos = backslash + 2


def _skip_spaces(data: bytes, pos: int) -> int:
    while pos < len(data) and data[pos] in b" \r\n\t":
        pos += 1
    return pos


# -- from tokens to an Envelope ------------------------------------------------------


def _envelope_of(items: Any) -> Envelope | None:
    if not isinstance(items, list):
        return None
    fields: dict[bytes, Any] = {}
    for i in range(0, len(items) - 1, 2):
        key = items[i]
        if isinstance(key, bytes):
            fields.setdefault(key.upper(), items[i + 1])
    uid = _number(fields.get(b"UID"))
    if uid is None or uid == 0:
        return None
    env = fields.get(b"ENVELOPE")
    parts: list[Any] = env if isinstance(env, list) else []
    parts = (parts + [None] * 10)[:10]
    date, subject, sender = parts[0], parts[1], parts[2]
    name, address = _first_address(sender)
    return Envelope(
        uid=uid,
        subject=_text(subject, LIMITS["subject"]),
        from_name=name,
        from_address=address,
        date=_text(date, LIMITS["date"], words=False),
        message_id=_text(parts[9], LIMITS["message_id"], words=False),
        size=_number(fields.get(b"RFC822.SIZE")),
    )


def _number(value: Any) -> int | None:
    if isinstance(value, bytes) and value.isdigit() and len(value) <= 12:
        return int(value)
    return None


def _first_address(value: Any) -> tuple[str | None, str | None]:
    """``(name, mailbox@host)`` of the first real address of an address list."""
    if not isinstance(value, list):
        return None, None
    for address in value:
        if not isinstance(address, list) or len(address) < 4:
            continue
        name, _adl, mailbox, host = address[:4]
        if host is None or not isinstance(mailbox, bytes):  # group syntax markers
            continue
        addr = _text(mailbox + b"@" + host if isinstance(host, bytes) else mailbox,
                     LIMITS["address"], words=False)  # fmt: skip
        return _text(name, LIMITS["name"]), addr
    return None, None


def _text(value: Any, limit: int, *, words: bool = True) -> str | None:
    """A header value made safe: decoded (RFC 2047 if ``words``), controls removed,
    whitespace collapsed, at most ``limit`` characters. None for NIL or non-text."""
    if not isinstance(value, bytes):
        return None
    raw = value[:MAX_RAW_FIELD].decode("utf-8", "replace")
    text = decode_words(raw) if words else raw
    return clean(text, limit)


def decode_words(text: str) -> str:
    """RFC 2047 encoded words decoded; an unknown charset or broken encoding leaves that
    part as sent (never raises)."""
    if "=?" not in text:
        return text
    try:
        parts = email.header.decode_header(text)
    except Exception:  # binascii.Error, HeaderParseError...: keep it as sent
        return text
    out: list[str] = []
    for chunk, charset in parts:
        if isinstance(chunk, str):
            out.append(chunk)
            continue
        try:
            out.append(chunk.decode(charset or "utf-8", "replace"))
        except (LookupError, TypeError):
            out.append(chunk.decode("utf-8", "replace"))
    return "".join(out)


def clean(text: str, limit: int) -> str:
    """Control and format characters dropped (line breaks and tabs become spaces),
    whitespace runs collapsed, cut to ``limit`` characters."""
    kept = []
    for ch in text:
        if ch in "\t\r\n":
            kept.append(" ")
        elif unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Co", "Cn") or ch == " ":
            kept.append(ch)
        if len(kept) > limit * 2 + 64:  # enough to collapse whitespace, then cut
            break
    result = " ".join("".join(kept).split())
    if len(result) > limit:
        result = result[: max(0, limit - 1)] + "…"
    return result
