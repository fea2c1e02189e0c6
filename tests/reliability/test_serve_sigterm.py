"""SIGTERM of a real ``trio-idle serve`` process holding 500 sessions.

The IMAP test server runs in this (the test) process; the daemon is a subprocess reading a
TOML connection file. Besides 490 healthy sessions there are sessions that went half-open
in IDLE (their LOGOUT is never answered), rows pointing at a server that accepts but never
greets, and rows pointing at a closed port. Contract: exit code 0 within 10 s, and every
healthy session said LOGOUT.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
from pathlib import Path

import pytest
import trio
from trio_idle_testing import ImapTestServer
from trio_idle_testing.backend import ScanBackend

from tests.harness import ADMIN_SECRET, KEY, serve_process

HEALTHY = 490
HALF_OPEN = 5
DEAD = 5  # each: never-greeting server and closed port
PASSWORD = "S3ntinel-pw-sigterm"


def raise_fd_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def entry(conn_id: str, email: str, port: int) -> str:
    return (
        f'[[connection]]\nid = "{conn_id}"\nemail = "{email}"\nimap_host = "127.0.0.1"\n'
        f'imap_port = {port}\npassword_env = "RELIABILITY_IMAP_PW"\n'
    )


@pytest.mark.timeout(120)  # its own 60 s limit must fire first, with its message
async def test_sigterm_with_500_sessions_exits_zero_within_10s(
    server: ImapTestServer, backend: ScanBackend, nursery: trio.Nursery, tmp_path: Path
) -> None:
    raise_fd_limit(4096)  # ~500 server sockets here, ~500 client sockets in the child
    healthy = [f"h{n}@sig.test" for n in range(HEALTHY)]
    half_open = [f"s{n}@sig.test" for n in range(HALF_OPEN)]
    for user in healthy + half_open:
        server.add_user(user, PASSWORD)
    mute = ImapTestServer(keepalive_interval=None)  # accepts TCP, never greets
    mute.global_faults.silent = True
    await nursery.start(mute.serve)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]

    entries = [entry(u, u, server.port) for u in healthy + half_open]
    entries += [entry(f"mute{n}", f"mute{n}@sig.test", mute.port) for n in range(DEAD)]
    entries += [entry(f"closed{n}", f"closed{n}@sig.test", closed_port) for n in range(DEAD)]
    conn_file = tmp_path / "connections.toml"
    conn_file.write_text("\n".join(entries))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIO_IDLE_")}
    env.update(
        ADMIN_SECRET=ADMIN_SECRET,
        ENCRYPTION_KEY=KEY,
        BACKEND_URL=backend.url,
        RELIABILITY_IMAP_PW=PASSWORD,
        TRIO_IDLE_SOURCE="file",
        TRIO_IDLE_CONNECTIONS_FILE=str(conn_file),
        TRIO_IDLE_IMAP_SECURITY="plain",
        TRIO_IDLE_CONNECT_RATE="5000",
        TRIO_IDLE_CONNECT_CONCURRENCY="500",
        TRIO_IDLE_CONNECT_TIMEOUT="30s",
        TRIO_IDLE_LOG_LEVEL="INFO",
        TRIO_IDLE_STATE_PATH=str(tmp_path / "state.sqlite3"),  # the default backend, private
    )
    log_path = tmp_path / "serve.log"
    async with serve_process(env, log_path) as proc:
        with trio.fail_after(60):
            await server.wait_for(lambda: server.idle_count() == HEALTHY + HALF_OPEN)
            await mute.wait_for(lambda: mute.stats.connections_open >= DEAD)
        for user in half_open:
            server.faults(user).silent = True  # half-open now: DONE/LOGOUT unanswered
        proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(10):  # the contract
            await proc.wait()
        code = proc.returncode
    output = log_path.read_text()
    assert code is not None, "no exit within 10 s of SIGTERM:\n" + output[-3000:]
    assert code == 0, output[-3000:]
    assert "[idle/daemon] shutting down (SIGTERM)" in output
    assert f"[idle/file] refreshed — {HEALTHY + HALF_OPEN + 2 * DEAD} active connections" in output
    with trio.move_on_after(10):  # they were sent before the exit; the server may lag
        await server.wait_for(lambda: server.stats.logouts >= HEALTHY)
    missing = set(healthy) - {e.user for e in server.log if e.event == "LOGOUT"}
    assert not missing, (
        f"no LOGOUT from {len(missing)}, e.g. {sorted(missing)[:3]}\n" + (output[-3000:])
    )
    assert server.stats.logouts == HEALTHY  # one LOGOUT each, none from the half-open
    assert PASSWORD not in output and ADMIN_SECRET not in output
