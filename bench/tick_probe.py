"""CPU and loop wake-ups per tick: ``python -m bench.tick_probe --n 2000 --tick 10s``.

Runs ``trio-idle serve`` (the file source, plaintext, a new SQLite state file) under
:mod:`bench.tick_child` against benchmark IMAP server processes (keepalives off: one
an hour) and a scan sink on loopback, hands it ``--n`` mailboxes, waits until the servers
saw every one enter IDLE and the sink got every startup catch-up scan, lets ``--settle``
seconds pass (the first ticks are spread over one interval), then over ``--window``
seconds reports, per NOOP the servers saw (one per tick):

* **CPU per tick**: the daemon's ``utime + stime`` over the window / NOOPs — all of its
  CPU, so its fixed cost (≈ 0.2 % of a core) is in it: ≈ 0.01 ms at 200 ticks/s;
* **wake-ups per tick**: task steps (trio's ``before_task_step``) by task, and returns
  from the loop's I/O wait (``after_io_wait``), / NOOPs.

``--tree DIR`` (repeatable) measures the ``trio_idle`` package of another source tree too,
in the same run against the same servers; ``--rounds`` alternates the trees that many
times (CPU figures on a shared machine: compare within a round). ``--coalesce`` makes
the servers answer the commands that arrived together in one write (see
:mod:`bench.imap_proc`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from bench import phases
from bench.procinfo import cpu_seconds, raise_nofile_limit
from bench.procs import ADMIN_SECRET, DaemonProc, ServerPool, ServerProc


async def _dump_now(daemon: DaemonProc, out: Path, k: int) -> dict[str, Any]:
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGUSR2)
    path = Path(f"{out}.{k}.json")
    with trio.fail_after(30):
        while True:
            if await trio.Path(path).exists():
                break
            await trio.sleep(0.02)  # another process writes it: no event to wait on
    info: dict[str, Any] = json.loads(await trio.Path(path).read_text())
    return info


def _kind(task_name: str) -> str:
    """The daemon's task names: ``ticker``, ``conn:<email>`` (a session), others."""
    if task_name == "ticker":
        return "ticker"
    if task_name.startswith("conn:"):
        return "session"
    return "other"


async def measure_one(
    label: str,
    tree: str | None,
    round_: int,
    args: argparse.Namespace,
    workdir: Path,
    pool: ServerPool,
    sink: phases.Sink,
    rows: list[tuple[str, int]],
) -> dict[str, Any]:
    n = len(rows)
    tag = f"{label}-{round_}"
    out = workdir / f"tick-{tag}"
    env = {
        "BACKEND_URL": sink.backend.url,
        "TRIO_IDLE_IMAP_SECURITY": "plain",
        "TRIO_IDLE_LOG_LEVEL": "WARNING",
        "TRIO_IDLE_TICK_INTERVAL": args.tick,
        "TRIO_IDLE_CONNECT_CONCURRENCY": "200",
        "TRIO_IDLE_CONNECT_RATE": "2000",
        "TRIO_IDLE_CATCHUP_RATE": "2000",
        "BENCH_PROBE_OUT": str(out),
    }
    if tree:
        env["BENCH_PROBE_TREE"] = tree
    daemon = DaemonProc(workdir, f"daemon-{tag}", env, module="bench.tick_child")
    try:
        await daemon.start()
        startup = sink.reasons.get("startup", 0)
        ramp = await phases.ramp(pool, daemon, rows, n / 100 + 120)
        scans = await phases.catch_up(sink, daemon, startup, n, n / 100 + 60)
        await trio.sleep(args.settle)
        before = await pool.totals()
        info0 = await _dump_now(daemon, out, 0)
        cpu0, t0 = cpu_seconds(daemon.pid), time.perf_counter()
        await trio.sleep(args.window)
        cpu1, t1 = cpu_seconds(daemon.pid), time.perf_counter()
        info1 = await _dump_now(daemon, out, 1)
        after = await pool.totals()
        noops = after["noops"] - before["noops"]
        per = 1 / max(1, noops)
        steps: dict[str, float] = {}
        by_name: dict[str, int] = {}
        for name, count in info1["steps"].items():
            diff = count - info0["steps"].get(name, 0)
            if diff:
                by_name[name] = diff
                steps[_kind(name)] = steps.get(_kind(name), 0) + diff
        result: dict[str, Any] = {
            "label": label,
            "tree": tree,
            "trio_idle": info1["trio_idle"],
            "round": round_,
            "n": n,
            "tick": args.tick,
            "all_idle": ramp["all_idle"],
            "startup_scans": scans["startup_scans"],
            "window_s": round(t1 - t0, 2),
            "noops": noops,
            "keepalives": after["keepalives"] - before["keepalives"],
            "reconnects": after["connections_total"] - before["connections_total"],
            "cpu_s": round(cpu1 - cpu0, 3),
            "cpu_ms_per_tick": round((cpu1 - cpu0) * 1000 * per, 4),
            "loop_wakeups_per_tick": round((info1["io_waits"] - info0["io_waits"]) * per, 3),
            "task_steps_per_tick": round(sum(steps.values()) * per, 3),
            "steps_per_tick_by_kind": {k: round(v * per, 3) for k, v in sorted(steps.items())},
            "top_tasks": [
                [name, round(c * per, 3)]
                for name, c in sorted(by_name.items(), key=lambda kv: -kv[1])[:6]
            ],
        }
        return result
    finally:
        await daemon.terminate(30)
        await trio.sleep(1.0)  # let the servers see every connection go


