"""Supervision: loop-lag monitor, health endpoint, health pings, systemd notifications.

Task tree (all inside the daemon's root nursery)::

    root nursery (daemon)
    └── supervision             run_supervision: ends when shutdown starts
        ├── loop monitor        measures event-loop lag every 0.5 s
        ├── health server       only with TRIO_IDLE_HEALTH_ADDR
        ├── status server       only with TRIO_IDLE_STATUS_ADDR (then /status is served there only)
        ├── pinger              only with TRIO_IDLE_PING_URL
        └── systemd             only with $NOTIFY_SOCKET: READY, STATUS, STOPPING
            └── watchdog        only with $WATCHDOG_USEC: WATCHDOG=1 while the loop is healthy

Guarantees: nothing here can stop the daemon once it runs — a failed ping, a vanished
notify socket or a broken HTTP client is logged and counted. The one startup failure is
an unusable health or status address, raised as :class:`StartupError` before the daemon
reports itself started. When the daemon's shutdown starts the whole subtree is cancelled at
once (``STOPPING=1`` is sent from the systemd task's ``finally``), so supervision never
delays the shutdown.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import trio
from loguru import logger

from trio_idle.cluster.listener import ListenerView
from trio_idle.cluster.membership import MembershipView
from trio_idle.mailbox.reconcile import Handle
from trio_idle.ops.health import (
    HealthSnapshot,
    assess_health,
    assess_liveness,
    assess_readiness,
    readiness_body,
    status_line,
)
from trio_idle.ops.health_server import ROUTES, HealthRoutes, HealthServer, Response, json_response
from trio_idle.ops.loop_monitor import LoopMonitor
from trio_idle.ops.metrics import ListenerMetrics, MetricsInput, make_registry
from trio_idle.ops.pinger import run_pinger
from trio_idle.ops.sd_notify import Notifier, watchdog_interval
from trio_idle.runtime.daemon_status import DaemonStatus, DaemonView

#: How often systemd's STATUS= line is refreshed when the counts change.
STATUS_EVERY = 5.0


class StartupError(Exception):
    """Supervision could not start (e.g. the health address is in use); log-safe message."""


def health_counts(handles: Iterable[Handle]) -> dict[tuple[str, str | None], int]:
    """Connections by current account health ``(state, reason)``; none before their
    first outcome."""
    counts: Counter[tuple[str, str | None]] = Counter()
    for handle in handles:
        current = handle.health.tracker.current
        if current is not None:
            counts[current.key] += 1
    return dict(counts)


def cluster_body(view: MembershipView | None) -> dict[str, Any] | None:
    """The ``cluster`` part of ``/status``: ``None`` for a single instance."""
    if view is None:
        return None
    return {
        "instance_id": view.instance_id,
        "fenced": view.fenced,
        "fence_reason": view.fence_reason,
        "members": [
            {"id": m.instance_id, "heartbeat_age_seconds": round(m.age, 3)} for m in view.members
        ],
        "owned": view.owned,
        "held": view.held,
    }


def _age(now: float, then: float | None) -> float | None:
    return None if then is None else round(max(0.0, now - then), 3)


def listener_body(view: ListenerView | None, now: float) -> dict[str, Any] | None:
    """The ``listener`` part of ``/status`` (``now``: ``trio.current_time()``); ``None``
    without ``TRIO_IDLE_LISTEN_URL``. Its only text, ``last_error``, is our words plus
    the error scrubbed by the listener: never the listen URL or its password."""
    if view is None:
        return None
    return {
        "channel": view.channel,
        "connected": view.connected,
        "state_age_seconds": _age(now, view.since),
        "connections": view.connections,
        "reconnects": view.reconnects,
        "failures": dict(view.failures),
        "notifications": view.notifications,
        "last_notification_age_seconds": _age(now, view.last_notification),
        "last_error": view.last_error,
    }


def listener_metrics(
    view: ListenerView | None, now: float, now_unix: float
) -> ListenerMetrics | None:
    """The listener for the metrics, its times as unix times (``now`` is
    ``trio.current_time()`` at ``now_unix``)."""
    if view is None:
        return None

    def unix(t: float | None) -> float | None:
        return None if t is None else now_unix - (now - t)

    return ListenerMetrics(
        connected=view.connected,
        connected_since_unix=unix(view.since) if view.connected else None,
        connections=view.connections,
        failures=view.failures,
        notifications=view.notifications,
        last_notification_unix=unix(view.last_notification),
    )


class Supervisor:
    """Reads the daemon for the health decisions, the endpoint and the metrics."""

    def __init__(self, daemon: DaemonView, monitor: LoopMonitor) -> None:
        self.daemon = daemon
        self.monitor = monitor
        self.started_at = trio.current_time()
        self.started_unix = time.time()
        #: where the health endpoint listens (``http://host:port``), once it does
        self.health_url: str | None = None
        #: where ``/status`` has its own listener (``TRIO_IDLE_STATUS_ADDR``), once it does
        self.status_url: str | None = None

    def snapshot(self, status: DaemonStatus | None = None) -> HealthSnapshot:
        """What the health decisions look at: ``status`` (default: the daemon now) and
        the loop lag now."""
        status = self.daemon.status() if status is None else status
        s = self.daemon.settings
        now = trio.current_time()
        return HealthSnapshot(
            now=now,
            started_at=self.started_at,
            refresh_interval=s.timers.refresh_interval,
            last_refresh_ok=status.last_refresh_ok,
            sessions=status.sessions,
            # shared mode: readiness is about this instance's share, not the whole list
            connections_in_source=status.connections_in_source
            if status.cluster is None
            else status.cluster.owned,
            loop_lag=self.monitor.lag(now),
            max_loop_lag=s.health.max_loop_lag,
            ready_share=s.health.ready_share,
            backend_failing_since=self.daemon.backend().failing_since,
            backend_down_after=s.health.backend_down_after,
            fenced=status.cluster is not None and status.cluster.fenced,
        )

    def metrics_input(self) -> MetricsInput:
        status = self.daemon.status()
        snap = self.snapshot(status)
        handles = self.daemon.sessions()
        age = snap.refresh_age
        return MetricsInput(
            stats=self.daemon.stats,
            sessions=snap.sessions,
            connections_in_source=snap.connections_in_source,
            last_refresh_unix=None if age is None else time.time() - age,
            started_unix=self.started_unix,
            loop_lag=snap.loop_lag,
            loop_stalls=self.monitor.stalls,
            scans_active=sum(1 for h in handles if h.coalescer.active),
            scans_pending=sum(h.coalescer.pending for h in handles),
            health=health_counts(handles),
            cluster=status.cluster,
            listener=listener_metrics(status.listener, snap.now, time.time()),
        )

    # -- routes ---------------------------------------------------------------------

    def healthz(self) -> Response:
        snap = self.snapshot()
        verdict = assess_liveness(snap)
        body = {
            "ok": verdict.ok,
            "reasons": list(verdict.reasons),
            "loop_lag_seconds": round(snap.loop_lag, 4),
            "max_loop_lag_seconds": snap.max_loop_lag,
        }
        return json_response(200 if verdict.ok else 503, body)

    def readyz(self) -> Response:
        snap = self.snapshot()
        verdict = assess_readiness(snap)
        return json_response(200 if verdict.ok else 503, readiness_body(snap, verdict))

    def status(self) -> Response:
        status = self.daemon.status()
        snap = self.snapshot(status)
        body: dict[str, Any] = {
            "health": assess_health(snap).summary(),
            **readiness_body(snap, assess_readiness(snap)),
            "last_refresh_error": status.last_refresh_error,
            "loop_lag_seconds": round(snap.loop_lag, 4),
            "cluster": cluster_body(status.cluster),
            "listener": listener_body(status.listener, snap.now),
            "connections": self.daemon.connections_snapshot(),
            "skipped_rows": [
                {"id": p.connection_id, "problem": p.message} for p in status.row_problems
            ],
        }
        return json_response(200, body)

    def routes(self) -> HealthRoutes:
        """Every route; ``/status`` behind ``TRIO_IDLE_STATUS_TOKEN``."""
        return HealthRoutes(
            healthz=self.healthz,
            readyz=self.readyz,
            status=self.status,
            registry=make_registry(self.metrics_input),
            stats=self.daemon.stats,
            status_token=self.daemon.settings.health.status_token,
        )

    # -- systemd --------------------------------------------------------------------

    def status_text(self, status: DaemonStatus) -> str:
        """systemd's ``STATUS=`` line for ``status``."""
        if status.refresh_attempts == 0:
            return "starting: loading the connection list"
        line = status_line(self.snapshot(status))
        if status.last_refresh_error is not None:
            line = f"connection list refresh failed ({status.last_refresh_error}); {line}"
        return line

    async def run_systemd(self, notifier: Notifier, watchdog_every: float | None) -> None:
        """READY=1 after the first successful refresh, STATUS= after every refresh (and
        when the counts change), STOPPING=1 when cancelled (the shutdown)."""
        try:
            async with trio.open_nursery() as nursery:
                if watchdog_every is not None:
                    nursery.start_soon(self.run_watchdog, notifier, watchdog_every)
                ready = False
                seen_attempts = 0
                last_status = ""
                while True:
                    status = self.daemon.status()
                    text = self.status_text(status)
                    if not ready and status.last_refresh_ok is not None:
                        ready = True
                        notifier.send(READY=1, STATUS=text)
                        logger.info("[idle/systemd] READY=1 sent")
                    elif status.refresh_attempts != seen_attempts or text != last_status:
                        notifier.send(STATUS=text)
                    seen_attempts, last_status = status.refresh_attempts, text
                    with trio.move_on_after(STATUS_EVERY):
                        await self.daemon.wait_refreshed(after=status.refresh_attempts)
        finally:
            notifier.send(STOPPING=1)
            notifier.close()

    async def run_watchdog(self, notifier: Notifier, every: float) -> None:
        """WATCHDOG=1 every ``every`` seconds, withheld while the loop lags too much."""
        threshold = self.daemon.settings.health.max_loop_lag
        withheld = False
        while True:
            await trio.sleep(every)
            lag = self.monitor.lag()
            if lag > threshold:
                if not withheld:
                    logger.warning(
                        f"[idle/systemd] event loop lag {lag:.1f}s exceeds {threshold:g}s; "
                        "withholding WATCHDOG=1"
                    )
                withheld = True
                continue
            if withheld:
                logger.info("[idle/systemd] event loop responsive again; WATCHDOG=1 resumed")
            withheld = False
            notifier.send(WATCHDOG=1)


