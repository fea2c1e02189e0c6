"""PM2 for real: the shipped ``deploy/ecosystem.config.js`` started by the pinned PM2 7,
the daemon healthy on its health port, then ``pm2 stop`` ends it gracefully.

PM2 comes from ``npm ci`` of tests/ops/pm2 into a temp prefix (the ``pm2_script``
fixture) and runs with ``PM2_HOME`` in the test's temp dir; its daemon is killed after
the test whatever happens. The shipped file is loaded as it is; a wrapper next to the
test's env file replaces only the two installed paths in it (the ``trio-idle`` script,
``/etc/trio-idle/env``) with this checkout's script and a temp env file, so every other
setting (``interpreter: 'none'``, ``kill_timeout``, the ``env`` block, ...) is the one
operators get. Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio
from trio_idle_testing import ImapTestServer
from trio_idle_testing.backend import ScanBackend

from tests.conftest import unavailable
from tests.harness import ADMIN_SECRET, KEY
from tests.ops.conftest import cli_env
from tests.ops.helpers import answer, until
from tests.servers import free_tcp_port
from tests.servers.pm2 import Pm2

ECOSYSTEM = Path(__file__).resolve().parents[2] / "deploy" / "ecosystem.config.js"
INSTALLED_SCRIPT = "/usr/local/bin/trio-idle"
INSTALLED_ENV_FILE = "/etc/trio-idle/env"
APP = "trio-idle"
PASSWORD = "S3ntinel-pw-pm2"


@pytest.fixture
def pm2(pm2_script: Path, tmp_path: Path) -> Iterator[Pm2]:
    runner = Pm2(pm2_script, tmp_path / "pm2-home", cli_env())
    try:
        yield runner
    finally:
        runner.kill()


def trio_idle_script() -> Path:
    script = Path(sys.executable).parent / "trio-idle"
    if not script.exists():
        unavailable(f"{script} is missing (pip install -e .)")
    return script


def wrapper(env_file: Path) -> str:
    """A PM2 config that is the shipped file with this test's two paths."""
    return f"""// deploy/ecosystem.config.js with this checkout's paths (tests/ops/test_pm2.py)
const shipped = require({json.dumps(str(ECOSYSTEM))});
const app = shipped.apps[0];
const installed = {json.dumps(INSTALLED_SCRIPT)}, envFile = {json.dumps(INSTALLED_ENV_FILE)};
if (app.script !== installed || !app.args.includes(envFile)) {{
  throw new Error('deploy/ecosystem.config.js no longer names the installed paths');
}}
app.script = {json.dumps(str(trio_idle_script()))};
app.args = app.args.replace(envFile, {json.dumps(str(env_file))});
module.exports = shipped;
"""


def kill_timeout_seconds() -> float:
    found = re.search(r"^\s*kill_timeout: (\d+),", ECOSYSTEM.read_text(), re.MULTILINE)
    assert found, "kill_timeout not found in deploy/ecosystem.config.js"
    return int(found.group(1)) / 1000


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


async def file_holds(path: Path, *texts: str) -> str:
    """The file's text once it holds every one of ``texts`` (PM2 writes its logs on its
    own time: a file offers no event to wait on). Bound it with ``trio.fail_after``."""
    while True:
        text = await trio.to_thread.run_sync(read, path)
        if all(t in text for t in texts):
            return text
        await trio.sleep(0.05)


