"""The measured phases. Each returns a JSON-ready dict; none of them asserts anything."""

from __future__ import annotations

import math
import random
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

import trio
from trio_idle_testing.backend import Reply, ScanBackend, ScanRequest

from bench.procinfo import cpu_seconds, rss_kib
from bench.procs import DaemonProc, MeasuredProc, ServerPool

Row = tuple[str, int]


class Sink:
    """The scan webhook receiver: :class:`ScanBackend` plus wall-clock receive times."""

    def __init__(self, secret: str) -> None:
        self.backend = ScanBackend(secret)
        self.backend.default_reply = self._reply
        #: email → wall times at which its POSTs were received, in order
        self.posts: dict[str, list[float]] = {}
        self.reasons: dict[str, int] = {}
        self._received = trio.Event()

    def _reply(self, request: ScanRequest) -> Reply:
        now = time.time()
        if request.email is not None:
            self.posts.setdefault(request.email, []).append(now)
        reason = str(request.reason)
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        self._received.set()
        self._received = trio.Event()
        return Reply()

    async def wait_for_reason(self, reason: str, count: int) -> None:
        """Return once ``count`` POSTs with ``reason`` have been received in all."""
        while self.reasons.get(reason, 0) < count:
            await self._received.wait()

    def first_post_after(self, email: str, t: float) -> float | None:
        for p in self.posts.get(email, ()):
            if p >= t:
                return p
        return None


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..100) of ``values``; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


async def ramp(
    pool: ServerPool, daemon: MeasuredProc, rows: Sequence[Row], limit: float
) -> dict[str, Any]:
    """Give the daemon ``rows`` (SIGHUP); time until the server saw every one enter IDLE."""
    await pool.call_all("reset_marks")
    before = await pool.totals()
    rss_before = rss_kib(daemon.pid)
    cpu_before = cpu_seconds(daemon.pid)
    t0 = daemon.set_rows(rows)
    count, latest = 0, None
    with trio.move_on_after(limit):
        while True:
            await trio.sleep(0.1)  # polling another process: no event to wait on
            count, latest = await pool.idle_marks(None)
            if count >= len(rows):
                break
    cpu_after = cpu_seconds(daemon.pid)
    rss_ramped = rss_kib(daemon.pid)
    after = await pool.totals()
    seconds = (latest - t0) if latest is not None and count >= len(rows) else None
    return {
        "sessions": len(rows),
        "reached_idle": count,
        "all_idle": count >= len(rows),
        "seconds": seconds,
        "sessions_per_s": len(rows) / seconds if seconds else None,
        "daemon_cpu_s": cpu_after - cpu_before,
        "rss_before_kib": rss_before,
        "rss_at_end_kib": rss_ramped,
        "logins": after["logins"] - before["logins"],
        "login_failures": after["login_failures"] - before["login_failures"],
    }


async def catch_up(
    sink: Sink, daemon: MeasuredProc, before: int, n: int, limit: float
) -> dict[str, Any]:
    """Wait until the sink got ``n`` startup catch-up scans more than ``before``.

    A daemon whose state store has never seen a mailbox scans it once at its first
    session (paced by ``TRIO_IDLE_CATCHUP_RATE``); idle figures are only meaningful after.
    """
    t0 = time.perf_counter()
    cpu0 = cpu_seconds(daemon.pid)
    with trio.move_on_after(limit):
        await sink.wait_for_reason("startup", before + n)
    got = sink.reasons.get("startup", 0) - before
    return {
        "startup_scans": got,
        "complete": got >= n,
        "waited_after_ramp_s": time.perf_counter() - t0,
        "daemon_cpu_s": cpu_seconds(daemon.pid) - cpu0,
    }


async def settle_and_measure_rss(
    daemon: MeasuredProc, n: int, base: int, settle: float
) -> dict[str, Any]:
    """RSS after ``settle`` seconds with ``n`` sessions, and per session above ``base``."""
    await trio.sleep(settle)
    rss = rss_kib(daemon.pid)
    return {
        "rss_base_kib": base,
        "rss_kib": rss,
        "per_session_kib": (rss - base) / n if n else None,
        "hwm_kib": _status_field(daemon.pid, "VmHWM"),
    }


def _status_field(pid: int, name: str) -> int | None:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    return None


async def idle_cpu(pool: ServerPool, daemon: MeasuredProc, n: int, window: float) -> dict[str, Any]:
    """Daemon CPU over ``window`` seconds with ``n`` sessions idle (nothing appended)."""
    before = await pool.totals()
    cpu0, t0 = cpu_seconds(daemon.pid), time.perf_counter()
    await trio.sleep(window)
    cpu1, t1 = cpu_seconds(daemon.pid), time.perf_counter()
    after = await pool.totals()
    elapsed = t1 - t0
    used = cpu1 - cpu0
    return {
        "window_s": elapsed,
        "cpu_s": used,
        "cpu_s_per_min": used / elapsed * 60,
        "pct_of_one_core": used / elapsed * 100,
        "keepalives": after["keepalives"] - before["keepalives"],
        "noops": after["noops"] - before["noops"],
        "reconnects": after["connections_total"] - before["connections_total"],
        "idle_clients_end": after["idle_clients"],
        "all_idle_at_end": after["idle_clients"] >= n,
        "server_cpu_s": after["cpu_s"] - before["cpu_s"],
    }


