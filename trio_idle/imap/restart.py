"""Pure: an IDLE restart — ``DONE``, ``NOOP`` on a tick, ``IDLE`` — as a state machine.

The tick and the IDLE renewal leave IDLE (``DONE``), ask ``NOOP`` on a tick, and enter
IDLE again. The daemon runs a restart two ways — written by the process ticker and
answered while the session reads (:meth:`~trio_idle.imap.client.ImapConnection.begin_restart`),
or run by the session itself (:meth:`~trio_idle.imap.client.ImapConnection.restart_idle`)
— and both run this one machine, so they fail with the same texts and treat a refused
pipelined IDLE the same way.

No I/O, h11-style, in two layers:

- :class:`RestartMachine`, one per connection: told :meth:`~RestartMachine.begin`, it
  makes the tags and returns the exact bytes to write (``DONE``, ``<tag> NOOP``,
  ``<tag> IDLE``); fed each tagged line and continuation the server sends
  (:meth:`~RestartMachine.feed`), it matches them by tag and returns what happened
  (:class:`Answered`, :class:`SendIdle`, :class:`IdleResumed`, :class:`Failed`); told a
  restart's deadline came (:meth:`~RestartMachine.check`), it returns
  :class:`TimedOut`. It remembers, for the connection's life, that the server refused a
  pipelined IDLE (:attr:`~RestartMachine.pipelines`).
- :class:`RestartAnswers`, one per restart: the rules that judge each status in order.
  An answer that ends the restart raises :class:`~trio_idle.core.errors.ImapError` with
  the text the session logs (``NOOP failed: NO``); a missing answer is named by
  :attr:`RestartAnswers.awaiting` (``no answer to NOOP within 30s``).

The connection is the driver: it writes the bytes, and its read path — which only the
session task runs — feeds the machine; the ticker's side (``begin``, ``check``) is
synchronous and never reads.
"""

from __future__ import annotations

import enum
import math
from typing import Final, NoReturn, Protocol

import attrs

from trio_idle.core.errors import ImapError

#: what :attr:`RestartAnswers.awaiting` names, in the order the answers come
DONE: Final = "DONE"
NOOP: Final = "NOOP"
IDLE: Final = "IDLE"


class Next(enum.Enum):
    """What the connection does after an answer was fed in."""

    #: nothing: the next answer is not in yet (feed it when it is)
    WAIT = "wait"
    #: write ``IDLE`` now, on its own: it was not written with ``DONE``
    SEND_IDLE = "send idle"
    #: the ``IDLE`` written with ``DONE`` was refused: write it again on its own, and
    #: write this connection's later ones on their own too (some servers answer ``BAD``
    #: to a command that arrives in the same packet as ``DONE``)
    RESEND_IDLE = "resend idle"
    #: IDLE's continuation came: the restart is over, the connection is idling again
    IDLING = "idling"


