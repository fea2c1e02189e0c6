"""Garbage collection under ``TRIO_IDLE_GC=tuned``: no loop stall for a steady daemon.

10,000 sessions keep millions of GC-tracked objects alive, and a full collection walks
every one of them while no session runs (seconds at 10,000 sessions; the figures of this
module: docs/performance.md, "Figures behind the code").
CPython's automatic full collections are therefore off (:func:`trio_idle.cli.main` raises
the third threshold before it runs ``serve``); the daemon runs one collection after each
refresh instead (``Daemon._collect_garbage``), of one of two kinds:

* :attr:`Kind.YOUNG` — the young generations only (``gc.collect(1)``: what was allocated
  since the last automatic young collection, a few thousand objects, milliseconds), then
  :func:`gc.freeze`, which moves every tracked object into the permanent generation
  without walking it. This is the steady daemon's collection. It skips what the previous
  policy walked after every refresh — every object created since the last refresh and
  still alive (a large share of a full collection once ticks renew each session's command
  objects) — because those walks freed next to nothing (docs/performance.md, Garbage
  collection): ticks and pushes leave no cyclic garbage; reference counting frees it.
* :attr:`Kind.FULL` — unfreeze everything, ``gc.collect()``, freeze the survivors. The
  only collection that frees a cycle among objects that lived through an earlier one;
  sessions that end (removed, reconnecting) leave such cycles. :class:`CollectionPolicy`
  asks for one when enough connections ended since the last full one, when pymalloc's
  allocated blocks (:func:`sys.getallocatedblocks`, which counts cyclic garbage too)
  grew by a share more than the connections made since explain, at two collections in
  a row — a bound on memory whatever made the garbage — and at least every
  ``max_interval``. The first
  collection of the process is always full. Sessions that start are not garbage: a
  ramp alone does not make the next collection full.

Frozen objects that die through reference counting are freed at once, as always: freezing
only changes what the collector walks.

Young collections are paced (:func:`pace_young_collections`): CPython starts one when
allocations *minus deallocations* pass 700, and a steady daemon frees about as many old
objects as it makes new ones (every tick replaces each session's command objects), so
that trigger rarely fires while the young generation grows with each tick's survivors —
tens of thousands of objects at 10,000 sessions, walked in collections of tens of
milliseconds that stop every session. A young collection every quarter second walks only
what that quarter second left: a pause of well under a millisecond, where one a second
paused milliseconds and was the tail of the push latency.
"""

from __future__ import annotations

import enum
import gc
import time
from typing import Final

import attrs
import trio

#: connections ended (sessions removed, or reconnecting) since the last full collection
#: that make the next one full: at least this many ...
MIN_ENDED: Final = 1000
#: ... or this share of the current sessions, whichever is larger
ENDED_SHARE: Final = 0.25
#: growth of pymalloc's allocated blocks beyond the baseline, as a share of it, seen by two
#: collections in a row, that makes the second one full. The baseline is the count after
#: the last full collection, raised by what the connections made since brought (new
#: sessions and reconnects are not garbage; the ended connections they replace are
#: counted above); two in a row because work in flight (a burst of pushes, ticks, health
#: reports) moves the count by several per cent for a moment, garbage stays. Whatever
#: makes cyclic garbage, a daemon holds at most about this share of its small-object
#: memory as garbage between full collections (measured: ±7 % of noise at 2,000
#: sessions ticking every 10 s, one refresh every 15 s)
GROWTH_SHARE: Final = 0.15
#: and a full collection at least this often (seconds), whatever else
MAX_INTERVAL: Final = 6 * 3600.0


class Kind(enum.Enum):
    """What one after-refresh collection walks (the value labels metrics and logs)."""

    YOUNG = "young"
    FULL = "full"


