"""The daemon: root nursery, refresh loop, graceful shutdown.

Task tree (see docs/architecture.md)::

    run_daemon
    └── trio_asyncio loop     asyncio libraries run inside trio; no other event loop exists
        └── state nursery     outlives the root nursery: the last state flush follows the sessions
            ├── state flusher
            └── root nursery  (opened in the state nursery's body)
                ├── supervision       loop lag, health/status endpoints, pings, systemd
                ├── refresh loop      reads the source every refresh_interval, applies the diff
                ├── ticker            writes every session's tick and IDLE renewal (ticker.py)
                ├── membership        shared mode only: heartbeat, member list, fence
                ├── share starter     shared mode only: starts the connections that moved here
                ├── listener          with TRIO_IDLE_LISTEN_URL only: LISTEN → refresh now
                └── connection tasks  one per connection, owned by the Reconciler

Guarantees: a source outage keeps every running session on the last good list and
retries with backoff (:mod:`trio_idle.backoff`, no jitter: 5 s doubling up to
``refresh_interval``); :meth:`Daemon.shutdown` cancels every connection scope (each
session writes LOGOUT and waits at most ``logout_timeout`` for the server to hang up) and
bounds the whole exit by ``shutdown_timeout``. Readers use :meth:`Daemon.status` and the
``wait_*`` methods (:mod:`trio_idle.daemon_status`).

With ``TRIO_IDLE_CLUSTER=shared`` the reconciler runs only this instance's share of the
list (:mod:`trio_idle.membership`, :func:`trio_idle.assignment.plan_share`): a membership
change or a fence stops what is no longer ours at once (synchronously, in the heartbeat's
callback); connections that moved here start after their state was read again from the
shared store, and only once their previous owner's lease has certainly expired.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final, Protocol, runtime_checkable

import trio
from loguru import logger

from trio_idle.assignment import SharePlan, plan_share
from trio_idle.asyncio_loop import open_asyncio_loop
from trio_idle.backoff import Backoff, BackoffPolicy
from trio_idle.config import Settings, process_secrets
from trio_idle.connections import ConnectionListBuilder, MailConnection, RowProblem
from trio_idle.crypto import derive_key
from trio_idle.daemon_status import DaemonStatus, Phase
from trio_idle.errors import SourceError
from trio_idle.gc_policy import (
    CollectionPolicy,
    Kind,
    collect_and_freeze,
    pace_young_collections,
)
from trio_idle.health import count_states
from trio_idle.imap_client import make_ssl_context
from trio_idle.limiter import ConnectLimiter, Pacer
from trio_idle.listener import NotifyListener
from trio_idle.logs import protect_secrets
from trio_idle.membership import (
    Membership,
    MembershipDb,
    MembershipView,
    PostgresMembership,
    default_instance_id,
)
from trio_idle.outcome_text import weak_password_ids
from trio_idle.reconcile import Reconciler
from trio_idle.scrub import PLAIN, WEAK_BELOW
from trio_idle.session import SessionEnv
from trio_idle.state_store import StateStore, make_state_backend
from trio_idle.stats import Stats
from trio_idle.supervision import Supervisor, run_supervision
from trio_idle.ticker import Ticker
from trio_idle.token_backend import make_token_source
from trio_idle.webhook import WebhookClient


class ConnectionSource(Protocol):
    """Anything that returns rows with the ``"MailConnection"`` column names."""

    name: str

    async def fetch(self) -> Sequence[dict[str, Any]]: ...


@runtime_checkable
class ChangeAwareSource(ConnectionSource, Protocol):
    """A source that can tell its rows did not change (the file source)."""

    async def fetch_changed(
        self, version: bytes | None
    ) -> tuple[bytes, Sequence[dict[str, Any]]] | None:
        """``(version, rows)``, or None when ``version`` (from an earlier answer) is
        still current. Raises :class:`SourceError` like ``fetch``."""
        ...


#: the first retry of a failed refresh waits this long (or ``refresh_interval`` if
#: shorter), doubling up to ``refresh_interval``: a database that was down for a moment is
#: read again soon, one that stays down is not hammered
REFRESH_RETRY_INITIAL: Final = 5.0


class Daemon:
    """Handle to a running daemon, given to the caller by ``nursery.start(run_daemon, ...)``.

    Read it through :meth:`status` (a frozen :class:`DaemonStatus`) and the ``wait_*``
    methods; act on it with :meth:`request_refresh` and :meth:`shutdown`. ``settings``,
    ``source``, ``reconciler`` and ``stats`` are the parts it runs with (read, don't
    replace); ``gc_policy`` may be replaced (tests use smaller thresholds).
    """

    def __init__(
        self,
        settings: Settings,
        source: ConnectionSource,
        reconciler: Reconciler,
        stats: Stats,
        root: trio.Nursery,
    ) -> None:
        self.settings = settings
        self.source = source
        self.reconciler = reconciler
        self.stats = stats
        self.gc_policy = CollectionPolicy()
        #: cancelled when shutdown starts: the ticker and the young-collection pacer
        #: never end by themselves
        self._background = trio.CancelScope()
        #: health endpoint, pings, systemd; set by :func:`run_daemon` before it reports
        self.supervisor: Supervisor | None = None
        self._root = root
        key = derive_key(
            settings.connections.encryption_key.reveal(), settings.connections.key_derivation
        )
        #: unchanged rows give the connections of the last refresh (no decryption, no new
        #: objects); the version of the rows it last built, for a change-aware source
        self._builder = ConnectionListBuilder(key)
        self._source_version: bytes | None = None
        self._refresh_now = trio.Event()
        self._logged_problems: set[tuple[str, str]] = set()
        #: connections already warned about a password too short to mask safely
        self._weak_warned: set[str] = set()
        # What status() reports. Every change is followed by _changed_now().
        self._phase = Phase.RUNNING
        self._refresh_attempts = 0
        self._last_refresh_ok: float | None = None
        self._last_refresh_error: str | None = None
        self._connections_in_source = 0
        self._row_problems: tuple[RowProblem, ...] = ()
        self._sessions_removed = 0
        self._changed = trio.Event()
        #: shared mode (set by :func:`run_daemon` before it reports started), else None
        self.membership: Membership | None = None
        #: with TRIO_IDLE_LISTEN_URL (set by :func:`run_daemon` before it reports started)
        self.listener: NotifyListener | None = None
        # shared mode: the whole list of the last good refresh, and the share decision
        self._wanted: Mapping[str, MailConnection] = {}
        self._plan = SharePlan(frozenset(), {})
        self._previous: frozenset[str] = frozenset()
        self._generation_seen = 0
        #: database time before which a (re)gained lease starts nothing new (see reshare)
        self._fresh_until = 0.0
        #: a refresh has succeeded: ``_wanted`` is the source's list
        self._wanted_known = False
        self._share_wake = trio.Event()

    # -- reading ----------------------------------------------------------------------

    def status(self) -> DaemonStatus:
        """The daemon now (no checkpoint: every field is of the same moment)."""
        return DaemonStatus(
            phase=self._phase,
            refresh_attempts=self._refresh_attempts,
            last_refresh_ok=self._last_refresh_ok,
            last_refresh_error=self._last_refresh_error,
            connections_in_source=self._connections_in_source,
            sessions=count_states(h.memory.state for h in self.reconciler.handles.values()),
            row_problems=self._row_problems,
            sessions_removed=self._sessions_removed,
            cluster=self._cluster_view(),
            listener=None if self.listener is None else self.listener.view(),
        )

    def _cluster_view(self) -> MembershipView | None:
        m = self.membership
        if m is None:
            return None
        return MembershipView(
            instance_id=m.instance_id,
            members=m.members(),
            fenced=m.fenced,
            fence_reason=m.fence_reason,
            owned=self._plan.owned,
            held=len(self._plan.holds),
        )

    async def wait_refreshed(self, after: int) -> DaemonStatus:
        """Return the status once more than ``after`` refreshes have ended (successful or
        not; compare with :attr:`DaemonStatus.refresh_attempts`).

        Always a checkpoint, also when that is already so. No refresh ends after
        :meth:`shutdown`, so then it waits until cancelled: bound it with a cancel scope.
        """
        await self._wait_until(lambda: self._refresh_attempts > after)
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
        self._refresh_now.set()

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
        if self.membership is not None:
            self.membership.stop()
            self._share_wake.set()
        if self.listener is not None:
            self.listener.stop()
        self._background.cancel()  # they never end by themselves: the root nursery would wait
        self._root.cancel_scope.deadline = (
            trio.current_time() + self.settings.process.shutdown_timeout
        )
        self._refresh_now.set()

    async def _run_background(self, ticker: Ticker) -> None:
        """Until shutdown starts: every session's tick and renewal (ticker.py) and, with
        ``TRIO_IDLE_GC=tuned``, young collections every 0.25 s (gc_policy.py)."""
        with self._background:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ticker.run, name="ticker")
                if self.settings.process.gc_mode == "tuned":
                    nursery.start_soon(pace_young_collections, name="gc-pacer")

    def _stopped(self) -> None:
        self._phase = Phase.STOPPED
        self._changed_now()

    # -- the refresh loop -------------------------------------------------------------

    async def _fetch(self) -> tuple[Sequence[dict[str, Any]] | None, bytes | None]:
        """``(rows, version)``; rows None: unchanged since the last build's version."""
        if isinstance(self.source, ChangeAwareSource):
            answer = await self.source.fetch_changed(self._source_version)
            if answer is None:
                return None, self._source_version
            version, rows = answer
            return rows, version
        return await self.source.fetch(), None

    def _warn_weak_passwords(self, conns: Iterable[MailConnection]) -> None:
        """One line per process for the connections whose password is too short to be
        masked safely in server text (:func:`trio_idle.scrub.weakly_masked`)."""
        weak = [i for i in weak_password_ids(conns) if i not in self._weak_warned]
        if not weak:
            return
        self._weak_warned.update(weak)
        shown = ", ".join(PLAIN.scrub(i, 80) for i in weak[:5])
        more = f" and {len(weak) - 5} more" if len(weak) > 5 else ""
        logger.warning(
            f"[idle/{self.source.name}] {len(weak)} connection(s) have a password shorter "
            f"than {WEAK_BELOW} characters ({shown}{more}): server text can only mask it "
            "where it stands alone as a word (docs/security.md)"
        )

    async def _refresh_once(self) -> bool:
        """Read the source and apply the diff. Returns False if the source failed."""
        try:
            rows, version = await self._fetch()
        except SourceError as exc:
            self.stats.inc("refresh_failures")
            self._last_refresh_error = str(exc)
            logger.warning(
                f"[idle/{self.source.name}] refresh failed: {exc}; keeping "
                f"{len(self.reconciler.handles)} sessions on the last good list"
            )
            return False
        # Validating and decrypting thousands of rows takes a few hundred milliseconds:
        # in a worker thread the loop keeps serving IMAP meanwhile (it gets the GIL back
        # every few milliseconds) instead of stalling for all of it.
        # (rows=None: the source's rows did not change; the builder answers from memory)
        wanted, problems = await trio.to_thread.run_sync(self._builder.build, rows)
        self._source_version = version
        current = {(p.connection_id, p.message) for p in problems}
        for conn_id, message in sorted(current - self._logged_problems):
            self.stats.inc("rows_skipped")
            # both come from the row: escaped and cut (a row must not forge log lines)
            logger.error(
                f"[idle/{self.source.name}] connection {PLAIN.scrub(conn_id, 80)} "
                f"skipped: {PLAIN.scrub(message)}"
            )
        self._logged_problems = current  # a row that is fixed and breaks again logs again
        self._warn_weak_passwords(wanted.values())
        if self._phase is not Phase.RUNNING:
            return True
        if self.membership is None:
            applied = await self.reconciler.apply_gradually(wanted)
            self._sessions_removed += len(applied.removed)
        else:
            self._wanted = wanted
            self._wanted_known = True
            self.reshare()
        if self.reconciler.store is not None:
            self.reconciler.store.prune(wanted.keys())
        self._row_problems = tuple(problems)
        self._connections_in_source = self._builder.rows
        self._last_refresh_ok = trio.current_time()
        self._last_refresh_error = None
        self.stats.inc("refreshes")
        logger.info(
            f"[idle/{self.source.name}] refreshed — {self._builder.rows} active connections, "
            f"{len(self.reconciler.handles)} sessions"
        )
        return True

    async def _refresh_loop(self) -> None:
        interval = self.settings.timers.refresh_interval
        retry = Backoff(BackoffPolicy(min(REFRESH_RETRY_INITIAL, interval), interval, jitter=0.0))
        while self._phase is Phase.RUNNING:
            ok = await self._refresh_once()
            if ok and self.settings.process.gc_mode == "tuned":
                self._collect_garbage()
            self._refresh_attempts += 1
            self._changed_now()
            if ok:
                retry.succeeded()
                delay = interval
            else:
                delay = retry.next_delay()
            with trio.move_on_after(delay):
                await self._refresh_now.wait()
            self._refresh_now = trio.Event()

    # -- shared mode ------------------------------------------------------------------

    def reshare(self) -> None:
        """Recompute this instance's share and stop at once what is not in it any more;
        the share starter starts what is new. Synchronous (the membership's callback), so
        a fence stops every session before anything else runs."""
        m = self.membership
        assert m is not None
        if m.fenced or m.beat is None or self._phase is not Phase.RUNNING:
            self._plan = SharePlan(frozenset(), {})
        else:
            current = m.beat.ids
            fresh = self._generation_seen != m.generation
            if fresh:
                # a lease (re)gained: the others may have taken over meanwhile
                self._previous, holds = current - {m.instance_id}, {}
                self._generation_seen = m.generation
            else:
                holds = dict(self._plan.holds)
            running = self.reconciler.handles.keys()
            plan = plan_share(
                self._wanted.keys(),
                m.instance_id,
                current,
                self._previous,
                running,
                holds,
                m.beat.db_now,
                m.ttl,
            )
            if fresh:
                # An instance registering at the same moment is missing from this first
                # list (each heartbeat's snapshot misses the other's uncommitted row), and
                # it would miss us too: both would start the same mailboxes. Start nothing
                # before the next renewal, which shows every member registered by now.
                self._fresh_until = m.beat.db_now + m.poll_interval / 2
            if m.beat.db_now < self._fresh_until:
                new = {i: self._fresh_until for i in plan.run if i not in running}
                plan = SharePlan(plan.run - new.keys(), {**plan.holds, **new})
            self._plan = plan
            if self._wanted_known:
                # before the first refresh nothing was planned: the connections are still
                # to be judged against the list the lease was gained with
                self._previous = current
        keep = {i: h.conn for i, h in self.reconciler.handles.items() if i in self._plan.run}
        self._sessions_removed += len(self.reconciler.apply(keep).removed)
        self._share_wake.set()
        self._changed_now()

    async def _share_starter(self) -> None:
        """Start the connections of the share that do not run yet, each after its state
        was read again from the shared store (its previous owner scanned it last)."""
        store = self.reconciler.store
        while self._phase is Phase.RUNNING:
            await self._share_wake.wait()
            self._share_wake = trio.Event()
            reloaded: set[str] = set()
            while self._phase is Phase.RUNNING:
                new = sorted(
                    i
                    for i in self._plan.run
                    if i not in self.reconciler.handles and i not in reloaded and i in self._wanted
                )
                if not new:
                    break
                if store is not None:
                    with trio.move_on_after(self.settings.process.db_timeout):
                        await store.reload(new)
                reloaded.update(new)
            if self._phase is not Phase.RUNNING:
                break
            # the plan as it is now: a fence during the reload leaves nothing to start;
            # what runs and changed restarts at once (like apply), only new ones wait
            share = {i: self._wanted[i] for i in self._plan.run if i in self._wanted}
            handles = self.reconciler.handles
            d = self.reconciler.apply({i: c for i, c in share.items() if i in handles})
            self._sessions_removed += len(d.removed)
            # A step at a time, as the refresh loop does: thousands moving here at once
            # (a failover) would stop the loop. Every one was reloaded above; between two
            # steps the share may shrink (a membership change, a fence, a refresh, a
            # shutdown), so each is judged by the plan as it is when its turn comes.
            started = await self.reconciler.start_gradually(
                sorted(share.keys() - handles.keys()), self._startable
            )
            if started:
                logger.info(
                    f"[idle/cluster] started {len(started)} connections of this instance's "
                    f"share ({len(self.reconciler.handles)} running, "
                    f"{len(self._plan.holds)} waiting for a previous owner's lease)"
                )
            self._changed_now()

    def _startable(self, conn_id: str) -> MailConnection | None:
        """The connection the share starter may start now, or None: still in this
        instance's share (not moved away, not held for a previous owner's lease, not
        fenced) and still in the list, while the daemon runs."""
        if self._phase is not Phase.RUNNING or conn_id not in self._plan.run:
            return None
        return self._wanted.get(conn_id)

    def _collect_garbage(self) -> None:
        """The after-refresh collection of ``TRIO_IDLE_GC=tuned`` (:mod:`trio_idle.gc_policy`).

        Blocks the loop for its pause: milliseconds for the steady daemon's young
        collection; ≈ 1.9 s at 10,000 sessions for a full one (after many connections
        ended, after memory grew more than new connections explain, every 6 h).
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

    ``environ`` (default ``os.environ``) is where supervision looks for systemd's
    ``NOTIFY_SOCKET``/``WATCHDOG_USEC``. Raises
    :class:`~trio_idle.supervision.StartupError` (inside an exception group) before
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
    tokens = make_token_source(settings)
    ticker = Ticker(stats, logger)
    env = SessionEnv(
        settings=settings,
        limiter=ConnectLimiter.from_settings(settings.limits),
        ssl_context=make_ssl_context(settings.imap.ca_file),
        stats=stats,
        rng=random.Random(),
        store=store,
        catchup_pacer=Pacer(settings.limits.catchup_rate),
        tokens=tokens,
        ticker=ticker,
    )
    webhook = WebhookClient.from_settings(settings.webhook)
    daemon: Daemon | None = None
    async with open_asyncio_loop(stats):
        try:
            await store.load()
            # The flusher outlives the root nursery so that the sessions' last scans are
            # written (shielded, bounded) after every session has ended.
            async with trio.open_nursery() as state_nursery:
                state_nursery.start_soon(store.run_flusher, name="state-flusher")
                async with trio.open_nursery() as root:
                    daemon = Daemon(settings, source, Reconciler(root, env, webhook), stats, root)
                    if settings.cluster.cluster == "shared":
                        daemon.membership = _make_membership(settings, daemon, membership_db)
                        await root.start(daemon.membership.run, name="membership")
                        root.start_soon(daemon._share_starter, name="share-starter")
                    daemon.supervisor = await root.start(run_supervision, daemon, environ)
                    root.start_soon(daemon._refresh_loop, name="refresh")
                    root.start_soon(daemon._run_background, ticker, name="ticker")
                    if settings.cluster.listen_url is not None:
                        daemon.listener = NotifyListener(
                            settings.cluster.listen_url,
                            on_change=daemon.request_refresh,
                            connect_timeout=settings.process.db_timeout,
                        )
                        root.start_soon(daemon.listener.run, name="listener")
                    task_status.started(daemon)
                if daemon.membership is not None:
                    # every session has ended: the others may take over at once
                    with trio.CancelScope(shield=True):
                        await daemon.membership.leave()
                state_nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                await webhook.aclose()
                await tokens.aclose()
            if daemon is not None:
                daemon._stopped()
    logger.info("[idle/daemon] stopped")


def _make_membership(settings: Settings, daemon: Daemon, db: MembershipDb | None) -> Membership:
    c = settings.cluster
    if db is None:
        assert settings.connections.database_url is not None  # enforced by config parsing
        db = PostgresMembership(settings.connections.database_url)
    return Membership(
        db,
        c.instance_id or default_instance_id(),
        ttl=c.cluster_ttl,
        poll_interval=c.cluster_poll,
        on_change=daemon.reshare,
    )
