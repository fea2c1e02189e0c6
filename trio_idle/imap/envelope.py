"""Pure parsing of ``UID SEARCH`` and ``UID FETCH (UID ENVELOPE RFC822.SIZE)`` answers.

Input is the raw untagged responses as :class:`~trio_idle.imap.framing.ResponseFramer`
cut them (``* 3 FETCH (... {12}\\r\\n<12 bytes> ...)\\r\\n``, literals inline), so nothing
depends on how aioimaplib splits lines. No I/O; tested with plain bytes.

Every value is data from the mail server, possibly hostile: strings are kept to
:data:`MAX_RAW_FIELD` bytes as they are read, decoded (RFC 2047 encoded words, 8-bit text
as UTF-8), stripped of control characters and bounded (:data:`LIMITS`); a field that
cannot be read becomes ``None``, an encoded word that cannot be decoded is kept as sent or
read as UTF-8 (:func:`decode_words`), and a response that cannot be parsed is skipped:
never an exception. Nothing here logs: envelope fields never reach a log line.

Work is linear in the input, counted, and cut into slices:

- the tokenizer reads each response once, forwards (no search starts again from an
  earlier position; no scan covers more than :data:`WINDOW` bytes: a quoted string is
  scanned window after window, a longer atom is cut); the nesting depth is bounded
  (:data:`MAX_DEPTH`) and so are the items kept per list (:data:`MAX_LIST_ITEMS`, the
  rest is read and dropped);
- only the envelopes asked for are decoded (``wanted``), each field from at most
  :data:`MAX_RAW_FIELD` bytes, by a decoder linear in its input;
- :class:`ParseMeter` counts the bytes searched, the tokens and the bytes decoded, so
  tests check all of this without clocks, and :func:`parse_steps` pauses (yields) each
  time about :data:`SLICE_WORK` units of work were done since the last pause: the caller
  lets the rest of the event loop run there (``ImapConnection.fetch_new``), so a hostile
  answer of the largest allowed size costs its own mailbox time, not everyone's.
"""

from __future__ import annotations

import binascii
import codecs
import re
import unicodedata
from collections.abc import Container, Generator, Iterable
from typing import Any, Final

import attrs

from trio_idle.imap.responses import MailboxState

#: longest text kept per field, in characters (longer: cut, ending in "…")
LIMITS: Final = {"subject": 998, "name": 200, "address": 320, "date": 100, "message_id": 250}
#: bytes of one string kept as it is read (bounds the decoder's work and the memory)
MAX_RAW_FIELD: Final = 8 * 1024
#: most envelopes in one scan request; more new messages: the range only
MAX_ENVELOPES: Final = 50
#: parenthesis nesting accepted in one response (an ENVELOPE needs 4)
MAX_DEPTH: Final = 8
#: items kept per parenthesised list (an ENVELOPE has 10, the FETCH list 6); a longer
#: list (a To of 500 recipients) is read to its end, its tail dropped
MAX_LIST_ITEMS: Final = 32
#: bytes one scan may cover: a quoted string window by window; an atom longer than this
#: reads as several, a run of spaces longer than this is malformed (junk either way)
WINDOW: Final = 64 * 1024

#: what one token costs, in bytes scanned (a Python-level step costs about as much as
#: the C-level scan of ~64 bytes of escapes)
TOKEN_WORK: Final = 64
#: what one byte handed to the field decoder costs, in bytes scanned (the per-character
#: clean-up is Python-level)
DECODE_WORK: Final = 16
#: work between two pauses of :func:`parse_steps`
SLICE_WORK: Final = 256 * 1024
#: work one answer may cost (32 slices; its CPU time: docs/performance.md, "Figures behind
#: the code"); a legitimate answer of 50 envelopes with 100 recipients each costs about a
#: quarter of it. Beyond it the parse gives up: the scan goes out with the range only, as
#: for more than :data:`MAX_ENVELOPES` messages
MAX_ANSWER_WORK: Final = 8 * 1024 * 1024

_FETCH_RE = re.compile(rb"\*\s{1,16}\d{1,10}\s{1,16}FETCH\s", re.IGNORECASE)
_SEARCH_RE = re.compile(rb"^\*\s+SEARCH\b", re.IGNORECASE)

#: one token after optional spaces: a parenthesis, the opening quote of a quoted string,
#: a literal's announcement (``{12}`` or ``{12+}``, its line break) or an atom. Possessive:
#: a failed match never backtracks, so each byte is looked at once.
_TOKEN_RE = re.compile(
    rb'[ \r\n\t]{0,%d}+(?:([()])|(")|\{(\d{1,10})\+?\}(?:\r\n|\n)?|([^ ()\r\n"{]{1,%d}+))'
    % (WINDOW, WINDOW)
)
#: the inside of a quoted string up to its closing quote: plain runs and escape pairs
_QUOTED_RE = re.compile(rb'(?:[^"\\]++|\\.)*+', re.DOTALL)
_ESCAPE_RE = re.compile(rb"\\(.)", re.DOTALL)
_OPEN: Final = ord("(")
_QUOTE: Final = ord('"')


