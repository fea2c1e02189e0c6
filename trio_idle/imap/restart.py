"""Pure: what the answers to one IDLE restart mean — ``DONE``, ``NOOP`` on a tick, ``IDLE``.

The tick and the IDLE renewal leave IDLE (``DONE``), ask ``NOOP`` on a tick, and enter
IDLE again. The daemon runs a restart two ways — written by the process ticker and
answered while the session reads (:meth:`~trio_idle.imap.client.ImapConnection.begin_restart`),
or run by the session itself (:meth:`~trio_idle.imap.client.ImapConnection.restart_idle`)
— and both follow the answers with this one machine, so they fail with the same texts
and treat a refused pipelined IDLE the same way.

No I/O, h11-style: the connection feeds :class:`RestartAnswers` each tagged answer of
the restart (its status as the parser read it: ``OK``, ``NO``, ``BAD``) and IDLE's
``+`` continuation, in the order the server sends them, and does what the returned
:class:`Next` says. An answer that ends the restart raises
:class:`~trio_idle.core.errors.ImapError` with the text the session logs
(``NOOP failed: NO``); a missing answer is the caller's to time out, named by
:attr:`RestartAnswers.awaiting` (``no answer to NOOP within 30s``).
"""

from __future__ import annotations

import enum
from typing import Final, NoReturn

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
