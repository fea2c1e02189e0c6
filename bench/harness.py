"""``python -m bench``: run the phases for each N and write the results.

For each N (and plaintext or TLS) two daemon processes are run one after the other
against the same IMAP server process(es):

* daemon **A** — connect limiter at its defaults (20 at once, 50/s), ``TICK_INTERVAL`` 24 h:
  ramp, memory, idle CPU without ticks, reconcile, shutdown;
* daemon **B** — limiter opened up (``--high-concurrency`` / ``--high-rate``), default
  2 min tick: ramp, memory, idle CPU with ticks, push→webhook latency, reconcile, shutdown.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import trio

from bench import phases
from bench.loop_probe import stalls_in
from bench.node_proc import tick_ms
from bench.procinfo import machine_info, raise_nofile_limit, rss_kib
from bench.procs import ADMIN_SECRET, DaemonProc, ServerPool, ServerProc
from bench.report import format_table, make_compare_plot, make_plot, markdown_table
from bench.soak_analysis import rss_growth, tracemalloc_diff

#: the repository this folder belongs to: results go to its docs/, wherever it runs from
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = str(REPO_ROOT / "docs" / "perf" / "results.json")
DEFAULT_PLOT = str(REPO_ROOT / "docs" / "perf" / "rss_latency.png")
DEFAULT_COMPARE_OUT = str(REPO_ROOT / "docs" / "perf" / "compare.json")
DEFAULT_COMPARE_PLOT = str(REPO_ROOT / "docs" / "perf" / "compare.png")


@attrs.frozen
class Options:
    """Everything a run needs, from the command line."""

    sizes: tuple[int, ...]
    tls: bool
    quick: bool
    log_level: str
    idle_window: float
    idle_window_notick: float
    latency_seconds: float
    rate_at_10k: float
    min_rate: float
    high_concurrency: int
    high_rate: float
    keepalive: float
    per_server: int
    churn: float
    skip_default: bool
    profile_dir: str | None
    seed: int
    gc_probe: bool = False
    gc_freeze: bool = False
    #: daemon B's TRIO_IDLE_TICK_INTERVAL (the product default is 2m)
    tick: str = "2m"
    #: seconds of daemon C (product defaults but the limiter): 0 = no soak
    soak: float = 0.0
    soak_rate: float = 20.0
    #: daemon C's TRIO_IDLE_REFRESH_INTERVAL (each refresh ends with its collection)
    soak_refresh: str = "5m"
    #: seconds between the soak's RSS samples, and the warm-up its growth figure skips
    soak_sample: float = 30.0
    soak_warmup: float = 600.0
    #: only daemon C (no A, no B: a new state file, its catch-up scans waited for)
    soak_only: bool = False
    #: tracemalloc in daemon C: started at the warm-up, a snapshot every this many seconds
    #: and at the end (0: off)
    tracemalloc_every: float = 0.0
    tracemalloc_frames: int = 1


def rate_for(n: int, opts: Options) -> float:
    """Append rate for N sessions: ``rate_at_10k`` scaled linearly, at least ``min_rate``."""
    return max(opts.min_rate, opts.rate_at_10k * n / 10_000)


def _tls_files(workdir: Path) -> tuple[tuple[str, str], str]:
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    chain, key, ca_path = workdir / "server.pem", workdir / "server.key", workdir / "ca.pem"
    cert.private_key_pem.write_to_path(str(key))
    with chain.open("wb") as f:
        for blob in cert.cert_chain_pems:
            f.write(blob.bytes())
    ca.cert_pem.write_to_path(str(ca_path))
    return (str(chain), str(key)), str(ca_path)


async def _start_profile(daemon: DaemonProc, out: Path, seconds: float) -> trio.Process:
    """``py-spy record`` (raw collapsed stacks) of the daemon; its stderr goes to
    ``<out>.log`` (:func:`_wait_profile` raises if it fails)."""
    exe = check_profiler(str(out.parent))
    assert exe is not None
    with out.with_suffix(".log").open("wb") as log:
        return await trio.lowlevel.open_process(
            [
                exe,
                "record",
                "--nonblocking",
                "--format",
                "raw",
                "--rate",
                "100",
                "-d",
                str(max(1, int(seconds))),
                "-p",
                str(daemon.pid),
                "-o",
                str(out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )


async def _wait_profile(profiler: trio.Process, out: Path) -> None:
    """Wait for ``py-spy record``; a failure (no ptrace permission, say) is an error,
    not a missing file noticed later."""
    await profiler.wait()
    problem = profile_failure(profiler.returncode, out)
    if problem:
        raise RuntimeError(problem)


def profile_failure(returncode: int | None, out: Path) -> str | None:
    """Why ``py-spy record`` into ``out`` failed (its log's tail), None if it worked."""
    if returncode == 0 and out.exists():
        return None
    log = out.with_suffix(".log")
    tail = log.read_text(errors="replace").strip()[-500:] if log.exists() else ""
    written = "written" if out.exists() else "not written"
    return f"py-spy record exited with {returncode}, {out.name} {written}: {tail}"


async def run_config(n: int, opts: Options, workdir: Path, rng: random.Random) -> dict[str, Any]:
    """All phases for N sessions; returns one result record."""
    k = max(1, round(n * opts.churn))
    users = [f"u{i:05d}@bench.test" for i in range(n)]
    extra = [f"n{i:05d}@bench.test" for i in range(k)]
    n_servers = max(1, math.ceil((n + k) / opts.per_server))
    groups: list[list[str]] = [[] for _ in range(n_servers)]
    for i, user in enumerate(users):
        groups[i % n_servers].append(user)
    for i, user in enumerate(extra):
        groups[i % n_servers].append(user)
    tls_files, ca_path = _tls_files(workdir) if opts.tls else (None, None)
    servers = [ServerProc(i, g) for i, g in enumerate(groups)]
    pool = ServerPool(servers)
    sink = phases.Sink(ADMIN_SECRET)
    result: dict[str, Any] = {
        "n": n,
        "tls": opts.tls,
        "log_level": opts.log_level,
        "quick": opts.quick,
        "server_processes": n_servers,
        "started_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
    }
    print(
        f"== N={n} {'tls' if opts.tls else 'plain'} log={opts.log_level} "
        f"({n_servers} server process(es), workdir {workdir})",
        flush=True,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(_serve_sink, sink)
        try:
            for s in servers:
                await s.start(workdir, opts.keepalive, tls_files)
            port_of = {u: (s.tls_port if opts.tls else s.port) for s in servers for u in s.users}
            rows = [(u, port_of[u]) for u in users]
            new_rows = [(u, port_of[u]) for u in extra]
            base_env = {
                "BACKEND_URL": sink.backend.url,
                "TRIO_IDLE_IMAP_SECURITY": "tls" if opts.tls else "plain",
                "TRIO_IDLE_LOG_LEVEL": opts.log_level,
                # startup catch-up scans (one per mailbox) are over before idle is measured
                "TRIO_IDLE_CATCHUP_RATE": str(opts.high_rate),
            }
            if ca_path:
                base_env["TRIO_IDLE_CA_FILE"] = ca_path
            result["settings"] = {
                "keepalive_s": opts.keepalive,
                "high_concurrency": opts.high_concurrency,
                "high_rate": opts.high_rate,
                "churn": k,
                "idle_window_s": opts.idle_window,
                "idle_window_notick_s": opts.idle_window_notick,
                "latency_rate_per_s": rate_for(n, opts),
                "latency_seconds": opts.latency_seconds,
            }
            if not opts.skip_default and not opts.soak_only:
                result["default_limiter"] = await _daemon_a(
                    n, opts, workdir, pool, sink, rows, new_rows, base_env
                )
            if not opts.soak_only:
                result["high_limiter"] = await _daemon_b(
                    n, opts, workdir, pool, sink, rows, new_rows, base_env, rng
                )
            if opts.soak > 0 and n == max(opts.sizes):
                result["soak"] = await _daemon_c(n, opts, workdir, pool, sink, rows, base_env, rng)
            result["server_rss_kib"] = (await pool.totals())["rss_kib"]
            result["scan_reasons"] = dict(sink.reasons)
        finally:
            with trio.CancelScope(shield=True):
                await pool.stop()
            nursery.cancel_scope.cancel()
    return result


async def _serve_sink(sink: phases.Sink, *, task_status: trio.TaskStatus[None]) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.backend.serve)
        task_status.started()


def _ramp_timeout(n: int, rate: float, tls: bool = False) -> float:
    # TLS handshakes on both sides share the 2 cores: allow 40 sessions/s at worst
    return max(n / rate * 3, n / (40 if tls else 100)) + 60


async def _daemon_a(
    n: int,
    opts: Options,
    workdir: Path,
    pool: ServerPool,
    sink: phases.Sink,
    rows: list[tuple[str, int]],
    new_rows: list[tuple[str, int]],
    base_env: dict[str, str],
) -> dict[str, Any]:
    env = {**base_env, "TRIO_IDLE_TICK_INTERVAL": "24h"}
    daemon = DaemonProc(workdir, f"daemon-a-{n}", env)
    try:
        return await _phases_a(n, opts, pool, sink, rows, new_rows, daemon)
    finally:
        daemon.kill()


async def _phases_a(
    n: int,
    opts: Options,
    pool: ServerPool,
    sink: phases.Sink,
    rows: list[tuple[str, int]],
    new_rows: list[tuple[str, int]],
    daemon: DaemonProc,
) -> dict[str, Any]:
    await daemon.start()
    out: dict[str, Any] = {"concurrency": 20, "rate": 50.0, "tick": "24h"}
    base = rss_kib(daemon.pid)
    print("  A: ramp (limiter 20 / 50/s)", flush=True)
    startup = sink.reasons.get("startup", 0)
    out["ramp"] = await phases.ramp(pool, daemon, rows, _ramp_timeout(n, 50, opts.tls))
    out["catch_up"] = await phases.catch_up(
        sink, daemon, startup, n, _ramp_timeout(n, 50, opts.tls)
    )
    out["state"] = "new"
    out["memory"] = await phases.settle_and_measure_rss(daemon, n, base, 2.0 if opts.quick else 5)
    print(f"  A: idle CPU without ticks ({opts.idle_window_notick:g}s)", flush=True)
    out["idle_cpu_no_tick"] = await phases.idle_cpu(pool, daemon, n, opts.idle_window_notick)
    k = len(new_rows)
    print("  A: reconcile", flush=True)
    out["reconcile"] = await phases.reconcile(
        pool, daemon, rows[k:], new_rows, rows[:k], _ramp_timeout(k, 50, opts.tls)
    )
    await trio.sleep(1.0)
    print("  A: shutdown", flush=True)
    out["shutdown"] = await phases.shutdown(pool, daemon, n)
    out["log_lines"] = daemon.log_counts()
    return out


async def _daemon_b(
    n: int,
    opts: Options,
    workdir: Path,
    pool: ServerPool,
    sink: phases.Sink,
    rows: list[tuple[str, int]],
    new_rows: list[tuple[str, int]],
    base_env: dict[str, str],
    rng: random.Random,
) -> dict[str, Any]:
    env = {
        **base_env,
        "TRIO_IDLE_CONNECT_CONCURRENCY": str(opts.high_concurrency),
        "TRIO_IDLE_CONNECT_RATE": str(opts.high_rate),
        "TRIO_IDLE_TICK_INTERVAL": opts.tick,
    }
    if opts.gc_freeze:
        env["TRIO_IDLE_BENCH_GC_FREEZE"] = "1"
    module = "bench.gc_probe" if opts.gc_probe or opts.gc_freeze else "trio_idle.cli"
    a_state = workdir / f"daemon-a-{n}-state.sqlite3"
    daemon = DaemonProc(
        workdir, f"daemon-b-{n}", env, module, state_from=a_state if a_state.exists() else None
    )
    try:
        return await _phases_b(n, opts, pool, sink, rows, new_rows, daemon, rng)
    finally:
        daemon.kill()


async def _phases_b(
    n: int,
    opts: Options,
    pool: ServerPool,
    sink: phases.Sink,
    rows: list[tuple[str, int]],
    new_rows: list[tuple[str, int]],
    daemon: DaemonProc,
    rng: random.Random,
) -> dict[str, Any]:
    await daemon.start()
    out: dict[str, Any] = {
        "concurrency": opts.high_concurrency,
        "rate": opts.high_rate,
        "tick": opts.tick,
    }
    tag = f"{n}-{'tls' if opts.tls else 'plain'}"
    base = rss_kib(daemon.pid)
    print(f"  B: ramp (limiter {opts.high_concurrency} / {opts.high_rate:g}/s)", flush=True)
    startup = sink.reasons.get("startup", 0)
    out["ramp"] = await phases.ramp(pool, daemon, rows, _ramp_timeout(n, opts.high_rate, opts.tls))
    # a restart (state copied from daemon A) has nothing to catch up; a new state file
    # means one startup scan per mailbox, over before the idle windows
    fresh = daemon.state_from is None
    out["state"] = "new" if fresh else "restart"
    out["catch_up"] = await phases.catch_up(
        sink, daemon, startup, n if fresh else 0, _ramp_timeout(n, opts.high_rate, opts.tls)
    )
    out["memory"] = await phases.settle_and_measure_rss(daemon, n, base, 2.0 if opts.quick else 5)
    windows: dict[str, tuple[float, float]] = {}
    if opts.gc_freeze:
        print("  B: gc.freeze() in the daemon (SIGUSR1)", flush=True)
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGUSR1)
        await trio.sleep(3.0)
        out["rss_after_freeze_kib"] = rss_kib(daemon.pid)
    print(f"  B: idle CPU with {opts.tick} ticks ({opts.idle_window:g}s)", flush=True)
    profiler = None
    idle_profile = Path(opts.profile_dir or ".") / f"profile-idle-{tag}.txt"
    if opts.profile_dir:
        profiler = await _start_profile(daemon, idle_profile, opts.idle_window)
    started = time.time()
    out["idle_cpu"] = await phases.idle_cpu(pool, daemon, n, opts.idle_window)
    windows["idle"] = (started, time.time())
    if profiler is not None:
        await _wait_profile(profiler, idle_profile)
    rate = rate_for(n, opts)
    print(f"  B: latency ({rate:g} appends/s for {opts.latency_seconds:g}s)", flush=True)
    push_profile = Path(opts.profile_dir or ".") / f"profile-push-{tag}.txt"
    if opts.profile_dir:
        profiler = await _start_profile(daemon, push_profile, opts.latency_seconds + 1)
    started = time.time()
    out["latency"] = await phases.latency(
        pool,
        sink,
        daemon,
        [u for u, _ in rows],
        rate,
        opts.latency_seconds,
        10.0 if opts.quick else 20.0,
        rng,
    )
    windows["latency"] = (started, time.time())
    if profiler is not None:
        await _wait_profile(profiler, push_profile)
    out["rss_after_latency_kib"] = rss_kib(daemon.pid)
    k = len(new_rows)
    print("  B: reconcile", flush=True)
    out["reconcile"] = await phases.reconcile(
        pool, daemon, rows[k:], new_rows, rows[:k], _ramp_timeout(k, opts.high_rate, opts.tls)
    )
    await trio.sleep(1.0)
    print("  B: shutdown", flush=True)
    out["shutdown"] = await phases.shutdown(pool, daemon, n)
    out["log_lines"] = daemon.log_counts()
    if opts.gc_probe or opts.gc_freeze:
        out["gc"] = daemon.gc_summary(windows)
        out["gc_freeze"] = opts.gc_freeze
    return out


