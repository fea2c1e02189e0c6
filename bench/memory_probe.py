"""Memory per session, and where it goes: ``python -m bench.memory_probe --n 2000``.

Runs ``trio-idle serve`` (the file source, a new SQLite state file, plaintext, ticks off)
against benchmark IMAP server processes and a scan sink on loopback, hands it ``--n``
mailboxes, waits until the servers saw every one enter IDLE and the sink got every
startup catch-up scan, settles, and reports:

* **RSS per session**: ``VmRSS`` after − before the mailboxes, / N, measured from
  outside (``/proc``), in a daemon that runs untraced;
* with ``--trace`` (a second daemon of the same run, under :mod:`tracemalloc`): the
  Python heap per session, the top allocation sites by ``file:line`` (and by the
  innermost ``trio_idle`` frame that led to them), and :func:`gc.get_objects` counts by
  type per session.

``--tls``: the servers serve implicit TLS with a certificate from a fresh :mod:`trustme` CA,
which the daemon trusts through ``TRIO_IDLE_CA_FILE`` (verification and the name check stay
on): the figures then include what OpenSSL keeps per connection.

Every dump also reads glibc's ``mallinfo2()`` in the daemon: **malloc in use per session**
(``uordblks``, bytes handed out by ``malloc`` and not freed: OpenSSL's allocations are there,
which tracemalloc does not see) next to RSS, which also counts what the allocator keeps free.

``--tree DIR`` (repeatable) measures the ``trio_idle`` package of another source tree
too, in the same run against the same servers (e.g. ``git archive <commit> trio_idle |
tar -x -C DIR``): before/after figures from one run on this shared machine.

The daemon runs as ``python -m bench.memory_child serve`` (see there).
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import signal
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import trio

from bench import phases
from bench.harness import _tls_files
from bench.procinfo import raise_nofile_limit, rss_kib
from bench.procs import ADMIN_SECRET, DaemonProc, ServerPool, ServerProc


async def _wait_file(path: Path, limit: float) -> None:
    with trio.fail_after(limit):
        while True:
            if await trio.Path(path).exists():
                return
            await trio.sleep(0.05)  # another process writes it: no event to wait on


async def _dump_now(daemon: DaemonProc, out: Path, k: int) -> dict[str, Any]:
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGUSR1)
    path = Path(f"{out}.{k}.json")
    await _wait_file(path, 300)
    info: dict[str, Any] = json.loads(await trio.Path(path).read_text())
    return info


def _innermost_ours(tb: tracemalloc.Traceback) -> str:
    for frame in reversed(tb):  # a Traceback runs from the oldest frame
        if "/trio_idle/" in frame.filename:
            return f"{frame.filename.rpartition('/trio_idle/')[2]}:{frame.lineno}"
    return "(no trio_idle frame)"


def _short(filename: str) -> str:
    for marker in ("/site-packages/", "/lib/python3", "/trio_idle/"):
        if marker in filename:
            tail = filename.rpartition(marker)[2]
            return ("trio_idle/" + tail) if marker == "/trio_idle/" else tail
    return filename


def trace_report(before: Path, after: Path, n: int, top: int) -> dict[str, Any]:
    """Heap growth per session from two snapshots: totals and the top sites."""
    snap0 = tracemalloc.Snapshot.load(str(before))
    snap1 = tracemalloc.Snapshot.load(str(after))
    filters = [tracemalloc.Filter(False, tracemalloc.__file__)]
    snap0, snap1 = snap0.filter_traces(filters), snap1.filter_traces(filters)
    total = sum(s.size_diff for s in snap1.compare_to(snap0, "filename"))
    by_line = snap1.compare_to(snap0, "lineno")
    lines = [
        {
            "site": f"{_short(s.traceback[0].filename)}:{s.traceback[0].lineno}",
            "bytes_per_session": s.size_diff / n,
            "blocks_per_session": s.count_diff / n,
        }
        for s in by_line[:top]
    ]
    ours: collections.Counter[str] = collections.Counter()
    ours_blocks: collections.Counter[str] = collections.Counter()
    for s in snap1.compare_to(snap0, "traceback"):
        key = _innermost_ours(s.traceback)
        ours[key] += s.size_diff
        ours_blocks[key] += s.count_diff
    by_ours = [
        {"site": k, "bytes_per_session": v / n, "blocks_per_session": ours_blocks[k] / n}
        for k, v in ours.most_common(top)
    ]
    return {"heap_bytes_per_session": total / n, "by_line": lines, "by_our_frame": by_ours}


def count_report(before: dict[str, int], after: dict[str, int], n: int, top: int) -> list[Any]:
    diff = {t: (after.get(t, 0) - before.get(t, 0)) / n for t in after.keys() | before.keys()}
    ranked = sorted(diff.items(), key=lambda kv: -abs(kv[1]))
    return [[t, round(v, 2)] for t, v in ranked[:top] if abs(v) >= 0.05]


async def measure_one(
    label: str,
    tree: str | None,
    trace: bool,
    args: argparse.Namespace,
    workdir: Path,
    pool: ServerPool,
    sink: phases.Sink,
    rows: list[tuple[str, int]],
    ca_path: str | None,
) -> dict[str, Any]:
    n = len(rows)
    tag = f"{label}-{'trace' if trace else 'rss'}"
    out = workdir / f"probe-{tag}"
    env = {
        "BACKEND_URL": sink.backend.url,
        "TRIO_IDLE_IMAP_SECURITY": "tls" if ca_path else "plain",
        "TRIO_IDLE_LOG_LEVEL": "WARNING",
        "TRIO_IDLE_TICK_INTERVAL": "24h",
        "TRIO_IDLE_CONNECT_CONCURRENCY": "200",
        "TRIO_IDLE_CONNECT_RATE": "2000",
        "TRIO_IDLE_CATCHUP_RATE": "2000",
        "BENCH_PROBE_OUT": str(out),
        "BENCH_PROBE_TRACE": "1" if trace else "0",
    }
    if ca_path:
        env["TRIO_IDLE_CA_FILE"] = ca_path
    if tree:
        env["BENCH_PROBE_TREE"] = tree
    daemon = DaemonProc(workdir, f"daemon-{tag}", env, module="bench.memory_child")
    try:
        await daemon.start()
        await trio.sleep(1.0)
        base = rss_kib(daemon.pid)
        info0 = await _dump_now(daemon, out, 0)
        startup = sink.reasons.get("startup", 0)
        t0 = time.perf_counter()
        ramp = await phases.ramp(pool, daemon, rows, n / 100 + 120)
        scans = await phases.catch_up(sink, daemon, startup, n, n / 100 + 60)
        await trio.sleep(args.settle)
        rss = rss_kib(daemon.pid)
        info1 = await _dump_now(daemon, out, 1)
        result: dict[str, Any] = {
            "label": label,
            "tree": tree,
            "traced": trace,
            "n": n,
            "all_idle": ramp["all_idle"],
            "startup_scans": scans["startup_scans"],
            "seconds_to_ready": round(time.perf_counter() - t0, 1),
            "rss_base_kib": base,
            "rss_kib": rss,
            "rss_per_session_kib": round((rss - base) / n, 2),
            "tls": ca_path is not None,
            "trio_idle": info1["trio_idle"],
        }
        if info0.get("malloc") and info1.get("malloc"):
            for key in ("in_use", "free", "mmapped"):
                delta = info1["malloc"][key] - info0["malloc"][key]
                result[f"malloc_{key}_per_session_kib"] = round(delta / n / 1024, 2)
        if trace:
            result["trio_idle"] = info1["trio_idle"]
            result["objects_per_session"] = count_report(
                info0["counts"], info1["counts"], n, args.top
            )
            result.update(
                trace_report(
                    Path(f"{out}.0.tracemalloc"), Path(f"{out}.1.tracemalloc"), n, args.top
                )
            )
        return result
    finally:
        await daemon.terminate(30)
        await trio.sleep(1.0)  # let the servers see every connection go


async def run(
    args: argparse.Namespace, workdir: Path, trees: list[tuple[str, str | None]]
) -> list[dict[str, Any]]:
    """One set of servers and one sink; an untraced (then a traced) daemon per tree."""
    n = args.n
    users = [f"u{i:05d}@bench.test" for i in range(n)]
    n_servers = max(1, math.ceil(n / args.per_server))
    groups: list[list[str]] = [users[i::n_servers] for i in range(n_servers)]
    servers = [ServerProc(i, g) for i, g in enumerate(groups)]
    tls_files, ca_path = _tls_files(workdir) if args.tls else (None, None)
    pool = ServerPool(servers)
    sink = phases.Sink(ADMIN_SECRET)
    results: list[dict[str, Any]] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.backend.serve)
        try:
            for s in servers:
                await s.start(workdir, 3600.0, tls_files)
            rows = [(u, s.tls_port if args.tls else s.port) for s in servers for u in s.users]
            for _ in range(args.rounds):
                for label, tree in trees:
                    r = await measure_one(
                        label, tree, False, args, workdir, pool, sink, rows, ca_path
                    )
                    print(
                        f"{label}: {r['rss_per_session_kib']:.1f} KiB RSS/session"
                        f"{' over TLS' if args.tls else ''}{_malloc_text(r)} "
                        f"(N={n}, idle={r['all_idle']}, scans={r['startup_scans']})",
                        flush=True,
                    )
                    results.append(r)
            if args.trace:
                for label, tree in trees:
                    r = await measure_one(
                        label, tree, True, args, workdir, pool, sink, rows, ca_path
                    )
                    results.append(r)
                    print_trace(r)
        finally:
            with trio.CancelScope(shield=True):
                await pool.stop()
            nursery.cancel_scope.cancel()
    return results


def _malloc_text(r: dict[str, Any]) -> str:
    if "malloc_in_use_per_session_kib" not in r:
        return ""
    return (
        f", malloc in use {r['malloc_in_use_per_session_kib']:.1f} "
        f"(+ free {r['malloc_free_per_session_kib']:.1f})"
    )


def print_trace(r: dict[str, Any]) -> None:
    print(
        f"\n== {r['label']} traced ({r['trio_idle']}): heap "
        f"{r['heap_bytes_per_session'] / 1024:.1f} KiB/session (RSS under tracing "
        f"{r['rss_per_session_kib']:.1f})"
    )
    print("-- top allocation sites (innermost frame), bytes / blocks per session")
    for row in r["by_line"]:
        print(f"  {row['bytes_per_session']:8.0f} {row['blocks_per_session']:6.1f}  {row['site']}")
    print("-- by the innermost trio_idle frame that led to them")
    for row in r["by_our_frame"]:
        print(f"  {row['bytes_per_session']:8.0f} {row['blocks_per_session']:6.1f}  {row['site']}")
    print("-- gc-tracked objects per session, by type")
    for name, per in r["objects_per_session"]:
        print(f"  {per:7.2f}  {name}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.memory_probe", description=__doc__)
    p.add_argument("--n", type=int, default=2000, help="mailboxes (sessions)")
    p.add_argument("--per-server", type=int, default=2500, help="mailboxes per server process")
    p.add_argument("--settle", type=float, default=3.0, help="seconds between ready and RSS")
    p.add_argument("--tls", action="store_true", help="implicit TLS with a trustme CA")
    p.add_argument("--trace", action="store_true", help="also a tracemalloc + gc-count run")
    p.add_argument("--top", type=int, default=25, help="rows per table")
    p.add_argument("--rounds", type=int, default=1, help="untraced RSS runs per tree")
    p.add_argument("--tree", action="append", default=[], help="another source tree to measure")
    p.add_argument("--out", help="write the results as JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    raise_nofile_limit()
    with tempfile.TemporaryDirectory(prefix="memory-probe-") as tmp:
        trees: list[tuple[str, str | None]] = [("this", None)]
        trees += [(os.path.basename(t.rstrip("/")), os.path.abspath(t)) for t in args.tree]
        results = trio.run(run, args, Path(tmp), trees)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
