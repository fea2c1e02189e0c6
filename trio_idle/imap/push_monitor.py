"""Turns every untagged line a server sends into the few facts a session acts on.

It sits inside the asyncio protocol's parser callback, so it must be cheap and never
block: a keepalive (``* OK Still here``) only updates :attr:`PushMonitor.last_activity`
and wakes nobody; only new mail, BYE and a lost connection wake the session task.
Because it sees *every* untagged line (during IDLE, in NOOP/SELECT responses and
between commands), an EXISTS that arrives between DONE and the next IDLE is not lost.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import trio

from trio_idle.core.errors import ImapError
from trio_idle.imap.notify import NotifyWatch
from trio_idle.imap.responses import PushKind, classify_push


class PushMonitor:
    """Per-connection message-count tracker and wake-up flag. Not thread-safe (trio thread)."""

    __slots__ = (
        "_cancel_on_loss",
        "_wakeup",
        "bye",
        "exists",
        "failure",
        "last_activity",
        "lost",
        "new_mail",
        "notify",
        "tick_mail",
        "ticking",
    )

    def __init__(self) -> None:
        #: message count as the server last reported it (None until SELECT says)
        self.exists: int | None = None
        #: messages announced since the session last called :meth:`take_new_mail`
        self.new_mail = 0
        self.bye: bytes | None = None
        self.lost: str | None = None
        #: the error that ended the connection, when it is more precise than ``lost``
        #: (a tick's command unanswered or refused): the session raises this one
        self.failure: ImapError | None = None
        #: a tick's NOOP is on its way: new mail counted meanwhile was found by the tick
        self.ticking = False
        #: of :attr:`new_mail`, what arrived while :attr:`ticking`
        self.tick_mail = 0
        self.last_activity = trio.current_time()
        #: what NOTIFY pushed for the other watched folders (None: NOTIFY not in effect)
        self.notify: NotifyWatch | None = None
        # Both made when first needed: the session reads the connection itself and never
        # waits here, and guards are the test server's. An Event is ≈ 0.5 KiB with its
        # waiter set, an empty set 0.2 KiB, per connection (python -m bench.memory_probe).
        #: who :meth:`wait` sleeps on (None until a task waits)
        self._wakeup: trio.Event | None = None
        #: the active :meth:`guard` scopes (None while there are none)
        self._cancel_on_loss: set[trio.CancelScope] | None = None

    # -- called from the protocol (asyncio side, same thread) -------------------------

    def untagged(self, line: bytes) -> None:
        kind, number = classify_push(line)
        if kind is PushKind.OTHER:
            if self.notify is not None and self.notify.feed(line):
                self._wake()  # a watched folder's STATUS, or NOTIFY's overflow
            return
        if kind is PushKind.EXISTS:
            assert number is not None
            if self.exists is not None and number > self.exists:
                self.new_mail += number - self.exists
                if self.ticking:
                    self.tick_mail += number - self.exists
                self._wake()
            self.exists = number
        elif kind is PushKind.EXPUNGE:
            if self.exists:
                self.exists -= 1
        else:
            self.bye = line[:200]
            self._wake()

    def activity(self) -> None:
        self.last_activity = trio.current_time()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.lost is None:  # closed because of mark_dead: that reason stands
            self.lost = f"{type(exc).__name__}: {exc}" if exc else "closed by server"
        self._wake()
        if self._cancel_on_loss is not None:
            for scope in self._cancel_on_loss:
                scope.cancel()

    def _wake(self) -> None:
        """Wake the tasks in :meth:`wait` (there are none if it was never called)."""
        if self._wakeup is not None:
            self._wakeup.set()

    # -- called from the session task (trio side) -------------------------------------

    def mark_dead(self, reason: str) -> None:
        """The session gave up on this connection (e.g. a command timed out)."""
        if self.lost is None:
            self.lost = reason
            self._wake()

    def fail(self, error: ImapError) -> None:
        """The connection is unusable because of ``error`` (raised by the session as is);
        wakes :meth:`wait`. A connection already lost keeps its first reason."""
        if self.lost is None:
            self.lost = str(error)
            self.failure = error
            self._wake()

    def rebase(self) -> None:
        """A SELECT is about to be issued again: its EXISTS is the new baseline. Mail
        counted since the previous SELECT arrived before this one, so it is in that
        count: announcing it as new would count it twice."""
        self.exists = None
        self.new_mail = self.tick_mail = 0

    def take_new_mail(self) -> int:
        count, self.new_mail = self.new_mail, 0
        return count

    def take_tick_mail(self) -> int:
        """How much of the mail last taken arrived during a tick (then reset)."""
        count, self.tick_mail = self.tick_mail, 0
        return count

    def pending(self) -> bool:
        """Whether new mail (in the selected mailbox, or pushed by NOTIFY for another
        folder), a BYE or the connection's loss waits to be acted on."""
        return (
            bool(self.new_mail)
            or self.bye is not None
            or self.lost is not None
            or (self.notify is not None and self.notify.waiting)
        )

    def problem(self) -> str | None:
        """Why this connection is unusable, or None while it is healthy."""
        if self.lost is not None:
            return f"connection lost ({self.lost})"
        if self.bye is not None:
            return f"server said {self.bye.decode('ascii', 'replace').lstrip('* ')!r}"
        return None

    async def wait(self) -> None:
        """Return once new mail, BYE or loss is pending (at once if already so).

        Always a checkpoint, like trio's own waits: a cancelled caller gets
        ``trio.Cancelled`` even when something is pending, and a session woken in a
        loop still lets other tasks run. Changes no state, so cancellation loses nothing.
        """
        if self.pending():
            await trio.lowlevel.checkpoint()
            return
        wakeup = self._wakeup
        if wakeup is None or wakeup.is_set():
            self._wakeup = wakeup = trio.Event()
        await wakeup.wait()

    @contextlib.contextmanager
    def guard(self) -> Iterator[trio.CancelScope]:
        """A cancel scope that is cancelled if the connection is lost while it is active.

        Use around a command wait, so a dead connection fails the command at once
        instead of at its deadline; check ``scope.cancelled_caught`` afterwards.
        """
        with trio.CancelScope() as scope:
            if self.lost is not None:
                scope.cancel()
            if self._cancel_on_loss is None:
                self._cancel_on_loss = set()
            guards = self._cancel_on_loss
            guards.add(scope)
            try:
                yield scope
            finally:
                guards.discard(scope)
                if not guards and self._cancel_on_loss is guards:
                    self._cancel_on_loss = None
