"""One task keeps every session's tick and IDLE renewal on time.

A session that waited for its own tick would wake twice for it: once when its deadline
cancels its read (a ``Cancelled`` raised through the read, the scopes closed and opened
again), once for the server's answers. At 10,000 sessions with the 2-minute tick that is
most of the daemon's idle CPU. Instead the :class:`Ticker` — one task for the process —
holds when each session is due, and when one is, writes its ``DONE``/``NOOP``/``IDLE`` on
the connection at once (:meth:`~trio_idle.imap.connector.RestartWriter.begin_restart`,
synchronous): the session task, still reading, wakes once, for the answers. The ticker
then checks, by the command timeout, that the answers came
(:meth:`~trio_idle.imap.connector.RestartWriter.check_restart`): a half-open connection is
found as before, with the same error (``no answer to NOOP within 30s``), at most
:data:`CHECK_GRANULARITY` after the command timeout.

Guarantees: callbacks run in the ticker's task, in due order, never before their time
and late by at most :data:`GRANULARITY` plus the loop's own delay (a restart's check: by
at most :data:`CHECK_GRANULARITY`, so a half-open connection is found within the command
timeout plus that); a callback must be synchronous and cheap (it only writes). One
that raises is logged and counted (``internal_errors``), never ends the ticker, and the
others still run. The ticker runs
until cancelled (its owner's scope: the daemon's root nursery, cancelled at shutdown);
entries of ended sessions are dropped when they come due (each session's
:class:`IdleTimers` is told it ended). After :data:`BATCH` entries in one pass the ticker
checkpoints, so a large batch does not hold the loop.

Entries are plain data, no closure per entry (at 10,000 sessions every session holds one):
a session's next restart is ``(when, seq, its IdleTimers, generation)``, stale once the
generation moved on; the checks of the restarts written one command timeout earlier,
within one :data:`CHECK_GRANULARITY`, share one entry,
``(when, seq, [(IdleTimers, restart number), ...], 0)``, run in one pass. Checks are
due on that coarser grid than restarts: with ticks jittered over minutes, most passes
write one or two sessions' ticks, and a check of its own for each would wake the loop
once more per tick; on the coarse grid every check due in that second shares one
wake-up. :meth:`Ticker.call_at` takes any callback too.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from typing import Final, TypeAlias

import trio

from trio_idle.core.logs import Logger, log_internal_error
from trio_idle.core.scrub import PLAIN
from trio_idle.core.stats import Stats
from trio_idle.imap.connector import RestartWriter

#: due times are rounded up to this (seconds), so due sessions are handled in batches:
#: ticks are jittered over minutes, a few milliseconds late costs nothing
GRANULARITY: Final = 0.02
#: checks of restarts are due on this grid (seconds): a second late on a 30-second
#: command timeout costs nothing, and one wake-up serves every check due in it
CHECK_GRANULARITY: Final = 1.0
#: entries run per batch before the ticker lets other tasks run
BATCH: Final = 500

#: the checks of the restarts one pass wrote: (timers, restart number) each
_Checks: TypeAlias = "list[tuple[IdleTimers, int]]"
#: what an entry runs: a session's restart (with its generation), a pass's checks, or
#: a callback (:meth:`Ticker.call_at`)
_Target: TypeAlias = "IdleTimers | _Checks | Callable[[], None]"


def _slot(when: float, grid: float = GRANULARITY) -> float:
    """``when`` rounded up to the ticker's ``grid`` (restarts: :data:`GRANULARITY`)."""
    return math.ceil(when / grid) * grid


class Ticker:
    """Runs sessions' restarts, their checks and callbacks at their due time, from one
    task (see module doc)."""

    __slots__ = ("_checks", "_heap", "_log", "_scope", "_seq", "_stats")

    def __init__(self, stats: Stats | None = None, log: Logger | None = None) -> None:
        self._heap: list[tuple[float, int, _Target, int]] = []
        #: the entries of checks not yet due, by due time: restarts written later join them
        self._checks: dict[float, _Checks] = {}
        self._seq = 0
        self._scope: trio.CancelScope | None = None
        self._stats = stats
        self._log = log

    def __len__(self) -> int:
        return len(self._heap)

    def call_at(self, when: float, callback: Callable[[], None]) -> None:
        """Run ``callback()`` in the ticker's task at ``when`` (trio's clock) or soon after.
        Synchronous; never blocks."""
        self._push(_slot(when), callback, 0)

    def _push(self, when: float, target: _Target, number: int) -> None:
        """Add an entry due at ``when`` (on a grid already: :func:`_slot`)."""
        self._seq += 1
        # checks before restarts due at the same time: a session's check was due before
        # its next restart was (it is pushed later, after the pass that rescheduled it)
        seq = -self._seq if type(target) is list else self._seq
        heapq.heappush(self._heap, (when, seq, target, number))
        scope = self._scope
        if scope is not None and when < scope.deadline:
            scope.deadline = when

    async def run(self) -> None:
        """Run entries as they come due, until cancelled."""
        heap = self._heap
        while True:
            with trio.CancelScope(deadline=heap[0][0] if heap else math.inf) as scope:
                self._scope = scope
                await trio.sleep_forever()
            self._scope = None
            now = trio.current_time()
            ran = 0
            checks = self._checks
            while heap and heap[0][0] <= now:
                due, _, target, number = heapq.heappop(heap)
                ran += 1
                # each entry in its own try: one session's bug must not stop every tick
                if isinstance(target, IdleTimers):
                    try:
                        restart = target._due(number, now)
                    except Exception as exc:
                        self._failed(exc)
                        continue
                    if restart is not None:
                        when = _slot(now + target.timeout, CHECK_GRANULARITY)
                        batch = checks.get(when)
                        if batch is None:
                            batch = checks[when] = []
                            self._push(when, batch, 0)
                        batch.append((target, restart))
                elif isinstance(target, list):
                    if checks.get(due) is target:
                        del checks[due]
                    ran += len(target) - 1
                    for timers, restart in target:
                        try:
                            timers._check(restart)
                        except Exception as exc:
                            self._failed(exc)
                else:
                    try:
                        target()
                    except Exception as exc:
                        self._failed(exc)
                if ran >= BATCH:
                    ran = 0
                    await trio.lowlevel.checkpoint()
                    now = trio.current_time()

    def _failed(self, exc: Exception) -> None:
        if self._stats is not None:
            self._stats.inc("internal_errors")
        if self._log is not None:
            log_internal_error(self._log, "[idle/ticker]", exc, PLAIN)