async def run(
    args: argparse.Namespace, workdir: Path, trees: list[tuple[str, str | None]]
) -> list[dict[str, Any]]:
    """One set of servers and one sink; a daemon per tree and round."""
    n = args.n
    users = [f"u{i:05d}@bench.test" for i in range(n)]
    n_servers = max(1, math.ceil(n / args.per_server))
    groups: list[list[str]] = [users[i::n_servers] for i in range(n_servers)]
    servers = [ServerProc(i, g) for i, g in enumerate(groups)]
    pool = ServerPool(servers)
    sink = phases.Sink(ADMIN_SECRET)
    results: list[dict[str, Any]] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.backend.serve)
        try:
            extra = {"coalesce_replies": True} if args.coalesce else None
            for s in servers:
                await s.start(workdir, 3600.0, None, extra)
            rows = [(u, s.port) for s in servers for u in s.users]
            for round_ in range(args.rounds):
                for label, tree in trees:
                    r = await measure_one(label, tree, round_, args, workdir, pool, sink, rows)
                    print(
                        f"{label} (round {round_}): {r['cpu_ms_per_tick']:.3f} ms CPU/tick, "
                        f"{r['loop_wakeups_per_tick']:.2f} loop wake-ups/tick, "
                        f"{r['task_steps_per_tick']:.2f} task steps/tick "
                        f"{r['steps_per_tick_by_kind']} "
                        f"(N={n}, NOOPs={r['noops']}, keepalives={r['keepalives']}, "
                        f"reconnects={r['reconnects']}, idle={r['all_idle']})",
                        flush=True,
                    )
                    results.append(r)
        finally:
            with trio.CancelScope(shield=True):
                await pool.stop()
            nursery.cancel_scope.cancel()
    return results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.tick_probe", description=__doc__)
    p.add_argument("--n", type=int, default=2000, help="mailboxes (sessions)")
    p.add_argument("--tick", default="10s", help="TRIO_IDLE_TICK_INTERVAL")
    p.add_argument("--per-server", type=int, default=2500, help="mailboxes per server process")
    p.add_argument("--settle", type=float, default=12.0, help="seconds between ready and window")
    p.add_argument("--window", type=float, default=30.0, help="seconds measured")
    p.add_argument("--rounds", type=int, default=1, help="runs per tree, alternating")
    p.add_argument("--tree", action="append", default=[], help="another source tree to measure")
    p.add_argument("--coalesce", action="store_true", help="servers: one write per batch")
    p.add_argument("--out", help="write the results as JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    raise_nofile_limit()
    with tempfile.TemporaryDirectory(prefix="tick-probe-") as tmp:
        trees: list[tuple[str, str | None]] = [("this", None)]
        trees += [(os.path.basename(t.rstrip("/")), os.path.abspath(t)) for t in args.tree]
        results = trio.run(run, args, Path(tmp), trees)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
