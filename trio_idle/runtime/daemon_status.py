"""What a running daemon shows its readers: a frozen status and the interface they read.

:class:`DaemonStatus` is a snapshot, taken by :meth:`trio_idle.runtime.daemon.Daemon.status`
without a checkpoint, so every field in it belongs to the same moment. Readers that wait
for a change use the daemon's ``wait_refreshed`` / ``wait_stopping`` / ``wait_stopped``
instead of events of their own.

:class:`DaemonView` is the part of the daemon that supervision (health endpoint,
metrics, systemd, pings) depends on, so :mod:`trio_idle.runtime.supervision` does not import
:mod:`trio_idle.runtime.daemon` (which starts it).
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import attrs

if TYPE_CHECKING:
    from trio_idle.accounts.connections import RowProblem
    from trio_idle.backend.watch import BackendWatch
    from trio_idle.cluster.listener import ListenerView
    from trio_idle.cluster.membership import MembershipView
    from trio_idle.core.config import Settings
    from trio_idle.core.stats import Stats
    from trio_idle.mailbox.reconcile import Handle


class Phase(enum.Enum):
    """Where the daemon is in its life; it only ever moves forward."""

    #: refreshing the list and running sessions
    RUNNING = "running"
    #: :meth:`~trio_idle.runtime.daemon.Daemon.shutdown` was called: sessions are logging out
    STOPPING = "stopping"
    #: :func:`~trio_idle.runtime.daemon.run_daemon` is returning: every session has ended
    STOPPED = "stopped"


@attrs.frozen(kw_only=True)
class DaemonStatus:
    """The daemon at one moment. Times are ``trio.current_time()`` values; every text is
    log-safe (no secrets, server and row text scrubbed)."""

    phase: Phase
    #: refreshes of the connection list that have ended so far, successful or not
    refresh_attempts: int
    #: time of the last successful refresh, ``None`` before the first one
    last_refresh_ok: float | None
    #: why the last refresh failed, ``None`` after a successful one
    last_refresh_error: str | None
    #: rows the last successful refresh read, skipped ones included
    connections_in_source: int
    #: count per session state, every state listed (:func:`trio_idle.ops.health.count_states`)
    sessions: Mapping[str, int]
    #: rows of the last successful refresh that were skipped, and why
    row_problems: tuple[RowProblem, ...]
    #: sessions removed by refreshes so far (with connection attempts: the GC churn)
    sessions_removed: int
    #: shared mode: instance id, live members, fence, owned share; ``None`` when single
    cluster: MembershipView | None = None
    #: the LISTEN/NOTIFY listener (``TRIO_IDLE_LISTEN_URL``); ``None`` when it is off
    listener: ListenerView | None = None

    @property
    def stopping(self) -> bool:
        """Shutdown has started (or is over)."""
        return self.phase is not Phase.RUNNING


class DaemonView(Protocol):
    """What supervision reads of the daemon; :class:`trio_idle.runtime.daemon.Daemon` is one."""

    @property
    def settings(self) -> Settings: ...

    @property
    def stats(self) -> Stats: ...

    def sessions(self) -> Collection[Handle]: ...

    def connections_snapshot(self) -> list[dict[str, Any]]: ...

    def backend(self) -> BackendWatch: ...

    def status(self) -> DaemonStatus: ...

    async def wait_refreshed(self, after: int) -> DaemonStatus: ...

    async def wait_stopping(self) -> None: ...