async def _daemon_c(
    n: int,
    opts: Options,
    workdir: Path,
    pool: ServerPool,
    sink: phases.Sink,
    rows: list[tuple[str, int]],
    base_env: dict[str, str],
    rng: random.Random,
) -> dict[str, Any]:
    """The soak: product defaults (2 min tick, 5 min refresh with its full GC) except the
    opened-up limiter, ``opts.soak`` seconds with mail arriving; then SIGTERM."""
    env = {
        **base_env,
        "TRIO_IDLE_CONNECT_CONCURRENCY": str(opts.high_concurrency),
        "TRIO_IDLE_CONNECT_RATE": str(opts.high_rate),
        "TRIO_IDLE_REFRESH_INTERVAL": opts.soak_refresh,
        "BENCH_STALL_PERIOD_MS": "20",
        "BENCH_STALL_LOG_MS": "5",
    }
    snapshots = workdir / f"tracemalloc-c-{n}"
    if opts.tracemalloc_every > 0:
        snapshots.mkdir(parents=True, exist_ok=True)
        env["BENCH_TRACEMALLOC_DIR"] = str(snapshots)
        env["BENCH_TRACEMALLOC_FRAMES"] = str(opts.tracemalloc_frames)
    b_state = workdir / f"daemon-b-{n}-state.sqlite3"
    restart = b_state.exists()
    # under gc_probe (the CLI unchanged, plus a log line per full collection) so the soak
    # reports the after-refresh collections' pauses and can force a last full one
    daemon = DaemonProc(
        workdir, f"daemon-c-{n}", env, "bench.gc_probe", state_from=b_state if restart else None
    )
    try:
        await daemon.start()
        out: dict[str, Any] = {
            "refresh": opts.soak_refresh,
            "tick": "2m",
            "state": "restart" if restart else "new",
            "tracemalloc_every_s": opts.tracemalloc_every or None,
        }
        base = rss_kib(daemon.pid)
        startup = sink.reasons.get("startup", 0)
        print("  C: ramp", flush=True)
        limit = _ramp_timeout(n, opts.high_rate, opts.tls)
        out["ramp"] = await phases.ramp(pool, daemon, rows, limit)
        out["catch_up"] = await phases.catch_up(
            sink, daemon, startup, 0 if restart else n, 0 if restart else limit
        )
        out["memory"] = await phases.settle_and_measure_rss(daemon, n, base, 5.0)
        print(f"  C: soak ({opts.soak:g}s, {opts.soak_rate:g} appends/s)", flush=True)
        started = time.time()
        async with trio.open_nursery() as nursery:
            if opts.tracemalloc_every > 0:
                nursery.start_soon(_tracemalloc_snapshots, daemon, opts)
            out["soak"] = await phases.soak(
                pool,
                sink,
                daemon,
                [u for u, _ in rows],
                opts.soak_rate,
                opts.soak,
                rng,
                sample_every=opts.soak_sample,
            )
            nursery.cancel_scope.cancel()
        ended = time.time()
        soak = out["soak"]
        soak["growth"] = rss_growth(soak["samples_t_rss_kib_cpu_s"], opts.soak_warmup)
        soak["stalls"] = stalls_in(daemon.stalls(), started, ended, 5.0)
        if opts.tracemalloc_every > 0:
            soak["tracemalloc"] = await _tracemalloc_report(daemon, snapshots)
        soak["gc"] = await phases.soak_gc(daemon, started, time.time())
        print("  C: shutdown", flush=True)
        out["shutdown"] = await phases.shutdown(pool, daemon, n)
        out["log_lines"] = daemon.log_counts()
        return out
    finally:
        daemon.kill()


