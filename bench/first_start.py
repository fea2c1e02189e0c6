"""What the backend receives when the daemon starts over N mailboxes that already hold mail.

``python -m bench.first_start [--mailboxes 1000]`` runs, in one process, the IMAP test
server (N mailboxes with 3 messages each), the test scan backend and the daemon with a
fresh SQLite state store, for ``TRIO_IDLE_START_FROM=full`` and ``=now``: a first start
(empty store), then a second start over the same store. For each start it counts the scan
requests and the account health reports the backend received until every session idles
and every scan is answered. Catch-up scans are paced by ``TRIO_IDLE_CATCHUP_RATE`` (20/s
by default; raised here so the run is short): at the default, a first start with ``full``
takes N / 20 seconds of scans on top.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio
from loguru import logger
from trio_idle_testing import ImapTestServer
from trio_idle_testing.backend import ScanBackend

from trio_idle.core.config import parse_settings
from trio_idle.core.crypto import derive_key, encrypt_password
from trio_idle.runtime.daemon import Daemon, run_daemon

KEY = "bench-first-start-key-0123456789abcdef"
SECRET = "bench-first-start-admin-secret"
PASSWORD = "bench-first-start-pw"
OLD_MAIL = 3


class _Rows:
    name = "db"

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows

    async def fetch(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.rows]


def _settled(daemon: Daemon) -> bool:
    """No scan active or pending, every connection's first health known and reported."""
    now = trio.current_time()
    for h in daemon.reconciler.handles.values():
        if h.coalescer.active or h.coalescer.pending:
            return False
        if h.health.tracker.current is None or h.health.tracker.due(now) is not None:
            return False
    return True


async def one_start(
    server: ImapTestServer, n: int, rows: list[dict[str, Any]], state: Path, start_from: str
) -> tuple[int, int, float]:
    """(scan requests, health reports, seconds) of one start until it settled."""
    backend = ScanBackend(secret=SECRET)
    async with trio.open_nursery() as nursery:
        url = await nursery.start(backend.serve)
        settings = parse_settings(
            {
                "ADMIN_SECRET": SECRET,
                "ENCRYPTION_KEY": KEY,
                "BACKEND_URL": url,
                "DATABASE_URL": "postgresql://unused@127.0.0.1:1/unused",
                "TRIO_IDLE_IMAP_SECURITY": "plain",
                "TRIO_IDLE_STATE": "sqlite",
                "TRIO_IDLE_STATE_PATH": str(state),
                "TRIO_IDLE_START_FROM": start_from,
                "TRIO_IDLE_CATCHUP_RATE": "100000",
                "TRIO_IDLE_CONNECT_RATE": "2000",
                "TRIO_IDLE_CONNECT_CONCURRENCY": "200",
            }
        )
        started = time.perf_counter()
        daemon: Daemon = await nursery.start(run_daemon, settings, _Rows(rows))
        await server.wait_for(lambda: server.idle_count() >= n)
        while not _settled(daemon):  # noqa: ASYNC110 - a daemon-wide condition, no one event
            await trio.sleep(0.05)
        seconds = time.perf_counter() - started
        daemon.shutdown("bench done")
        await daemon.wait_stopped()
        nursery.cancel_scope.cancel()
    return len(backend.requests), len(backend.status_reports), seconds


async def _drained(server: ImapTestServer) -> None:
    """Every session of the previous start has logged out."""
    await server.wait_for(lambda: server.idle_count() == 0)


async def run(n: int) -> None:
    print(f"{n} mailboxes with {OLD_MAIL} messages each (already scanned by the old daemon)")
    print(f"{'TRIO_IDLE_START_FROM':<22}{'start':<8}{'scans':>7}{'health reports':>16}{'s':>7}")
    for start_from in ("full", "now"):
        server = ImapTestServer(keepalive_interval=None)
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            names = [f"f{i}@first-start.test" for i in range(n)]
            key = derive_key(KEY)
            rows = []
            for name in names:
                server.add_user(name, PASSWORD)
                for m in range(OLD_MAIL):
                    server.append(name, f"Subject: old {m}\r\n\r\nold\r\n".encode())
                rows.append(
                    {
                        "id": name,
                        "userId": "bench",
                        "email": name,
                        "imapHost": "127.0.0.1",
                        "imapPort": server.port,
                        "encryptedPassword": encrypt_password(PASSWORD, key),
                    }
                )
            with tempfile.TemporaryDirectory() as tmp:
                state = Path(tmp) / "state.sqlite3"
                for which in ("first", "second"):
                    scans, reports, seconds = await one_start(server, n, rows, state, start_from)
                    print(f"{start_from:<22}{which:<8}{scans:>7}{reports:>16}{seconds:>7.1f}")
                    await _drained(server)
            nursery.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mailboxes", type=int, default=1000)
    args = parser.parse_args()
    logger.remove()  # the daemon's lines for N mailboxes would drown the figures
    logger.add(sys.stderr, level="WARNING")
    trio.run(run, args.mailboxes)


if __name__ == "__main__":
    main()