async def run_supervision(
    daemon: DaemonView,
    environ: Mapping[str, str] | None = None,
    *,
    task_status: trio.TaskStatus[Supervisor] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Start what the settings and environment ask for; end when shutdown starts."""
    settings = daemon.settings
    env = os.environ if environ is None else environ
    monitor = LoopMonitor(stall_threshold=settings.health.max_loop_lag)
    supervisor = Supervisor(daemon, monitor)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(monitor.run, name="loop-monitor")
        routes = supervisor.routes()
        if settings.health.health_addr is not None:
            if settings.health.status_addr is not None:
                routes_here = routes.only(r for r in ROUTES if r != "/status")
            else:
                routes_here = routes
            supervisor.health_url = await _start_server(
                nursery, routes_here, settings.health.health_addr, "TRIO_IDLE_HEALTH_ADDR"
            )
        if settings.health.status_addr is not None:
            if settings.health.status_token is None:
                logger.warning(
                    "[idle/health] TRIO_IDLE_STATUS_ADDR is set but TRIO_IDLE_STATUS_TOKEN is "
                    "not: /status answers 404 until a token is configured"
                )
            supervisor.status_url = await _start_server(
                nursery,
                routes.only(["/status"]),
                settings.health.status_addr,
                "TRIO_IDLE_STATUS_ADDR",
            )
        if settings.health.ping_url is not None:
            nursery.start_soon(
                run_pinger,
                settings.health.ping_url,
                settings.health.ping_fail_suffix,
                settings.health.ping_interval,
                lambda: assess_health(supervisor.snapshot()),
                daemon.stats,
                settings.webhook.http_trust_env,
                name="health-pinger",
            )
        notifier = Notifier.from_env(env)
        if notifier is not None:
            every = watchdog_interval(env)
            logger.debug(
                "[idle/systemd] notifications on"
                + (f", watchdog every {every:g}s" if every else "")
            )
            nursery.start_soon(supervisor.run_systemd, notifier, every, name="systemd")
        task_status.started(supervisor)
        await daemon.wait_stopping()
        nursery.cancel_scope.cancel()


async def _start_server(
    nursery: trio.Nursery, routes: HealthRoutes, addr: tuple[str, int], variable: str
) -> str:
    """Start a :class:`HealthServer` on ``addr``; its URL, or :class:`StartupError`."""
    host, port = addr
    server = HealthServer(routes, host, port)
    name = "status-server" if variable == "TRIO_IDLE_STATUS_ADDR" else "health-server"
    try:
        url: str = await nursery.start(server.serve, name=name)
    except OSError as exc:
        raise StartupError(
            f"cannot listen on {host}:{port} ({variable}): {exc.strerror or exc}"
        ) from None
    return url