def _signal(daemon: DaemonProc, signum: int) -> None:
    assert daemon.process is not None
    daemon.process.send_signal(signum)


async def _tracemalloc_snapshots(daemon: DaemonProc, opts: Options) -> None:
    """SIGUSR1 at the warm-up (tracing starts; at once if the soak is shorter), then every
    ``tracemalloc_every`` seconds (a snapshot each), until cancelled."""
    warmup = opts.soak_warmup if opts.soak_warmup < opts.soak else 0.0
    await trio.sleep(warmup)
    _signal(daemon, signal.SIGUSR1)
    while True:
        await trio.sleep(opts.tracemalloc_every)
        _signal(daemon, signal.SIGUSR1)


async def _tracemalloc_report(daemon: DaemonProc, directory: Path) -> dict[str, Any]:
    """One last snapshot, then what grew between the first snapshot and it."""
    before = len(daemon.snapshots())
    _signal(daemon, signal.SIGUSR1)
    with trio.move_on_after(300):  # a snapshot of 10,000 sessions takes a while
        while len(daemon.snapshots()) <= before:  # noqa: ASYNC110 - another process's log
            await trio.sleep(0.5)
    taken = daemon.snapshots()
    out: dict[str, Any] = {"snapshots": taken, "directory": str(directory), "top": []}
    if len(taken) >= 2:
        first, last = Path(taken[0]["path"]), Path(taken[-1]["path"])
        out["top"] = await trio.to_thread.run_sync(tracemalloc_diff, first, last)
        out["between_s"] = round(taken[-1]["at"] - taken[0]["at"], 1)
    return out


