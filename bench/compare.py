"""``python -m bench --compare``: trio-idle side by side with the Node + imapflow baseline.

For each security mode (plaintext, TLS) and each N, one set of benchmark IMAP server
processes (:mod:`bench.imap_proc`, keepalive every ``--keepalive`` s) and one scan sink
serve both programs, one after the other:

1. the Node baseline (:mod:`bench.node_proc`, the original daemon's stack);
2. ``trio-idle serve`` on a new state file (its startup catch-up scans are waited for
   before anything is measured), limiter opened up like daemon B.

Both get the same mailboxes (SIGHUP), the same connect concurrency, the same tick, the same
idle window and the same sequence of appends with the same SIGHUP half-way through them
(trio-idle refreshes its list and collects garbage, the baseline re-reads its list), and
both are measured from outside the same way: RSS (``VmRSS``) before and after the ramp,
CPU (``utime + stime`` from ``/proc/PID/stat``) over the idle window with the NOOPs the
server saw, push latency from the server building ``* n EXISTS`` to the sink receiving
the POST, and missed pushes (appends with no POST for that mailbox after them, after the
grace period). The one in-process figure is the loop stall: both run the same probe (a
``--stall-period`` ms timer, how late it fires; :mod:`bench.loop_probe` and
``bench/node_baseline/index.js``), logged with wall times and cut per phase here.

The ratios are trio-idle / Node: below 1 means trio-idle spends less (or is faster).
"""

from __future__ import annotations

import datetime
import json
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import attrs
import trio

from bench import phases
from bench.loop_probe import COARSE_MS, TOGGLE_SIGNAL, stalls_in
from bench.node_proc import NodeProc, imapflow_version, node_version, tick_ms
from bench.procinfo import machine_info, rss_kib
from bench.procs import ADMIN_SECRET, DaemonProc, MeasuredProc, ServerPool, ServerProc

STACKS = ("node", "trio_idle")
#: what a pair records of the Node stack whether it ran or not (``--stacks trio_idle``)
NODE_VERSIONS: Final = frozenset({"version", "imapflow"})
LABELS = {"node": "Node + imapflow", "trio_idle": "trio-idle"}


@attrs.frozen
class CompareOptions:
    """One ``--compare`` run, from the command line."""

    sizes: tuple[int, ...]
    modes: tuple[str, ...]
    quick: bool
    idle_window: float
    latency_seconds: float
    rate: float
    grace: float
    keepalive: float
    tick: str
    concurrency: int
    connect_rate: float
    per_server: int
    seed: int
    settle: float
    #: the baseline's imapflow ``autoIdleDelay`` in ms (None: imapflow's default, 15 s)
    node_idle_delay_ms: int | None = None
    #: the IMAP server processes answer commands that arrived together in one write, as a
    #: server that handles one read's pipelined commands before flushing its output does
    #: (``coalesce_replies`` in bench.imap_proc; off: one write per answer). Fair
    #: to both stacks: imapflow sends each command after the previous answer, so it
    #: gets one write per answer either way; trio-idle pipelines DONE/NOOP/IDLE.
    coalesce_replies: bool = False
    #: extra ``TRIO_IDLE_*`` settings for the daemon (an A/B of one setting)
    daemon_env: tuple[tuple[str, str], ...] = ()
    #: the loop-stall probe of both programs: timer period, and the lateness worth a line
    stall_period_ms: float = 20.0
    stall_log_ms: float = 5.0
    #: SIGHUP both programs half-way through the appends (a refresh inside the window)
    refresh_midway: bool = True
    #: also SIGHUP both once right after the ramp, outside every window: the refresh in
    #: the latency window is then a steady-state one (trio-idle: a collection of what is
    #: new since, not the first full one after the ramp's churn)
    settle_refresh: bool = False
    #: the command line, recorded with every pair (the figures name their command)
    command: str = ""
    #: which programs to run (both for a comparison; one for a before/after of either)
    stacks: tuple[str, ...] = STACKS


def _tls_files(workdir: Path) -> tuple[tuple[str, str], str]:
    from bench.harness import _tls_files as make

    return make(workdir)


