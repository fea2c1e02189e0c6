"""Event-loop lag, measured continuously.

:meth:`LoopMonitor.run` sleeps ``period`` seconds again and again and records how late
each wake-up was (the *overshoot*): a loop busy with callbacks, or blocked by a
synchronous call, wakes its sleepers late. :meth:`LoopMonitor.lag` is the largest
overshoot of the last ``window`` seconds, and also counts the wake-up that is overdue
right now, so a reader that runs before the monitor after a stall still sees it.

Cancellation: :meth:`run` is an endless loop; cancelling it is the only way to end it.
"""

from __future__ import annotations

import collections
from typing import Final

import trio

DEFAULT_PERIOD: Final = 0.5
DEFAULT_WINDOW: Final = 2.0


class LoopMonitor:
    """Measures event-loop lag; all times are ``trio.current_time()`` values."""

    def __init__(
        self,
        period: float = DEFAULT_PERIOD,
        window: float = DEFAULT_WINDOW,
        stall_threshold: float = float("inf"),
    ) -> None:
        self.period = period
        self.window = window
        #: an overshoot above this counts as a stall (:attr:`stalls`)
        self.stall_threshold = stall_threshold
        self.samples = 0
        self.stalls = 0
        self.max_lag = 0.0
        self._recent: collections.deque[tuple[float, float]] = collections.deque()
        self._expected: float | None = None

    def record(self, now: float, lag: float) -> None:
        """Add one measurement (what :meth:`run` does after every wake-up)."""
        self.samples += 1
        self.max_lag = max(self.max_lag, lag)
        if lag > self.stall_threshold:
            self.stalls += 1
        self._recent.append((now, lag))
        while self._recent and self._recent[0][0] < now - self.window:
            self._recent.popleft()

    def lag(self, now: float | None = None) -> float:
        """Largest lag seen in the last ``window`` seconds, or the current overdue time."""
        now = trio.current_time() if now is None else now
        recent = max((lag for t, lag in self._recent if t >= now - self.window), default=0.0)
        overdue = 0.0 if self._expected is None else now - self._expected
        return max(recent, overdue, 0.0)

    async def run(self) -> None:
        """Measure forever (until cancelled)."""
        try:
            while True:
                self._expected = trio.current_time() + self.period
                await trio.sleep_until(self._expected)
                now = trio.current_time()
                self.record(now, max(0.0, now - self._expected))
        finally:
            self._expected = None
