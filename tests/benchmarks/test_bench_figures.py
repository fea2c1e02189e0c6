"""The benchmark's own arithmetic, without processes: loop stalls cut per phase, the soak's
growth per hour and tracemalloc diff, the comparison's stall rows and plot, the ramp and
descriptor limits, and ``--profile`` refusing to run without py-spy."""

from __future__ import annotations

import shutil
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from bench import compare, harness
from bench.loop_probe import TOGGLE_SIGNAL, parse_stalls, stalls_in, with_probe
from bench.report import compare_series, make_compare_plot
from bench.soak_analysis import rss_growth, short_path, tracemalloc_diff


def test_stall_lines_are_parsed_and_cut_per_window() -> None:
    lines = [
        b"STALL 100.000 ms=7.5\n",
        b"2026-12-01 10:00:00.000 WARNING something else\n",
        b"STALL 105.500 ms=83.2\n",
        b"STALL 110.000 ms=12.0\n",
        b"STALL garbage\n",
    ]
    stalls = parse_stalls(lines)
    assert stalls == [(100.0, 7.5), (105.5, 83.2), (110.0, 12.0)]
    window = stalls_in(stalls, 101.0, 111.0, 5.0)
    assert window["max_ms"] == 83.2 and window["at"] == 105.5
    assert window["logged"] == 2 and window["over_50ms"] == 1
    quiet = stalls_in(stalls, 200.0, 300.0, 5.0)
    assert quiet["max_ms"] is None and quiet["below_ms"] == 5.0


def test_stall_summary_separates_the_ramp_and_the_refresh() -> None:
    stalls = [(10.0, 900.0), (25.0, 30.0), (41.0, 120.0), (52.0, 8.0)]
    windows = {"ramp": (0.0, 20.0), "idle": (20.0, 35.0), "latency": (35.0, 60.0)}
    summary = compare.stall_summary(stalls, windows, refresh_at=40.0, log_above_ms=5.0)
    assert summary["run"]["max_ms"] == 900.0  # the ramp's
    assert summary["steady"]["max_ms"] == 120.0  # idle and pushes only
    assert summary["refresh"]["max_ms"] == 120.0  # within 5 s of the SIGHUP
    assert summary["idle"]["max_ms"] == 30.0


def _stack(steady: float | None) -> dict[str, Any]:
    record = {"max_ms": steady, "below_ms": None if steady is not None else 5.0}
    return {"stalls": {"period_ms": 20.0, "latency": record}, "latency": {"midway_at": 1.0}}


def test_compare_table_reports_the_stall_of_both_programs() -> None:
    run = {"n": 2000, "tls": True, "node": _stack(40.0), "trio_idle": _stack(None)}
    rows = {m: (a, b, r) for m, a, b, r in compare.rows_for(run)}
    [stall] = [v for k, v in rows.items() if k.startswith("longest loop stall during the pushes")]
    # nothing above the threshold: shown as "< 5" and compared as 5 (an upper bound)
    assert stall == ("40.0", "< 5", "0.12×")
    assert "push → webhook p99 (a refresh half-way), ms" in rows
    assert "longest loop stall" in compare.markdown([run])


def test_the_machine_line_names_node_and_imapflow_only_when_the_baseline_ran() -> None:
    machine = {"cores": 2, "cpu_model": "X", "mem_total_gib": 4, "kernel": "6.1", "python": "3.11"}
    versions = {"version": "v22.1.0", "imapflow": None}  # looked up, imapflow not installed
    alone = {"n": 50, "tls": False, "machine": machine, "node": versions, "trio_idle": _stack(5.0)}
    both = {**alone, "node": {**versions, "imapflow": "2.10.2", **_stack(40.0)}}
    line = compare.provenance(alone)
    assert "Node" not in line and "imapflow" not in line, line
    assert line.startswith("Machine: 2 cores (X), 4 GiB, Linux 6.1, CPython 3.11")
    assert ", Node v22.1.0, imapflow 2.10.2; `" in compare.provenance(both)
    assert "Node v22.1.0" not in compare.markdown([alone]).splitlines()[-1]


