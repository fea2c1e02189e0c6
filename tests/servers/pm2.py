"""PM2 for the tests: installed from a pinned lock into a throwaway npm prefix, run with
its own ``PM2_HOME``.

:func:`install_pm2` copies ``tests/ops/pm2/package.json`` and its ``package-lock.json``
(PM2 and every dependency pinned) into a directory and runs ``npm ci`` there: the
machine needs ``node`` and ``npm`` and the npm registry, nothing installed globally.
:class:`Pm2` runs that ``pm2`` with ``PM2_HOME`` in a directory of its own, so the PM2
daemon it starts keeps its sockets, pid file and logs there and nothing reaches the
user's ``~/.pm2``; :meth:`Pm2.kill` ends that daemon (and the apps it runs).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import ServerStartError, ServerUnavailable

__all__ = ["PM2_LOCK_DIR", "Pm2", "install_pm2"]

#: package.json + package-lock.json pinning PM2
PM2_LOCK_DIR = Path(__file__).resolve().parents[1] / "ops" / "pm2"
_INSTALL_TIMEOUT = 600.0
_COMMAND_TIMEOUT = 60.0


def install_pm2(prefix: Path) -> Path:
    """``npm ci`` of the pinned PM2 into ``prefix``; the path of its ``pm2`` script.

    :class:`ServerUnavailable` if node or npm is missing or the install fails (no
    registry): the fixture turns that into a skip, or a failure under CI.
    """
    if shutil.which("node") is None:
        raise ServerUnavailable("node (Node.js) not found on PATH")
    npm = shutil.which("npm")
    if npm is None:
        raise ServerUnavailable("npm not found on PATH")
    prefix.mkdir(parents=True, exist_ok=True)
    for name in ("package.json", "package-lock.json"):
        shutil.copyfile(PM2_LOCK_DIR / name, prefix / name)
    try:
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=prefix,
            capture_output=True,
            text=True,
            timeout=_INSTALL_TIMEOUT,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ServerUnavailable(f"npm ci of PM2 took over {_INSTALL_TIMEOUT:g}s") from exc
    if done.returncode != 0:
        last = (done.stderr or done.stdout).strip().splitlines()[-3:] or ["(no output)"]
        raise ServerUnavailable("npm ci of PM2 failed: " + " | ".join(last))
    script = prefix / "node_modules" / ".bin" / "pm2"
    if not script.exists():
        raise ServerStartError(f"npm ci succeeded but {script} is missing")
    return script


class Pm2:
    """The ``pm2`` command with ``PM2_HOME=home`` and the environment ``env``."""

    def __init__(self, script: Path, home: Path, env: Mapping[str, str]) -> None:
        self.script = script
        self.home = home
        self.env = {**env, "PM2_HOME": str(home)}
        self.home.mkdir(parents=True, exist_ok=True)

    @property
    def daemon_log(self) -> Path:
        """The PM2 daemon's own log (apps started, signals sent, exit codes)."""
        return self.home / "pm2.log"

    def app_log(self, app: str, stream: str) -> Path:
        """Where PM2 writes an app's ``out`` or ``error`` stream by default."""
        return self.home / "logs" / f"{app}-{stream}.log"

    def run(self, args: Sequence[str]) -> subprocess.CompletedProcess[str]:
        """Run ``pm2 <args>``; :class:`ServerStartError` (with its output) if it fails."""
        done = subprocess.run(
            [str(self.script), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=_COMMAND_TIMEOUT,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        if done.returncode != 0:
            raise ServerStartError(
                f"pm2 {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
            )
        return done

    def processes(self) -> list[dict[str, Any]]:
        """``pm2 jlist``: the apps PM2 manages, as PM2 describes them."""
        out = self.run(["jlist"]).stdout
        listed: list[dict[str, Any]] = json.loads(out[out.index("[") :])
        return listed

    def kill(self) -> None:
        """``pm2 kill``: stop every app and the PM2 daemon of this ``PM2_HOME``. Never raises;
        if the daemon outlives it, it is killed by the pid in ``PM2_HOME/pm2.pid``."""
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(
                [str(self.script), "kill"],
                env=self.env,
                capture_output=True,
                timeout=_COMMAND_TIMEOUT,
                stdin=subprocess.DEVNULL,
                check=False,
            )
        pid_file = self.home / "pm2.pid"
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