async def latency(
    pool: ServerPool,
    sink: Sink,
    daemon: MeasuredProc,
    users: Sequence[str],
    rate: float,
    seconds: float,
    grace: float,
    rng: random.Random,
    midway: Callable[[], float] | None = None,
) -> dict[str, Any]:
    """Appends at ``rate``/s for ``seconds`` across ``users`` (a random permutation, round
    robin, so a user gets mail again only after every other user did); then the time from
    each EXISTS being sent to the first POST for that user received after the append.

    ``midway`` (e.g. a SIGHUP refresh) is called once, half-way through the appends; the
    wall time it returns is ``midway_at`` in the result."""
    count = max(1, round(rate * seconds))
    order = list(users)
    rng.shuffle(order)
    sequence = [order[i % len(order)] for i in range(count)]
    start_at = time.time() + 0.5
    offsets = [i / rate for i in range(count)]
    per_server: dict[int, tuple[list[str], list[float]]] = {s.index: ([], []) for s in pool.servers}
    for user, offset in zip(sequence, offsets, strict=True):
        names, offs = per_server[pool.owner[user].index]
        names.append(user)
        offs.append(offset)
    cpu0 = cpu_seconds(daemon.pid)
    for s in pool.servers:
        names, offs = per_server[s.index]
        await s.call("appends", users=names, offsets=offs, start_at=start_at)
    midway_at: float | None = None
    if midway is not None:
        await trio.sleep(max(0.0, start_at + seconds / 2 - time.time()))
        midway_at = midway()
    await trio.sleep(max(0.0, start_at + offsets[-1] - time.time()))
    records: list[list[Any]] = []
    for s in pool.servers:
        while True:
            answer = await s.call("append_results")
            if answer["done"]:
                records.extend(answer["records"])
                break
            await trio.sleep(0.1)
    cpu_at_end_of_appends = cpu_seconds(daemon.pid)
    deadline = trio.current_time() + grace
    while trio.current_time() < deadline:
        if all(sink.first_post_after(r[0], r[1]) is not None for r in records):
            break
        await trio.sleep(0.1)
    lat_exists: list[float] = []
    lat_append: list[float] = []
    missed: list[str] = []
    no_exists = 0
    #: (latency, when the EXISTS was built, s after the first append): where the tail is
    timed: list[tuple[float, float]] = []
    for user, t_append, t_exists in records:
        post = sink.first_post_after(user, t_append)
        if post is None:
            missed.append(user)
            continue
        lat_append.append(post - t_append)
        if t_exists is None:
            no_exists += 1
        else:
            lat_exists.append(post - t_exists)
            timed.append((post - t_exists, t_exists - start_at))
    send_lag = [r[2] - r[1] for r in records if r[2] is not None]
    ms = 1000.0
    return {
        "rate_per_s": rate,
        "appends": len(records),
        "missed": len(missed),
        "missed_users": missed[:20],
        "exists_not_seen_sent": no_exists,
        "p50_ms": _scaled(percentile(lat_exists, 50), ms),
        "p90_ms": _scaled(percentile(lat_exists, 90), ms),
        "p99_ms": _scaled(percentile(lat_exists, 99), ms),
        "max_ms": _scaled(max(lat_exists, default=None), ms),
        "append_to_post_p99_ms": _scaled(percentile(lat_append, 99), ms),
        "server_append_to_exists_p99_ms": _scaled(percentile(send_lag, 99), ms),
        "daemon_cpu_s": cpu_at_end_of_appends - cpu0,
        "daemon_cpu_pct_during_appends": (cpu_at_end_of_appends - cpu0) / max(seconds, 1e-9) * 100,
        "first_append_at": start_at,
        "midway_at": midway_at,
        "slowest": [[round(at, 3), round(lat * ms, 2)] for lat, at in sorted(timed)[-10:]],
    }


def _scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else round(value * factor, 3)


