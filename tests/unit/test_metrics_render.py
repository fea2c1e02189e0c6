"""Metrics rendering, parsed back with prometheus_client's own parser."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from trio_idle import __version__
from trio_idle.core.stats import LATENCY_BUCKETS, Stats
from trio_idle.ops.health import count_states
from trio_idle.ops.metrics import MetricsInput, make_registry, render_metrics


def parse(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def data(stats: Stats, **overrides: Any) -> MetricsInput:
    values: dict[str, Any] = {
        "stats": stats,
        "sessions": count_states(["idle", "idle", "polling", "backing-off"]),
        "connections_in_source": 5,
        "last_refresh_unix": 1_700_000_000.5,
        "started_unix": 1_699_999_000.0,
        "loop_lag": 0.012,
        "loop_stalls": 2,
        "scans_active": 1,
        "scans_pending": 3,
    }
    values.update(overrides)
    return MetricsInput(**values)


def test_every_family_from_stats() -> None:
    stats = Stats()
    stats.inc("connects", by=4)
    stats.inc("connect_attempts", by=6)
    stats.inc("disconnects")
    stats.inc("connect_failures", by=2)
    stats.inc("auth_failures")
    stats.inc("exists_events", "exists", by=7)
    stats.inc("exists_events", "tick")
    stats.inc("catch_up_scans", by=2)
    stats.inc("scans_coalesced", by=3)
    stats.inc("scans_sent", "exists", by=5)
    stats.inc("scans_ok", by=4)
    stats.inc("backend_stale_connection_retries", by=2)
    stats.inc("scans_failed", "401")
    stats.inc("scans_retried", "503", by=2)
    stats.inc("scans_retried", "network")
    stats.inc("refreshes", by=9)
    stats.inc("refresh_failures")
    stats.inc("pings_sent", "ok", by=3)
    stats.inc("ping_errors")
    stats.inc("state_writes", by=12)
    stats.inc("state_errors", "write")
    m = parse(render_metrics(data(stats)))

    assert m[("trio_idle_sessions", (("state", "idle"),))] == 2
    assert m[("trio_idle_sessions", (("state", "polling"),))] == 1
    assert m[("trio_idle_sessions", (("state", "backing-off"),))] == 1
    assert m[("trio_idle_sessions", (("state", "connecting"),))] == 0
    assert m[("trio_idle_sessions", (("state", "auth-failed"),))] == 0
    assert m[("trio_idle_connects_total", ())] == 4
    assert m[("trio_idle_connect_attempts_total", ())] == 6
    assert m[("trio_idle_disconnects_total", (("cause", "connection_lost"),))] == 1
    assert m[("trio_idle_disconnects_total", (("cause", "connect_failed"),))] == 2
    assert m[("trio_idle_disconnects_total", (("cause", "auth_failed"),))] == 1
    assert m[("trio_idle_disconnects_total", (("cause", "internal_error"),))] == 0
    assert m[("trio_idle_exists_events_total", (("reason", "exists"),))] == 7
    assert m[("trio_idle_exists_events_total", (("reason", "tick"),))] == 1
    assert m[("trio_idle_scans_requested_total", ())] == 10  # 8 new-mail + 2 catch-up
    assert m[("trio_idle_scans_coalesced_total", ())] == 3
    assert m[("trio_idle_scans_sent_total", (("reason", "exists"),))] == 5
    assert m[("trio_idle_scans_ok_total", ())] == 4
    assert m[("trio_idle_backend_stale_connection_retries_total", ())] == 2
    assert m[("trio_idle_scans_failed_total", (("status", "401"),))] == 1
    assert m[("trio_idle_scans_retried_total", (("status", "503"),))] == 2
    assert m[("trio_idle_scans_retried_total", (("status", "network"),))] == 1
    assert m[("trio_idle_refreshes_total", ())] == 9
    assert m[("trio_idle_refresh_failures_total", ())] == 1
    assert m[("trio_idle_pings_sent_total", (("result", "ok"),))] == 3
    assert m[("trio_idle_ping_errors_total", ())] == 1
    assert m[("trio_idle_state_writes_total", ())] == 12
    assert m[("trio_idle_state_errors_total", (("operation", "write"),))] == 1
    assert m[("trio_idle_source_connections", ())] == 5
    assert m[("trio_idle_last_refresh_success_timestamp_seconds", ())] == 1_700_000_000.5
    assert m[("trio_idle_start_time_seconds", ())] == 1_699_999_000.0
    assert m[("trio_idle_event_loop_lag_seconds", ())] == 0.012
    assert m[("trio_idle_event_loop_stalls_total", ())] == 2
    assert m[("trio_idle_scans_active", ())] == 1
    assert m[("trio_idle_scans_pending", ())] == 3
    assert ("trio_idle_build_info", (("version", __version__),)) in m


def test_latency_histogram_is_cumulative() -> None:
    stats = Stats()
    for value in (0.003, 0.005, 0.2, 0.2, 7.0, 500.0):
        stats.scan_latency.observe(value)
    m = parse(render_metrics(data(stats)))

    def bucket(le: str) -> float:
        return m[("trio_idle_scan_latency_seconds_bucket", (("le", le),))]

    assert bucket("0.005") == 2  # le is inclusive
    assert bucket("0.01") == 2
    assert bucket("0.25") == 4
    assert bucket("10.0") == 5
    assert bucket("120.0") == 5
    assert bucket("+Inf") == 6
    assert m[("trio_idle_scan_latency_seconds_count", ())] == 6
    assert abs(m[("trio_idle_scan_latency_seconds_sum", ())] - 507.408) < 1e-9
    buckets = [k for k in m if k[0] == "trio_idle_scan_latency_seconds_bucket"]
    assert len(buckets) == len(LATENCY_BUCKETS) + 1


def test_no_refresh_yet_and_empty_counters() -> None:
    m = parse(render_metrics(data(Stats(), last_refresh_unix=None, sessions=count_states([]))))
    assert m[("trio_idle_last_refresh_success_timestamp_seconds", ())] == 0
    assert m[("trio_idle_connects_total", ())] == 0
    assert m[("trio_idle_scan_latency_seconds_count", ())] == 0
    assert all(not labels or labels[0][0] != "mailbox" for _, labels in m)


def test_registry_reads_fresh_values_at_each_scrape_and_adds_process_metrics() -> None:
    from prometheus_client import generate_latest

    stats = Stats()
    registry = make_registry(lambda: data(stats))
    first = parse(generate_latest(registry))
    stats.inc("connects")
    second = parse(generate_latest(registry))
    assert first[("trio_idle_connects_total", ())] == 0
    assert second[("trio_idle_connects_total", ())] == 1
    assert ("process_resident_memory_bytes", ()) in second
    # nothing was registered globally
    from prometheus_client import REGISTRY

    assert "trio_idle_connects" not in {
        f.name for f in text_string_to_metric_families(generate_latest(REGISTRY).decode())
    }


def test_account_health_counts_by_state_and_reason_without_emails() -> None:
    stats = Stats()
    stats.inc("health_reports", "ok")
    health = {("ok", None): 3, ("auth_failed", "imap_disabled"): 2}
    text = render_metrics(data(stats, health=health))
    m = parse(text)
    assert m[("trio_idle_account_health", (("reason", ""), ("state", "ok")))] == 3
    assert (
        m[("trio_idle_account_health", (("reason", "imap_disabled"), ("state", "auth_failed")))]
        == 2
    )
    # states with no connection are there too, at 0, so sums and alerts need no absent()
    assert m[("trio_idle_account_health", (("reason", ""), ("state", "unreachable")))] == 0
    assert m[("trio_idle_health_reports_total", (("result", "ok"),))] == 1
    assert b"@" not in text


# every labelled counter, with each of its known label values; written out here (not
# read from metrics.py) so that dropping a value there fails this test
EXPECTED_ZEROS = {
    "trio_idle_exists_events_total": ("reason", {"exists", "tick"}),
    "trio_idle_scans_sent_total": ("reason", {"exists", "tick", "startup", "reconnect"}),
    "trio_idle_idle_restarts_total": ("by", {"ticker", "session"}),
    "trio_idle_folder_scans_total": ("reason", {"exists", "tick", "startup", "reconnect"}),
    "trio_idle_notify_fallbacks_total": ("cause", {"refused", "overflow"}),
    "trio_idle_notify_status_ignored_total": ("reason", {"unwatched", "malformed"}),
    "trio_idle_scans_failed_total": ("status", {"400", "401", "403", "404"}),
    "trio_idle_scans_retried_total": ("status", {"network", "429", "500", "502", "503", "504"}),
    "trio_idle_pings_sent_total": ("result", {"ok", "fail"}),
    "trio_idle_state_errors_total": ("operation", {"load", "write"}),
    "trio_idle_health_reports_total": ("result", {"ok", "retried"}),
    "trio_idle_token_failures_total": (
        "reason",
        {"token_error", "token_unavailable", "token_revoked", "refused"},
    ),
    "trio_idle_envelope_fetches_total": ("result", {"listed", "range", "unavailable"}),
    "trio_idle_gc_collections_total": ("kind", {"young", "full"}),
    "trio_idle_status_auth_failures_total": ("reason", {"missing", "wrong"}),
    "trio_idle_health_clients_dropped_total": ("reason", {"evicted", "timeout"}),
    "trio_idle_disconnects_total": (
        "cause",
        {"connection_lost", "connect_failed", "auth_failed", "internal_error"},
    ),
}


def labelled_counter_series(text: bytes) -> dict[str, dict[str, float]]:
    """Every ``*_total`` sample with exactly one label: family → label value → value."""
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text.decode()):
        if family.type != "counter":
            continue
        for s in family.samples:
            if s.name.endswith("_total") and len(s.labels) == 1:
                (value,) = s.labels.values()
                out.setdefault(s.name, {})[value] = float(s.value)
    return out


def test_a_fresh_daemon_exports_every_labelled_counter_at_zero_for_each_known_value() -> None:
    """Before the first failure a rate over ``scans_failed_total`` must exist (0), or an
    alert adding it to another rate has no series and can never fire."""
    series = labelled_counter_series(render_metrics(data(Stats())))
    assert set(series) == set(EXPECTED_ZEROS)
    for name, (_label, values) in EXPECTED_ZEROS.items():
        assert series[name] == dict.fromkeys(values, 0.0), name


def test_counted_label_values_join_the_known_ones() -> None:
    stats = Stats()
    stats.inc("scans_failed", "422")
    stats.inc("scans_failed", "401", by=2)
    series = labelled_counter_series(render_metrics(data(stats)))
    assert series["trio_idle_scans_failed_total"] == {
        "400": 0.0,
        "401": 2.0,
        "403": 0.0,
        "404": 0.0,
        "422": 1.0,
    }