def _key(run: dict[str, Any]) -> tuple[Any, ...]:
    return (run["n"], run["tls"], run["log_level"], run["quick"])


def merge_results(path: Path, runs: list[dict[str, Any]], fresh: bool) -> dict[str, Any]:
    """Add ``runs`` to the results file (a run replaces one with the same N/TLS/log/quick)."""
    old: list[dict[str, Any]] = []
    if path.exists() and not fresh:
        old = json.loads(path.read_text()).get("runs", [])
    new_keys = {_key(r) for r in runs}
    merged = [r for r in old if _key(r) not in new_keys] + runs
    merged.sort(key=lambda r: (r["quick"], r["tls"], r["log_level"] != "WARNING", r["n"]))
    return {
        "updated_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "runs": merged,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the real trio-idle daemon process against test IMAP server "
        "processes: ramp, memory, idle CPU, push→webhook latency, reconcile, shutdown.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="N=200 and a few seconds per phase (proves the harness works)",
    )
    p.add_argument("--n", default=None, help="comma-separated session counts (100,1000,10000)")
    p.add_argument("--tls", action="store_true", help="implicit TLS with a trustme CA")
    p.add_argument("--plot", action="store_true", help=f"write {DEFAULT_PLOT} from the results")
    p.add_argument("--plot-only", action="store_true", help="only redraw the plot")
    p.add_argument(
        "--markdown", action="store_true", help="only print the results as a markdown table"
    )
    p.add_argument("--plot-path", default=DEFAULT_PLOT)
    p.add_argument("--out", default=DEFAULT_OUT, help="results JSON (runs are merged in)")
    p.add_argument("--fresh", action="store_true", help="replace the results file")
    p.add_argument("--log-level", default="WARNING", help="daemon TRIO_IDLE_LOG_LEVEL")
    p.add_argument(
        "--idle-window",
        type=float,
        default=None,
        help="seconds of idle CPU measurement with ticks (default 130; with --compare "
        "one tick interval; quick 3)",
    )
    p.add_argument(
        "--idle-window-notick",
        type=float,
        default=None,
        help="seconds of idle CPU measurement without ticks (default 60, quick 3)",
    )
    p.add_argument(
        "--latency-seconds",
        type=float,
        default=None,
        help="seconds of appends (default 20, quick 3)",
    )
    p.add_argument(
        "--rate",
        type=float,
        default=200.0,
        help="appends/s at N=10000, scaled linearly with N (default 200)",
    )
    p.add_argument("--min-rate", type=float, default=10.0, help="lowest appends/s (default 10)")
    p.add_argument("--high-concurrency", type=int, default=200)
    p.add_argument("--high-rate", type=float, default=2000.0)
    p.add_argument(
        "--keepalive",
        type=float,
        default=120.0,
        help="server '* OK Still here' interval (Dovecot: 120)",
    )
    p.add_argument(
        "--per-server", type=int, default=8000, help="max accounts per IMAP server process"
    )
    p.add_argument(
        "--daemon-env",
        action="append",
        default=[],
        metavar="TRIO_IDLE_X=VALUE",
        help="with --compare: one more setting for trio-idle (repeatable; an A/B of one setting)",
    )
    p.add_argument(
        "--coalesce-replies",
        action="store_true",
        help="with --compare: the IMAP servers answer commands that arrived together in "
        "one write (a server flushing once per read of pipelined commands)",
    )
    p.add_argument("--churn", type=float, default=0.1, help="reconcile fraction (0.1)")
    p.add_argument(
        "--skip-default", action="store_true", help="skip daemon A (default limiter, no ticks)"
    )
    p.add_argument(
        "--profile",
        metavar="DIR",
        default=None,
        help="py-spy record daemon B's idle and push phases into DIR",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--gc-probe",
        action="store_true",
        help="run daemon B under bench.gc_probe (logs full GC passes)",
    )
    p.add_argument(
        "--gc-freeze",
        action="store_true",
        help="like --gc-probe, and gc.freeze() in daemon B after its ramp (experiment)",
    )
    p.add_argument(
        "--tick",
        default="2m",
        help="daemon B's tick interval (default 2m; shorter ones measure the cost of a tick)",
    )
    p.add_argument(
        "--soak",
        type=float,
        default=0.0,
        help="at the largest N, then hold the sessions this many seconds in a third daemon "
        "with product defaults (2 min tick, 5 min refresh) and mail arriving; 0 = skip",
    )
    p.add_argument("--soak-rate", type=float, default=20.0, help="appends/s during the soak")
    p.add_argument(
        "--soak-refresh",
        default="5m",
        help="daemon C's refresh interval (product default 5m; each refresh collects garbage)",
    )
    p.add_argument(
        "--soak-sample", type=float, default=30.0, help="seconds between RSS samples (30)"
    )
    p.add_argument(
        "--soak-warmup",
        type=float,
        default=600.0,
        help="seconds of the soak left out of its RSS growth per hour (600)",
    )
    p.add_argument(
        "--soak-only",
        action="store_true",
        help="run only the soak daemon (no A, no B; it starts on a new state file)",
    )
    p.add_argument(
        "--tracemalloc",
        action="store_true",
        help="trace the soak daemon's allocations from the warm-up on (slower, more memory), "
        "snapshots in the workdir, and print what grew by file:line",
    )
    p.add_argument(
        "--tracemalloc-every",
        type=float,
        default=600.0,
        help="seconds between tracemalloc snapshots with --tracemalloc (600)",
    )
    p.add_argument(
        "--tracemalloc-frames", type=int, default=1, help="frames kept per allocation (1)"
    )
    p.add_argument("--workdir", default=None, help="keep logs and files here (default: temp)")
    c = p.add_argument_group(
        "side by side with the Node stack (--compare)",
        "trio-idle and the Node + imapflow baseline (bench/node_baseline, installed with "
        "npm ci) one after the other against the same IMAP server processes and sink; "
        "prints the trio-idle / Node ratios as markdown. Uses --n (default 1000,5000), "
        "--tls, --quick, --keepalive, --tick, --idle-window (default 130), "
        "--latency-seconds (default 20), --high-concurrency, --high-rate, --seed.",
    )
    c.add_argument("--compare", action="store_true", help="run the side-by-side comparison")
    c.add_argument(
        "--security",
        default=None,
        help="comma-separated modes for --compare: plain, tls (default plain,tls; "
        "--tls alone means tls)",
    )
    c.add_argument(
        "--compare-rate", type=float, default=20.0, help="appends/s in the latency phase (20)"
    )
    c.add_argument(
        "--grace", type=float, default=None, help="seconds to wait for late POSTs (20, quick 5)"
    )
    c.add_argument("--compare-out", default=DEFAULT_COMPARE_OUT, help="the comparison's JSON")
    c.add_argument(
        "--compare-markdown",
        action="store_true",
        help="only print the comparison tables from --compare-out",
    )
    c.add_argument(
        "--compare-plot",
        default=DEFAULT_COMPARE_PLOT,
        help="the comparison's plot, written after --compare with --plot (or --plot-only)",
    )
    c.add_argument(
        "--stall-period",
        type=float,
        default=20.0,
        help="ms: the loop-stall probe's timer in both programs (20)",
    )
    c.add_argument(
        "--settle-refresh",
        action="store_true",
        help="SIGHUP both once after the ramp too, so the refresh inside the latency window "
        "is a steady-state one (not trio-idle's first full collection after the ramp)",
    )
    c.add_argument(
        "--stacks",
        default="node,trio_idle",
        help="comma-separated programs to run: node, trio_idle (one alone: a before/after "
        "of that program with the same phases; ratios need both)",
    )
    c.add_argument(
        "--no-refresh",
        action="store_true",
        help="do not SIGHUP both programs half-way through the appends",
    )
    return p