async def reconcile(
    pool: ServerPool,
    daemon: DaemonProc,
    keep: Sequence[Row],
    added: Sequence[Row],
    removed: Sequence[Row],
    limit: float,
) -> dict[str, Any]:
    """Replace ``removed`` by ``added`` (SIGHUP); time until the server sees every added one
    in IDLE and every removed one disconnected."""
    await pool.call_all("reset_marks")
    t0 = daemon.set_rows([*keep, *added])
    new_users = [u for u, _ in added]
    old_users = [u for u, _ in removed]
    idle = gone = 0
    idle_max = gone_max = None
    with trio.move_on_after(limit):
        while True:
            await trio.sleep(0.1)
            idle, idle_max = await pool.idle_marks(new_users)
            gone, gone_max = await pool.gone_marks(old_users)
            if idle >= len(new_users) and gone >= len(old_users):
                break
    complete = idle >= len(new_users) and gone >= len(old_users)
    start_s = idle_max - t0 if idle_max is not None and idle >= len(new_users) else None
    stop_s = gone_max - t0 if gone_max is not None and gone >= len(old_users) else None
    return {
        "added": len(added),
        "removed": len(removed),
        "complete": complete,
        "seconds": max(start_s, stop_s) if start_s is not None and stop_s is not None else None,
        "start_s": start_s,
        "stop_s": stop_s,
        "added_in_idle": idle,
        "removed_gone": gone,
    }


async def shutdown(pool: ServerPool, daemon: MeasuredProc, n: int) -> dict[str, Any]:
    """SIGTERM → process exit; also how many sessions LOGOUT cleanly."""
    before = await pool.totals()
    seconds, code = await daemon.terminate()
    with trio.move_on_after(10):
        while (await pool.totals())["connections_open"] > 0:  # noqa: ASYNC110 - other process
            await trio.sleep(0.1)
    after = await pool.totals()
    return {
        "sessions": n,
        "seconds": seconds,
        "exit_code": code,
        "logouts": after["logouts"] - before["logouts"],
        "connections_left_open": after["connections_open"],
    }


async def soak(
    pool: ServerPool,
    sink: Sink,
    daemon: DaemonProc,
    users: Sequence[str],
    rate: float,
    seconds: float,
    rng: random.Random,
    sample_every: float = 30.0,
) -> dict[str, Any]:
    """Hold the sessions ``seconds`` with mail arriving at ``rate``/s (as :func:`latency`):
    daemon RSS and CPU sampled every ``sample_every`` s, reconnects counted."""
    before = await pool.totals()
    t0, cpu0 = time.perf_counter(), cpu_seconds(daemon.pid)
    samples: list[list[float]] = []

    def sample() -> None:
        elapsed = time.perf_counter() - t0
        samples.append([round(elapsed, 1), rss_kib(daemon.pid), cpu_seconds(daemon.pid) - cpu0])

    async def sampler() -> None:
        while True:
            sample()
            await trio.sleep(sample_every)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sampler)
        pushes = await latency(pool, sink, daemon, users, rate, seconds, 20.0, rng)
        nursery.cancel_scope.cancel()
    sample()
    after = await pool.totals()
    rss = [int(s[1]) for s in samples]
    elapsed = samples[-1][0]
    return {
        "seconds": elapsed,
        "rate_per_s": rate,
        "samples_t_rss_kib_cpu_s": samples,
        "rss_first_kib": rss[0],
        "rss_max_kib": max(rss),
        "rss_last_kib": rss[-1],
        "cpu_pct_of_one_core": samples[-1][2] / elapsed * 100 if elapsed else None,
        "reconnects": after["connections_total"] - before["connections_total"],
        "noops": after["noops"] - before["noops"],
        "all_idle_at_end": after["idle_clients"] >= len(users),
        "pushes": {k: pushes[k] for k in ("appends", "missed", "p50_ms", "p99_ms", "max_ms")},
    }


async def soak_gc(daemon: DaemonProc, start: float, end: float) -> dict[str, Any]:
    """The soak daemon's after-refresh collections (kind, pause, objects freed) and its
    generation-2 passes (full collections, automatic or not), then one forced
    full collection (SIGUSR2 to :mod:`bench.gc_probe`): what it frees is the
    garbage the frozen generation had kept, i.e. what freezing cost in memory."""
    passes = [
        [round(t - start, 1), ms, collected]
        for t, g, ms, collected in daemon.gc_passes()
        if g == 2 and start <= t <= end
    ]
    collections = [c for c in daemon.refresh_collections() if start <= c[0] <= end]
    refreshes = [[round(t - start, 1), kind, ms, n] for t, kind, ms, n in collections]
    rss_before = rss_kib(daemon.pid)
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGUSR2)
    forced: dict[str, Any] = {}
    with trio.move_on_after(60):
        while not forced:
            await trio.sleep(0.2)
            forced = daemon.forced_full() or {}
    await trio.sleep(1.0)
    return {
        "gen2_t_ms_collected": passes,
        "gen2_ms_max": max((p[1] for p in passes), default=None),
        "refresh_t_kind_ms_collected": refreshes,
        "refresh_ms_max": max((ms for _, _, ms, _ in collections), default=None),
        "forced_full": forced,
        "rss_before_forced_kib": rss_before,
        "rss_after_forced_kib": rss_kib(daemon.pid),
    }
