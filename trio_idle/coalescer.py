"""Per-connection scan coalescing: at most one active and one pending scan.

Whatever asks for a scan (EXISTS, the tick, a reconnect) calls :meth:`ScanCoalescer.request`,
which never blocks. The connection's scan worker loops on :meth:`ScanCoalescer.next_scan`.
A request while idle wakes the worker (becomes *active*); a request while a scan is
active becomes the *pending* one; further requests while one is pending are absorbed
(counted in :attr:`absorbed`), because the pending scan, which starts after them, covers
their mail too. So a burst of any size costs at most two scans.
"""

from __future__ import annotations

from typing import Final

import attrs
import trio

from trio_idle.limiter import Pacer

#: Catch-up scans (after a restart or reconnect) are paced globally; EXISTS/tick are not.
PACED_REASONS: Final = frozenset({"startup", "reconnect"})


@attrs.define
class ScanCoalescer:
    """A ``trio.Event`` plus a pending counter (0 or 1): at most one scan active and one
    pending per mailbox, however many requests arrive (a burst or an outage never queues).

    Every async method is a checkpoint (see :meth:`next_scan`).
    """

    _wakeup: trio.Event = attrs.field(factory=trio.Event)
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
        self._wakeup.set()
        return True

    async def next_scan(self) -> str:
        """Wait until a scan is pending, make it the active one and return its reason.

        Call :meth:`done` when the scan finished (success or given up). Always a
        checkpoint, as trio's primitives are: cancelled, it raises ``trio.Cancelled``
        even when a scan is pending, and leaves the state untouched (the pending scan
        stays pending); once a scan was taken it is returned, never lost to a cancel.
        """
        if self.pending:
            # trio's fast path: a cancel point before the state changes, a scheduling
            # point (immune to cancellation) after it
            await trio.lowlevel.checkpoint_if_cancelled()
            reason = self._take()
            await trio.lowlevel.cancel_shielded_checkpoint()
            return reason
        while not self.pending:
            if self._wakeup.is_set():
                self._wakeup = trio.Event()
            await self._wakeup.wait()
        return self._take()

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
