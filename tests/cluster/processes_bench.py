"""One process or two: the same total of sessions on 1 and on 2 ``trio-idle serve`` processes.

For each process count P (run one after the other, against the same IMAP server and
scan backend): a fresh Postgres database with the mailboxes' table empty, P instances in
shared mode (P=1 is shared mode with one member: the same leases and heartbeats, so
the difference measured is the second process, not the cluster code), each instance's
RSS once it is up with no mailbox, then every mailbox inserted and a SIGHUP, and:

* **RSS per session**: sum over the processes of (RSS now − RSS before sessions) / sessions,
  after every mailbox is in IDLE and every startup catch-up scan has been received;
* **idle CPU**: CPU time of all the processes over a fixed window with nothing appended,
  as % of one core;
* **push→webhook**: mails appended at a modest rate; the time from the server building
  the ``* N EXISTS`` line to the backend receiving the POST (p50/p99).

The IMAP server is :mod:`bench.imap_proc` (its own process, implicit TLS with a trustme CA
when ``--tls``), the webhook receiver is :class:`bench.phases.Sink` in this process; all
on loopback. Run through ``python -m tests.cluster.takeover_bench --processes 1,2``.
Bounded: every wait has a deadline.
"""

from __future__ import annotations

import datetime
import os
import random
import signal
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import trio

from bench import phases
from bench.harness import _tls_files
from bench.procinfo import cpu_seconds, raise_nofile_limit, rss_kib
from bench.procs import ADMIN_SECRET, PASSWORD, ServerPool, ServerProc
from tests.cluster.takeover_bench import Instance
from tests.harness import KEY, row
from tests.servers.postgres import (
    MAIL_CONNECTION_DDL,
    PostgresServer,
    execute_sql,
    insert_mail_connections,
)
from trio_idle.cluster.membership import MEMBERSHIP_SQL
from trio_idle.state.tables import POSTGRES_DDL

#: instance ids, in start order
NAMES = ("p1", "p2", "p3", "p4")


class _Daemon:
    """:class:`bench.procs.MeasuredProc` view of one instance, for :func:`phases.latency`
    (which reads only ``pid``; its CPU fields are replaced by the sum over all processes)."""

    def __init__(self, instance: Instance) -> None:
        self.instance = instance

    @property
    def pid(self) -> int:
        assert self.instance.proc is not None
        return self.instance.proc.pid

    def set_rows(self, rows: Sequence[tuple[str, int]]) -> float:
        raise NotImplementedError("rows come from Postgres here")

    async def terminate(self, limit: float = 60.0) -> tuple[float, int | None]:
        t0 = time.monotonic()
        await self.instance.stop()
        assert self.instance.proc is not None
        return time.monotonic() - t0, self.instance.proc.returncode


def _pids(instances: Sequence[Instance]) -> list[int]:
    return [i.proc.pid for i in instances if i.proc is not None]


def _alive(instances: Sequence[Instance]) -> None:
    """Raise at once if an instance exited (rather than waiting out a deadline)."""
    for i in instances:
        if i.proc is not None and i.proc.returncode is not None:
            raise RuntimeError(f"instance {i.name} exited ({i.proc.returncode}); see {i.log_path}")


def _cpu(instances: Sequence[Instance]) -> float:
    return sum(cpu_seconds(pid) for pid in _pids(instances))


async def _poll(seconds: float, what: str, check: Any) -> None:
    """Wait until ``await check()`` is true; another process offers no event to wait on."""
    with trio.move_on_after(seconds) as scope:
        while not await check():  # noqa: ASYNC110
            await trio.sleep(0.2)
    if scope.cancelled_caught:
        raise RuntimeError(f"timed out after {seconds:g}s waiting for {what}")