async def _serve_sink(sink: phases.Sink, *, task_status: trio.TaskStatus[None]) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.backend.serve)
        task_status.started()


#: the slowest ramp (sessions/s) a run is allowed before it counts as stuck: the TLS
#: handshakes of both sides share the 2 cores (Node at 10,000 TLS sessions: ≈ 100/s)
SLOWEST_RAMP = {False: 100.0, True: 40.0}


def ramp_limit(n: int, tls: bool, opts: CompareOptions) -> float:
    """Seconds the ramp (and the startup catch-up) of N sessions may take."""
    # the baseline enters IDLE only after imapflow's auto-IDLE delay (15 s by default)
    limiter = n / min(opts.connect_rate, opts.concurrency * 20) * 3
    return max(limiter, n / SLOWEST_RAMP[tls]) + 90


def check_fd_limit(sizes: Sequence[int], per_server: int, soft_limit: int) -> str | None:
    """Why the largest N cannot run under ``soft_limit`` descriptors per process (every
    process under test holds one socket per session, a server process one per account
    it serves), or None."""
    need = max(max(sizes, default=0), min(per_server, max(sizes, default=0))) + 256
    if need > soft_limit:
        return (
            f"N={max(sizes):,} needs about {need:,} open files per process, "
            f"RLIMIT_NOFILE is {soft_limit:,} (raise the hard limit: ulimit -Hn)"
        )
    return None


async def run_pair(n: int, tls: bool, opts: CompareOptions, workdir: Path) -> dict[str, Any]:
    """Both stacks against one set of server processes for N mailboxes; one record."""
    users = [f"c{i:05d}@bench.test" for i in range(n)]
    n_servers = max(1, math.ceil(n / opts.per_server))
    groups: list[list[str]] = [[] for _ in range(n_servers)]
    for i, user in enumerate(users):
        groups[i % n_servers].append(user)
    tls_files, ca_path = _tls_files(workdir) if tls else (None, None)
    servers = [ServerProc(i, g) for i, g in enumerate(groups)]
    pool = ServerPool(servers)
    sink = phases.Sink(ADMIN_SECRET)
    # the baseline sends the original's headers (no trio-idle user agent, no scan id):
    # the sink records every authorised POST instead of answering 400
    sink.backend.strict = False
    result: dict[str, Any] = {
        "n": n,
        "tls": tls,
        "quick": opts.quick,
        "compare": True,
        "command": opts.command,
        "server_processes": n_servers,
        "started_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "node": {"version": node_version(), "imapflow": imapflow_version()},
        "settings": {
            "keepalive_s": opts.keepalive,
            "tick": opts.tick,
            "connect_concurrency": opts.concurrency,
            "trio_idle_connect_rate": opts.connect_rate,
            "idle_window_s": opts.idle_window,
            "latency_rate_per_s": opts.rate,
            "latency_seconds": opts.latency_seconds,
            "grace_s": opts.grace,
            "node_idle_delay_ms": opts.node_idle_delay_ms,
            "coalesce_replies": opts.coalesce_replies,
            "daemon_env": dict(opts.daemon_env),
            "stall_period_ms": opts.stall_period_ms,
            "stall_log_ms": opts.stall_log_ms,
            "refresh_midway": opts.refresh_midway,
            "settle_refresh": opts.settle_refresh,
            "ramp_limit_s": ramp_limit(n, tls, opts),
            "order": list(opts.stacks),
        },
    }
    print(f"== compare N={n} {'tls' if tls else 'plain'} ({n_servers} server process(es))")
    async with trio.open_nursery() as nursery:
        await nursery.start(_serve_sink, sink)
        try:
            extra = {"coalesce_replies": True} if opts.coalesce_replies else None
            for s in servers:
                await s.start(workdir, opts.keepalive, tls_files, extra)
            port_of = {u: (s.tls_port if tls else s.port) for s in servers for u in s.users}
            rows = [(u, port_of[u]) for u in users]
            node_env = {
                "BACKEND_URL": sink.backend.url,
                "IMAP_TLS": "1" if tls else "0",
                "TICK_MS": str(tick_ms(opts.tick)),
                "CONNECT_CONCURRENCY": str(opts.concurrency),
                "STALL_PERIOD_MS": str(opts.stall_period_ms),
                "STALL_LOG_MS": str(opts.stall_log_ms),
            }
            if ca_path:
                node_env["IMAP_CA_FILE"] = ca_path
            if opts.node_idle_delay_ms is not None:
                node_env["AUTO_IDLE_DELAY_MS"] = str(opts.node_idle_delay_ms)
            node = NodeProc(workdir, f"node-{n}", node_env)
            if "node" in opts.stacks:
                result["node"].update(await _measure("node", node, n, tls, rows, pool, sink, opts))
            daemon_env = {
                "BACKEND_URL": sink.backend.url,
                "TRIO_IDLE_IMAP_SECURITY": "tls" if tls else "plain",
                "TRIO_IDLE_LOG_LEVEL": "WARNING",
                "TRIO_IDLE_CATCHUP_RATE": str(opts.connect_rate),
                "TRIO_IDLE_CONNECT_CONCURRENCY": str(opts.concurrency),
                "TRIO_IDLE_CONNECT_RATE": str(opts.connect_rate),
                "TRIO_IDLE_TICK_INTERVAL": opts.tick,
                "BENCH_STALL_PERIOD_MS": str(opts.stall_period_ms),
                "BENCH_STALL_LOG_MS": str(opts.stall_log_ms),
            }
            if ca_path:
                daemon_env["TRIO_IDLE_CA_FILE"] = ca_path
            daemon_env.update(opts.daemon_env)
            # the CLI unchanged, plus the stall probe beside it (bench.loop_probe, which
            # bench.gc_probe installs) and a line per full collection: what a stall was
            daemon = DaemonProc(workdir, f"trio-idle-{n}", daemon_env, "bench.gc_probe")
            if "trio_idle" in opts.stacks:
                result["trio_idle"] = await _measure(
                    "trio_idle", daemon, n, tls, rows, pool, sink, opts
                )
            result["server_rss_kib"] = (await pool.totals())["rss_kib"]
        finally:
            with trio.CancelScope(shield=True):
                await pool.stop()
            nursery.cancel_scope.cancel()
    return result