class _ParseError(Exception):
    pass


@attrs.define
class ParseMeter:
    """What a parse cost, counted as it goes (for tests, and for :func:`parse_steps`'s
    slices and budget). One meter serves one parse."""

    #: bytes the tokenizer's scans looked at (each scan counts the bytes it matched plus
    #: the one that stopped it)
    examined: int = 0
    #: tokens read (parentheses, strings, literals, atoms)
    tokens: int = 0
    #: raw bytes handed to the field decoders
    decoded: int = 0
    #: all of it in one unit (bytes scanned): see :data:`TOKEN_WORK`, :data:`DECODE_WORK`
    work: int = 0
    #: pauses :func:`parse_steps` made (each one a checkpoint of the caller)
    slices: int = 0
    #: the most work done between two pauses (or before the first, after the last)
    longest_slice: int = 0
    #: :data:`MAX_ANSWER_WORK` was reached: the parse gave up
    over_budget: bool = False
    #: work at the last pause
    mark: int = 0

    def pause(self) -> None:
        """A slice ends here."""
        self.longest_slice = max(self.longest_slice, self.work - self.mark)
        self.mark = self.work
        self.slices += 1


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
    #: their envelopes (messages expunged meanwhile missing); None: more than the limit,
    #: or an answer that would cost more than :data:`MAX_ANSWER_WORK` to parse
    envelopes: tuple[Envelope, ...] | None = attrs.field(repr=False)


@attrs.frozen
class FolderMail:
    """What :meth:`~trio_idle.imap.connector.ImapLink.fetch_folder_new` found in a folder
    beside the selected mailbox, and what it saw of both mailboxes on the way."""

    #: the folder's new mail, as :meth:`~trio_idle.imap.connector.ImapLink.fetch_new` gives it
    mail: NewMail
    #: the folder as its EXAMINE reported it (its UIDVALIDITY: the numbering of ``mail``)
    examined: MailboxState
    #: the selected mailbox as the SELECT that ended the visit reported it
    selected: MailboxState
    #: the selected mailbox's message count as the session knew it before the visit
    #: (its EXISTS and EXPUNGE meanwhile were the folder's, not counted as new mail)
    exists_before: int | None


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


def parse_fetch_envelopes(
    responses: Iterable[bytes],
    wanted: Container[int] | None = None,
    meter: ParseMeter | None = None,
) -> list[Envelope] | None:
    """:func:`parse_steps` in one go (no pauses). Never raises."""
    steps = parse_steps(responses, wanted, meter)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            result: list[Envelope] | None = done.value
            return result


def parse_steps(
    responses: Iterable[bytes],
    wanted: Container[int] | None = None,
    meter: ParseMeter | None = None,
) -> Generator[None, None, list[Envelope] | None]:
    """Every parseable ``FETCH`` response with a UID (in ``wanted``, when given), in UID
    order, one per UID (the first); None when the answer would cost more than
    :data:`MAX_ANSWER_WORK` to parse (a hostile server). Never raises.

    A generator: it yields each time :data:`SLICE_WORK` units of work were done since the
    last yield (overshooting by at most one token, one window of a quoted string or one
    envelope's fields), and returns the envelopes. The caller checkpoints at each yield;
    dropping the generator abandons the parse."""
    meter = ParseMeter() if meter is None else meter
    out: dict[int, Envelope] = {}
    try:
        for response in responses:
            match = _FETCH_RE.match(response)
            _scanned(meter, match.end() if match else min(len(response), 48))
            if not match:
                continue
            try:
                items = yield from _items(response, match.end(), meter)
            except _ParseError:
                continue
            fields: dict[bytes, Any] = {}
            for i in range(0, len(items) - 1, 2):
                key = items[i]
                if isinstance(key, bytes):
                    fields.setdefault(key.upper(), items[i + 1])
            uid = _number(fields.get(b"UID"))
            if uid is None or uid == 0 or uid in out:
                continue
            if wanted is not None and uid not in wanted:
                continue
            out[uid] = yield from _envelope_of(uid, fields, meter)
    except _OverBudget:
        meter.over_budget = True
        return None
    finally:
        meter.pause()
    return [out[uid] for uid in sorted(out)]


# -- the tokenizer -------------------------------------------------------------------


class _OverBudget(Exception):
    pass


def _scanned(meter: ParseMeter, count: int) -> None:
    meter.examined += count
    meter.work += count