def check_profiler(profile_dir: str | None) -> str | None:
    """The py-spy executable for ``--profile`` (None without it); raises SystemExit with
    the reason when py-spy is missing or cannot run, rather than profiling nothing."""
    if profile_dir is None:
        return None
    import shutil

    # a venv's scripts are not on PATH unless it is activated: look beside python too
    beside = Path(sys.executable).parent / "py-spy"
    exe = shutil.which("py-spy") or (str(beside) if beside.exists() else None)
    if exe is None:
        raise SystemExit(
            "--profile: py-spy not found on PATH or beside "
            f"{sys.executable} (pip install py-spy, or drop --profile)"
        )
    done = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise SystemExit(f"--profile: {exe} --version failed: {done.stderr.strip()[-300:]}")
    Path(profile_dir).mkdir(parents=True, exist_ok=True)
    return exe


def _compare_main(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """``--compare``: both stacks, then the markdown ratio tables."""
    from bench import compare
    from bench.node_proc import NodeUnavailable, ensure_installed

    out = Path(args.compare_out)
    if args.compare_markdown:
        print(compare.markdown(json.loads(out.read_text())["runs"]), end="")
        return 0
    if args.plot_only:
        make_compare_plot(json.loads(out.read_text())["runs"], Path(args.compare_plot))
        print(f"plot written to {args.compare_plot}")
        return 0
    quick = args.quick
    default_sizes = "50" if quick else "1000,5000"
    sizes = tuple(int(x) for x in (args.n or default_sizes).split(",") if x.strip())
    modes_text = args.security or ("tls" if args.tls else ("plain" if quick else "plain,tls"))
    modes = tuple(m.strip() for m in modes_text.split(",") if m.strip())
    bad = [m for m in modes if m not in ("plain", "tls")]
    if bad or not modes:
        print(f"--security: expected plain and/or tls, got {modes_text!r}", file=sys.stderr)
        return 2
    stacks = tuple(x.strip() for x in args.stacks.split(",") if x.strip())
    if not stacks or any(x not in compare.STACKS for x in stacks):
        print(f"--stacks: expected node and/or trio_idle, got {args.stacks!r}", file=sys.stderr)
        return 2
    try:
        if "node" in stacks:
            ensure_installed()
    except NodeUnavailable as exc:
        print(f"--compare: {exc}", file=sys.stderr)
        return 2
    opts = compare.CompareOptions(
        sizes=sizes,
        modes=modes,
        quick=quick,
        # exactly one tick interval: each program sends one NOOP per session in the
        # window whatever the phases of its ticks (130 s windows counted 10,000 NOOPs for
        # the baseline and 10,250-10,740 for trio-idle, whose ramp spreads its phases)
        idle_window=args.idle_window or (3.0 if quick else tick_ms(args.tick) / 1000),
        latency_seconds=args.latency_seconds or (3.0 if quick else 20.0),
        rate=args.compare_rate,
        grace=args.grace or (5.0 if quick else 20.0),
        keepalive=args.keepalive,
        tick=args.tick,
        concurrency=args.high_concurrency,
        connect_rate=args.high_rate,
        per_server=args.per_server,
        seed=args.seed,
        settle=2.0 if quick else 5.0,
        # imapflow waits 15 s after its last command before IDLE: too long for a check
        node_idle_delay_ms=200 if quick else None,
        coalesce_replies=args.coalesce_replies,
        daemon_env=tuple(_setting(item) for item in args.daemon_env),
        stall_period_ms=args.stall_period,
        refresh_midway=not args.no_refresh,
        settle_refresh=args.settle_refresh,
        stacks=stacks,
        command=" ".join(["python -m bench", *map(shlex.quote, argv)]),
    )
    limit = raise_nofile_limit()
    print(f"RLIMIT_NOFILE soft limit: {limit}", flush=True)
    problem = compare.check_fd_limit(sizes, args.per_server, limit)
    if problem:
        print(f"--compare: {problem}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        runs = trio.run(compare.run_all, opts, workdir, out)
    else:
        with tempfile.TemporaryDirectory(prefix="trio-idle-compare-") as tmp:
            runs = trio.run(compare.run_all, opts, Path(tmp), out)
    print()
    print(compare.markdown(runs), end="")
    print(f"\nresults: {out}  ({time.perf_counter() - started:.0f}s)")
    if args.plot:
        make_compare_plot(json.loads(out.read_text())["runs"], Path(args.compare_plot))
        print(f"plot: {args.compare_plot}")
    return 0


async def _run_all(opts: Options, workdir: Path, out: Path, fresh: bool) -> list[dict[str, Any]]:
    """Every N in turn; the results file is rewritten after each one (a crash keeps them)."""
    rng = random.Random(opts.seed)
    runs: list[dict[str, Any]] = []
    for n in opts.sizes:
        sub = workdir / f"n{n}-{'tls' if opts.tls else 'plain'}"
        sub.mkdir(parents=True, exist_ok=True)
        runs.append(await run_config(n, opts, sub, rng))
        write_results(out, runs, fresh)
    return runs


def write_results(out: Path, runs: list[dict[str, Any]], fresh: bool) -> dict[str, Any]:
    """Merge ``runs`` into ``out`` and write it; return the merged data."""
    data = merge_results(out, runs, fresh)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")
    return data


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.compare or args.compare_markdown:
        return _compare_main(args, argv)
    check_profiler(args.profile)
    out = Path(args.out)
    if args.markdown:
        print(markdown_table(json.loads(out.read_text())["runs"]))
        return 0
    if args.plot_only:
        data = json.loads(out.read_text())
        make_plot(data["runs"], Path(args.plot_path))
        print(f"plot written to {args.plot_path}")
        return 0
    quick = args.quick
    sizes = (
        (200,)
        if quick and args.n is None
        else tuple(int(x) for x in (args.n or "100,1000,10000").split(",") if x.strip())
    )
    opts = Options(
        sizes=sizes,
        tls=args.tls,
        quick=quick,
        log_level=args.log_level.upper(),
        idle_window=args.idle_window or (3.0 if quick else 120.0),
        idle_window_notick=args.idle_window_notick or (3.0 if quick else 60.0),
        latency_seconds=args.latency_seconds or (3.0 if quick else 20.0),
        rate_at_10k=args.rate,
        min_rate=args.min_rate,
        high_concurrency=args.high_concurrency,
        high_rate=args.high_rate,
        keepalive=args.keepalive,
        per_server=args.per_server,
        churn=args.churn,
        skip_default=args.skip_default,
        profile_dir=args.profile,
        seed=args.seed,
        gc_probe=args.gc_probe,
        gc_freeze=args.gc_freeze,
        tick=args.tick,
        soak=args.soak,
        soak_rate=args.soak_rate,
        soak_refresh=args.soak_refresh,
        soak_sample=args.soak_sample,
        soak_warmup=args.soak_warmup,
        soak_only=args.soak_only,
        tracemalloc_every=args.tracemalloc_every if args.tracemalloc else 0.0,
        tracemalloc_frames=args.tracemalloc_frames,
    )
    if opts.soak_only and opts.soak <= 0:
        print("--soak-only needs --soak SECONDS", file=sys.stderr)
        return 2
    if opts.tracemalloc_every and (opts.soak <= 0 or opts.tracemalloc_every <= 0):
        print("--tracemalloc needs --soak SECONDS and --tracemalloc-every > 0", file=sys.stderr)
        return 2
    limit = raise_nofile_limit()
    print(f"RLIMIT_NOFILE soft limit: {limit}", flush=True)
    started = time.perf_counter()
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        runs = trio.run(_run_all, opts, workdir, out, args.fresh)
    else:
        with tempfile.TemporaryDirectory(prefix="trio-idle-bench-") as tmp:
            runs = trio.run(_run_all, opts, Path(tmp), out, args.fresh)
    data = write_results(out, runs, args.fresh)
    print()
    print(format_table(runs))
    print(f"\nresults: {out}  ({time.perf_counter() - started:.0f}s)")
    if args.plot:
        make_plot(data["runs"], Path(args.plot_path))
        print(f"plot: {args.plot_path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


def _setting(item: str) -> tuple[str, str]:
    """``--daemon-env``'s ``TRIO_IDLE_X=VALUE``; a clear error for anything else."""
    key, eq, value = item.partition("=")
    if not eq or not key.startswith("TRIO_IDLE_"):
        raise SystemExit(f"--daemon-env: expected TRIO_IDLE_<NAME>=<value>, got {item!r}")
    return key, value
