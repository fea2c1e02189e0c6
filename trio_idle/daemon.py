"""The daemon: root nursery, refresh loop, graceful shutdown.

Task tree (see docs/architecture.md)::

    trio.run → run_daemon
      trio_asyncio loop (asyncio libraries run inside trio; no other event loop exists)
      root nursery
      ├── supervision       loop lag, health and status endpoints, pings, systemd (supervision.py)
      ├── refresh loop      reads the source every refresh_interval, applies the diff
      └── connection tasks  one per connection, owned by the Reconciler (reconcile.py)

Guarantees: a source outage keeps every running session on the last good list and
retries with backoff; :meth:`Daemon.shutdown` cancels every connection scope (each
session writes LOGOUT and waits at most ``logout_timeout`` for the server to hang up) and
bounds the whole exit by ``shutdown_timeout``.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import trio
from loguru import logger

from trio_idle.asyncio_loop import open_asyncio_loop
from trio_idle.config import Settings, process_secrets
from trio_idle.connections import RowProblem, build_connections
from trio_idle.crypto import derive_key
from trio_idle.errors import SourceError
from trio_idle.gc_policy import FullCollectionPolicy, collect_and_freeze
from trio_idle.imap_client import make_ssl_context, shrink_tls_read_buffer
from trio_idle.limiter import ConnectLimiter, Pacer
from trio_idle.logs import protect_secrets
from trio_idle.reconcile import Reconciler
from trio_idle.scrub import PLAIN
from trio_idle.session import SessionEnv
from trio_idle.state_store import StateStore, make_state_backend
from trio_idle.stats import Stats
from trio_idle.supervision import Supervisor, run_supervision
from trio_idle.webhook import WebhookClient


class ConnectionSource(Protocol):
    """Anything that returns rows with the ``"MailConnection"`` column names."""

    name: str

    async def fetch(self) -> Sequence[dict[str, Any]]: ...


class Daemon:
    """Handle to a running daemon, given to the caller by ``nursery.start(run_daemon, ...)``."""

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
        self._root = root
        self._key = derive_key(settings.encryption_key.reveal(), settings.key_derivation)
        self._refresh_now = trio.Event()
        self._logged_problems: set[tuple[str, str]] = set()
        self.last_refresh_ok: float | None = None
        self.connections_in_source = 0
        #: set after every refresh attempt (tests and health checks wait on it)
        self.refreshed = trio.Event()
        #: refresh attempts so far; incremented right before ``refreshed`` is set
        self.refresh_attempts = 0
        #: why the last refresh failed (log-safe), ``None`` after a successful one
        self.last_refresh_error: str | None = None
        #: rows of the last successful refresh that were skipped, and why (no secrets)
        self.row_problems: list[RowProblem] = []
        self.stopping = False
        #: set when :meth:`shutdown` is called (supervision ends and sends STOPPING=1)
        self.shutdown_requested = trio.Event()
        self.stopped = trio.Event()
        #: sessions removed by refreshes so far (with connection attempts: the GC churn)
        self.sessions_removed = 0
        self.gc_policy = FullCollectionPolicy()
        #: health endpoint, pings, systemd; set by :func:`run_daemon` before it reports
        self.supervisor: Supervisor | None = None

    def request_refresh(self) -> None:
        """Refresh now instead of at the next interval (SIGHUP, tests)."""
        self._refresh_now.set()

    async def refresh_once(self) -> bool:
        """Read the source and apply the diff. Returns False if the source failed."""
        try:
            rows = await self.source.fetch()
        except SourceError as exc:
            self.stats.inc("refresh_failures")
            self.last_refresh_error = str(exc)
            logger.warning(
                f"[idle/{self.source.name}] refresh failed: {exc}; keeping "
                f"{len(self.reconciler.handles)} sessions on the last good list"
            )
            return False
        wanted, problems = build_connections(rows, self._key)
        current = {(p.connection_id, p.message) for p in problems}
        for conn_id, message in sorted(current - self._logged_problems):
            self.stats.inc("rows_skipped")
            # both come from the row: escaped and cut (a row must not forge log lines)
            logger.error(
                f"[idle/{self.source.name}] connection {PLAIN.scrub(conn_id, 80)} "
                f"skipped: {PLAIN.scrub(message)}"
            )
        self._logged_problems = current  # a row that is fixed and breaks again logs again
        if self.stopping:
            return True
        self.sessions_removed += len(self.reconciler.apply(wanted).removed)
        if self.reconciler.store is not None:
            self.reconciler.store.prune(wanted.keys())
        self.row_problems = problems
        self.connections_in_source = len(rows)
        self.last_refresh_ok = trio.current_time()
        self.last_refresh_error = None
        self.stats.inc("refreshes")
        logger.info(
            f"[idle/{self.source.name}] refreshed — {len(rows)} active connections, "
            f"{len(self.reconciler.handles)} sessions"
        )
        return True

    async def refresh_loop(self) -> None:
        retry = min(5.0, self.settings.refresh_interval)
        while not self.stopping:
            ok = await self.refresh_once()
            if ok and self.settings.gc_mode == "tuned":
                self.collect_garbage()
            self.refresh_attempts += 1
            self.refreshed.set()
            self.refreshed = trio.Event()
            if ok:
                delay, retry = (
                    self.settings.refresh_interval,
                    min(5.0, self.settings.refresh_interval),
                )
            else:
                delay, retry = retry, min(retry * 2, self.settings.refresh_interval)
            with trio.move_on_after(delay):
                await self._refresh_now.wait()
            self._refresh_now = trio.Event()

    def collect_garbage(self) -> None:
        """The after-refresh collection of ``TRIO_IDLE_GC=tuned`` (:mod:`trio_idle.gc_policy`).

        Blocks the loop for its pause. At 10,000 sessions on the benchmark machine:
        0.6–0.8 s when only what was created since the last refresh is walked, 1.9 s when
        the policy asks for a full one (after many sessions started or ended, every 6 h).
        """
        churn = self.stats.get("connect_attempts") + self.sessions_removed
        now = trio.current_time()
        full = self.gc_policy.full_due(churn, len(self.reconciler.handles), now)
        done = collect_and_freeze(full)
        if full:
            self.gc_policy.full_done(churn, now)
        self.stats.inc("gc_collections", "full" if full else "new")
        line = (
            f"[idle/gc] {'full' if full else 'new-objects'} collection: "
            f"{done.collected} objects freed in {done.seconds * 1000:.0f} ms"
        )
        if full:
            logger.info(line)
        else:
            logger.debug(line)

    def shutdown(self, reason: str = "shutdown requested") -> None:
        """Stop refreshing, end every session (LOGOUT), exit within ``shutdown_timeout``."""
        if self.stopping:
            return
        self.stopping = True
        self.shutdown_requested.set()
        logger.info(
            f"[idle/daemon] shutting down ({reason}): closing "
            f"{len(self.reconciler.handles)} sessions"
        )
        self.reconciler.stop_all()
        self._root.cancel_scope.deadline = trio.current_time() + self.settings.shutdown_timeout
        self._refresh_now.set()


async def run_daemon(
    settings: Settings,
    source: ConnectionSource,
    *,
    environ: Mapping[str, str] | None = None,
    task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run until :meth:`Daemon.shutdown` (returns normally) or cancellation.

    ``environ`` (default ``os.environ``) is where supervision looks for systemd's
    ``NOTIFY_SOCKET``/``WATCHDOG_USEC``. Raises
    :class:`~trio_idle.supervision.StartupError` (inside an exception group) before
    reporting started when the health endpoint or the status address cannot listen.
    """
    protect_secrets(process_secrets(settings))
    shrink_tls_read_buffer()
    stats = Stats()
    store = StateStore(
        make_state_backend(settings, os.environ if environ is None else environ),
        stats,
        grace=settings.state_grace,
    )
    env = SessionEnv(
        settings=settings,
        limiter=ConnectLimiter(
            settings.connect_concurrency, settings.connect_rate, settings.connect_host_share
        ),
        ssl_context=make_ssl_context(settings.ca_file),
        stats=stats,
        rng=random.Random(),
        store=store,
        catchup_pacer=Pacer(settings.catchup_rate),
    )
    webhook = WebhookClient(
        settings.scan_url,
        secret_header=settings.secret_header,
        secret=settings.admin_secret,
        signing_secret=settings.signing_secret,
        total_timeout=settings.scan_timeout,
        max_connections=settings.http_max_connections,
        trust_env=settings.http_trust_env,
    )
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
                    daemon.supervisor = await root.start(run_supervision, daemon, environ)
                    root.start_soon(daemon.refresh_loop, name="refresh")
                    task_status.started(daemon)
                state_nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                await webhook.aclose()
            if daemon is not None:
                daemon.stopped.set()
    logger.info("[idle/daemon] stopped")