class IdleTimers:
    """When one IDLE session next ticks (NOOP) and renews its IDLE, and — with a
    :class:`Ticker` — the ticker's side of it: at the due time :meth:`due` writes the
    restart on the link (:meth:`RestartWriter.begin_restart`: the ticker only writes;
    the session alone reads) and schedules its check, or,
    when the link cannot take it now, cancels the session's wait (:attr:`wake`) so the
    session runs it itself and then calls :meth:`restarted`.

    The session owns it: it sets :attr:`wake` around its wait and calls :meth:`ended`
    when its connection ends (entries still in the ticker then do nothing).
    """

    __slots__ = (
        "_generation",
        "_link",
        "_log",
        "_stats",
        "_ticker",
        "next_tick",
        "renew_at",
        "renew_interval",
        "renew_line",
        "tick_interval",
        "timeout",
        "wake",
    )

    def __init__(
        self,
        link: RestartWriter,
        ticker: Ticker | None,
        *,
        next_tick: float,
        renew_at: float,
        tick_interval: float,
        renew_interval: float,
        timeout: float,
        log: Logger,
        renew_line: str,
        stats: Stats,
    ) -> None:
        self._link: RestartWriter | None = link
        self._stats = stats
        self._ticker = ticker
        self._generation = 0
        self._log = log
        self.next_tick = next_tick
        self.renew_at = renew_at
        self.tick_interval = tick_interval
        self.renew_interval = renew_interval
        self.timeout = timeout
        #: the log line of a renewal (``[idle/<email>] idle renewing (25min threshold)``)
        self.renew_line = renew_line
        #: the scope of the session's wait while it waits; cancelled to hand it a restart
        self.wake: trio.CancelScope | None = None

    @property
    def passive(self) -> bool:
        """Whether a ticker writes the restarts (else the session's wait has a deadline)."""
        return self._ticker is not None

    @property
    def due_at(self) -> float:
        return min(self.next_tick, self.renew_at)

    def start(self) -> None:
        """Schedule the first restart (with a ticker; no-op without)."""
        self._schedule()

    def take_due(self, now: float) -> bool:
        """Whether the restart due at ``now`` is a tick (it writes ``NOOP``); moves the
        timers of what is due past ``now`` and logs a renewal. For whoever performs the
        restart (ticker or session): a renewal asks nothing more of it than a restart."""
        tick = now >= self.next_tick
        if now >= self.renew_at:
            self._log.info(self.renew_line)
            self.renew_at = now + self.renew_interval
        if tick:
            self.next_tick = now + self.tick_interval
        return tick

    def restarted(self) -> None:
        """The session ran a restart itself: schedule the next one."""
        self._stats.inc("idle_restarts", "session")
        self._schedule()

    def ended(self) -> None:
        """The connection ended: nothing scheduled for it runs any more."""
        self._link = None
        self._generation += 1
        self.wake = None

    def _schedule(self) -> None:
        ticker = self._ticker
        if ticker is None or self._link is None:
            return
        self._generation += 1
        ticker._push(_slot(self.due_at), self, self._generation)

    def _due(self, generation: int, now: float) -> int | None:
        """The ticker's entry came due: write the restart and return its number (the
        ticker checks it by the command timeout), or None (stale, early, or handed to
        the session)."""
        link = self._link
        if link is None or generation != self._generation:
            return None  # ended, or rescheduled since
        if now < self.due_at:
            self._schedule()
            return None
        number = link.begin_restart(noop=now >= self.next_tick)
        if number is None:
            # the session does it (it may be busy, e.g. fetching for a scan: then it
            # finds the restart due when it is done)
            if self.wake is not None:
                self.wake.cancel()
            return None
        self._stats.inc("idle_restarts", "ticker")
        self.take_due(now)
        self._schedule()
        return number

    def _check(self, number: int) -> None:
        """Restart ``number``'s answers are due: a link that has not had them all is
        dead (:meth:`RestartWriter.check_restart`)."""
        link = self._link
        if link is not None:  # a session that ended has nothing left to check
            link.check_restart(number)