@pytest.mark.timeout(180)  # npm ci of PM2 (first use in the session) + start + stop
async def test_pm2_runs_the_shipped_file_and_stop_is_graceful_on_sigint(
    pm2: Pm2, backend: ScanBackend, nursery: trio.Nursery, tmp_path: Path
) -> None:
    imap = ImapTestServer(keepalive_interval=None)
    await nursery.start(imap.serve)
    users = ["a@pm2.test", "b@pm2.test"]
    for user in users:
        imap.add_user(user, PASSWORD)
    conn_file = tmp_path / "connections.toml"
    conn_file.write_text(
        "\n".join(
            f'[[connection]]\nid = "c{n}"\nemail = "{user}"\nimap_host = "127.0.0.1"\n'
            f'imap_port = {imap.port}\npassword_env = "PW_PM2"\n'
            for n, user in enumerate(users)
        )
    )
    health_port = free_tcp_port()
    env_file = tmp_path / "env"
    # systemd's syntax, read by `--env-file`; its health address wins over the file's
    # `env` block (127.0.0.1:9310)
    env_file.write_text(
        f"ADMIN_SECRET={ADMIN_SECRET}\nENCRYPTION_KEY={KEY}\nBACKEND_URL={backend.url}\n"
        f"PW_PM2={PASSWORD}\nTRIO_IDLE_SOURCE=file\nTRIO_IDLE_CONNECTIONS_FILE={conn_file}\n"
        f"TRIO_IDLE_IMAP_SECURITY=plain\nTRIO_IDLE_STATE=sqlite\n"
        f"TRIO_IDLE_STATE_PATH={tmp_path / 'state.sqlite3'}\n"
        f"TRIO_IDLE_HEALTH_ADDR=127.0.0.1:{health_port}\n"
    )
    env_file.chmod(0o600)
    config = tmp_path / "ecosystem.config.js"
    config.write_text(wrapper(env_file))
    home_pm2 = Path.home() / ".pm2"
    had_home_pm2 = home_pm2.exists()

    await trio.to_thread.run_sync(pm2.run, ["start", str(config)])
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{health_port}") as daemon:
        with trio.fail_after(30):
            await until(answer(daemon, "/readyz"), lambda r: r is not None and r.status_code == 200)
            await imap.wait_for(lambda: all(imap.idle_count(u) == 1 for u in users))
    [app] = await trio.to_thread.run_sync(pm2.processes)
    assert app["name"] == APP and app["pm2_env"]["status"] == "online"
    assert app["pm2_env"]["exec_interpreter"] == "none"
    assert app["pm2_env"]["restart_time"] == 0  # started once, never crashed
    assert app["pm2_env"]["kill_timeout"] == kill_timeout_seconds() * 1000  # the file's

    started = trio.current_time()
    await trio.to_thread.run_sync(pm2.run, ["stop", APP])
    elapsed = trio.current_time() - started
    out_log = pm2.app_log(APP, "out")
    with trio.fail_after(10):
        pm2_log = await file_holds(pm2.daemon_log, f"App [{APP}:0] exited with code")
    with trio.move_on_after(3):  # the app's last lines may reach the file after the exit
        await file_holds(out_log, "[idle/daemon] stopped")
    out, errors = read(out_log), read(pm2.app_log(APP, "error"))
    context = f"--- out:\n{out[-3000:]}\n--- error:\n{errors[-2000:]}\n--- pm2:\n{pm2_log[-2000:]}"

    # PM2 7 sends SIGINT, the daemon says so, and it ended by itself with code 0
    assert f"App [{APP}:0] exited with code [0] via signal [SIGINT]" in pm2_log, context
    shutdown = f"[idle/daemon] shutting down (SIGINT): closing {len(users)} sessions"
    assert shutdown in out, context
    assert "[idle/daemon] stopped" in out[out.index(shutdown) :], context
    # ...within kill_timeout: no SIGKILL, and `pm2 stop` returned before it could send one
    assert elapsed < kill_timeout_seconds(), (elapsed, context)
    assert "SIGKILL" not in pm2_log, context
    # every session logged out (the server saw each LOGOUT once)
    with trio.fail_after(5):  # written before the exit; the server may read them later
        await imap.wait_for(lambda: imap.stats.logouts >= len(users))
    logouts = sorted(e.user for e in imap.log if e.event == "LOGOUT")
    assert logouts == users, context
    assert "Traceback" not in errors, context
    [app] = await trio.to_thread.run_sync(pm2.processes)
    assert app["pm2_env"]["status"] == "stopped"
    # nothing of PM2's reached the home directory
    assert had_home_pm2 or not home_pm2.exists()
    assert PASSWORD not in out + errors + pm2_log
