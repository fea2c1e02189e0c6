"""No mail missed across daemon restarts: persisted state, startup scans, paced catch-up."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from trio_idle_testing import ImapTestServer
from trio_idle_testing.backend import ScanBackend

from tests.harness import (
    ADMIN_SECRET,
    KEY,
    ListSource,
    capture_logs,
    make_settings,
    poll_until,
    row,
    running_daemon,
)
from tests.restart.conftest import state_settings
from tests.servers.postgres import execute_sql, fetch_sql
from trio_idle.runtime.daemon import Daemon
from trio_idle.state.tables import POSTGRES_DDL, POSTGRES_TABLE

PASSWORD = "S3ntinel-pw-restart"
RATE = 40.0  # catch-up scans per second


def users(n: int) -> list[str]:
    return [f"r{i}@restart.test" for i in range(n)]


@pytest.fixture(params=["sqlite", "postgres"])
def state_env(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    """Settings selecting each state backend; the Postgres one uses a fresh database with
    the state table only (`trio-idle db migrate` is tested below)."""
    return state_settings(request, tmp_path, POSTGRES_DDL)


def forget_state(env: dict[str, str]) -> None:
    """Lose the whole state, as an operator deleting the file (or the table's rows) would."""
    if env["TRIO_IDLE_STATE"] == "sqlite":
        Path(env["TRIO_IDLE_STATE_PATH"]).unlink()
    else:
        execute_sql(env["DATABASE_URL"], f"TRUNCATE {POSTGRES_TABLE}")


def recorded_ids(env: dict[str, str]) -> set[str]:
    """Connection ids with a stored state (what a restart would compare against)."""
    if env["TRIO_IDLE_STATE"] == "postgres":
        rows = fetch_sql(env["DATABASE_URL"], f"SELECT connection_id FROM {POSTGRES_TABLE}")
        return {r[0] for r in rows}
    path = Path(env["TRIO_IDLE_STATE_PATH"])
    if not path.exists():
        return set()
    try:
        with sqlite3.connect(path) as db:
            return {r[0] for r in db.execute("SELECT connection_id FROM mailbox_state")}
    except sqlite3.Error:  # the daemon is creating it right now
        return set()


async def run_until_quiet(
    server: ImapTestServer, backend: ScanBackend, names: list[str], env: dict[str, str]
) -> None:
    """Start the daemon, wait until every session is in IDLE and every scan is answered
    and recorded, then shut it down gracefully (which flushes the state)."""
    settings = make_settings(
        backend.url, TRIO_IDLE_IMAP_SECURITY="plain", TRIO_IDLE_CATCHUP_RATE=str(RATE), **env
    )
    source = ListSource([row(n, n, PASSWORD, server.port) for n in names])
    async with running_daemon(settings, source) as daemon:
        with trio.fail_after(30):
            await server.wait_for(lambda: server.idle_count() >= len(names))
            await quiet(daemon)


async def quiet(daemon: Daemon) -> None:
    def busy() -> bool:
        return any(
            h.coalescer.active or h.coalescer.pending for h in daemon.reconciler.handles.values()
        )

    while busy():  # noqa: ASYNC110 - a daemon-wide condition has no single event
        await trio.sleep(0.02)


def startup_scans(backend: ScanBackend) -> dict[str, int]:
    counts: dict[str, int] = {}
    for request in backend.requests:
        if request.body.get("reason") == "startup" and request.email:
            counts[request.email] = counts.get(request.email, 0) + 1
    return counts


def assert_paced(backend: ScanBackend, rate: float) -> None:
    """The backend never saw more catch-up scans than the rate allows in any second."""
    times = sorted(
        r.received_at for r in backend.requests if r.body.get("reason") in ("startup", "reconnect")
    )
    window = int(rate) + 2  # slack: a second holds rate+1 starts, plus HTTP jitter
    for i in range(len(times) - window):
        assert times[i + window] - times[i] >= 1.0, "catch-up scans exceeded the pace"


async def test_only_mailboxes_with_new_mail_are_scanned_after_restart(
    server: ImapTestServer, backend: ScanBackend, state_env: dict[str, str]
) -> None:
    names = users(100)
    for name in names:
        server.add_user(name, PASSWORD)
    # first run: the store is empty, so every mailbox gets one paced startup scan
    await run_until_quiet(server, backend, names, state_env)
    assert startup_scans(backend) == dict.fromkeys(names, 1)
    assert_paced(backend, RATE)

    # mail arrives while the daemon is down
    with_mail = names[::10] + names[1::10] + names[2::10]  # 30 mailboxes
    for name in with_mail:
        server.append(name, b"Subject: while you were out\r\n\r\nhi\r\n")
    backend.requests.clear()
    await run_until_quiet(server, backend, names, state_env)
    assert startup_scans(backend) == dict.fromkeys(with_mail, 1)
    assert len(backend.requests) == 30

    # a restart with nothing new scans nothing
    backend.requests.clear()
    await run_until_quiet(server, backend, names, state_env)
    assert backend.requests == []


async def test_lost_state_costs_one_paced_scan_per_mailbox(
    server: ImapTestServer, backend: ScanBackend, state_env: dict[str, str]
) -> None:
    names = users(100)
    for name in names:
        server.add_user(name, PASSWORD)
    await run_until_quiet(server, backend, names, state_env)
    await trio.to_thread.run_sync(forget_state, state_env)
    backend.requests.clear()
    await run_until_quiet(server, backend, names, state_env)
    assert startup_scans(backend) == dict.fromkeys(names, 1)
    assert_paced(backend, RATE)


async def test_uidvalidity_change_while_down_is_scanned(
    server: ImapTestServer, backend: ScanBackend, state_env: dict[str, str]
) -> None:
    names = users(3)
    for name in names:
        server.add_user(name, PASSWORD)
    env = state_env
    await run_until_quiet(server, backend, names, env)
    server.set_uidvalidity(names[1], server.mailbox(names[1]).uidvalidity + 1)
    backend.requests.clear()
    with capture_logs() as logs:
        await run_until_quiet(server, backend, names, env)
    assert startup_scans(backend) == {names[1]: 1}
    assert logs.matching(f"[idle/{names[1]}] catch-up scan (uidvalidity changed while down)")


async def test_kill_9_during_an_unanswered_scan_rescans_after_restart(
    server: ImapTestServer, backend: ScanBackend, state_env: dict[str, str], tmp_path: Path
) -> None:
    names = users(2)
    victim = names[0]
    for name in names:
        server.add_user(name, PASSWORD)
    conn_file = tmp_path / "connections.toml"
    conn_file.write_text(
        "\n".join(
            f'[[connection]]\nid = "{n}"\nemail = "{n}"\nimap_host = "127.0.0.1"\n'
            f'imap_port = {server.port}\npassword_env = "PW"\n'
            for n in names
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIO_IDLE_")}
    env.update(
        {
            "ADMIN_SECRET": ADMIN_SECRET,
            "ENCRYPTION_KEY": KEY,
            "BACKEND_URL": backend.url,
            "PW": PASSWORD,
            "TRIO_IDLE_SOURCE": "file",
            "TRIO_IDLE_CONNECTIONS_FILE": str(conn_file),
            "TRIO_IDLE_IMAP_SECURITY": "plain",
            "TRIO_IDLE_SCAN_TIMEOUT": "60s",
            **state_env,
        }
    )

    async def start() -> trio.Process:
        return await trio.lowlevel.open_process(
            [sys.executable, "-m", "trio_idle.cli", "serve"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    proc = await start()
    try:
        with trio.fail_after(30):
            await backend.wait_for_requests(2, finished=True)  # both startup scans
            # and flushed to the store
            await poll_until(lambda: recorded_ids(state_env) == set(names), interval=0.2)
        gate = backend.hold(victim)
        server.append(victim, b"Subject: in flight\r\n\r\nx\r\n")
        with trio.fail_after(15):
            await backend.wait_for_requests(3)  # the victim's scan is now held open
        proc.send_signal(signal.SIGKILL)
        with trio.fail_after(10):
            await proc.wait()
        gate.release()
        backend.requests.clear()
        proc = await start()
        with trio.fail_after(30):
            await backend.wait_for_requests(1, email=victim, finished=True)
            await server.wait_for(lambda: server.idle_count() >= 2)
        assert startup_scans(backend) == {victim: 1}
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_db_migrate_creates_the_state_table(pg_dsn: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIO_IDLE_")}
    env["DATABASE_URL"] = pg_dsn
    for _ in range(2):  # idempotent
        result = await trio.run_process(
            [sys.executable, "-m", "trio_idle.cli", "db", "migrate"],
            env=env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr.decode()
        assert b"trio_idle_mailbox_state is ready" in result.stdout
        assert b"trio_idle_oauth_refresh_token is ready" in result.stdout
        assert b"trio_idle_account_health is ready" in result.stdout
    from tests.servers.postgres import fetch_sql

    rows = await trio.to_thread.run_sync(
        fetch_sql, pg_dsn, "SELECT count(*) FROM trio_idle_mailbox_state"
    )
    assert rows[0][0] == 0
    rows = await trio.to_thread.run_sync(
        fetch_sql, pg_dsn, "SELECT count(*) FROM trio_idle_oauth_refresh_token"
    )
    assert rows[0][0] == 0
    rows = await trio.to_thread.run_sync(
        fetch_sql, pg_dsn, "SELECT count(*) FROM trio_idle_account_health"
    )
    assert rows[0][0] == 0
    env["DATABASE_URL"] = pg_dsn.rsplit("/", 1)[0] + "/no_such_db"
    result = await trio.run_process(
        [sys.executable, "-m", "trio_idle.cli", "db", "migrate"],
        env=env,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 1
    assert pg_dsn.split("@")[0] not in result.stderr.decode()  # no credentials echoed
