"""Pure (no I/O) IMAP4rev1 client-command framing and parsing for the test server.

Two layers:

* :class:`CommandFramer` cuts a byte stream into complete logical commands. A logical
  command is one line, or several lines joined by literals (``{n}``/``{n+}`` followed by
  CRLF and exactly ``n`` octets). It reports when the server owes the client a ``+``
  continuation (synchronizing literal). Buffers hold at most one pending command.
* :func:`parse_command` turns one framed command into a :class:`Command` (tag, upper-cased
  name, arguments).

Guarantees: nothing here blocks or does I/O; malformed input raises :class:`ParseError`
(never anything else); no line exceeds ``max_line`` bytes, no literal ``max_literal`` bytes,
and no framed command ``max_line + max_literal`` bytes, so a hostile client cannot make the
buffers grow past that.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Final, TypeAlias

import attrs

#: An argument: atom or quoted string → ``str``; literal → ``bytes``;
#: parenthesized list → ``tuple`` of arguments (nested as sent).
Arg: TypeAlias = "str | bytes | tuple[Arg, ...]"

_LITERAL_AT_END: Final = re.compile(rb"\{(\d{1,10})(\+?)\}\Z")
_LITERAL_HERE: Final = re.compile(rb"\{(\d{1,10})(\+?)\}\r\n")
# RFC 3501 atom-specials: ( ) { SP CTL % * " \ ] — a tag additionally may not contain "+".
_TAG_FORBIDDEN: Final = frozenset(b'(){ %*"\\]+')
_ATOM_STOP: Final = frozenset(b" ()")

DEFAULT_MAX_LINE: Final = 64 * 1024
DEFAULT_MAX_LITERAL: Final = 64 * 1024 * 1024


class ParseError(ValueError):
    """The client sent something that is not a well-formed command.

    ``tag`` is the command's tag when it could be read (answer ``tag BAD``), else ``None``
    (answer ``* BAD``). ``fatal`` means the stream can no longer be framed (close it).
    """

    def __init__(self, message: str, *, tag: str | None = None, fatal: bool = False) -> None:
        super().__init__(message)
        self.tag = tag
        self.fatal = fatal


@attrs.frozen
class NeedContinuation:
    """The client announced a synchronizing literal of ``size`` octets.

    The server must send a ``+`` continuation before the client sends the octets.
    """

    size: int


@attrs.frozen
class CommandLine:
    """One complete logical command: line text with literal headers and contents inline.

    ``raw`` excludes the final CRLF (or bare LF) of the command.
    """

    raw: bytes


FramerEvent: TypeAlias = NeedContinuation | CommandLine


class CommandFramer:
    """Incremental framer: :meth:`feed` bytes, then drain :meth:`next_event` until ``None``.

    Lines end in CRLF; a bare LF is accepted too. Literal contents are taken verbatim,
    whatever bytes they contain.
    """

    __slots__ = ("_buf", "_literal_left", "_max_command", "_max_line", "_max_literal", "_pending")

    def __init__(
        self, *, max_line: int = DEFAULT_MAX_LINE, max_literal: int = DEFAULT_MAX_LITERAL
    ) -> None:
        self._buf = bytearray()
        self._pending = bytearray()
        self._literal_left = 0
        self._max_line = max_line
        self._max_literal = max_literal
        self._max_command = max_line + max_literal

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes."""
        self._buf += data

    def reset(self) -> None:
        """Discard everything buffered (e.g. plaintext pipelined before a TLS handshake)."""
        self._buf = bytearray()
        self._pending = bytearray()
        self._literal_left = 0

    @property
    def buffered(self) -> int:
        """Number of bytes held (unframed input plus the partial command)."""
        return len(self._buf) + len(self._pending)

    def has_line(self) -> bool:
        """Whether a line end is buffered: another (pipelined) command may be complete."""
        return b"\n" in self._buf

    def next_event(self) -> FramerEvent | None:
        """Return the next event, or ``None`` if more input is needed.

        Raises :class:`ParseError` (``fatal=True``) when a line or literal exceeds the limits.
        """
        while True:
            if self._literal_left:
                take = min(self._literal_left, len(self._buf))
                if take:
                    self._pending += self._buf[:take]
                    del self._buf[:take]
                    self._literal_left -= take
                if self._literal_left:
                    return None
            end = self._buf.find(b"\n")
            if end < 0:
                if len(self._buf) > self._max_line:
                    raise ParseError("line too long", fatal=True)
                return None
            line = bytes(self._buf[: end - 1 if end and self._buf[end - 1] == 0x0D else end])
            del self._buf[: end + 1]
            if len(line) > self._max_line:
                raise ParseError("line too long", fatal=True)
            match = _LITERAL_AT_END.search(line)
            if match is None:
                raw = bytes(self._pending) + line
                self._pending = bytearray()
                return CommandLine(raw)
            size = int(match.group(1))
            if size > self._max_literal or len(self._pending) + size > self._max_command:
                raise ParseError("literal too large", fatal=True)
            self._pending += line + b"\r\n"
            self._literal_left = size
            if not match.group(2):
                return NeedContinuation(size)


@attrs.frozen
class Command:
    """A parsed client command. ``name`` is upper-case; ``args`` as in :data:`Arg`."""

    tag: str
    name: str
    args: tuple[Arg, ...]


