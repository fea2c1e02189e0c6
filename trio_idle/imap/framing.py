"""Splits what an IMAP server sends into complete responses, within bounds. Pure (no I/O).

A *response* is one line up to CRLF, together with every literal that continues it
(RFC 3501 section 4.3: a line ending in ``{n}`` is followed by exactly ``n`` bytes of
literal data, then the rest of the line)::

    * 12 FETCH (BODY[] {5}\\r\\nhello)\\r\\n      <- one response, one literal

:class:`ResponseFramer` is fed bytes as they arrive and hands out responses one by one,
in the h11 style: :meth:`~ResponseFramer.feed`, then :meth:`~ResponseFramer.next_response`
until it returns ``None``. The daemon gives aioimaplib one complete response at a time, so
aioimaplib never buffers an unfinished line itself and its recursive line parser (one
stack frame per line and literal of the data it is given) never sees more than one
response.

Guarantees:

- Work is linear in the bytes fed: the search for CRLF resumes where it stopped (one
  byte back, for a CR at the end of a read), never from the start of the line, and
  literal data is skipped by count, never searched. :attr:`ResponseFramer.scanned` counts
  the bytes searched so tests can check this without clocks.
- Memory is bounded: a response's text outside its literals may total ``max_line``
  bytes, its literals ``max_literal`` bytes, and it may contain :data:`MAX_LITERALS`
  literals. A response that would exceed a bound raises :class:`FrameTooLarge` as soon as
  that is known (a literal's announced size is checked before its data arrives), with
  one line saying what the server did, such as
  ``server sent a line longer than 1 MiB without CRLF``.
- The same bytes give the same responses (and the same bound errors) however they are
  split into reads.

``{n+}`` (a non-synchronizing literal, RFC 7888) is something only a client may send; a
server that ends a line with it raises :class:`FrameError` rather than being guessed at.
"""

from __future__ import annotations

from typing import Final

import attrs

#: Literals one response may carry. Real servers send a few (a FETCH of several body
#: parts); aioimaplib's parser recurses once per literal, so this also bounds its depth.
MAX_LITERALS: Final = 32

#: An announced size with more digits than this is absurd whatever the limit; checked
#: before converting, so a line of digits costs nothing (and Python's int() limit never
#: applies).
_MAX_SIZE_DIGITS: Final = 18

_CR: Final = 0x0D
_OPEN: Final = ord("{")
_CLOSE: Final = ord("}")
_PLUS: Final = ord("+")
_ZERO: Final = ord("0")
_NINE: Final = ord("9")

_UNITS: Final = ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def format_size(n: int) -> str:
    """``512`` → ``512 bytes``, ``1048576`` → ``1 MiB``, ``1258291`` → ``1.2 MiB``. Pure.

    Binary units; one decimal unless the value is a whole number of its unit.
    """
    if n < 1024:
        return f"{n} bytes"
    value = float(n)
    for unit in _UNITS:
        value /= 1024
        if value < 1024 or unit == _UNITS[-1]:
            break
    if value == int(value):
        return f"{int(value)} {unit}"
    return f"{value:.1f} {unit}"


@attrs.frozen
class ImapLimits:
    """What one server may make us buffer.

    ``max_line``: text of one response outside its literals; ``max_literal``: the
    literals of one response together. The untagged lines answering one command (all but
    IDLE, whose lines are not kept) may total ``max_line + max_literal``
    (:attr:`max_answer`), except a ``FETCH``'s: ``max_fetch_answer``, because the envelope
    fetch (:meth:`~trio_idle.imap.client.ImapConnection.fetch_new`) asks for up to
    :data:`~trio_idle.imap.envelope.MAX_ENVELOPES` envelopes in one command, and one
    envelope of a legitimate message (hundreds of recipients, a long subject) can be tens
    of KiB. Each of its responses is still bounded by ``max_line``/``max_literal``.
    """

    max_line: int = 1024 * 1024
    max_literal: int = 1024 * 1024
    max_fetch_answer: int = 8 * 1024 * 1024

    @property
    def max_answer(self) -> int:
        return self.max_line + self.max_literal


DEFAULT_LIMITS: Final = ImapLimits()


class FrameError(Exception):
    """The server broke IMAP framing; ``str()`` is one line saying how. The connection
    cannot be read any further: the framer raises the same error again on every call."""


class FrameTooLarge(FrameError):
    """A response exceeded one of the framer's bounds (line, literal, literal count)."""