def _maybe_pause(meter: ParseMeter) -> Generator[None, None, None]:
    """Yield if a slice is due; raise :class:`_OverBudget` past the answer's budget."""
    if meter.work - meter.mark >= SLICE_WORK:
        if meter.work > MAX_ANSWER_WORK:
            raise _OverBudget
        meter.pause()
        yield


def _items(data: bytes, pos: int, meter: ParseMeter) -> Generator[None, None, list[Any]]:
    """The parenthesised list at ``pos``: items are lists, bytes (a string, literal or
    atom, at most :data:`MAX_RAW_FIELD` of it) or None (NIL); lists keep their first
    :data:`MAX_LIST_ITEMS` items. One forward pass, no recursion; raises
    :class:`_ParseError` on anything malformed. Text after the list's closing
    parenthesis is not read."""
    stack: list[list[Any]] = []
    token_at = _TOKEN_RE.match
    while True:
        match = token_at(data, pos)
        if match is None:
            _scanned(meter, 1)
            raise _ParseError("end of data" if pos >= len(data) else "unexpected character")
        end = match.end()
        meter.examined += end - pos + 1
        meter.tokens += 1
        meter.work += end - pos + 1 + TOKEN_WORK
        pos = end
        kind = match.lastindex
        value: Any
        if kind == 1:  # a parenthesis
            if data[pos - 1] == _OPEN:
                if len(stack) >= MAX_DEPTH:
                    raise _ParseError("nested too deeply")
                stack.append([])
                continue
            if not stack:
                raise _ParseError("unbalanced")
            done = stack.pop()
            if not stack:
                return done
            value = done
        elif not stack:
            raise _ParseError("not a list")
        elif kind == 2:  # a quoted string
            start = pos
            value, pos = _quoted(data, start, start, meter)
            if value is None:  # longer than a window
                value, pos = yield from _long_quoted(data, start, pos, meter)
        elif kind == 3:  # a literal: its data is skipped by count, never searched
            start, pos = pos, pos + int(match.group(3))
            if pos > len(data):
                raise _ParseError("short literal")
            value = data[start : min(pos, start + MAX_RAW_FIELD)]
        else:
            atom = match.group(4)
            value = None if atom.upper() == b"NIL" else atom[:MAX_RAW_FIELD]
        if len(stack[-1]) < MAX_LIST_ITEMS:
            stack[-1].append(value)
        if meter.work - meter.mark >= SLICE_WORK:
            yield from _maybe_pause(meter)


def _quoted(data: bytes, start: int, pos: int, meter: ParseMeter) -> tuple[bytes | None, int]:
    """One window of the scan of a quoted string whose text starts at ``start`` (after the
    opening quote), resumed at ``pos``: ``(text, position after the closing quote)`` if
    the closing quote is in the window, ``(None, where to resume)`` if not. The text is
    unescaped and cut to :data:`MAX_RAW_FIELD` bytes (only the part kept is unescaped)."""
    stop = min(len(data), pos + WINDOW)
    # stops at the closing quote, at ``stop``, or at a backslash whose escaped byte lies
    # at or beyond ``stop`` (the next window starts at that backslash)
    end = _QUOTED_RE.match(data, pos, stop).end()  # type: ignore[union-attr]
    _scanned(meter, end - pos + 1)
    if end < len(data) and data[end] == _QUOTE:
        text = data[start : min(end, start + 2 * MAX_RAW_FIELD)]
        if b"\\" in text:  # each escape pair gives one byte: twice the limit is enough
            text = _ESCAPE_RE.sub(rb"\1", text)
        return text[:MAX_RAW_FIELD], end + 1
    if stop == len(data):
        raise _ParseError("unclosed string")
    return None, end


def _long_quoted(
    data: bytes, start: int, pos: int, meter: ParseMeter
) -> Generator[None, None, tuple[bytes, int]]:
    """:func:`_quoted`, window after window, pausing when a slice is due."""
    while True:
        yield from _maybe_pause(meter)
        text, pos = _quoted(data, start, pos, meter)
        if text is not None:
            return text, pos


# -- from tokens to an Envelope ------------------------------------------------------


def _envelope_of(
    uid: int, fields: dict[bytes, Any], meter: ParseMeter
) -> Generator[None, None, Envelope]:
    """The envelope's fields decoded one after the other, pausing between them."""
    env = fields.get(b"ENVELOPE")
    parts: list[Any] = env if isinstance(env, list) else []
    parts = (parts + [None] * 10)[:10]
    name, address = _first_address(parts[2])
    decoded: list[str | None] = []
    for value, limit, words in (
        (parts[1], LIMITS["subject"], True),
        (name, LIMITS["name"], True),
        (address, LIMITS["address"], False),
        (parts[0], LIMITS["date"], False),
        (parts[9], LIMITS["message_id"], False),
    ):
        decoded.append(_text(value, limit, meter, words=words))
        yield from _maybe_pause(meter)
    subject, from_name, from_address, date, message_id = decoded
    return Envelope(
        uid=uid,
        subject=subject,
        from_name=from_name,
        from_address=from_address,
        date=date,
        message_id=message_id,
        size=_number(fields.get(b"RFC822.SIZE")),
    )


