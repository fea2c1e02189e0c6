"""``trio-idle status`` as an operator runs it: the real CLI as a process, asking the real
daemon (in-process, against the IMAP test server and the test backend) over 127.0.0.1.

What an operator notices: a table with each connection's state, health, last push and
scan, last error; the exit code a script can act on (0 ok, 1 something is not, 2 the
settings or the token are wrong, 3 no daemon answers); the token never printed.
"""

from __future__ import annotations

import sys

import trio

from tests.harness import running_daemon
from tests.ops.conftest import cli_env, closed_port
from tests.reliability.rig import Rig, mailbox_name

TOKEN = "st-status-cmd-0123456789abcdef"
A, B = mailbox_name(1, "status"), mailbox_name(2, "status")


async def status(addr: str, *args: str, token: str | None = TOKEN) -> tuple[int, str, str]:
    env = cli_env(TRIO_IDLE_HEALTH_ADDR=addr)
    if token is not None:
        env["TRIO_IDLE_STATUS_TOKEN"] = token
    done = await trio.run_process(
        [sys.executable, "-m", "trio_idle.cli", "status", *args],
        env=env,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    out, err = done.stdout.decode(), done.stderr.decode()
    assert TOKEN not in out + err
    return done.returncode, out, err


def row_of(out: str, conn_id: str) -> list[str]:
    (line,) = [line for line in out.splitlines() if line.startswith(conn_id + " ")]
    return line.split()


async def test_status_shows_the_connections_and_exits_by_their_health(rig: Rig) -> None:
    settings = rig.settings(
        TRIO_IDLE_HEALTH_ADDR="127.0.0.1:0",
        TRIO_IDLE_STATUS_TOKEN=TOKEN,
        TRIO_IDLE_AUTH_BACKOFF="1h",
        TRIO_IDLE_READY_SHARE="0.5",
    )
    async with running_daemon(settings, rig.source(A, B)) as daemon:
        assert daemon.supervisor is not None and daemon.supervisor.health_url is not None
        addr = daemon.supervisor.health_url.removeprefix("http://")
        with trio.fail_after(30):
            await rig.all_idle([A, B])
            rig.ledger.append(A)
            await rig.backend.wait_for_requests(1, email=A, finished=True)
            await rig.quiet(daemon, A)
            await rig.logs.wait_until(
                lambda: all(
                    daemon.reconciler.handles[n].health.tracker.current is not None for n in (A, B)
                )
            )
            code, out, err = await status(addr)
            assert code == 0, out + err
            a = row_of(out, A)
            assert a[2:4] == ["idle", "ok"] and a[4].startswith("20") and a[5].startswith("20")
            assert row_of(out, B)[2:6] == ["idle", "ok", "-", "-"]  # no mail, no scan yet
            assert "daemon ready: 2/2 sessions watching" in out

            # B's password stops working: B is not ok, the script learns it from the code
            rig.server.faults(B).refuse_login = True
            rig.server.drop(B, "fin")
            await rig.log(f"[idle/{B}] authentication failed")
            code, out, _ = await status(addr)
            assert code == 1
            b = row_of(out, B)
            assert b[2:4] == ["auth-failed", "auth_failed/invalid_credentials"]
            assert "AUTHENTICATIONFAILED" in " ".join(b[6:])
            assert "1 of 2 connections not ok" in out
            code, out, _ = await status(addr, "--connection", A)  # one connection only
            assert code == 0 and B not in out

            code, out, err = await status(addr, token="st-wrong-token-0123456789")
            assert code == 2 and out == "" and "refused the token" in err
            code, out, err = await status(addr, token=None)
            assert code == 2 and "TRIO_IDLE_STATUS_TOKEN" in err
    code, out, err = await status(f"127.0.0.1:{closed_port()}")
    assert code == 3 and out == "" and "daemon unreachable" in err
