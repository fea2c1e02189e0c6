"""The daemon: root nursery, refresh loop, graceful shutdown.

Task tree (see docs/architecture.md)::

    run_daemon
    └── trio_asyncio loop     asyncio libraries run inside trio; no other event loop exists
        └── state nursery     outlives the root nursery: the last state flush follows the sessions
            ├── state flusher
            └── root nursery  (opened in the state nursery's body)
                ├── supervision       loop lag, health/status endpoints, pings, systemd
                ├── refresh loop      reads the source every refresh_interval (refresher.py)
                ├── ticker            writes every session's tick and IDLE renewal (ticker.py)
                ├── membership        shared mode only: heartbeat, member list, fence
                ├── share starter     shared mode only: starts what moved here (share.py)
                ├── listener          with TRIO_IDLE_LISTEN_URL only: LISTEN → refresh now
                └── connection tasks  one per connection, owned by the Reconciler

Guarantees: a source outage keeps every running session on the last good list and
retries with backoff (:mod:`trio_idle.core.backoff`, no jitter: 5 s doubling up to
``refresh_interval``); :meth:`Daemon.shutdown` cancels every connection scope (each
session writes LOGOUT and waits at most ``logout_timeout`` for the server to hang up) and
bounds the whole exit by ``shutdown_timeout``. Readers use :meth:`Daemon.status` and the
``wait_*`` methods (:mod:`trio_idle.runtime.daemon_status`).

With ``TRIO_IDLE_CLUSTER=shared`` the reconciler runs only this instance's share of the
list (:mod:`trio_idle.cluster.membership`, :func:`trio_idle.cluster.assignment.plan_share`):
a membership
change or a fence stops what is no longer ours at once (synchronously, in the heartbeat's
callback); connections that moved here start after their state was read again from the
shared store, and only once their previous owner's lease has certainly expired.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Callable, Collection, Mapping
from typing import Any

import trio
from loguru import logger

from trio_idle.accounts.connections import ConnectionListBuilder, MailConnection
from trio_idle.accounts.providers import host_rates
from trio_idle.auth.token_backend import make_token_source
from trio_idle.backend.watch import BackendWatch
from trio_idle.backend.webhook import WebhookClient
from trio_idle.cluster.listener import NotifyListener
from trio_idle.cluster.membership import MembershipDb, PostgresMembership, default_instance_id
from trio_idle.core.config import Settings, process_secrets
from trio_idle.core.crypto import derive_key
from trio_idle.core.gc_policy import (
    CollectionPolicy,
    Kind,
    collect_and_freeze,
    pace_young_collections,
)
from trio_idle.core.limiter import ConnectLimiter, Pacer
from trio_idle.core.logs import protect_secrets
from trio_idle.core.scrub import Scrubber, url_secrets
from trio_idle.core.stats import Stats
from trio_idle.imap.asyncio_loop import open_asyncio_loop
from trio_idle.imap.connect import make_ssl_context
from trio_idle.mailbox.reconcile import Handle, Reconciler
from trio_idle.mailbox.session import SessionEnv
from trio_idle.mailbox.ticker import Ticker
from trio_idle.ops.health import count_states
from trio_idle.runtime.daemon_status import DaemonStatus, Phase
from trio_idle.runtime.refresher import ConnectionSource, Refresher
from trio_idle.runtime.share import ShareCoordinator
from trio_idle.runtime.supervision import Supervisor, run_supervision
from trio_idle.state.backends import make_state_backend
from trio_idle.state.store import StateStore


class Daemon:
    """Handle to a running daemon, given to the caller by ``nursery.start(run_daemon, ...)``.

    Read it through :meth:`status` (a frozen :class:`DaemonStatus`) and the ``wait_*``
    methods; act on it with :meth:`request_refresh` and :meth:`shutdown`. Its parts —
    ``settings``, ``stats``, ``reconciler``, ``refresher``, ``share`` (shared mode),
    ``listener`` (``TRIO_IDLE_LISTEN_URL``), ``supervisor`` (once :meth:`start` has run)
    — are built by :func:`run_daemon`, the composition root; read them, don't replace them.
    ``gc_policy`` may be replaced (tests use smaller thresholds).
    """

    def __init__(
        self,
        settings: Settings,
        source: ConnectionSource,
        reconciler: Reconciler,
        stats: Stats,
        root: trio.Nursery,
        *,
        membership_db: MembershipDb | None = None,
    ) -> None:
        self.settings = settings
        self.reconciler = reconciler
        self.stats = stats
        self.gc_policy = CollectionPolicy()
        #: cancelled when shutdown starts: the ticker and the young-collection pacer
        #: never end by themselves
        self._background = trio.CancelScope()
        #: health endpoint, pings, systemd; set by :meth:`start` before it returns
        self.supervisor: Supervisor | None = None
        self._root = root
        self._phase = Phase.RUNNING
        self._sessions_removed = 0
        self._changed = trio.Event()
        key = derive_key(
            settings.connections.encryption_key.reveal(), settings.connections.key_derivation
        )
        #: shared mode: this instance's share of the list; None when single
        self.share: ShareCoordinator | None = None
        if settings.cluster.cluster == "shared":
            self.share = self._make_share(reconciler, membership_db)
        #: unchanged rows give the connections of the last refresh (no decryption, no new
        #: objects)
        self.refresher = Refresher(
            source,
            ConnectionListBuilder(key),
            stats,
            interval=settings.timers.refresh_interval,
            deliver=self._deliver,
            sessions=lambda: len(self.reconciler.handles),
            after_refresh=self._after_refresh,
            after_attempt=self._changed_now,
        )
        #: with TRIO_IDLE_LISTEN_URL: LISTEN → refresh now
        self.listener: NotifyListener | None = None
        if settings.cluster.listen_url is not None:
            self.listener = NotifyListener(
                settings.cluster.listen_url,
                on_change=self.refresher.request,
                connect_timeout=settings.process.db_timeout,
            )

    @property
    def source(self) -> ConnectionSource:
        return self.refresher.source

    async def start(
        self,
        ticker: Ticker,
        environ: Mapping[str, str] | None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Start every part in the root nursery: membership and share starter (shared
        mode), supervision, the refresh loop, the ticker, the listener. Reports started
        once supervision listens (raises its
        :class:`~trio_idle.runtime.supervision.StartupError` otherwise)."""
        root = self._root
        if self.share is not None:
            await root.start(self.share.membership.run, name="membership")
            root.start_soon(self.share.run, name="share-starter")
        self.supervisor = await root.start(run_supervision, self, environ)
        root.start_soon(self.refresher.run, name="refresh")
        root.start_soon(self._run_background, ticker, name="ticker")
        if self.listener is not None:
            root.start_soon(self.listener.run, name="listener")
        task_status.started()

    # -- reading ----------------------------------------------------------------------

    def status(self) -> DaemonStatus:
        """The daemon now (no checkpoint: every field is of the same moment)."""
        r = self.refresher
        return DaemonStatus(
            phase=self._phase,
            refresh_attempts=r.attempts,
            last_refresh_ok=r.last_ok,
            last_refresh_error=r.last_error,
            connections_in_source=r.connections_in_source,
            sessions=count_states(h.memory.state for h in self.reconciler.handles.values()),
            row_problems=r.row_problems,
            sessions_removed=self._sessions_removed,
            cluster=None if self.share is None else self.share.view(),
            listener=None if self.listener is None else self.listener.view(),
        )

    def sessions(self) -> Collection[Handle]:
        """The running connections (supervision reads their scans and health)."""
        return self.reconciler.handles.values()

    def backend(self) -> BackendWatch:
        """Whether the backend answers (readiness and pings read it)."""
        return self.reconciler.backend

    def connections_snapshot(self) -> list[dict[str, Any]]:
        """Per connection, what ``/status`` shows (log-safe)."""
        return self.reconciler.snapshot()

    async def wait_refreshed(self, after: int) -> DaemonStatus:
        """Return the status once more than ``after`` refreshes have ended (successful or
        not; compare with :attr:`DaemonStatus.refresh_attempts`).

        Always a checkpoint, also when that is already so. No refresh ends after
        :meth:`shutdown`, so then it waits until cancelled: bound it with a cancel scope.
        """
        await self._wait_until(lambda: self.refresher.attempts > after)
        return self.status()

    async def wait_stopping(self) -> None:
        """Return once shutdown has started (a checkpoint, also if it has already)."""
        await self._wait_until(lambda: self._phase is not Phase.RUNNING)

    async def wait_stopped(self) -> None:
        """Return once every session has ended and :func:`run_daemon` is returning (a
        checkpoint, also if that happened already)."""
        await self._wait_until(lambda: self._phase is Phase.STOPPED)

    async def _wait_until(self, done: Callable[[], bool]) -> None:
        # ``done`` only ever turns true (counts grow, the phase moves forward), so a true
        # one stays true across the checkpoint; _changed is read after each check with no
        # checkpoint in between, so no change can slip past the wait.
        if done():
            await trio.lowlevel.checkpoint()
        while not done():
            await self._changed.wait()

    def _changed_now(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # -- acting -----------------------------------------------------------------------

    def request_refresh(self) -> None:
        """Refresh now instead of at the next interval (SIGHUP, tests)."""
        self.refresher.request()

    def shutdown(self, reason: str = "shutdown requested") -> None:
        """Stop refreshing, end every session (LOGOUT), exit within ``shutdown_timeout``.

        Idempotent: a second call does nothing (the first one's deadline stands)."""
        if self._phase is not Phase.RUNNING:
            return
        self._phase = Phase.STOPPING
        self._changed_now()
        logger.info(
            f"[idle/daemon] shutting down ({reason}): closing "
            f"{len(self.reconciler.handles)} sessions"
        )
        self.reconciler.stop_all()
        if self.share is not None:
            self.share.stop()
        if self.listener is not None:
            self.listener.stop()
        self._background.cancel()  # they never end by themselves: the root nursery would wait
        self._root.cancel_scope.deadline = (
            trio.current_time() + self.settings.process.shutdown_timeout
        )
        self.refresher.stop()

    def stopped(self) -> None:
        """:func:`run_daemon` is returning: every session has ended."""
        self._phase = Phase.STOPPED
        self._changed_now()

    async def _run_background(self, ticker: Ticker) -> None:
        """Until shutdown starts: every session's tick and renewal (ticker.py) and, with
        ``TRIO_IDLE_GC=tuned``, young collections every 0.25 s (gc_policy.py)."""
        with self._background:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ticker.run, name="ticker")
                if self.settings.process.gc_mode == "tuned":
                    nursery.start_soon(pace_young_collections, name="gc-pacer")

    def _make_share(self, reconciler: Reconciler, db: MembershipDb | None) -> ShareCoordinator:
        s = self.settings
        c = s.cluster
        dsn = s.connections.database_url
        if db is None:
            assert dsn is not None  # enforced by config parsing
            db = PostgresMembership(dsn)
        # a heartbeat's error reaches /status as the fence reason
        scrub = Scrubber(url_secrets(dsn.reveal()) if dsn is not None else ())
        return ShareCoordinator(
            db,
            c.instance_id or default_instance_id(),
            ttl=c.cluster_ttl,
            poll_interval=c.cluster_poll,
            reconciler=reconciler,
            reload_timeout=s.process.db_timeout,
            on_change=self._changed_now,
            removed=self._count_removed,
            scrub=scrub,
        )

    # -- what a good refresh does ----------------------------------------------------

    async def _deliver(self, wanted: Mapping[str, MailConnection]) -> None:
        """A good list: run it (single) or this instance's share of it (shared)."""
        if self.share is None:
            applied = await self.reconciler.apply_gradually(wanted)
            self._count_removed(len(applied.removed))
        else:
            self.share.set_wanted(wanted)
        if self.reconciler.store is not None:
            self.reconciler.store.prune(wanted.keys())

    def _count_removed(self, n: int) -> None:
        self._sessions_removed += n

    def _after_refresh(self) -> None:
        if self.settings.process.gc_mode == "tuned":
            self._collect_garbage()

    def _collect_garbage(self) -> None:
        """The after-refresh collection of ``TRIO_IDLE_GC=tuned``
        (:mod:`trio_idle.core.gc_policy`).

        Blocks the loop for its pause: milliseconds for the steady daemon's young
        collection; seconds at 10,000 sessions for a full one (after many connections
        ended, after memory grew more than new connections explain, every 6 h; the
        figures: docs/performance.md, "Figures behind the code").
        """
        sessions = len(self.reconciler.handles)
        attempts = self.stats.get("connect_attempts")
        now = trio.current_time()
        kind = self.gc_policy.kind_due(attempts, sessions, sys.getallocatedblocks(), now)
        done = collect_and_freeze(kind)
        self.gc_policy.done(kind, attempts, sessions, sys.getallocatedblocks(), now)
        self.stats.inc("gc_collections", kind.value)
        line = (
            f"[idle/gc] {kind.value} collection: "
            f"{done.collected} objects freed in {done.seconds * 1000:.0f} ms"
        )
        if kind is Kind.FULL:
            logger.info(line)
        else:
            logger.debug(line)


