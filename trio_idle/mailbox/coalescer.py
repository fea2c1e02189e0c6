"""Per-connection scan coalescing: at most one active and one pending scan.

Whatever asks for a scan (EXISTS, the tick, a reconnect) calls :meth:`ScanCoalescer.request`,
which never blocks. A request while idle wakes the worker (becomes *active*); a request
while a scan is active becomes the *pending* one; further requests while one is pending
are absorbed (counted in :attr:`absorbed`), because the pending scan, which starts after
them, covers their mail too. So a burst of any size costs at most two scans.

The worker is started on demand, so that an idle mailbox holds no scan task: the
connection attaches a starter (:meth:`ScanCoalescer.attach`), a request that finds no
task running calls it, and the task takes scans with :meth:`ScanCoalescer.take_next`
until none is pending, then ends.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import attrs
import trio

from trio_idle.core.limiter import Pacer

#: Catch-up scans (after a restart or reconnect) are paced globally; EXISTS/tick are not.
PACED_REASONS: Final = frozenset({"startup", "reconnect"})


@attrs.define(weakref_slot=False)  # one per mailbox and folder: no weakref slot to carry
class ScanCoalescer:
    """A pending counter (0 or 1) and the scan task's starter: at most one scan active and
    one pending per mailbox, however many requests arrive (a burst or an outage never
    queues).

    Every async method is a checkpoint, as trio's own primitives are.
    """

    pending: int = 0
    active: bool = False
    #: reason of the first request folded into the pending scan
    pending_reason: str | None = None
    requested: int = 0
    absorbed: int = 0
    #: ``trio.current_time()`` of the first request folded into the pending scan
    pending_since: float | None = None
    #: the same, for the scan that is active now (for the latency histogram)
    active_since: float | None = None
    #: set while the active scan waits for its catch-up slot (see :meth:`wait_paced`)
    _urgent: trio.CancelScope | None = None
    #: starts the connection's scan task (:meth:`attach`); None: none can be started now
    _start: Callable[[], None] | None = attrs.field(default=None, repr=False, eq=False)
    #: the task the starter started has not ended yet
    _running: bool = False

    def request(self, reason: str) -> bool:
        """Ask for a scan. Returns False when it was absorbed into an already pending one."""
        self.requested += 1
        if self._urgent is not None and reason not in PACED_REASONS:
            # the active scan has not been sent yet, so it covers this mail: send it now
            self.absorbed += 1
            self._urgent.cancel()
            return False
        if self.pending:
            self.absorbed += 1
            return False
        self.pending = 1
        self.pending_reason = reason
        self.pending_since = trio.current_time()
        self._kick()
        return True

    def attach(self, start: Callable[[], None]) -> None:
        """From now on a pending scan with no task running calls ``start()``, which must
        start (never await) a task that runs :meth:`take_next` until it returns None and
        calls :meth:`task_ended` however it ends. Called at once if a scan is pending
        already (one carried over a credentials restart)."""
        self._start = start
        self._kick()

    def detach(self) -> None:
        """No more tasks are started (the connection's nursery is closing); a pending
        scan stays pending for whoever attaches next."""
        self._start = None

    def _kick(self) -> None:
        if self.pending and not self._running and self._start is not None:
            self._running = True
            self._start()

    def take_next(self) -> str | None:
        """For the task :meth:`attach`'s starter started: the pending scan made active and
        its reason, or None when none is pending — then the task must end without another
        checkpoint (a later request starts a new one). Synchronous: nothing can cancel it
        half-way. Call :meth:`done` when the taken scan finished."""
        if not self.pending:
            self._running = False
            return None
        return self._take()

    def task_ended(self) -> None:
        """The started task ended (returned or cancelled): the next request starts one.
        A scan still pending (the task was cancelled) waits for :meth:`attach`."""
        self._running = False

    def _take(self) -> str:
        """Pending becomes active. Synchronous, so nothing can cancel it half-way."""
        reason = self.pending_reason or "exists"
        self.active_since, self.pending_since = self.pending_since, None
        self.pending = 0
        self.pending_reason = None
        self.active = True
        return reason

    async def wait_paced(self, pacer: Pacer) -> bool:
        """Hold the active (catch-up) scan until its global slot; returns True when an
        EXISTS/tick request arrived meanwhile and cut the wait short (priority).

        A checkpoint (the pacer's wait always is); cancelled, the scan stays active and
        the caller's ``finally: done()`` ends it."""
        with trio.CancelScope() as scope:
            self._urgent = scope
            try:
                await pacer.wait()
            finally:
                self._urgent = None
        return scope.cancelled_caught

    def done(self) -> None:
        self.active = False
