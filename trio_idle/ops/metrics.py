"""Prometheus metrics: a custom collector over the daemon's :class:`~trio_idle.core.stats.Stats`.

Nothing is registered in prometheus-client's global registry: :func:`make_registry` builds
a private :class:`~prometheus_client.CollectorRegistry` holding a :class:`DaemonCollector`
(which reads a :class:`MetricsInput` at scrape time) and the process collector (memory,
CPU, open files). :func:`render_metrics` renders one :class:`MetricsInput` — what the
unit tests parse back with ``prometheus_client.parser``.

No metric carries a per-mailbox label or any text from a row or a server: label values
are this code's own words (session states, disconnect causes, scan reasons, ...) and the
backend's HTTP status codes, all low-cardinality.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Final

import attrs
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from trio_idle import __version__
from trio_idle.accounts.credentials import TOKEN_ERROR, TOKEN_REVOKED, TOKEN_UNAVAILABLE
from trio_idle.cluster.membership import MembershipView
from trio_idle.core.gc_policy import Kind as GcKind
from trio_idle.core.stats import Histogram, Stats
from trio_idle.mailbox.account_health import HEALTH_STATES
from trio_idle.mailbox.coalescer import PACED_REASONS
from trio_idle.mailbox.session_states import SESSION_STATES

PREFIX: Final = "trio_idle"

#: ``Stats`` counter → ``cause`` label of ``trio_idle_disconnects_total``.
DISCONNECT_CAUSES: Final = (
    ("disconnects", "connection_lost"),
    ("connect_failures", "connect_failed"),
    ("auth_failures", "auth_failed"),
    ("internal_errors", "internal_error"),
)

#: Plain ``Stats`` counters exported as ``trio_idle_<name>_total``, with their help text.
PLAIN_COUNTERS: Final = (
    ("refreshes", "successful refreshes of the connection list"),
    ("refresh_failures", "failed refreshes of the connection list (source unreachable)"),
    ("rows_skipped", "rows skipped as unusable (logged once per problem)"),
    (
        "row_values_ignored",
        "optional row values that were invalid and replaced by their default, the row "
        "still running (logged once per problem)",
    ),
    ("connect_attempts", "IMAP connection attempts (TCP + TLS + LOGIN)"),
    ("connects", "IMAP sessions established (LOGIN and SELECT succeeded)"),
    ("catch_up_scans", "scans requested after a reconnect found mail that arrived meanwhile"),
    ("scans_coalesced", "scan requests absorbed into an already pending scan"),
    ("scans_ok", "scans the backend answered with 2xx"),
    (
        "backend_stale_connection_retries",
        "backend requests sent again at once on a fresh connection: the pooled one they "
        "went out on had been closed by the backend before it answered",
    ),
    ("ping_errors", "health pings that could not be delivered"),
    ("state_writes", "mailbox state entries written to the state store"),
    (
        "started_from_now",
        "mailboxes new to the state store whose UIDNEXT was recorded without a scan "
        "(TRIO_IDLE_START_FROM=now)",
    ),
    ("asyncio_errors", "errors asyncio had nobody to report to (logged, not fatal)"),
    (
        "folders_missing",
        "watched folders (TRIO_IDLE_FOLDERS) a server does not have, counted once per "
        "connection and folder",
    ),
    (
        "folder_connections_capped",
        "mailboxes in TRIO_IDLE_FOLDER_WATCH=idle whose folders would need more IMAP "
        "connections than the provider allows: the folders past the limit are polled "
        "with STATUS (once per connection)",
    ),
)

#: ``Stats`` counters with a label, exported as ``trio_idle_<name>_total{<label>}``: name,
#: label, the label values exported at 0 before their first event (every value a counter
#: can take, or for HTTP statuses the usual ones), help text. Without those zeros a rate
#: over a counter has no series until its first increment, and an alert that adds it to
#: another (``A + rate(B)``) has none either: it could never fire.
LABELLED_COUNTERS: Final[tuple[tuple[str, str, tuple[str, ...], str], ...]] = (
    (
        "exists_events",
        "reason",
        ("exists", "tick"),
        "new mail noticed (exists: pushed during IDLE; tick: NOOP)",
    ),
    (
        "scans_sent",
        "reason",
        ("exists", "tick", *sorted(PACED_REASONS)),
        "scan requests sent to the backend, retries included",
    ),
    (
        "folder_scans",
        "reason",
        ("exists", "tick", *sorted(PACED_REASONS)),
        "scans requested for a folder beside INBOX (TRIO_IDLE_FOLDERS) whose STATUS "
        "showed new mail (exists: pushed by NOTIFY during IDLE)",
    ),
    (
        "notify_fallbacks",
        "cause",
        ("refused", "overflow"),
        "connections whose folders went back to STATUS every tick: the server refused "
        "NOTIFY (refused) or gave up on it ([NOTIFICATIONOVERFLOW], overflow)",
    ),
    (
        "notify_status_ignored",
        "reason",
        ("unwatched", "malformed"),
        "STATUS lines pushed under NOTIFY and dropped: for a folder not watched, or unreadable",
    ),
    (
        "idle_restarts",
        "by",
        ("ticker", "session"),
        "IDLE left and entered again for a tick or a renewal (ticker: written ahead by "
        "the process ticker; session: by the session itself)",
    ),
    (
        "scans_failed",
        "status",
        ("400", "401", "403", "404"),
        "scans the backend refused for good (not retried)",
    ),
    (
        "scans_retried",
        "status",
        ("network", "429", "500", "502", "503", "504"),
        "scan attempts that failed and were retried",
    ),
    (
        "pings_sent",
        "result",
        ("ok", "fail"),
        "health pings delivered (ok: healthy, fail: unhealthy)",
    ),
    ("state_errors", "operation", ("load", "write"), "state store failures (load, write)"),
    (
        "health_reports",
        "result",
        ("ok", "retried"),
        "account health reports sent to the backend (ok: accepted, retried: failed and "
        "retried, an HTTP status: refused for good)",
    ),
    (
        "token_failures",
        "reason",
        (TOKEN_ERROR, TOKEN_UNAVAILABLE, TOKEN_REVOKED, "refused"),
        "OAuth2 access tokens not had (token_error, token_unavailable, token_revoked) "
        "or refused by the IMAP server (refused)",
    ),
    (
        "envelope_fetches",
        "result",
        ("listed", "range", "unavailable"),
        "envelope fetches before a scan (listed: envelopes sent; range: more new mail than "
        "fit, range only; unavailable: no session or the fetch failed)",
    ),
    (
        "gc_collections",
        "kind",
        tuple(kind.value for kind in GcKind),
        "after-refresh garbage collections (young, full)",
    ),
    (
        "status_auth_failures",
        "reason",
        ("missing", "wrong"),
        "/status requests refused for a missing or wrong bearer token",
    ),
    (
        "health_clients_dropped",
        "reason",
        ("evicted", "timeout"),
        "health port clients closed (evicted: pushed out by a new client before completing "
        "a request; timeout: too slow)",
    ),
)


@attrs.frozen(kw_only=True)
class ListenerMetrics:
    """The LISTEN/NOTIFY listener for one scrape (:class:`trio_idle.cluster.listener.ListenerView`
    with unix times)."""

    connected: bool
    #: unix time the current connection started listening; ``None`` while not connected
    connected_since_unix: float | None
    connections: int
    #: failures by kind (``connect``, ``lost``, ``heartbeat``)
    failures: Mapping[str, int]
    notifications: int
    last_notification_unix: float | None


@attrs.frozen(kw_only=True)
class MetricsInput:
    """What one scrape exports; built by :mod:`trio_idle.runtime.supervision` from the daemon."""

    stats: Stats
    sessions: Mapping[str, int]
    connections_in_source: int
    #: unix time of the last successful refresh, ``None`` before the first
    last_refresh_unix: float | None
    started_unix: float
    loop_lag: float
    loop_stalls: int
    scans_active: int = 0
    scans_pending: int = 0
    #: connections by account health ``(state, reason)``; ``ok`` has reason ``None``
    health: Mapping[tuple[str, str | None], int] = attrs.field(factory=dict)
    #: shared mode (instance id, members, owned share); ``None`` for a single instance
    cluster: MembershipView | None = None
    #: the LISTEN/NOTIFY listener; ``None`` when ``TRIO_IDLE_LISTEN_URL`` is not set
    listener: ListenerMetrics | None = None


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)


def _histogram(name: str, doc: str, h: Histogram) -> HistogramMetricFamily:
    cumulative: list[tuple[str, float]] = []
    running = 0
    for bound, count in zip(h.buckets, h.counts, strict=False):
        running += count
        cumulative.append((repr(float(bound)), running))
    cumulative.append(("+Inf", h.count))
    return HistogramMetricFamily(f"{PREFIX}_{name}", doc, buckets=cumulative, sum_value=h.sum)


def families(data: MetricsInput) -> Iterator[Metric]:
    """Every metric family for one scrape (pure)."""
    stats = data.stats

    info = GaugeMetricFamily(f"{PREFIX}_build_info", "version of trio-idle", labels=["version"])
    info.add_metric([__version__], 1)
    yield info
    yield _gauge("start_time_seconds", "unix time the daemon started", data.started_unix)

    sessions = GaugeMetricFamily(f"{PREFIX}_sessions", "IMAP sessions by state", labels=["state"])
    for state in SESSION_STATES:
        sessions.add_metric([state], data.sessions.get(state, 0))
    for state, n in sorted(data.sessions.items()):
        if state not in SESSION_STATES:
            sessions.add_metric([state], n)
    yield sessions
    health = GaugeMetricFamily(
        f"{PREFIX}_account_health",
        "connections by account health state and reason (as reported to the backend)",
        labels=["state", "reason"],
    )
    for state in HEALTH_STATES:  # every state present, so a dashboard can sum it
        if not any(s == state for s, _ in data.health):
            health.add_metric([state, ""], 0)
    for (state, reason), n in sorted(
        data.health.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")
    ):
        health.add_metric([state, reason or ""], n)
    yield health
    yield _gauge(
        "source_connections",
        "active rows in the connection source at the last successful refresh",
        data.connections_in_source,
    )
    yield _gauge(
        "last_refresh_success_timestamp_seconds",
        "unix time of the last successful refresh of the connection list (0: none yet)",
        data.last_refresh_unix or 0.0,
    )

    for name, doc in PLAIN_COUNTERS:
        yield _counter(name, doc, stats.get(name))
    requested = stats.get("exists_events") + stats.get("catch_up_scans")
    yield _counter("scans_requested", "scans requested (new mail noticed, catch-ups)", requested)

    disconnects = CounterMetricFamily(
        f"{PREFIX}_disconnects",
        "sessions that ended or failed to start, by cause (each is followed by a reconnect)",
        labels=["cause"],
    )
    for stat, cause in DISCONNECT_CAUSES:
        disconnects.add_metric([cause], stats.get(stat))
    yield disconnects

    for name, label, known, doc in LABELLED_COUNTERS:
        family = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=[label])
        for value, count in stats.by_label(name, known).items():
            family.add_metric([value], count)
        yield family

    yield _histogram(
        "scan_latency_seconds",
        "from new mail noticed to the backend's 2xx answer",
        stats.scan_latency,
    )
    yield _gauge("scans_active", "scan requests in flight", data.scans_active)
    yield _gauge("scans_pending", "scans waiting behind an active one", data.scans_pending)
    yield _gauge(
        "event_loop_lag_seconds",
        "largest event-loop wake-up delay of the last few seconds",
        data.loop_lag,
    )
    yield _counter(
        "event_loop_stalls",
        "event-loop lag measurements above the configured maximum",
        data.loop_stalls,
    )
    if data.cluster is not None:
        yield from _cluster_families(data.cluster)
    if data.listener is not None:
        yield from _listener_families(data.listener)


def _listener_families(listener: ListenerMetrics) -> Iterator[Metric]:
    """With ``TRIO_IDLE_LISTEN_URL`` only. Counts and times: no text from Postgres."""
    yield _gauge(
        "listener_connected",
        "1 while the LISTEN/NOTIFY listener is connected and listening",
        float(listener.connected),
    )
    yield _gauge(
        "listener_connected_since_timestamp_seconds",
        "unix time the listener's current connection started listening (0: not connected)",
        listener.connected_since_unix or 0.0,
    )
    yield _counter(
        "listener_connections",
        "listener connections that reached LISTEN (the first one and every reconnect)",
        listener.connections,
    )
    failures = CounterMetricFamily(
        f"{PREFIX}_listener_failures",
        "listener connections that ended or could not be made (connect: refused, timed "
        "out or rejected; lost: closed or failed while listening; heartbeat: unanswered)",
        labels=["reason"],
    )
    for reason, count in sorted(listener.failures.items()):
        failures.add_metric([reason], count)
    yield failures
    yield _counter(
        "listener_notifications",
        "notifications of a changed connection table received",
        listener.notifications,
    )
    yield _gauge(
        "listener_last_notification_timestamp_seconds",
        "unix time of the last notification received (0: none yet)",
        listener.last_notification_unix or 0.0,
    )


def _cluster_families(view: MembershipView) -> Iterator[Metric]:
    """Shared mode. The instance ids are the operator's own names (one per process), so
    labelling by them stays low-cardinality."""
    info = GaugeMetricFamily(
        f"{PREFIX}_cluster_instance_info", "this instance's id in the membership", labels=["id"]
    )
    info.add_metric([view.instance_id], 1)
    yield info
    yield _gauge("cluster_members", "live instances in the membership table", len(view.members))
    ages = GaugeMetricFamily(
        f"{PREFIX}_cluster_member_heartbeat_age_seconds",
        "seconds since each live member's heartbeat (database clock), at the last renewal",
        labels=["member"],
    )
    for member in view.members:
        ages.add_metric([member.instance_id], member.age)
    yield ages
    yield _gauge(
        "cluster_fenced", "1 while this instance cannot renew its lease", float(view.fenced)
    )
    yield _gauge(
        "cluster_owned_connections",
        "connections this instance owns (running or waiting for the previous owner's lease)",
        view.owned,
    )
    yield _gauge(
        "cluster_held_connections",
        "owned connections waiting for the previous owner's lease to expire",
        view.held,
    )


class DaemonCollector(Collector):
    """Reads a fresh :class:`MetricsInput` from ``read`` at every scrape."""

    def __init__(self, read: Callable[[], MetricsInput]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        yield from families(self._read())


def make_registry(read: Callable[[], MetricsInput], *, process: bool = True) -> CollectorRegistry:
    """A private registry with the daemon's metrics (and the process collector)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(read))
    if process:
        ProcessCollector(registry=registry)
    return registry


def render_metrics(data: MetricsInput) -> bytes:
    """The Prometheus text exposition of ``data`` alone (no process metrics)."""
    return generate_latest(make_registry(lambda: data, process=False))