async def _measure(
    kind: str,
    proc: NodeProc | DaemonProc,
    n: int,
    tls: bool,
    rows: list[tuple[str, int]],
    pool: ServerPool,
    sink: phases.Sink,
    opts: CompareOptions,
) -> dict[str, Any]:
    """The phases for one stack; the process is gone when this returns."""
    label = LABELS[kind]
    measured: MeasuredProc = proc
    limit = ramp_limit(n, tls, opts)
    try:
        await proc.start()
        out: dict[str, Any] = {}
        base = rss_kib(proc.pid)
        reasons_before = dict(sink.reasons)
        print(f"  {label}: ramp", flush=True)
        startup = sink.reasons.get("startup", 0)
        windows: dict[str, tuple[float, float]] = {}
        t_ramp = time.time()
        out["ramp"] = await phases.ramp(pool, measured, rows, limit)
        if not out["ramp"]["all_idle"]:
            print(
                f"  {label}: ramp INCOMPLETE after {limit:.0f}s "
                f"({out['ramp']['reached_idle']:,} of {n:,} in IDLE)",
                flush=True,
            )
        if kind == "trio_idle":
            # a new state file: one startup scan per mailbox, over before the idle window
            out["catch_up"] = await phases.catch_up(sink, measured, startup, n, limit)
        out["memory"] = await phases.settle_and_measure_rss(measured, n, base, opts.settle)
        if opts.settle_refresh:
            print(f"  {label}: a refresh (SIGHUP) before the idle window", flush=True)
            measured.set_rows(rows)
            await trio.sleep(opts.settle)
        windows["ramp"] = (t_ramp, time.time())
        print(f"  {label}: idle CPU ({opts.idle_window:g}s, tick {opts.tick})", flush=True)
        # the probe's 20 ms wake-ups would be a good part of idle CPU: coarse meanwhile
        assert proc.process is not None
        proc.process.send_signal(TOGGLE_SIGNAL)
        t_idle = time.time()
        out["idle_cpu"] = await phases.idle_cpu(pool, measured, n, opts.idle_window)
        windows["idle"] = (t_idle, time.time())
        proc.process.send_signal(TOGGLE_SIGNAL)
        refresh = " with a SIGHUP half-way" if opts.refresh_midway else ""
        print(
            f"  {label}: latency ({opts.rate:g} appends/s for {opts.latency_seconds:g}s{refresh})",
            flush=True,
        )
        t_latency = time.time()
        # the same append sequence for both stacks, the same list on the SIGHUP
        out["latency"] = await phases.latency(
            pool,
            sink,
            measured,
            [u for u, _ in rows],
            opts.rate,
            opts.latency_seconds,
            opts.grace,
            random.Random(opts.seed),
            midway=(lambda: measured.set_rows(rows)) if opts.refresh_midway else None,
        )
        windows["latency"] = (t_latency, time.time())
        out["rss_after_latency_kib"] = rss_kib(proc.pid)
        if isinstance(proc, NodeProc):
            out["event_loop_delay"] = await proc.event_loop_delay()
        out["stalls"] = stall_summary(
            proc.stalls(), windows, out["latency"].get("midway_at"), opts.stall_log_ms
        )
        out["stalls"]["period_ms"] = opts.stall_period_ms
        out["stalls"]["idle_period_ms"] = COARSE_MS
        if isinstance(proc, DaemonProc):
            out["gc"] = proc.gc_summary(windows)
            refresh_at = out["latency"].get("midway_at")
            if refresh_at is not None:
                out["gc"]["refresh"] = proc.gc_summary(
                    {"refresh": (refresh_at, refresh_at + REFRESH_WINDOW)}
                )["refresh"]
        out["shutdown"] = await phases.shutdown(pool, measured, n)
        out["scan_reasons"] = {
            k: v - reasons_before.get(k, 0)
            for k, v in sink.reasons.items()
            if v - reasons_before.get(k, 0)
        }
        if isinstance(proc, NodeProc):
            out["error_lines"] = proc.error_lines()
        else:
            out["log_lines"] = proc.log_counts()
        return out
    finally:
        proc.kill()


