"""Garbage collection under ``TRIO_IDLE_GC=tuned``: short pauses with 10,000 sessions.

10,000 sessions keep millions of GC-tracked objects alive, and a full collection walks
every one of them while no session runs (≈ 1.6 s at 10,000 plaintext sessions). CPython's
automatic full collections are therefore off (:func:`trio_idle.cli.main` raises the
third threshold before it runs ``serve``); the daemon collects once after each refresh
instead (``Daemon._collect_garbage``), and freezes what survives
(:func:`gc.freeze`): frozen objects are skipped by later collections, so the collection
after the next refresh only walks what was created since and is still alive. Ticks renew
every session's command objects, so at 10,000 sessions that is still ≈ 40 % of a full
collection (0.6–0.8 s against 1.9 s on the benchmark machine), not nothing.

The price: a frozen object that later becomes unreachable *only through a reference cycle*
is not freed until it is unfrozen (reference counting still frees everything acyclic at
once). Sessions that end (removed, reconnecting) are what leave such cycles, so
:class:`FullCollectionPolicy` unfreezes everything and runs a real full collection when
enough sessions have started or ended since the last one, and at least every
``max_interval``; the first collection of the process is always full.
"""

from __future__ import annotations

import gc
import time
from typing import Final

import attrs

#: sessions started or ended since the last full collection that make the next one full:
#: at least this many ...
MIN_CHURN: Final = 1000
#: ... or this share of the current sessions, whichever is larger
CHURN_SHARE: Final = 0.25
#: and a full collection at least this often (seconds), whatever the churn
MAX_INTERVAL: Final = 6 * 3600.0


@attrs.define
class FullCollectionPolicy:
    """Decides, after each refresh, whether the collection must be a full one. Pure.

    ``churn`` is a monotonic count of session starts and ends (connection attempts plus
    sessions removed); ``now`` is any monotonic clock in seconds.
    """

    min_churn: int = MIN_CHURN
    churn_share: float = CHURN_SHARE
    max_interval: float = MAX_INTERVAL
    _churn_at_full: int | None = None
    _time_of_full: float = 0.0

    def full_due(self, churn: int, sessions: int, now: float) -> bool:
        if self._churn_at_full is None:
            return True
        if now - self._time_of_full >= self.max_interval:
            return True
        allowed = max(self.min_churn, int(self.churn_share * sessions))
        return churn - self._churn_at_full >= allowed

    def full_done(self, churn: int, now: float) -> None:
        self._churn_at_full = churn
        self._time_of_full = now


@attrs.frozen
class Collection:
    """What one collection did, for the log line and the counters."""

    full: bool
    collected: int
    seconds: float


def collect_and_freeze(full: bool) -> Collection:
    """Collect (everything if ``full``, else what is not frozen), then freeze the survivors.

    Blocks the thread for the pause it measures; call it where a pause is acceptable (the
    daemon does, after a refresh).
    """
    started = time.perf_counter()
    if full:
        gc.unfreeze()
    collected = gc.collect()
    gc.freeze()
    return Collection(full, collected, time.perf_counter() - started)