async def run(
    counts: Sequence[int],
    sessions: int,
    tls: bool,
    idle_window: float,
    rate: float,
    latency_seconds: float,
    settle: float,
    ttl: float = 15.0,
    poll: float = 5.0,
) -> dict[str, Any]:
    """Measure each process count in ``counts``; returns the JSON-ready results."""
    raise_nofile_limit()
    workdir = Path(tempfile.mkdtemp(prefix="trio-idle-processes-"))
    pg = PostgresServer()
    pg.start()
    users = [f"m{i:05d}@scaling.test" for i in range(sessions)]
    tls_files, ca_path = _tls_files(workdir) if tls else (None, None)
    server = ServerProc(0, users)
    pool = ServerPool([server])
    sink = phases.Sink(ADMIN_SECRET)
    runs: list[dict[str, Any]] = []
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(sink.backend.serve)
            try:
                await server.start(workdir, 1800.0, tls_files)
                port = server.tls_port if tls else server.port
                rows = [row(u, u, PASSWORD, port) for u in users]
                for count in counts:
                    dsn = pg.create_database(f"processes{count}")
                    execute_sql(dsn, MAIL_CONNECTION_DDL, POSTGRES_DDL, MEMBERSHIP_SQL.create)
                    env = _env(dsn, sink.backend.url, tls, ca_path, ttl, poll)
                    instances = [
                        Instance(name, env, workdir / f"p{count}") for name in NAMES[:count]
                    ]
                    (workdir / f"p{count}").mkdir()
                    runs.append(
                        await _one(
                            instances, pool, sink, dsn, rows, idle_window, rate,
                            latency_seconds, settle, env["TRIO_IDLE_STATUS_TOKEN"],
                        )
                    )  # fmt: skip
                    print(_line(runs[-1]), flush=True)
            finally:
                with trio.CancelScope(shield=True):
                    await pool.stop()
                nursery.cancel_scope.cancel()
    finally:
        pg.cleanup()
    return {
        "sessions": sessions,
        "tls": tls,
        "idle_window_s": idle_window,
        "rate_per_s": rate,
        "latency_seconds": latency_seconds,
        "cluster_ttl_s": ttl,
        "cluster_poll_s": poll,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "runs": runs,
        "logs": str(workdir),
    }