@attrs.define
class RestartAnswers:
    """The answers of one restart, followed in order (see the module docstring).

    Guarantees: every answer is judged exactly as the session always judged it — ``DONE``
    and ``NOOP`` must be answered ``OK``; a tagged answer to ``IDLE`` is a refusal (an
    accepted IDLE answers ``+``), forgiven once, by :attr:`Next.RESEND_IDLE`, when that
    IDLE was written with ``DONE``. Once the restart is over (idling, or an error raised)
    the machine takes no more answers (:class:`RuntimeError`: a bug in the caller).
    """

    #: a ``NOOP`` was written after ``DONE`` (a tick; a renewal has none)
    noop: bool
    #: ``IDLE`` was written together with ``DONE`` (and ``NOOP``), pipelined
    pipelined: bool
    #: the command whose answer comes next: :data:`DONE`, :data:`NOOP` or :data:`IDLE`
    awaiting: str = attrs.field(default=DONE, init=False)
    #: the restart is over: idling again, or failed
    over: bool = attrs.field(default=False, init=False)
    # an IDLE written on its own that is refused ends the restart
    _idle_alone: bool = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._idle_alone = not self.pipelined

    def answered(self, status: str) -> Next:
        """The tagged answer to :attr:`awaiting` came with ``status``.

        Raises :class:`~trio_idle.core.errors.ImapError` if it ends the restart.
        """
        self._check_running()
        awaiting = self.awaiting
        if awaiting == DONE:
            if status != "OK":
                self._fail(f"DONE failed: IDLE ended with {status}")
            if self.noop:
                self.awaiting = NOOP
                return Next.WAIT
            return self._to_idle()
        if awaiting == NOOP:
            if status != "OK":
                self._fail(f"NOOP failed: {status}")
            return self._to_idle()
        if self._idle_alone:
            self._fail(f"IDLE failed: server refused IDLE: {status}")
        self._idle_alone = True
        return Next.RESEND_IDLE

    def continued(self) -> Next:
        """A ``+`` continuation came: IDLE's, when IDLE is awaited (the restart is over);
        ignored before, as the parser ignores one that no command asked for."""
        self._check_running()
        if self.awaiting != IDLE:
            return Next.WAIT
        self.over = True
        return Next.IDLING

    def _to_idle(self) -> Next:
        self.awaiting = IDLE
        return Next.WAIT if self.pipelined else Next.SEND_IDLE

    def _fail(self, text: str) -> NoReturn:
        self.over = True
        raise ImapError(text)

    def _check_running(self) -> None:
        if self.over:
            raise RuntimeError("the restart is over: it takes no more answers")


@attrs.frozen
class Answered:
    """``DONE`` or ``NOOP`` (:attr:`which`) was answered ``OK``; the restart goes on."""

    which: str


#: the two :class:`Answered` there are (made once: a tick allocates none)
ANSWERED_DONE: Final = Answered(DONE)
ANSWERED_NOOP: Final = Answered(NOOP)


@attrs.frozen
class SendIdle:
    """Write :attr:`data` (``<tag> IDLE``) now, on its own: it was not written with
    ``DONE`` (:attr:`refused` False), or the IDLE written with ``DONE`` was refused
    (:attr:`refused` True: this connection's later restarts write IDLE alone too)."""

    data: bytes
    tag: str
    refused: bool


@attrs.frozen
class IdleResumed:
    """IDLE's ``+`` came: the restart is over, the connection idles under :attr:`tag`."""

    tag: str


@attrs.frozen
class Failed:
    """An answer ended the restart: the connection is unusable; :attr:`text` is the
    error it ends with (``NOOP failed: NO``)."""

    text: str


@attrs.frozen
class TimedOut:
    """The deadline came before the answer to :attr:`which` (``DONE``, ``NOOP``, ``IDLE``)."""

    which: str


#: what :meth:`RestartMachine.feed` returns for a line that concerns the restart
Event = Answered | SendIdle | IdleResumed | Failed


class Tags(Protocol):
    """What makes a connection's tags (its parser: tags never repeat)."""

    def new_tag(self) -> str: ...