def _number(value: Any) -> int | None:
    if isinstance(value, bytes) and value.isdigit() and len(value) <= 12:
        return int(value)
    return None


def _first_address(value: Any) -> tuple[bytes | None, bytes | None]:
    """``(name, mailbox@host)`` of the first real address of an address list, raw."""
    if not isinstance(value, list):
        return None, None
    for address in value:
        if not isinstance(address, list) or len(address) < 4:
            continue
        name, _adl, mailbox, host = address[:4]
        if host is None or not isinstance(mailbox, bytes):  # group syntax markers
            continue
        raw = mailbox + b"@" + host if isinstance(host, bytes) else mailbox
        return name, raw[:MAX_RAW_FIELD]
    return None, None


def _text(value: Any, limit: int, meter: ParseMeter, *, words: bool = True) -> str | None:
    """A header value made safe: decoded (RFC 2047 if ``words``), controls removed,
    whitespace collapsed, at most ``limit`` characters. None for NIL or non-text."""
    if not isinstance(value, bytes):
        return None
    meter.decoded += len(value)
    meter.work += DECODE_WORK * len(value)
    raw = value.decode("utf-8", "replace")
    return clean(decode_words(raw) if words else raw, limit)


#: an RFC 2047 encoded word: charset (an RFC 2231 ``*language`` suffix dropped),
#: encoding, text. Neither part may hold ``?`` or whitespace, and the quantifiers are
#: possessive, so the search is linear (each byte belongs to at most one attempt's
#: charset and one attempt's text).
_WORD_RE = re.compile(r"=\?([^?\s*]*+)(?:\*[^?\s]*+)?\?([bBqQ])\?([^?\s]*+)\?=")
#: codecs that are not mail charsets: an encoded word in one of them is read as UTF-8
#: (``idna`` and ``undefined`` refuse the "replace" handler, ``punycode`` is quadratic)
_NOT_CHARSETS: Final = frozenset(
    {"idna", "punycode", "undefined", "unicode-escape", "raw-unicode-escape"}
)


def decode_words(text: str) -> str:
    """RFC 2047 encoded words decoded, in one pass (linear in ``text``). Never raises:

    - a word whose encoded text is broken (bad base64) is left as sent;
    - a word in a charset Python does not know, or that is no mail charset (``idna``,
      ``punycode``, ``undefined``, a bytes-to-bytes codec…), or whose decoder fails
      anyway, is read as UTF-8 with replacement characters;
    - whitespace between two encoded words is dropped (RFC 2047 section 6.2), and
      adjacent words in one charset are decoded together (a character split across
      words survives).
    """
    if "=?" not in text:
        return text
    out: list[str] = []
    run = bytearray()  # adjacent encoded words of one charset, not decoded yet
    run_charset = ""
    seen = False  # an encoded word came before: a blank gap after it is dropped
    last = 0  # end of the last encoded word
    for match in _WORD_RE.finditer(text):
        payload = _word_bytes(match.group(2), match.group(3))
        if payload is None:
            continue  # left as sent: part of the next gap
        gap = text[last : match.start()]
        charset = match.group(1).lower()
        if gap.strip() or not seen or charset != run_charset:
            if run:
                out.append(_charset_decode(bytes(run), run_charset))
                run.clear()
            if gap.strip() or not seen:
                out.append(gap)
        run_charset = charset
        run += payload
        seen = True
        last = match.end()
    if run:
        out.append(_charset_decode(bytes(run), run_charset))
    out.append(text[last:])
    return "".join(out)


def _word_bytes(encoding: str, encoded: str) -> bytes | None:
    """The bytes an encoded word's text stands for; None if it is broken."""
    try:
        data = encoded.encode("ascii")
        if encoding in "qQ":
            return binascii.a2b_qp(data, header=True)  # "_" is a space, "=XX" a byte
        return binascii.a2b_base64(data + b"=" * (-len(data) % 4))
    except (UnicodeEncodeError, binascii.Error, ValueError):
        return None


def _charset_decode(data: bytes, charset: str) -> str:
    try:
        name = codecs.lookup(charset).name
    except (LookupError, ValueError):  # unknown; a NUL in the name
        name = "utf-8"
    if name in _NOT_CHARSETS:
        name = "utf-8"
    try:
        return data.decode(name, "replace")
    except Exception:  # a codec is arbitrary code (a non-text codec's LookupError, a
        # decoder that refuses "replace", ...): nothing it raises may escape
        return data.decode("utf-8", "replace")


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