def _env(
    dsn: str, backend_url: str, tls: bool, ca_path: str | None, ttl: float, poll: float
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIO_IDLE_")}
    env.update(
        ADMIN_SECRET=ADMIN_SECRET,
        ENCRYPTION_KEY=KEY,
        DATABASE_URL=dsn,
        BACKEND_URL=backend_url,
        TRIO_IDLE_IMAP_SECURITY="tls" if tls else "plain",
        TRIO_IDLE_STATE="postgres",
        TRIO_IDLE_CLUSTER="shared",
        # product defaults for ticks and refresh (and TTL/poll unless given): what a
        # deployment idles at
        TRIO_IDLE_CLUSTER_TTL=f"{ttl}s",
        TRIO_IDLE_CLUSTER_POLL=f"{poll}s",
        TRIO_IDLE_CATCHUP_RATE="1000",
        TRIO_IDLE_CONNECT_RATE="1000",
        TRIO_IDLE_STATUS_TOKEN=os.urandom(12).hex(),
        TRIO_IDLE_LOG_LEVEL="WARNING",
    )
    if ca_path:
        env["TRIO_IDLE_CA_FILE"] = ca_path
    if ttl < 15:  # the TTL must exceed twice the LOGOUT timeout (as in the takeover bench)
        env["TRIO_IDLE_LOGOUT_TIMEOUT"] = f"{min(2.0, ttl / 3)}s"
    return env


async def _one(
    instances: list[Instance],
    pool: ServerPool,
    sink: phases.Sink,
    dsn: str,
    rows: list[dict[str, Any]],
    idle_window: float,
    rate: float,
    latency_seconds: float,
    settle: float,
    token: str,
) -> dict[str, Any]:
    n = len(rows)
    users = [str(r["email"]) for r in rows]
    count = len(instances)
    started = time.monotonic()
    async with httpx.AsyncClient(trust_env=False, timeout=5) as client:
        try:
            for instance in instances:
                await instance.start()

            async def members_agree() -> bool:
                _alive(instances)
                views = [await i.cluster(client, token) for i in instances]
                return all(v is not None and len(v["members"]) == count for v in views)

            await _poll(120, f"{count} members in every view", members_agree)
            await trio.sleep(settle)  # imports and first heartbeats are behind us
            rss_base = [rss_kib(pid) for pid in _pids(instances)]

            await pool.call_all("reset_marks")
            startup_before = sink.reasons.get("startup", 0)
            await trio.to_thread.run_sync(lambda: insert_mail_connections(dsn, *rows))
            t0 = time.monotonic()
            for instance in instances:
                assert instance.proc is not None
                instance.proc.send_signal(signal.SIGHUP)

            async def all_idle() -> bool:
                _alive(instances)
                stats = await pool.totals()
                if stats["idle_clients"] < n or stats["connections_open"] != n:
                    return False
                views = [await i.cluster(client, token) for i in instances]
                return (
                    all(v is not None and not v["held"] for v in views)
                    and sum(v["owned"] for v in views if v is not None) == n
                )

            await _poll(120 + n / 50, "every mailbox in IDLE exactly once", all_idle)
            ramp_s = time.monotonic() - t0
            with trio.fail_after(60 + n / 100):
                await sink.wait_for_reason("startup", startup_before + n)
            await trio.sleep(settle)
            rss_now = [rss_kib(pid) for pid in _pids(instances)]
            grown = sum(now - base for now, base in zip(rss_now, rss_base, strict=True))

            before = await pool.totals()
            cpu0, w0 = _cpu(instances), time.perf_counter()
            await trio.sleep(idle_window)
            cpu1, w1 = _cpu(instances), time.perf_counter()
            after = await pool.totals()

            cpu_l0 = _cpu(instances)
            lat = await phases.latency(
                pool,
                sink,
                _Daemon(instances[0]),
                users,
                rate,
                latency_seconds,
                grace=30.0,
                rng=random.Random(count),
            )
            cpu_l1 = _cpu(instances)
        finally:
            with trio.CancelScope(shield=True):
                for instance in instances:
                    await instance.stop()

    async def none_open() -> bool:  # the next count starts from no session at all
        return (await pool.totals())["connections_open"] == 0

    await _poll(30, "every session closed", none_open)
    for key in ("daemon_cpu_s", "daemon_cpu_pct_during_appends", "missed_users"):
        lat.pop(key, None)
    return {
        "processes": count,
        "sessions": n,
        "ramp_s": round(ramp_s, 2),
        "rss_base_kib": rss_base,
        "rss_kib": rss_now,
        "rss_per_session_kib": round(grown / n, 2),
        "rss_total_mib": round(sum(rss_now) / 1024, 1),
        "idle_window_s": round(w1 - w0, 1),
        "idle_cpu_pct_of_one_core": round((cpu1 - cpu0) / (w1 - w0) * 100, 2),
        "idle_reconnects": after["connections_total"] - before["connections_total"],
        "latency": lat,
        "cpu_pct_during_appends": round((cpu_l1 - cpu_l0) / latency_seconds * 100, 1),
        "seconds": round(time.monotonic() - started, 1),
    }


def _line(r: dict[str, Any]) -> str:
    lat = r["latency"]
    return (
        f"P={r['processes']}: {r['sessions']} sessions in IDLE after {r['ramp_s']}s; "
        f"RSS/session {r['rss_per_session_kib']} KiB (total {r['rss_total_mib']} MiB); "
        f"idle CPU {r['idle_cpu_pct_of_one_core']}% of a core; "
        f"push→webhook p50 {lat['p50_ms']} ms p99 {lat['p99_ms']} ms "
        f"({lat['appends']} mails, {lat['missed']} missed)"
    )


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f} ms"


def table(result: dict[str, Any]) -> str:
    """The markdown table of docs/scaling.md ("One process or two")."""
    head = (
        "| processes | RSS per session | RSS total | idle CPU (% of one core) "
        "| push→webhook p50 | p99 | max | mails missed | CPU while appending |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in result["runs"]:
        lat = r["latency"]
        lines.append(
            f"| {r['processes']} | {r['rss_per_session_kib']:.1f} KiB | {r['rss_total_mib']} MiB "
            f"| {r['idle_cpu_pct_of_one_core']:.2f} | {_ms(lat['p50_ms'])} "
            f"| {_ms(lat['p99_ms'])} | {_ms(lat['max_ms'])} | {lat['missed']} "
            f"| {r['cpu_pct_during_appends']} % |"
        )
    return head + "\n".join(lines) + "\n"