class ResponseFramer:
    """Incremental IMAP response framer with bounds. Not thread-safe; no I/O.

    Call :meth:`feed` with each read, then :meth:`next_response` until it returns
    ``None``: the bounds are checked there, so bytes fed but never asked for are not.
    """

    __slots__ = (
        "_buf",
        "_error",
        "_literal_bytes",
        "_literal_end",
        "_literals",
        "_scan",
        "_segment",
        "_text",
        "last_literals",
        "max_line",
        "max_literal",
        "max_literals",
        "scanned",
    )

    def __init__(self, max_line: int, max_literal: int, max_literals: int = MAX_LITERALS) -> None:
        if max_line <= 0 or max_literal < 0 or max_literals < 0:
            raise ValueError("max_line must be positive, max_literal(s) not negative")
        self.max_line = max_line
        self.max_literal = max_literal
        self.max_literals = max_literals
        #: bytes the CRLF search has looked at, over the framer's life (for tests)
        self.scanned = 0
        #: literals of the response :meth:`next_response` handed out last (what parsing
        #: it costs: the parser's work is per line and literal)
        self.last_literals = 0
        # a bytearray while bytes wait; the shared empty bytes between responses (an
        # idle connection's framer holds no buffer object of its own)
        self._buf: bytes | bytearray = b""
        self._error: FrameError | None = None
        # The response being assembled always starts at _buf[0]:
        self._segment = 0  # where its current line segment (after the last literal) starts
        self._scan = 0  # where the CRLF search resumes (>= _segment)
        self._text = 0  # bytes of its finished segments, CRLFs and literals not counted
        self._literal_end: int | None = None  # while inside a literal: where it ends
        self._literals = 0
        self._literal_bytes = 0

    @property
    def buffered(self) -> int:
        """Bytes fed that are not yet part of a response handed out."""
        return len(self._buf)

    def feed(self, data: bytes) -> None:
        """Append bytes read from the server. O(len(data)); checks nothing yet.

        After an error the bytes are dropped: the connection is being closed anyway.
        """
        if self._error is None:
            if self._buf:
                self._buf += data  # a bytearray: in place
            else:
                self._buf = bytearray(data)

    def next_response(self) -> bytes | None:
        """The next complete response (ending in CRLF), or ``None`` if more bytes are needed.

        Raises :class:`FrameTooLarge` when the response being assembled exceeds a bound,
        :class:`FrameError` when it is not IMAP; either again on any later call.
        """
        if self._error is not None:
            raise self._error
        try:
            return self._next()
        except FrameError as exc:
            self._error = exc
            self._buf = b""  # nothing more will be read: free the memory now
            raise

    def _next(self) -> bytes | None:
        buf = self._buf
        while True:
            if self._literal_end is not None:
                if len(buf) < self._literal_end:
                    return None
                self._segment = self._scan = self._literal_end
                self._literal_end = None
            end = buf.find(b"\r\n", self._scan)
            if end < 0:
                self.scanned += len(buf) - self._scan
                # a CR ending this read may be the first half of the CRLF: look at it again
                self._scan = max(self._segment, len(buf) - 1)
                pending = len(buf) - self._segment
                if pending and buf[-1] == _CR:
                    pending -= 1
                if self._text + pending > self.max_line:
                    # how much more than the limit depends on how the reads fell: not said
                    raise FrameTooLarge(
                        f"server sent a line longer than {format_size(self.max_line)} without CRLF"
                    )
                return None
            self.scanned += end + 2 - self._scan
            self._text += end - self._segment
            if self._text > self.max_line:
                raise FrameTooLarge(
                    f"server sent a {format_size(self._text)} line "
                    f"(limit {format_size(self.max_line)})"
                )
            size = self._literal_size(self._segment, end)
            if size is None:
                if end + 2 == len(buf):  # the usual case: one whole response was read
                    response = bytes(buf)
                    self._buf = b""
                else:
                    assert isinstance(buf, bytearray)  # bytes only when empty
                    response = bytes(buf[: end + 2])
                    del buf[: end + 2]  # O(1) from the front of a bytearray
                self.last_literals = self._literals
                self._segment = self._scan = self._text = 0
                self._literals = self._literal_bytes = 0
                return response
            self._start_literal(size)
            self._literal_end = end + 2 + size

    def _start_literal(self, size: int) -> None:
        if size > self.max_literal:
            raise FrameTooLarge(
                f"server announced a {format_size(size)} literal "
                f"(limit {format_size(self.max_literal)})"
            )
        self._literals += 1
        if self._literals > self.max_literals:
            raise FrameTooLarge(
                f"server sent more than {self.max_literals} literals in one response"
            )
        self._literal_bytes += size
        if self._literal_bytes > self.max_literal:
            raise FrameTooLarge(
                f"server sent {format_size(self._literal_bytes)} of literals in one response "
                f"(limit {format_size(self.max_literal)})"
            )

    def _literal_size(self, start: int, end: int) -> int | None:
        """The size announced by a ``{n}`` that ends ``_buf[start:end]``, if there is one."""
        buf = self._buf
        if end - start < 3 or buf[end - 1] != _CLOSE:
            return None
        last = end - 2  # the last digit (or the '+' of {n+})
        plus = buf[last] == _PLUS
        if plus:
            last -= 1
        first = last
        while first >= start and _ZERO <= buf[first] <= _NINE and last - first < _MAX_SIZE_DIGITS:
            first -= 1
        if first == last or first < start:
            return None  # "{}" or "}" alone: not a literal, just text
        if buf[first] != _OPEN:
            if _ZERO <= buf[first] <= _NINE:  # more digits than any real size has
                raise FrameTooLarge(
                    f"server announced a literal of more than {_MAX_SIZE_DIGITS} digits "
                    f"(limit {format_size(self.max_literal)})"
                )
            return None
        if plus:
            raise FrameError(
                "server sent a non-synchronizing literal {n+}, which only clients may send"
            )
        return int(buf[first + 1 : last + 1])