async def run_daemon(
    settings: Settings,
    source: ConnectionSource,
    *,
    environ: Mapping[str, str] | None = None,
    membership_db: MembershipDb | None = None,
    task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run until :meth:`Daemon.shutdown` (returns normally) or cancellation.

    The composition root: every part is built here from ``settings`` and handed to the
    parts that use it; nothing reaches into another object's private members.
    ``environ`` (default ``os.environ``) is where supervision looks for systemd's
    ``NOTIFY_SOCKET``/``WATCHDOG_USEC``. Raises
    :class:`~trio_idle.runtime.supervision.StartupError` (inside an exception group) before
    reporting started when the health endpoint or the status address cannot listen.
    ``membership_db`` replaces the membership table in shared mode (tests).
    """
    protect_secrets(process_secrets(settings))
    stats = Stats()
    store = StateStore(
        make_state_backend(settings, os.environ if environ is None else environ),
        stats,
        grace=settings.store.state_grace,
    )
    # one watch of the backend, fed by the scans, reports and token requests alike
    watch = BackendWatch()
    tokens = make_token_source(settings, watch=watch, stats=stats)
    ticker = Ticker(stats, logger)
    env = SessionEnv(
        imap=settings.imap,
        timers=settings.timers,
        backoff=settings.backoff,
        start_from=settings.store.start_from,
        limiter=ConnectLimiter.from_settings(settings.limits, host_rates(settings.limits)),
        ssl_context=make_ssl_context(settings.imap.ca_file),
        stats=stats,
        rng=random.Random(),
        store=store,
        catchup_pacer=Pacer(settings.limits.catchup_rate),
        tokens=tokens,
        ticker=ticker,
    )
    webhook = WebhookClient.from_settings(settings.webhook, stats, watch=watch)
    daemon: Daemon | None = None
    async with open_asyncio_loop(stats):
        try:
            await store.load()
            # The flusher outlives the root nursery so that the sessions' last scans are
            # written (shielded, bounded) after every session has ended.
            async with trio.open_nursery() as state_nursery:
                state_nursery.start_soon(store.run_flusher, name="state-flusher")
                async with trio.open_nursery() as root:
                    reconciler = Reconciler(
                        root,
                        env,
                        webhook,
                        webhook_settings=settings.webhook,
                        account_health=settings.account_health,
                    )
                    daemon = Daemon(
                        settings, source, reconciler, stats, root, membership_db=membership_db
                    )
                    await daemon.start(ticker, environ)
                    task_status.started(daemon)
                if daemon.share is not None:
                    # every session has ended: the others may take over at once
                    with trio.CancelScope(shield=True):
                        await daemon.share.membership.leave()
                state_nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                await webhook.aclose()
                await tokens.aclose()
            if daemon is not None:
                daemon.stopped()
    logger.info("[idle/daemon] stopped")