def parse_command(raw: bytes) -> Command:
    """Parse one framed command (see :class:`CommandFramer`).

    ``UID FETCH ...`` parses as name ``UID`` with the sub-command as first argument.
    Raises :class:`ParseError` with ``tag`` set when the tag was readable.
    """
    sp = raw.find(b" ")
    tag_bytes = raw if sp < 0 else raw[:sp]
    if not tag_bytes or any(b in _TAG_FORBIDDEN or b < 0x20 or b == 0x7F for b in tag_bytes):
        raise ParseError("invalid tag")
    tag = tag_bytes.decode("ascii", "replace")
    if sp < 0:
        raise ParseError("missing command", tag=tag)
    parser = _ArgParser(raw, sp + 1, tag)
    name_arg = parser.next_arg()
    if not isinstance(name_arg, str) or not name_arg:
        raise ParseError("missing command", tag=tag)
    args = tuple(parser.rest())
    return Command(tag=tag, name=name_arg.upper(), args=args)


class _ArgParser:
    __slots__ = ("_pos", "_raw", "_tag")

    def __init__(self, raw: bytes, pos: int, tag: str) -> None:
        self._raw = raw
        self._pos = pos
        self._tag = tag

    def _error(self, message: str) -> ParseError:
        return ParseError(message, tag=self._tag)

    def rest(self) -> Iterator[Arg]:
        while True:
            self._skip_spaces()
            if self._pos >= len(self._raw):
                return
            if self._raw[self._pos] == 0x29:  # ")"
                raise self._error("unbalanced ')'")
            yield self.next_arg()

    def _skip_spaces(self) -> None:
        while self._pos < len(self._raw) and self._raw[self._pos] == 0x20:
            self._pos += 1

    def next_arg(self) -> Arg:
        self._skip_spaces()
        raw, pos = self._raw, self._pos
        if pos >= len(raw):
            raise self._error("missing argument")
        first = raw[pos]
        if first == 0x22:  # '"'
            return self._quoted()
        if first == 0x7B:  # "{"
            return self._literal()
        if first == 0x28:  # "("
            return self._list()
        return self._atom()

    def _quoted(self) -> str:
        raw = self._raw
        out = bytearray()
        pos = self._pos + 1
        while pos < len(raw):
            ch = raw[pos]
            if ch == 0x5C:  # backslash
                if pos + 1 >= len(raw):
                    break
                out.append(raw[pos + 1])
                pos += 2
                continue
            if ch == 0x22:
                self._pos = pos + 1
                return out.decode("utf-8", "replace")
            if ch in (0x0D, 0x0A):
                break
            out.append(ch)
            pos += 1
        raise self._error("unterminated quoted string")

    def _literal(self) -> bytes:
        match = _LITERAL_HERE.match(self._raw, self._pos)
        if match is None:
            raise self._error("malformed literal")
        start = match.end()
        end = start + int(match.group(1))
        if end > len(self._raw):
            raise self._error("truncated literal")
        self._pos = end
        return self._raw[start:end]

    def _list(self) -> tuple[Arg, ...]:
        self._pos += 1
        items: list[Arg] = []
        while True:
            self._skip_spaces()
            if self._pos >= len(self._raw):
                raise self._error("unterminated list")
            if self._raw[self._pos] == 0x29:
                self._pos += 1
                return tuple(items)
            items.append(self.next_arg())

    def _atom(self) -> str:
        """An atom; ``[...]`` sections (``BODY[HEADER.FIELDS (A B)]``) are kept whole."""
        raw = self._raw
        pos = start = self._pos
        depth = 0
        while pos < len(raw):
            ch = raw[pos]
            if ch == 0x5B:  # "["
                depth += 1
            elif ch == 0x5D and depth:  # "]"
                depth -= 1
            elif depth == 0 and (ch in _ATOM_STOP or ch < 0x20):
                break
            pos += 1
        if pos == start:
            raise self._error("unexpected character")
        self._pos = pos
        return raw[start:pos].decode("utf-8", "replace")


# ---------------------------------------------------------------------------------------
# Argument helpers shared by the command handlers.


def as_text(arg: Arg) -> str:
    """An astring argument (atom, quoted string or literal) as text; lists are rejected."""
    if isinstance(arg, str):
        return arg
    if isinstance(arg, bytes):
        return arg.decode("utf-8", "replace")
    raise ValueError("expected a string, got a list")


def quote(text: str) -> str:
    """Render ``text`` as an IMAP quoted string."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def parse_sequence_set(text: str, largest: int) -> set[int]:
    """Expand an IMAP sequence set (``1:3,5,7:*``); ``*`` is ``largest``.

    Ranges may be given high:low. Members above ``largest`` are kept (the caller filters),
    except that ``*`` on an empty mailbox means nothing. Raises :class:`ValueError`.
    """
    out: set[int] = set()
    for part in text.split(","):
        if not part:
            raise ValueError("empty sequence-set member")
        lo_s, sep, hi_s = part.partition(":")
        lo = _seq_number(lo_s, largest)
        hi = _seq_number(hi_s, largest) if sep else lo
        if lo > hi:
            lo, hi = hi, lo
        if hi == 0:
            continue
        if hi - lo > 10_000_000:
            raise ValueError("sequence range too large")
        out.update(range(max(lo, 1), hi + 1))
    return out


def _seq_number(text: str, largest: int) -> int:
    if text == "*":
        return largest
    if not text.isdigit() or text.startswith("0"):
        raise ValueError(f"bad sequence number {text!r}")
    return int(text)


def format_flags(flags: Iterable[str]) -> str:
    """``("\\\\Seen", "\\\\Deleted")`` → ``(\\Seen \\Deleted)`` (sorted, stable output)."""
    return "(" + " ".join(sorted(flags)) + ")"
