"""Global pacing: a steady ramp instead of a thundering herd, and fair to every host.

Gmail and others throttle many logins from one IP, and a burst of a thousand TLS
handshakes starves the event loop: every session takes a :class:`ConnectLimiter` slot for
its connect + login. After a restart, thousands of catch-up scans must not flood the
backend either: they wait for a :class:`Pacer` start time (EXISTS-driven scans do not).

A host that accepts connections and never answers (a tarpit, an overloaded server) keeps
each slot it gets for the whole connect timeout; :class:`ConnectLimiter` therefore lets
one host hold only a share of the slots, so every other mailbox keeps connecting.

After one provider's outage, its sessions must come back no faster than it accepts
logins and must not queue every other provider's sessions behind them: with per-host
pacing on (``TRIO_IDLE_HOST_PACING``), the start times come from a :class:`HostPacer`
(each host key at its own rate, the global rate shared round robin among the keys
waiting; the decisions are :class:`~trio_idle.core.host_pacing.PaceBook`'s).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import trio

from trio_idle.core.host_pacing import HostRates, PaceBook

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


class _Gate:
    """One host key's turn: the task holding ``lock`` is the key's next start."""

    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = trio.Lock()
        self.users = 0


class HostPacer:
    """Start times for connects of many host keys: each key no faster than its own rate,
    all keys together no faster than the global rate, the global rate shared round robin
    among the keys waiting (:class:`~trio_idle.core.host_pacing.PaceBook`).

    :meth:`turn` is where a connect waits; in order: the key's gate (FIFO, one task per
    key past it at a time), the key's own start time, one of ``semaphore``'s slots, then
    its turn at the global pace among the keys at that stage. So a key held back by its
    own rate holds no global slot, and each key has at most one task competing for the
    global pace: a key with thousands of tasks waiting weighs as much as one with one.

    Cancelling a task anywhere in :meth:`turn` gives back exactly what it took; a key's
    gate exists only while some task holds or waits for it.
    """

    def __init__(self, rate: float, rates: HostRates) -> None:
        self._book = PaceBook(rate, rates)
        self._gates: dict[str, _Gate] = {}
        #: keys whose task holds a global slot and waits for its start, in arrival order
        self._waiting: dict[str, None] = {}
        self._change = trio.Event()

    @contextlib.asynccontextmanager
    async def turn(self, key: str, semaphore: trio.Semaphore) -> AsyncIterator[None]:
        """Take a start for ``key``, holding one of ``semaphore``'s slots for the block."""
        async with self._gate(key) as gate, gate.lock:
            await trio.sleep_until(self._book.host_ready_at(key))
            await semaphore.acquire()
            try:
                await self._global_turn(key)
            except BaseException:
                semaphore.release()
                raise
        try:
            yield
        finally:
            semaphore.release()

    async def _global_turn(self, key: str) -> None:
        self._waiting[key] = None
        self._changed()
        try:
            while True:
                now = trio.current_time()
                choice = self._book.choose(list(self._waiting), now)
                assert choice is not None  # this key waits
                chosen, at = choice
                if chosen == key and at <= now:
                    self._book.started(key, now)
                    return
                # the chosen key sleeps until its time; the others until something changes
                change = self._change
                with trio.move_on_at(at if chosen == key else math.inf):
                    await change.wait()
        finally:
            del self._waiting[key]
            self._changed()

    def _changed(self) -> None:
        self._change.set()
        self._change = trio.Event()

    @contextlib.asynccontextmanager
    async def _gate(self, key: str) -> AsyncIterator[_Gate]:
        gate = self._gates.get(key)
        if gate is None:
            gate = self._gates[key] = _Gate()
        gate.users += 1
        try:
            yield gate
        finally:
            # no checkpoint between this and the deletion (as in ConnectLimiter._host_slot)
            gate.users -= 1
            if gate.users == 0:
                del self._gates[key]

    @property
    def keys_waiting(self) -> int:
        """Keys with a task holding or waiting for their gate."""
        return len(self._gates)

    @property
    def book(self) -> PaceBook:
        return self._book


class _HostSlots:
    """One host's semaphore and how many tasks hold or wait for it."""

    __slots__ = ("semaphore", "users")

    def __init__(self, cap: int) -> None:
        self.semaphore = trio.Semaphore(cap, max_value=cap)
        self.users = 0


def host_key(host: str) -> str:
    """The name a host's share is counted under: as given, case and a final dot ignored.

    Sessions pass their pace key (:func:`trio_idle.accounts.providers.pace_key`: a
    preset's name, else ``host:port``)."""
    return host.strip().lower().rstrip(".")


def per_host_cap(concurrency: int, host_share: float) -> int:
    """Slots one host may hold: ``floor(concurrency × host_share)``, at least 1."""
    return max(1, math.floor(concurrency * host_share + 1e-9))


class ConnectLimiter:
    """At most ``concurrency`` handshakes at once, started no faster than ``rate``/s, and at
    most :func:`per_host_cap` of them for any one host.

    Slots are taken in this order: the host's, then a global one, then a start time: from
    the rate :class:`Pacer` (``host_rates`` is ``None``: one FIFO for every host), else from
    a :class:`HostPacer` (each host at its own rate from ``host_rates``, the global rate
    shared round robin among hosts). So a task waiting for a busy host holds no global
    slot and uses up no start time, and :attr:`in_progress` counts global slot holders,
    including one sleeping until its start time. Every queue is FIFO (trio's semaphores
    and locks).

    Cancelling a task anywhere in :meth:`slot` gives back exactly what it took. A host's
    bookkeeping exists only while some task holds or waits for that host's slot, so
    thousands of distinct hosts over time cost nothing once they are done.
    """

    def __init__(
        self,
        concurrency: int,
        rate: float,
        host_share: float = 1.0,
        host_rates: HostRates | None = None,
    ) -> None:
        if not 0 < host_share <= 1:
            raise ValueError(f"host_share must be in (0, 1], got {host_share!r}")
        self._semaphore = trio.Semaphore(concurrency, max_value=concurrency)
        self._concurrency = concurrency
        self._per_host = per_host_cap(concurrency, host_share)
        self._hosts: dict[str, _HostSlots] = {}
        self._pacer = Pacer(rate)
        self._host_pacer = None if host_rates is None else HostPacer(rate, host_rates)

    @classmethod
    def from_settings(
        cls, limits: LimitSettings, host_rates: HostRates | None = None
    ) -> ConnectLimiter:
        """The limiter ``limits`` describe (``TRIO_IDLE_CONNECT_*``); per-host pacing with
        ``host_rates`` when ``TRIO_IDLE_HOST_PACING`` is on (no own rates if not given)."""
        rates = (host_rates or HostRates()) if limits.host_pacing else None
        return cls(
            limits.connect_concurrency, limits.connect_rate, limits.connect_host_share, rates
        )

    @contextlib.asynccontextmanager
    async def slot(self, host: str = "") -> AsyncIterator[None]:
        """Hold one connect slot for ``host`` (the connection's pace key) for the block."""
        key = host_key(host)
        # in this order: the host's slot, then a global one (see the class doc)
        async with self._host_slot(key):
            if self._host_pacer is not None:
                async with self._host_pacer.turn(key, self._semaphore):
                    yield
            else:
                async with self._semaphore:
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
    def host_pacer(self) -> HostPacer | None:
        """The per-host pacing (``None``: one global FIFO pace)."""
        return self._host_pacer

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