def test_ramp_limit_allows_slow_tls_ramps_and_the_fd_limit_is_checked() -> None:
    opts = compare.CompareOptions(
        sizes=(10_000,),
        modes=("tls",),
        quick=False,
        idle_window=130,
        latency_seconds=20,
        rate=20,
        grace=20,
        keepalive=120,
        tick="2m",
        concurrency=200,
        connect_rate=2000,
        per_server=8000,
        seed=1,
        settle=5,
    )
    assert compare.ramp_limit(10_000, True, opts) >= 10_000 / 40
    assert compare.ramp_limit(10_000, False, opts) < compare.ramp_limit(10_000, True, opts)
    assert compare.check_fd_limit((1000, 10_000), 8000, 20_000) is None
    problem = compare.check_fd_limit((25_000,), 8000, 20_000)
    assert problem is not None and "RLIMIT_NOFILE" in problem


def test_rss_growth_per_hour_skips_the_warm_up() -> None:
    # 1 GiB-ish first, then +360 KiB per hour from a 36,000 KiB start: 1 % per hour
    samples = [[0.0, 10_000.0, 0.0], [300.0, 30_000.0, 0.0]]
    samples += [[600.0 + 30 * i, 36_000.0 + 0.1 * 30 * i, 0.0] for i in range(20)]
    growth = rss_growth(samples, 600.0)
    assert growth["samples"] == 20
    assert growth["kib_per_hour"] == pytest.approx(360.0)
    assert growth["pct_per_hour"] == pytest.approx(1.0)
    assert rss_growth(samples[:3], 600.0)["pct_per_hour"] is None  # too few samples


def test_tracemalloc_diff_names_the_line_that_grew(tmp_path: Path) -> None:
    tracemalloc.start(1)
    try:
        first = tracemalloc.take_snapshot()
        kept = [bytearray(1000) for _ in range(500)]  # the growth
        last = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    first.dump(str(tmp_path / "a.tmsnap"))
    last.dump(str(tmp_path / "b.tmsnap"))
    top = tracemalloc_diff(tmp_path / "a.tmsnap", tmp_path / "b.tmsnap", top=3)
    assert len(kept) == 500
    assert "test_bench_figures.py:" in top[0]["where"]
    assert top[0]["size_diff_kib"] >= 480 and top[0]["count_diff"] >= 500
    assert short_path("/x/lib/python3.11/site-packages/aioimaplib/a.py") == "aioimaplib/a.py"
    assert short_path("/work/repo/trio_idle/mailbox/session.py") == "trio_idle/mailbox/session.py"


def test_compare_plot_has_a_line_per_program(tmp_path: Path) -> None:
    def run(n: int, node_kib: float, ours_kib: float) -> dict[str, Any]:
        return {
            "n": n,
            "tls": False,
            "quick": False,
            "node": {"memory": {"per_session_kib": node_kib}},
            "trio_idle": {"memory": {"per_session_kib": ours_kib}},
        }

    runs = [run(5000, 30.0, 25.0), run(1000, 34.0, 39.0), dict(run(50, 1, 1), quick=True)]
    assert compare_series(runs, "node", False, ("memory", "per_session_kib")) == (
        [1000, 5000],
        [34.0, 30.0],
    )
    assert compare_series(runs, "trio_idle", True, ("memory", "per_session_kib")) == ([], [])
    out = tmp_path / "compare.png"
    make_compare_plot(runs, out)
    assert out.stat().st_size > 0


def test_profile_without_py_spy_fails_loudly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python"))
    with pytest.raises(SystemExit) as exc:
        harness.main(["--quick", "--profile", str(tmp_path / "prof")])
    assert "py-spy not found" in str(exc.value.code)
    assert not (tmp_path / "prof").exists()


def test_probe_runs_beside_the_main_function_and_ends_with_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import time

    import trio

    async def stalls_once() -> str:
        await trio.sleep(0.05)
        time.sleep(0.15)  # noqa: ASYNC251 - the synchronous stall the probe must notice
        await trio.sleep(0.05)
        return "done"

    assert trio.run(with_probe(stalls_once, 10.0, 50.0)) == "done"
    stalls = parse_stalls(line.encode() for line in capsys.readouterr().err.splitlines())
    assert stalls and max(ms for _, ms in stalls) >= 90.0


def test_the_toggle_signal_switches_the_probe_to_its_coarse_period_and_back(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import os

    import trio

    async def toggled_twice() -> None:
        await trio.sleep(0.05)
        for _ in range(2):
            os.kill(os.getpid(), TOGGLE_SIGNAL)
            await trio.sleep(0.1)

    trio.run(with_probe(toggled_twice, 20.0, 1000.0, coarse_ms=250.0))
    switches = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("STALLPROBE")]
    assert [ln.split("period_ms=")[1] for ln in switches] == ["250", "20"]
