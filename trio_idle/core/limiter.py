"""Global pacing: a steady ramp instead of a thundering herd, and fair to every host.

Gmail and others throttle many logins from one IP, and a burst of a thousand TLS
handshakes starves the event loop: every session takes a :class:`ConnectLimiter` slot for
its connect + login. After a restart, thousands of catch-up scans must not flood the
backend either: they wait for a :class:`Pacer` start time (EXISTS-driven scans do not).

A host that accepts connections and never answers (a tarpit, an overloaded server) keeps
each slot it gets for the whole connect timeout; :class:`ConnectLimiter` therefore lets
one host hold only a share of the slots, so every other mailbox keeps connecting.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from trio_idle.core.config import LimitSettings


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


class _HostSlots:
    """One host's semaphore and how many tasks hold or wait for it."""

    __slots__ = ("semaphore", "users")

    def __init__(self, cap: int) -> None:
        self.semaphore = trio.Semaphore(cap, max_value=cap)
        self.users = 0


def host_key(host: str) -> str:
    """The name a host's share is counted under: as typed, case and a final dot ignored."""
    return host.strip().lower().rstrip(".")


def per_host_cap(concurrency: int, host_share: float) -> int:
    """Slots one host may hold: ``floor(concurrency × host_share)``, at least 1."""
    return max(1, math.floor(concurrency * host_share + 1e-9))


class ConnectLimiter:
    """At most ``concurrency`` handshakes at once, started no faster than ``rate``/s, and at
    most :func:`per_host_cap` of them for any one host.

    Slots are taken in this order: the host's, then a global one, then a start time from
    the rate :class:`Pacer`. So a task waiting for a busy host holds no global slot and
    uses up no start time, and :attr:`in_progress` counts global slot holders, including
    one sleeping until its start time. Every queue is FIFO (trio's semaphores and lock).

    Cancelling a task anywhere in :meth:`slot` gives back exactly what it took. A host's
    bookkeeping exists only while some task holds or waits for that host's slot, so
    thousands of distinct hosts over time cost nothing once they are done.
    """

    def __init__(self, concurrency: int, rate: float, host_share: float = 1.0) -> None:
        if not 0 < host_share <= 1:
            raise ValueError(f"host_share must be in (0, 1], got {host_share!r}")
        self._semaphore = trio.Semaphore(concurrency, max_value=concurrency)
        self._concurrency = concurrency
        self._per_host = per_host_cap(concurrency, host_share)
        self._hosts: dict[str, _HostSlots] = {}
        self._pacer = Pacer(rate)

    @classmethod
    def from_settings(cls, limits: LimitSettings) -> ConnectLimiter:
        """The limiter ``limits`` describe (``TRIO_IDLE_CONNECT_*``)."""
        return cls(limits.connect_concurrency, limits.connect_rate, limits.connect_host_share)

    @contextlib.asynccontextmanager
    async def slot(self, host: str = "") -> AsyncIterator[None]:
        """Hold one connect slot for ``host`` (the row's host name) for the block."""
        # in this order: the host's slot, then a global one (see the class doc)
        async with self._host_slot(host_key(host)), self._semaphore:
            await self._pacer.wait()
            yield

    @contextlib.asynccontextmanager
    async def _host_slot(self, key: str) -> AsyncIterator[None]:
        entry = self._hosts.get(key)
        if entry is None:
            entry = self._hosts[key] = _HostSlots(self._per_host)
        entry.users += 1
        try:
            async with entry.semaphore:
                yield
        finally:
            # No checkpoint between this and the deletion: no task can pick up the entry
            # in between, and the next user of this host makes a fresh one.
            entry.users -= 1
            if entry.users == 0:
                del self._hosts[key]

    @property
    def per_host(self) -> int:
        """Most slots one host may hold at once."""
        return self._per_host

    @property
    def in_progress(self) -> int:
        return self._concurrency - self._semaphore.value

    @property
    def hosts_tracked(self) -> int:
        """Hosts with a task holding or waiting for one of their slots."""
        return len(self._hosts)

    def host_in_progress(self, host: str) -> int:
        """Slots ``host`` holds now (0 for a host nobody is connecting to)."""
        entry = self._hosts.get(host_key(host))
        return 0 if entry is None else self._per_host - entry.semaphore.value