@attrs.define
class CollectionPolicy:
    """Decides the kind of each after-refresh collection. Pure: no clock, no :mod:`gc`.

    ``attempts`` counts the connection attempts since the process started, ``sessions``
    the sessions running now (so ``attempts - sessions`` connections have ended: each
    running session made at least one attempt; the count dips while new sessions wait
    for their first). ``blocks`` is :func:`sys.getallocatedblocks` or any other measure
    of live small-object memory, ``now`` any monotonic clock in seconds. Call
    :meth:`kind_due` before a collection and :meth:`done` after it, with ``blocks``
    counted after it.

    Ended connections count towards a full collection from the collection *after* the one
    that first saw them: a removed session is still logging out when the refresh that
    removed it collects, and whatever is still alive then gets frozen; by the next
    refresh it is garbage a full collection can free.

    Growth is judged against the baseline plus, for each connection made since the
    previous collection, the blocks per connection seen so far (blocks above the count at
    the policy's first collection, which the daemon runs before any session starts,
    divided by the connections made, at most one per session): a ramp or a reconnect
    storm brings memory that is not garbage.
    """

    min_ended: int = MIN_ENDED
    ended_share: float = ENDED_SHARE
    growth_share: float = GROWTH_SHARE
    max_interval: float = MAX_INTERVAL
    _ended_at_full: int | None = None
    _ended_seen: int = 0
    _attempts_seen: int = 0
    _time_of_full: float = 0.0
    _blocks_at_start: int = 0
    _blocks_base: float = 0.0
    _grown: bool = False

    def kind_due(self, attempts: int, sessions: int, blocks: int, now: float) -> Kind:
        """The kind the collection about to run must be."""
        if self._ended_at_full is None:
            return Kind.FULL
        if now - self._time_of_full >= self.max_interval:
            return Kind.FULL
        allowed = max(self.min_ended, int(self.ended_share * sessions))
        if self._ended_seen - self._ended_at_full >= allowed:
            return Kind.FULL
        if self._grown and self._grows(attempts, sessions, blocks):
            return Kind.FULL
        return Kind.YOUNG

    def _grows(self, attempts: int, sessions: int, blocks: int) -> bool:
        base = self._allowance(attempts, sessions, blocks)
        return blocks - base >= self.growth_share * base

    def _allowance(self, attempts: int, sessions: int, blocks: int) -> float:
        """The baseline plus what the connections made since the last collection brought."""
        made = max(0, attempts - self._attempts_seen)
        if not made:
            return self._blocks_base
        per_connection = max(0, blocks - self._blocks_at_start) / max(1, min(sessions, attempts))
        return self._blocks_base + made * per_connection

    def done(self, kind: Kind, attempts: int, sessions: int, blocks: int, now: float) -> None:
        """Record a collection of ``kind`` (arguments as for :meth:`kind_due`, but
        ``blocks`` counted after the collection)."""
        if self._ended_at_full is None:
            self._blocks_at_start = blocks
        self._grown = kind is not Kind.FULL and self._grows(attempts, sessions, blocks)
        if kind is Kind.FULL:
            # what ended since the previous collection may have been alive during this one
            self._ended_at_full = self._ended_seen
            self._time_of_full = now
            self._blocks_base = blocks
        else:  # up to what is there, by at most what new connections explain
            allowance = self._allowance(attempts, sessions, blocks)
            self._blocks_base = min(allowance, max(self._blocks_base, blocks))
        self._ended_seen = attempts - sessions
        self._attempts_seen = attempts


@attrs.frozen
class Collection:
    """What one collection did, for the log line and the counters."""

    kind: Kind
    collected: int
    seconds: float


def collect_and_freeze(kind: Kind) -> Collection:
    """Collect what ``kind`` walks (see the module), then freeze every tracked object.

    Blocks the thread for the pause it measures (milliseconds for :attr:`Kind.YOUNG`; a
    walk of every tracked object for :attr:`Kind.FULL`); call it where that is acceptable
    (the daemon does, after a refresh). Not interruptible: no cancellation point.
    """
    started = time.perf_counter()
    if kind is Kind.FULL:
        gc.unfreeze()
        collected = gc.collect()
    else:
        collected = gc.collect(1)
    gc.freeze()
    return Collection(kind, collected, time.perf_counter() - started)


#: seconds between paced young collections
YOUNG_INTERVAL: Final = 0.25


async def pace_young_collections(interval: float = YOUNG_INTERVAL) -> None:
    """Collect the young generations (``gc.collect(1)``) every ``interval`` seconds,
    forever (see the module doc). Each walks what was created since the one before and is
    still alive — a quarter second's worth of objects (mostly the coroutines, closures
    and trap objects of each session's next read), where CPython's own trigger let far
    more accumulate (docs/performance.md, "Figures behind the code"). The total walked is the
    same at any interval (a survivor is walked once, then promoted); a shorter one makes
    each pause, and so the delay of a push that meets it, shorter. Cancelled with the
    daemon's root nursery; never raises otherwise."""
    while True:
        await trio.sleep(interval)
        gc.collect(1)