class RestartMachine:
    """The IDLE restarts of one connection (see the module docstring).

    States: not restarting (:attr:`running` False), or awaiting the answer to ``DONE``,
    ``NOOP`` or ``IDLE`` (:attr:`awaiting`), the IDLE written or not yet
    (:attr:`idle_tag`). Guarantees: a tagged answer is taken only with the tag of the
    command awaited — any other tag ends the restart (:class:`Failed`); untagged lines
    are never its (``None``: the monitor's); a ``+`` counts only while IDLE is awaited
    and written; after the restart ended (idling, failed, timed out, abandoned) lines
    are ignored until the next :meth:`begin`. Synchronous and allocation-light: one
    :class:`RestartAnswers` per restart, an event per answer that changes something.
    ``str()`` is :attr:`awaiting` (errors name the command).
    """

    __slots__ = (
        "_answers",
        "_tags",
        "_timeout",
        "deadline",
        "done_tag",
        "idle_tag",
        "noop_tag",
        "number",
        "pipelines",
    )

    def __init__(self, tags: Tags, timeout: float) -> None:
        #: makes the connection's next tag; the object, not its bound method (one object
        #: less per connection)
        self._tags = tags
        self._timeout = timeout
        self._answers: RestartAnswers | None = None
        #: write IDLE together with DONE (and NOOP); False once the server refused that
        self.pipelines = True
        #: the restart's number, for :meth:`check` (counts from 1)
        self.number = 0
        #: by when the running restart's answers are due (``begin``'s now + timeout)
        self.deadline = math.inf
        #: the tag of the IDLE being left: its tagged answer is DONE's
        self.done_tag = ""
        self.noop_tag: str | None = None
        #: the IDLE entered again; None until written
        self.idle_tag: str | None = None

    def __str__(self) -> str:
        return self.awaiting

    @property
    def running(self) -> bool:
        """A restart was begun and is not over."""
        answers = self._answers
        return answers is not None and not answers.over

    @property
    def awaiting(self) -> str:
        """The command whose answer comes next (the last one awaited once over)."""
        answers = self._answers
        return DONE if answers is None else answers.awaiting

    def begin(self, now: float, idle_tag: str, *, noop: bool, pipelined: bool) -> bytes:
        """Start a restart of the IDLE tagged ``idle_tag``: the bytes to write now, in one
        write — ``DONE``, ``<tag> NOOP`` if ``noop``, ``<tag> IDLE`` if ``pipelined``.
        ``pipelined`` requires :attr:`pipelines`; its answers are due at ``now`` + the
        timeout (:attr:`deadline`). :class:`RuntimeError` while one is running."""
        if self.running:
            raise RuntimeError("a restart is running already")
        if pipelined and not self.pipelines:
            raise RuntimeError("this server refused a pipelined IDLE: write it alone")
        self.number += 1
        self.deadline = now + self._timeout
        self.done_tag = idle_tag
        self._answers = RestartAnswers(noop, pipelined)
        data = b"DONE\r\n"
        self.noop_tag = self.idle_tag = None
        if noop:
            self.noop_tag = tag = self._tags.new_tag()
            data += f"{tag} NOOP\r\n".encode()
        if pipelined:
            self.idle_tag = tag = self._tags.new_tag()
            data += f"{tag} IDLE\r\n".encode()
        return data

    def feed(self, line: bytes) -> Event | None:
        """One line the server sent (its first line; CRLF optional): what it did to the
        restart, or ``None`` if nothing (untagged, an early ``+``, no restart running)."""
        answers = self._answers
        if answers is None or answers.over:
            return None
        first = line[:1]
        if first == b"*":
            return None
        if first == b"+":
            if answers.awaiting != IDLE or self.idle_tag is None:
                return None
            answers.continued()
            return IdleResumed(self.idle_tag)
        tag, _, rest = line.rstrip(b"\r\n").partition(b" ")
        awaiting = answers.awaiting
        expected = (
            self.done_tag
            if awaiting == DONE
            else self.noop_tag
            if awaiting == NOOP
            else self.idle_tag
        )
        status = rest.partition(b" ")[0].decode("ascii", "replace")
        if expected is None or tag.decode("ascii", "replace") != expected:
            answers.over = True
            return Failed(f"{awaiting} failed: answer for another command: {status}")
        try:
            todo = answers.answered(status)
        except ImapError as exc:
            return Failed(str(exc))
        if todo is Next.WAIT:
            return ANSWERED_DONE if awaiting == DONE else ANSWERED_NOOP
        refused = todo is Next.RESEND_IDLE
        if refused:
            self.pipelines = False
        self.idle_tag = tag_ = self._tags.new_tag()
        return SendIdle(f"{tag_} IDLE\r\n".encode(), tag_, refused)

    def check(self, number: int) -> TimedOut | None:
        """Restart ``number``'s deadline came (the caller's clock says so): if it is still
        running, it is over — :class:`TimedOut` names the answer missing. A restart
        already over, or an older one, gives ``None``."""
        answers = self._answers
        if answers is None or answers.over or number != self.number:
            return None
        answers.over = True
        return TimedOut(answers.awaiting)

    def overdue(self, now: float) -> bool:
        """Whether a restart is running past its :attr:`deadline` at ``now``."""
        return self.running and now >= self.deadline

    def abandon(self) -> None:
        """The connection ended: the running restart (if any) takes no more lines."""
        if self._answers is not None:
            self._answers.over = True