#: seconds after the mid-window SIGHUP counted as "the refresh" (its collection included)
REFRESH_WINDOW = 5.0


def stall_summary(
    stalls: Sequence[tuple[float, float]],
    windows: dict[str, tuple[float, float]],
    refresh_at: float | None,
    log_above_ms: float,
) -> dict[str, Any]:
    """The longest stall per phase (``ramp``, ``idle``, ``latency``), over the whole run
    (``run``: ramp to the end of the pushes) and after the ramp (``steady``: idle window
    and pushes, the refresh included); ``refresh``: the first seconds after the SIGHUP."""
    out: dict[str, Any] = {
        name: stalls_in(stalls, a, b, log_above_ms) for name, (a, b) in windows.items()
    }
    if windows:
        first = min(a for a, _ in windows.values())
        last = max(b for _, b in windows.values())
        out["run"] = stalls_in(stalls, first, last, log_above_ms)
        after_ramp = [w for k, w in windows.items() if k != "ramp"]
        if after_ramp:
            out["steady"] = stalls_in(stalls, min(a for a, _ in after_ramp), last, log_above_ms)
    if refresh_at is not None:
        out["refresh"] = stalls_in(stalls, refresh_at, refresh_at + REFRESH_WINDOW, log_above_ms)
    out["log_above_ms"] = log_above_ms
    return out


async def run_all(opts: CompareOptions, workdir: Path, out: Path) -> list[dict[str, Any]]:
    """Every mode and N in turn; ``out`` is rewritten after each pair (a crash keeps them)."""
    runs: list[dict[str, Any]] = []
    for mode in opts.modes:
        for n in opts.sizes:
            sub = workdir / f"compare-n{n}-{mode}"
            sub.mkdir(parents=True, exist_ok=True)
            runs.append(await run_pair(n, mode == "tls", opts, sub))
            write_results(out, runs)
    return runs


def write_results(out: Path, runs: list[dict[str, Any]]) -> None:
    """The comparison's JSON: the machine and every pair (replaced, never merged)."""
    data = {
        "updated_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "runs": runs,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")


