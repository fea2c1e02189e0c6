"""``trio-idle serve`` as a real process: exit codes, signals, LOGOUT on shutdown."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import trio
from trio_idle_testing.backend import ScanBackend

from tests.harness import ADMIN_SECRET, KEY, poll_until, serve_process
from tests.integration.dovecot_log import all_logged_out, wait_session_ends
from tests.servers.dovecot import DovecotServer


def _serve_env(backend_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIO_IDLE_")}
    env.update(
        {
            "ADMIN_SECRET": ADMIN_SECRET,
            "ENCRYPTION_KEY": KEY,
            "BACKEND_URL": backend_url,
            "TRIO_IDLE_SOURCE": "file",
            "TRIO_IDLE_IMAP_SECURITY": "plain",
            "TRIO_IDLE_CONNECT_TIMEOUT": "30s",
            "TRIO_IDLE_CONNECT_RATE": "500",
        }
    )
    env.update(extra)
    return env


async def test_sigterm_logs_out_everywhere_and_exits_zero(
    dovecot: DovecotServer, backend: ScanBackend, tmp_path: Path
) -> None:
    users = [dovecot.new_user("sig") for _ in range(30)]
    # a server that accepts TCP but never greets, and a port where nobody listens
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(100)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    entries = []
    extra_env = {}
    for n, user in enumerate(users):
        extra_env[f"PW_{n}"] = user.password
        entries.append(
            f'[[connection]]\nid = "c{n}"\nemail = "{user.email}"\nimap_host = "127.0.0.1"\n'
            f'imap_port = {dovecot.plain_port}\npassword_env = "PW_{n}"\n'
        )
    for n, port in enumerate([silent.getsockname()[1], closed_port]):
        extra_env[f"DEAD_{n}"] = "x"
        entries.append(
            f'[[connection]]\nid = "dead{n}"\nemail = "dead{n}@example.test"\n'
            f'imap_host = "127.0.0.1"\nimap_port = {port}\npassword_env = "DEAD_{n}"\n'
        )
    conn_file = tmp_path / "connections.toml"
    conn_file.write_text("\n".join(entries))
    env = _serve_env(backend.url, TRIO_IDLE_CONNECTIONS_FILE=str(conn_file), **extra_env)
    log_path = tmp_path / "serve.log"
    try:
        async with serve_process(env, log_path) as proc:
            with trio.fail_after(30):
                await poll_until(
                    lambda: all(dovecot.connections(u.email) == 1 for u in users), interval=0.3
                )
            proc.send_signal(signal.SIGTERM)
            # the contract: exit 0 within 10 s even with unreachable and silent servers
            with trio.fail_after(10):
                code = await proc.wait()
    finally:
        silent.close()
    output = log_path.read_text()
    assert code == 0, output[-3000:]
    assert "[idle/daemon] shutting down (SIGTERM)" in output
    assert (
        "[idle/db]" not in output
        and "[idle/file] refreshed — 32 active connections, 32 sessions" in output
    )
    with trio.fail_after(10):
        await poll_until(lambda: all(dovecot.connections(u.email) == 0 for u in users))
        # each session ended with LOGOUT, not with a closed socket
        ends = {u.email: await wait_session_ends(dovecot, u.email) for u in users}
    assert all(all_logged_out(why) for why in ends.values()), ends
    assert ADMIN_SECRET not in output and KEY not in output
    assert all(u.password not in output for u in users)


def test_config_error_exits_2_with_one_line(tmp_path: Path) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("ADMIN_SECRET", "ENCRYPTION_KEY", "DATABASE_URL")
    }
    env.update(
        {
            "ADMIN_SECRET": "x",
            "ENCRYPTION_KEY": "too-short",
            "DATABASE_URL": "postgresql://u:p@127.0.0.1/db",
        }
    )
    result = subprocess.run(
        [sys.executable, "-m", "trio_idle.cli", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("trio-idle: configuration error: ENCRYPTION_KEY:")
    assert "32 characters" in lines[0]
    assert "too-short" not in result.stderr


async def test_info_lines_on_stdout_warnings_on_stderr(
    backend: ScanBackend, tmp_path: Path
) -> None:
    # what PM2's out_file / error_file (or journald's priorities) receive
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    conn_file = tmp_path / "connections.toml"
    conn_file.write_text(
        f'[[connection]]\nid = "c"\nemail = "split@example.test"\nimap_host = "127.0.0.1"\n'
        f'imap_port = {port}\npassword_env = "PW"\n'
    )
    env = _serve_env(backend.url, TRIO_IDLE_CONNECTIONS_FILE=str(conn_file), PW="x")
    out_path, err_path = tmp_path / "out.log", tmp_path / "err.log"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "trio_idle.cli", "serve"], env=env, stdout=out, stderr=err
        )
        try:
            with trio.fail_after(20):
                await poll_until(lambda: "connect failed" in err_path.read_text(), 0.05)
            proc.send_signal(signal.SIGTERM)
            with trio.fail_after(10):
                assert await proc.wait() == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    stdout, stderr = out_path.read_text(), err_path.read_text()
    assert "INFO    [idle/daemon] trio-idle " in stdout
    assert "[idle/daemon] shutting down (SIGTERM)" in stdout
    assert f"WARNING [idle/split@example.test] connect failed: connection to 127.0.0.1:{port}" in (
        stderr
    )
    assert all(" WARNING " not in line and " ERROR " not in line for line in stdout.splitlines())
    assert all(" INFO " not in line for line in stderr.splitlines()), stderr
