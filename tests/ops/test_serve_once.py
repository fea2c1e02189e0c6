"""``trio-idle serve --once`` as a real process: report and exit code."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import trio
from trio_idle_testing.backend import ScanBackend

from tests.harness import ADMIN_SECRET, KEY
from tests.integration.dovecot_log import all_logged_out, wait_session_ends
from tests.ops.conftest import cli_env, closed_port
from tests.servers.dovecot import DovecotServer, DovecotUser

#: every test runs ``serve --once`` under its own 60 s limit, which must fire first
pytestmark = pytest.mark.timeout(120)


def entry(conn_id: str, email: str, port: int, password_env: str) -> str:
    return (
        f'[[connection]]\nid = "{conn_id}"\nemail = "{email}"\nimap_host = "127.0.0.1"\n'
        f'imap_port = {port}\npassword_env = "{password_env}"\n'
    )


async def serve_once(
    tmp_path: Path, backend: ScanBackend, entries: list[str], **env: str
) -> tuple[int, str, str]:
    conn_file = tmp_path / "connections.toml"
    conn_file.write_text("\n".join(entries))
    full_env = cli_env(
        ADMIN_SECRET=ADMIN_SECRET,
        ENCRYPTION_KEY=KEY,
        BACKEND_URL=backend.url,
        TRIO_IDLE_SOURCE="file",
        TRIO_IDLE_CONNECTIONS_FILE=str(conn_file),
        TRIO_IDLE_IMAP_SECURITY="plain",
        TRIO_IDLE_CONNECT_TIMEOUT="5s",
        TRIO_IDLE_COMMAND_TIMEOUT="5s",
        **env,
    )
    with trio.fail_after(60):
        result = await trio.run_process(
            [sys.executable, "-m", "trio_idle.cli", "serve", "--once"],
            env=full_env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def test_all_connected_exits_0(
    dovecot: DovecotServer, backend: ScanBackend, tmp_path: Path
) -> None:
    a, b = dovecot.new_user("once"), dovecot.new_user("once")
    code, out, err = await serve_once(
        tmp_path,
        backend,
        [
            entry("a", a.email, dovecot.plain_port, "PW_A"),
            entry("b", b.email, dovecot.plain_port, "PW_B"),
        ],
        PW_A=a.password,
        PW_B=b.password,
    )
    assert code == 0, out + err
    assert out.splitlines()[0] == "2 connections in the source, 2 sessions, 2 connected"
    assert "idle 2" in out.splitlines()[1]
    assert out.splitlines()[-1] == "result: all connections watched"
    assert f"[idle/{a.email}] connected (127.0.0.1:{dovecot.plain_port})" in err
    assert "[idle/daemon] shutting down (--once: report printed)" in err
    assert a.password not in out + err and b.password not in out + err
    # the sessions were logged out on the way out (LOGOUT, not a closed socket)
    with trio.fail_after(10):
        ends = [await wait_session_ends(dovecot, u.email) for u in (a, b)]
    assert all(all_logged_out(why) for why in ends), ends


async def test_one_unreachable_row_exits_1(
    dovecot: DovecotServer, dovecot_user: DovecotUser, backend: ScanBackend, tmp_path: Path
) -> None:
    user = dovecot_user
    dead = closed_port()
    code, out, err = await serve_once(
        tmp_path,
        backend,
        [
            entry("good", user.email, dovecot.plain_port, "PW_GOOD"),
            entry("dead", "dead@example.test", dead, "PW_DEAD"),
        ],
        PW_GOOD=user.password,
        PW_DEAD="dead-secret-pw",
    )
    assert code == 1, out + err
    lines = out.splitlines()
    assert lines[0] == "2 connections in the source, 2 sessions, 1 connected"
    assert (
        f"FAILED dead dead@example.test 127.0.0.1:{dead} [backing-off]: "
        f"connection to 127.0.0.1:{dead} refused"
    ) in lines
    assert lines[-1] == "result: 1 failed"
    assert "dead-secret-pw" not in out + err and user.password not in out + err