# ---- the ratio table ------------------------------------------------------------------------


def _get(record: Any, *path: str) -> Any:
    for part in path:
        if not isinstance(record, dict) or part not in record:
            return None
        record = record[part]
    return record


def ratio(trio_value: Any, node_value: Any) -> float | None:
    """trio-idle / Node, None if either is missing or Node's is not positive."""
    if not isinstance(trio_value, int | float) or not isinstance(node_value, int | float):
        return None
    if node_value <= 0:
        return None
    return float(trio_value) / float(node_value)


def _num(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def _times(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def growth_per_session(runs: Sequence[dict[str, Any]], stack: str, tls: bool) -> float | None:
    """KiB per added session between the smallest and the largest N of one mode:
    (RSS after the ramp at N₂ − at N₁) / (N₂ − N₁); None with fewer than two sizes."""
    chosen = sorted((r for r in runs if r["tls"] == tls), key=lambda r: r["n"])
    if len(chosen) < 2:
        return None
    lo, hi = chosen[0], chosen[-1]
    a, b = _get(lo, stack, "memory", "rss_kib"), _get(hi, stack, "memory", "rss_kib")
    if a is None or b is None or hi["n"] == lo["n"]:
        return None
    return float((b - a) / (hi["n"] - lo["n"]))


def rows_for(run: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """``(measure, Node, trio-idle, trio-idle / Node)`` for one pair."""
    node, ours = run.get("node", {}), run.get("trio_idle", {})

    def both(*path: str, digits: int = 1) -> tuple[str, str, float | None]:
        a, b = _get(node, *path), _get(ours, *path)
        return _num(a, digits), _num(b, digits), ratio(b, a)

    out: list[tuple[str, str, str, str]] = []
    a, b, r = both("memory", "per_session_kib")
    out.append(("memory per session (RSS after the ramp − before, / N), KiB", a, b, _times(r)))
    a, b, r = both("idle_cpu", "pct_of_one_core", digits=2)
    window = _get(ours, "idle_cpu", "window_s") or _get(node, "idle_cpu", "window_s")
    noops = (_num(_get(node, "idle_cpu", "noops")), _num(_get(ours, "idle_cpu", "noops")))
    out.append(
        (
            f"idle CPU over {_num(window, 0)} s, % of one core (NOOPs the server saw)",
            f"{a} ({noops[0]})",
            f"{b} ({noops[1]})",
            _times(r),
        )
    )
    refreshed = _get(ours, "latency", "midway_at") or _get(node, "latency", "midway_at")
    during = " (a refresh half-way)" if refreshed else ""
    for key, name in (("p50_ms", "p50"), ("p99_ms", "p99"), ("max_ms", "max")):
        a, b, r = both("latency", key)
        out.append((f"push → webhook {name}{during}, ms", a, b, _times(r)))
    missed = []
    for rec in (node, ours):
        m, total = _get(rec, "latency", "missed"), _get(rec, "latency", "appends")
        missed.append(f"{_num(m)} of {_num(total)}")
    out.append(("pushes with no webhook call", missed[0], missed[1], "–"))
    a, b, r = both("ramp", "seconds")
    out.append(("ramp: SIGHUP → every session in IDLE, s", a, b, _times(r)))
    for key, name in (
        ("latency", "during the pushes (refresh included)"),
        ("refresh", f"within {REFRESH_WINDOW:g} s of the refresh (SIGHUP)"),
        ("idle", f"in the idle window ({COARSE_MS:g} ms timer: a lower bound)"),
        ("run", "whole run (ramp included)"),
    ):
        if _get(node, "stalls", key) is None and _get(ours, "stalls", key) is None:
            continue
        cells = [stall_cell(_get(rec, "stalls", key)) for rec in (node, ours)]
        r = ratio(stall_ms(_get(ours, "stalls", key)), stall_ms(_get(node, "stalls", key)))
        out.append((f"longest loop stall {name}, ms", cells[0], cells[1], _times(r)))
    collection = _get(ours, "gc", "refresh")
    if isinstance(collection, dict):
        count, top = collection.get("gen2_collections"), collection.get("gen2_ms_max")
        out.append(
            (
                "trio-idle's collections (gen. 2) after that refresh: how many, longest ms",
                "–",
                f"{_num(count)}, {_num(top)}" if count else "0",
                "–",
            )
        )
    return out


def stall_ms(record: Any) -> float | None:
    """A :func:`bench.loop_probe.stalls_in` record's longest stall; below the logging
    threshold counts as the threshold (an upper bound)."""
    if not isinstance(record, dict):
        return None
    top = record.get("max_ms")
    if top is None:
        below = record.get("below_ms")
        return float(below) if isinstance(below, int | float) else None
    return float(top)


def stall_cell(record: Any) -> str:
    """``83.2`` or ``< 5`` (nothing above the logging threshold), ``–`` if missing."""
    if not isinstance(record, dict):
        return "–"
    if record.get("max_ms") is None and record.get("below_ms") is not None:
        return f"< {_num(record['below_ms'], 0)}"
    return _num(record.get("max_ms"))


def markdown(runs: Sequence[dict[str, Any]]) -> str:
    """One table per pair (mode, N), then the RSS growth per mode: for docs/performance.md."""
    parts: list[str] = []
    for run in runs:
        node_v = _get(run, "node", "imapflow") or "?"
        title = f"N = {run['n']:,}, {'TLS' if run['tls'] else 'plaintext'}"
        if run.get("quick"):
            title += " (quick: harness check, not a measurement)"
        parts.append(
            f"| {title} | Node + imapflow {node_v} | trio-idle | trio-idle / Node |\n"
            "|---|---:|---:|---:|"
        )
        parts[-1] += "".join(f"\n| {m} | {a} | {b} | {r} |" for m, a, b, r in rows_for(run))
        parts.append("")
    for tls in (False, True):
        chosen = sorted({r["n"] for r in runs if r["tls"] == tls})
        node_g = growth_per_session(runs, "node", tls)
        ours_g = growth_per_session(runs, "trio_idle", tls)
        if node_g is None or ours_g is None:
            continue
        parts.append(
            f"RSS growth per added session, {'TLS' if tls else 'plaintext'}, "
            f"N = {chosen[0]:,} → {chosen[-1]:,}: Node {node_g:.1f} KiB, trio-idle "
            f"{ours_g:.1f} KiB ({_times(ratio(ours_g, node_g))})."
        )
        parts.append("")
    periods = {_get(r, s, "stalls", "period_ms") for r in runs for s in STACKS} - {None}
    if periods:
        each = " / ".join(f"{p:g}" for p in sorted(periods))
        parts.append(
            f"Loop stall: how late a {each} ms timer fired ({COARSE_MS:g} ms during the idle "
            "window, whose CPU figure it would otherwise inflate), the same probe in both "
            "programs (bench/loop_probe.py, bench/node_baseline/index.js); `< 5`: never by "
            "more than 5 ms."
        )
        parts.append("")
    for line in sorted({provenance(run) for run in runs}):
        parts.append(line)
        parts.append("")
    return "\n".join(parts).rstrip() + "\n"


def node_ran(run: dict[str, Any]) -> bool:
    """Whether the pair measured the Node baseline, not only looked up its versions."""
    node = run.get("node")
    return isinstance(node, dict) and bool(node.keys() - NODE_VERSIONS)


def provenance(run: dict[str, Any]) -> str:
    """Where a pair was measured: the machine, the versions (Node's and imapflow's only
    when the baseline ran), the command."""
    m = run.get("machine", {})
    packages = m.get("packages", {})
    command = run.get("command") or "python -m bench --compare (command not recorded)"
    node = ""
    if node_ran(run):
        node = (
            f", Node {_get(run, 'node', 'version') or '?'}, imapflow "
            f"{_get(run, 'node', 'imapflow') or '?'}"
        )
    return (
        f"Machine: {m.get('cores', '?')} cores ({m.get('cpu_model', '?')}), "
        f"{m.get('mem_total_gib', '?')} GiB, Linux {m.get('kernel', '?')}, "
        f"CPython {m.get('python', '?')} (trio-idle {packages.get('trio-idle', '?')})"
        f"{node}; `{command}`"
    )
