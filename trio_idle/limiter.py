"""The global connect limiter: a steady ramp instead of a thundering herd.

Gmail and others throttle many logins from one IP, and a burst of a thousand TLS
handshakes starves the event loop. Every session takes a slot for its connect + login:
at most ``concurrency`` handshakes at once, started no faster than ``rate`` per second.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import trio


class ConnectLimiter:
    """Semaphore for concurrency plus a reservation clock for the rate.

    The rate needs no lock: each waiter reserves the next free start time
    synchronously, then sleeps until it. A cancelled waiter just leaves a gap.
    """

    def __init__(self, concurrency: int, rate: float) -> None:
        self._semaphore = trio.Semaphore(concurrency, max_value=concurrency)
        self._concurrency = concurrency
        self._interval = 1.0 / rate
        self._next_start = 0.0

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        async with self._semaphore:
            now = trio.current_time()
            start = max(now, self._next_start)
            self._next_start = start + self._interval
            await trio.sleep_until(start)
            yield

    @property
    def in_progress(self) -> int:
        return self._concurrency - self._semaphore.value
