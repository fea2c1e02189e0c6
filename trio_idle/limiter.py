"""Global pacing: a steady ramp instead of a thundering herd.

Gmail and others throttle many logins from one IP, and a burst of a thousand TLS
handshakes starves the event loop: every session takes a :class:`ConnectLimiter` slot for
its connect + login. After a restart, thousands of catch-up scans must not flood the
backend either: they wait for a :class:`Pacer` start time (EXISTS-driven scans do not).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import trio


class Pacer:
    """At most ``rate`` starts per second, across all tasks, strictly.

    Waiters queue on a fair (FIFO) ``trio.Lock``; the one holding it sleeps until the next
    start time, then sets the following one from the moment it actually left. So even
    after the event loop stalls, starts never bunch up: two are always at least
    ``1/rate`` apart. Cancelling a waiter (queued or sleeping) costs nothing.
    """

    def __init__(self, rate: float) -> None:
        self._interval = 1.0 / rate
        self._next_start = 0.0
        self._lock = trio.Lock()

    async def wait(self) -> None:
        async with self._lock:
            await trio.sleep_until(self._next_start)
            self._next_start = trio.current_time() + self._interval


class ConnectLimiter:
    """At most ``concurrency`` handshakes at once, started no faster than ``rate``/s.

    The rate reservation is taken after the semaphore, so a waiter that holds no slot
    does not use up start times; :attr:`in_progress` therefore counts slot holders,
    including one sleeping until its start time.
    """

    def __init__(self, concurrency: int, rate: float) -> None:
        self._semaphore = trio.Semaphore(concurrency, max_value=concurrency)
        self._concurrency = concurrency
        self._pacer = Pacer(rate)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        async with self._semaphore:
            await self._pacer.wait()
            yield

    @property
    def in_progress(self) -> int:
        return self._concurrency - self._semaphore.value
