"""``python -m bench --quick`` and ``--compare --quick`` work end to end (correctness only,
never timings).

Runs the real daemon process against a test IMAP server process and the in-harness scan
sink with N=200 and a few seconds per phase (~25 s). Asserts that every session reached
IDLE, no push was missed, reconcile and shutdown completed and the JSON has every field;
the numbers themselves are machine-dependent and are not checked.

The ``--compare --quick`` test (≈ 20 s) runs the Node + imapflow baseline beside it (50
mailboxes) and needs ``node`` (the ``node_bin`` fixture: a skip locally, a failure with
``TRIO_IDLE_REQUIRE_SERVERS=1`` as in CI); ``npm ci`` runs only once node is known present.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.phases import percentile
from bench.report import format_table, markdown_table

REPO = Path(__file__).resolve().parents[2]

MACHINE_FIELDS = ("cores", "cpu_model", "kernel", "python", "packages")
RAMP_FIELDS = ("sessions", "reached_idle", "all_idle", "seconds", "sessions_per_s", "logins")
MEMORY_FIELDS = ("rss_base_kib", "rss_kib", "per_session_kib", "hwm_kib")
CPU_FIELDS = ("window_s", "cpu_s", "cpu_s_per_min", "pct_of_one_core", "keepalives", "noops")
LATENCY_FIELDS = ("appends", "missed", "p50_ms", "p90_ms", "p99_ms", "max_ms", "rate_per_s")
RECONCILE_FIELDS = ("added", "removed", "complete", "seconds", "start_s", "stop_s")
SHUTDOWN_FIELDS = ("sessions", "seconds", "exit_code", "logouts", "connections_left_open")


def _has(record: dict[str, Any], fields: tuple[str, ...]) -> None:
    missing = [f for f in fields if f not in record]
    assert not missing, f"missing fields {missing} in {sorted(record)}"


def test_percentile_nearest_rank() -> None:
    assert percentile([], 99) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([float(i) for i in range(1, 101)], 99) == 99.0
    assert percentile([5.0], 99) == 5.0


@pytest.mark.timeout(360)  # ≈ 40 s; the bench's own limit is 300 s
def test_quick_bench_runs_and_reports_everything(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    plot = tmp_path / "plot.png"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--quick",
            "--soak",
            "4",
            "--soak-refresh",
            "1s",
            "--soak-sample",
            "1",
            "--soak-warmup",
            "0",
            "--tracemalloc",
            "--tracemalloc-every",
            "1.5",
            "--out",
            str(out),
            "--workdir",
            str(tmp_path / "work"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "p99ms" in proc.stdout  # the human table

    data = json.loads(out.read_text())
    _has(data["machine"], MACHINE_FIELDS)
    [run] = data["runs"]
    assert run["n"] == 200 and run["quick"] is True and run["tls"] is False
    _has(run["machine"], MACHINE_FIELDS)

    a, b = run["default_limiter"], run["high_limiter"]
    for daemon in (a, b):
        _has(daemon["ramp"], RAMP_FIELDS)
        assert daemon["ramp"]["all_idle"], daemon["ramp"]
        assert daemon["ramp"]["reached_idle"] == 200
        _has(daemon["memory"], MEMORY_FIELDS)
        assert daemon["memory"]["per_session_kib"] is not None
        _has(daemon["reconcile"], RECONCILE_FIELDS)
        assert daemon["reconcile"]["complete"], daemon["reconcile"]
        assert daemon["reconcile"]["added"] == daemon["reconcile"]["removed"] == 20
        _has(daemon["shutdown"], SHUTDOWN_FIELDS)
        assert daemon["shutdown"]["exit_code"] == 0
        assert daemon["shutdown"]["connections_left_open"] == 0
        assert daemon["shutdown"]["logouts"] == 200
        assert daemon["catch_up"]["complete"], daemon["catch_up"]
        assert daemon["log_lines"].get("ERROR", 0) == 0, daemon["log_lines"]

    _has(a["idle_cpu_no_tick"], CPU_FIELDS)
    assert a["idle_cpu_no_tick"]["all_idle_at_end"]
    _has(b["idle_cpu"], CPU_FIELDS)
    assert b["idle_cpu"]["all_idle_at_end"]
    assert b["idle_cpu"]["reconnects"] == 0

    # B and C restart on the previous daemon's state file: nothing new, nothing rescanned
    assert a["catch_up"]["startup_scans"] == 200
    assert b["state"] == "restart" and b["catch_up"]["startup_scans"] == 0

    latency = b["latency"]
    _has(latency, LATENCY_FIELDS)
    assert latency["appends"] > 0
    assert latency["missed"] == 0, latency["missed_users"]
    assert latency["p99_ms"] is not None

    c = run["soak"]
    assert c["ramp"]["all_idle"] and c["catch_up"]["startup_scans"] == 0
    soak = c["soak"]
    assert soak["all_idle_at_end"] and soak["reconnects"] == 0
    assert soak["pushes"]["appends"] > 0 and soak["pushes"]["missed"] == 0
    assert len(soak["samples_t_rss_kib_cpu_s"]) >= 2
    # every refresh ends with a collection (pause reported); a forced full one at the end
    assert len(soak["gc"]["refresh_t_kind_ms_collected"]) >= 2, soak["gc"]
    assert soak["gc"]["forced_full"]["ms"] > 0, soak["gc"]
    assert "a forced full one at the end" in proc.stdout
    # growth per hour from the samples after the warm-up, the stall, what grew (tracemalloc)
    assert soak["growth"]["samples"] >= 3 and soak["growth"]["pct_per_hour"] is not None
    assert "max_ms" in soak["stalls"] and "RSS growth after the first 0s" in proc.stdout
    traced = soak["tracemalloc"]
    assert len(traced["snapshots"]) >= 2 and traced["top"], traced
    assert all(Path(s["path"]).exists() for s in traced["snapshots"])
    assert "tracemalloc: " in proc.stdout
    assert c["shutdown"]["exit_code"] == 0 and c["shutdown"]["logouts"] == 200
    assert c["log_lines"].get("ERROR", 0) == 0, c["log_lines"]

    # the plot can be drawn from what was written (matplotlib: `bench` and `test` extras)
    from bench.report import make_plot

    quick_as_full = [dict(run, quick=False)]
    make_plot(quick_as_full, plot)
    assert plot.stat().st_size > 0
    assert "200" in format_table(data["runs"])
    assert "\n| 200 | plain | " in markdown_table(quick_as_full)


# ---- side by side with the Node stack (python -m bench --compare) ---------------------------


def _pair(n: int, tls: bool, node_rss: int, ours_rss: int) -> dict[str, Any]:
    def stack(rss: int, kib: float, cpu: float, p99: float, missed: int) -> dict[str, Any]:
        return {
            "memory": {"rss_kib": rss, "per_session_kib": kib},
            "idle_cpu": {"pct_of_one_core": cpu, "noops": n, "window_s": 130.0},
            "latency": {"p50_ms": 2.0, "p99_ms": p99, "max_ms": p99, "missed": missed},
            "ramp": {"seconds": 2.0},
        }

    return {
        "n": n,
        "tls": tls,
        "quick": False,
        "node": {"imapflow": "2.10.2", **stack(node_rss, 20.0, 4.0, 20.0, 3)},
        "trio_idle": stack(ours_rss, 30.0, 8.0, 10.0, 0),
    }


def test_compare_ratios_are_trio_idle_over_node() -> None:
    from bench.compare import growth_per_session, markdown, ratio, rows_for

    assert ratio(8.0, 4.0) == 2.0
    assert ratio(1.0, 0) is None and ratio(None, 4.0) is None
    runs = [_pair(1000, False, 60_000, 80_000), _pair(5000, False, 140_000, 200_000)]
    # (140,000 − 60,000) / 4,000 and (200,000 − 80,000) / 4,000
    assert growth_per_session(runs, "node", False) == 20.0
    assert growth_per_session(runs, "trio_idle", False) == 30.0
    assert growth_per_session(runs, "node", True) is None  # no TLS runs
    table = dict((m, (a, b, r)) for m, a, b, r in rows_for(runs[0]))
    cpu = next(v for k, v in table.items() if k.startswith("idle CPU"))
    assert cpu == ("4.00 (1,000)", "8.00 (1,000)", "2.00×")
    assert table["push → webhook p99, ms"] == ("20.0", "10.0", "0.50×")
    assert table["pushes with no webhook call"][:2] == ("3 of –", "0 of –")
    text = markdown(runs)
    header = "| N = 1,000, plaintext | Node + imapflow 2.10.2 | trio-idle | trio-idle / Node |"
    assert header in text
    assert "N = 1,000 → 5,000: Node 20.0 KiB, trio-idle 30.0 KiB (1.50×)" in text


@pytest.mark.timeout(240)  # ≈ 25 s; the bench's own limit is 180 s
def test_quick_compare_runs_both_stacks(node_bin: str, tmp_path: Path) -> None:
    """``--compare --quick``: the Node baseline (``npm ci`` from its lock if needed) and
    trio-idle both reach IDLE on every mailbox, POST every push, and get a ratio row."""
    out = tmp_path / "compare.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--compare",
            "--quick",
            "--compare-out",
            str(out),
            "--workdir",
            str(tmp_path / "work"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| N = 50, plaintext (quick" in proc.stdout
    [run] = json.loads(out.read_text())["runs"]
    assert run["n"] == 50 and run["tls"] is False and run["compare"] is True
    assert run["node"]["imapflow"].startswith("2.10.")
    _has(run["machine"], MACHINE_FIELDS)
    for stack in ("node", "trio_idle"):
        record = run[stack]
        assert record["ramp"]["all_idle"] and record["ramp"]["logins"] == 50, record["ramp"]
        _has(record["memory"], MEMORY_FIELDS)
        _has(record["idle_cpu"], CPU_FIELDS)
        assert record["idle_cpu"]["all_idle_at_end"] and record["idle_cpu"]["reconnects"] == 0
        latency = record["latency"]
        _has(latency, LATENCY_FIELDS)
        assert latency["appends"] > 0 and latency["missed"] == 0, latency
        assert record["shutdown"]["connections_left_open"] == 0
        assert record["scan_reasons"].get("exists", 0) > 0, record["scan_reasons"]
    assert run["node"]["error_lines"] == 0
    # the original logged out nobody; trio-idle does, and scanned each new mailbox once
    assert run["node"]["shutdown"]["logouts"] == 0
    assert run["trio_idle"]["shutdown"]["logouts"] == 50
    assert run["trio_idle"]["catch_up"]["startup_scans"] == 50
    assert run["trio_idle"]["log_lines"].get("ERROR", 0) == 0
    # both got the SIGHUP half-way through the pushes, and both ran the stall probe
    for stack in ("node", "trio_idle"):
        record = run[stack]
        assert record["latency"]["midway_at"] is not None
        stalls = record["stalls"]
        assert stalls["period_ms"] == 20.0
        for window in ("ramp", "idle", "latency", "run", "steady", "refresh"):
            assert "max_ms" in stalls[window], (window, stalls)
    eld = run["node"]["event_loop_delay"]
    assert eld is not None and eld["resolutionMs"] == 20 and eld["maxMs"] >= eld["minMs"] > 0
    assert "| longest loop stall during the pushes" in proc.stdout
    # the probe went coarse for the idle-CPU window and fine again: two switches each
    for name in ("node-50.log", "trio-idle-50.log"):
        log = (tmp_path / "work" / "compare-n50-plain" / name).read_text()
        assert log.count("STALLPROBE ") == 2, name
