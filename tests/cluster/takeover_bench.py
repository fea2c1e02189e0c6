"""Takeover after ``kill -9``: three real ``trio-idle serve`` processes in shared mode.

Everything on loopback: a throwaway Postgres (the pgserver wheel), the IMAP test server
and the scan backend run in this process; the three daemons are child processes. Each
round SIGKILLs one instance, appends a mail to half of its mailboxes while nobody watches
them, and measures the time from the kill until every one of its mailboxes is in IDLE on
another instance. Then it restarts the killed instance (same id) and waits until the
three have settled again (every mailbox watched once, nothing held) before the next round.

Reported: takeover min/median/max, the mailboxes that were ever watched twice (counted at
every server event; must be 0) and the mails appended during a takeover that were not
scanned afterwards (must be 0)::

    python -m tests.cluster.takeover_bench --kills 5 --mailboxes 300   # nox -s scaling

Bounded: every wait has a deadline (a round fails after 3 TTL + 30 s).

``--processes 1,2 --sessions 2000 --tls`` measures something else instead: the same total
of sessions on one and on two processes (RSS per session, idle CPU, push→webhook); see
:mod:`tests.cluster.processes_bench`.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import secrets
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import trio
from trio_idle_testing import ImapTestServer
from trio_idle_testing.backend import ScanBackend
from trio_idle_testing.imap_server import LogEntry

from tests.harness import ADMIN_SECRET, KEY, row
from tests.servers import free_tcp_port
from tests.servers.postgres import (
    MAIL_CONNECTION_DDL,
    PostgresServer,
    execute_sql,
    insert_mail_connections,
)
from trio_idle.cluster.assignment import shares
from trio_idle.cluster.membership import MEMBERSHIP_SQL
from trio_idle.core.values import parse_duration
from trio_idle.state.tables import POSTGRES_DDL

PASSWORD = "S3ntinel-pw-scaling"
NAMES = ("a", "b", "c")


class Watch:
    """Counts mailboxes that had two sessions at once, at every server event."""

    def __init__(self, server: ImapTestServer) -> None:
        self.server = server
        self.doubles: set[str] = set()
        self.first: list[tuple[float, str, str]] = []
        server.on_event = self._event

    def _event(self, entry: LogEntry) -> None:
        if entry.user and entry.user != "*" and self.server.connections(entry.user) > 1:
            if entry.user not in self.doubles and os.environ.get("DEBUG_DOUBLES"):
                print(f"double {trio.current_time():.2f} {entry.user} {entry.event}", flush=True)
            self.doubles.add(entry.user)


class Instance:
    """One ``trio-idle serve`` child process and its health port."""

    def __init__(self, name: str, env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.port = free_tcp_port()
        self.env = {
            **env,
            "TRIO_IDLE_INSTANCE_ID": name,
            "TRIO_IDLE_HEALTH_ADDR": f"127.0.0.1:{self.port}",
        }
        self.log_path = log_dir / f"{name}.log"
        self.proc: trio.Process | None = None

    async def start(self) -> None:
        log = self.log_path.open("ab")
        self.proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "trio_idle.cli", "serve"],
            env=self.env,
            stdout=log,
            stderr=log,
        )
        log.close()  # the child has its own descriptor

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(15):
                await self.proc.wait()
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()

    async def cluster(self, client: httpx.AsyncClient, token: str) -> dict[str, Any] | None:
        try:
            reply = await client.get(
                f"http://127.0.0.1:{self.port}/status",
                headers={"Authorization": f"Bearer {token}"},
            )
        except httpx.HTTPError:
            return None  # not listening yet
        if reply.status_code != 200:
            return None
        body: dict[str, Any] | None = reply.json().get("cluster")
        return body


async def settled(
    instances: list[Instance],
    client: httpx.AsyncClient,
    token: str,
    server: ImapTestServer,
    users: list[str],
) -> bool:
    views = [await i.cluster(client, token) for i in instances]
    if any(
        v is None or v["fenced"] or v["held"] or len(v["members"]) != len(instances) for v in views
    ):
        return False
    owned = sum(v["owned"] for v in views if v is not None)
    return owned == len(users) and all(
        server.idle_count(u) == 1 and server.connections(u) == 1 for u in users
    )


async def wait_settled(
    instances: list[Instance],
    client: httpx.AsyncClient,
    token: str,
    server: ImapTestServer,
    users: list[str],
    seconds: float,
) -> None:
    with trio.fail_after(seconds):
        # /status and the process list offer no event to wait on
        while not await settled(instances, client, token, server, users):  # noqa: ASYNC110
            await trio.sleep(0.2)


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{os.cpu_count()} cores ({model}), Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )


async def run(kills: int, mailboxes: int, ttl: float, poll: float) -> dict[str, Any]:
    pg = PostgresServer()
    pg.start()
    try:
        dsn = pg.create_database("scaling")
        execute_sql(dsn, MAIL_CONNECTION_DDL, POSTGRES_DDL, MEMBERSHIP_SQL.create)
        return await _rounds(dsn, kills, mailboxes, ttl, poll)
    finally:
        pg.cleanup()


async def _rounds(dsn: str, kills: int, mailboxes: int, ttl: float, poll: float) -> dict[str, Any]:
    server = ImapTestServer(keepalive_interval=None)
    backend = ScanBackend(secret=ADMIN_SECRET)
    token = secrets.token_urlsafe(24)
    takeovers: list[float] = []
    unscanned = 0
    log_dir = Path(tempfile.mkdtemp(prefix="trio-idle-scaling-"))
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        await nursery.start(backend.serve)
        users = [f"m{i:05d}@scaling.test" for i in range(mailboxes)]
        for user in users:
            server.add_user(user, PASSWORD)
        rows = [row(u, u, PASSWORD, server.port) for u in users]
        await trio.to_thread.run_sync(lambda: insert_mail_connections(dsn, *rows))
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRIO_IDLE_")}
        env.update(
            ADMIN_SECRET=ADMIN_SECRET,
            ENCRYPTION_KEY=KEY,
            DATABASE_URL=dsn,
            BACKEND_URL=backend.url,
            TRIO_IDLE_IMAP_SECURITY="plain",
            TRIO_IDLE_STATE="postgres",
            TRIO_IDLE_CLUSTER="shared",
            TRIO_IDLE_CLUSTER_TTL=f"{ttl}s",
            TRIO_IDLE_CLUSTER_POLL=f"{poll}s",
            TRIO_IDLE_LOGOUT_TIMEOUT=f"{min(2.0, ttl / 3)}s",
            TRIO_IDLE_CATCHUP_RATE="1000",
            TRIO_IDLE_CONNECT_RATE="1000",
            TRIO_IDLE_STATUS_TOKEN=token,
            TRIO_IDLE_LOG_LEVEL="INFO",
        )
        instances = [Instance(name, env, log_dir) for name in NAMES]
        watch = Watch(server)
        async with httpx.AsyncClient(trust_env=False, timeout=5) as client:
            try:
                for instance in instances:
                    await instance.start()
                await wait_settled(instances, client, token, server, users, 3 * ttl + 60)
                for round_no in range(kills):
                    victim = instances[round_no % len(instances)]
                    lost = sorted(shares(users, list(NAMES))[victim.name])
                    killed_at = trio.current_time()
                    if os.environ.get("DEBUG_DOUBLES"):
                        print(f"kill at {killed_at:.2f}", flush=True)
                    await victim.kill()
                    with trio.fail_after(10):  # the kernel closes its sockets
                        await server.wait_for(functools.partial(_none_connected, server, lost))
                    with_mail = lost[::2]
                    for user in with_mail:
                        server.append(user, b"Subject: during the takeover\r\n\r\nhi\r\n")
                    with trio.fail_after(3 * ttl + 30):
                        await server.wait_for(functools.partial(_all_idle, server, lost))
                    took = trio.current_time() - killed_at
                    takeovers.append(took)
                    with trio.move_on_after(30):
                        while _unscanned(backend, with_mail, killed_at):
                            await backend.wait_for_requests(len(backend.requests) + 1)
                    unscanned += len(_unscanned(backend, with_mail, killed_at))
                    print(
                        f"round {round_no + 1}: killed {victim.name} ({len(lost)} mailboxes): "
                        f"all in IDLE elsewhere after {took:.2f}s",
                        flush=True,
                    )
                    await victim.start()
                    await wait_settled(instances, client, token, server, users, 3 * ttl + 60)
            finally:
                for instance in instances:
                    await instance.stop()
        nursery.cancel_scope.cancel()
    return {
        "takeovers": takeovers,
        "doubles": len(watch.doubles),
        "unscanned": unscanned,
        "logs": str(log_dir),
    }


def _none_connected(server: ImapTestServer, users: list[str]) -> bool:
    return all(server.connections(u) == 0 for u in users)


def _all_idle(server: ImapTestServer, users: list[str]) -> bool:
    return all(server.idle_count(u) == 1 for u in users)


def _unscanned(backend: ScanBackend, users: list[str], since: float) -> list[str]:
    return [u for u in users if not any(r.received_at >= since for r in backend.requests_for(u))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.cluster.takeover_bench")
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--mailboxes", type=int, default=300)
    parser.add_argument("--ttl", type=parse_duration, default=15.0, help="TRIO_IDLE_CLUSTER_TTL")
    parser.add_argument("--poll", type=parse_duration, default=5.0, help="TRIO_IDLE_CLUSTER_POLL")
    parser.add_argument(
        "--processes",
        help="instead of kills: compare these process counts (e.g. 1,2) at the same total of "
        "--sessions; see tests/cluster/processes_bench.py",
    )
    parser.add_argument("--sessions", type=int, default=2000, help="with --processes")
    parser.add_argument("--tls", action="store_true", help="with --processes: implicit TLS")
    parser.add_argument("--idle-window", type=parse_duration, default=60.0, help="with --processes")
    parser.add_argument("--rate", type=float, default=20.0, help="with --processes: mails/s")
    parser.add_argument(
        "--latency-seconds", type=parse_duration, default=20.0, help="with --processes"
    )
    parser.add_argument(
        "--settle", type=parse_duration, default=10.0, help="with --processes: before RSS"
    )
    args = parser.parse_args(argv)
    if args.processes:
        return _processes_main(args)
    started = time.monotonic()
    result = trio.run(run, args.kills, args.mailboxes, args.ttl, args.poll)
    t = result["takeovers"]
    print(f"machine: {machine()}")
    print(
        f"3 instances, {args.mailboxes} mailboxes, TTL {args.ttl:g}s, poll {args.poll:g}s, "
        f"{len(t)} kills (-9), {time.monotonic() - started:.0f}s in all"
    )
    print(
        f"takeover: min {min(t):.2f}s, median {statistics.median(t):.2f}s, max {max(t):.2f}s "
        f"(bound TTL + poll = {args.ttl + args.poll:g}s, plus connecting)"
    )
    print(f"mailboxes watched twice at any server event: {result['doubles']}")
    print(f"mails appended during a takeover and not scanned: {result['unscanned']}")
    print(f"daemon logs: {result['logs']}")
    return 0 if result["doubles"] == 0 and result["unscanned"] == 0 else 1


def _processes_main(args: argparse.Namespace) -> int:
    from tests.cluster import processes_bench

    counts = [int(c) for c in args.processes.split(",")]
    started = time.monotonic()
    result = trio.run(
        processes_bench.run,
        counts,
        args.sessions,
        args.tls,
        args.idle_window,
        args.rate,
        args.latency_seconds,
        args.settle,
        args.ttl,
        args.poll,
    )
    print(f"machine: {machine()}")
    print(
        f"{args.sessions} sessions ({'TLS' if args.tls else 'plaintext'}) on "
        f"{' then '.join(str(c) for c in counts)} process(es) in shared mode; idle window "
        f"{args.idle_window:g}s; {args.rate:g} mails/s for {args.latency_seconds:g}s; "
        f"{time.monotonic() - started:.0f}s in all; {result['date']}"
    )
    print(processes_bench.table(result), end="")
    out = Path(result["logs"]) / "processes.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"details: {out}")
    missed = sum(r["latency"]["missed"] for r in result["runs"])
    return 0 if missed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
