"""The Node + imapflow baseline (``bench/node_baseline/index.js``) as a process under test.

It is the original daemon's stack: one ImapFlow client per mailbox in IDLE, a NOOP every
tick, a ``fetch`` POST on EXISTS with one scan active and one pending per mailbox. The
harness drives it exactly like ``trio-idle serve`` (:class:`bench.procs.DaemonProc`): it
starts with no mailboxes, gets them from a file on SIGHUP, and is measured from outside
(``/proc``, the IMAP server's counters, the sink).

Its dependencies are pinned by ``bench/node_baseline/package-lock.json`` and installed
with ``npm ci`` (:func:`ensure_installed`; ``nox -s bench`` runs it first).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import trio

from bench.loop_probe import read_stalls
from bench.procs import ADMIN_SECRET, PASSWORD, terminate_process, write_atomically

NODE_DIR = Path(__file__).resolve().parent / "node_baseline"
SCRIPT = NODE_DIR / "index.js"
LOCK = NODE_DIR / "package-lock.json"
#: npm writes this copy of the lock into node_modules on every ``npm ci``
INSTALLED_LOCK = NODE_DIR / "node_modules" / ".package-lock.json"


class NodeUnavailable(RuntimeError):
    """``node`` or ``npm`` is missing, or ``npm ci`` failed: the message says which."""


def node_version() -> str | None:
    """``node --version`` (e.g. ``v20.20.2``), None if node is not on PATH."""
    exe = shutil.which("node")
    if exe is None:
        return None
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30)
    return out.stdout.strip() or None


def imapflow_version() -> str | None:
    """The installed imapflow's version (from its package.json), None if not installed."""
    try:
        meta = json.loads((NODE_DIR / "node_modules" / "imapflow" / "package.json").read_text())
    except (OSError, ValueError):
        return None
    version = meta.get("version")
    return str(version) if version else None


def installed_matches_lock() -> bool:
    """Whether ``node_modules`` was installed from the current lock file."""
    try:
        installed = json.loads(INSTALLED_LOCK.read_text())["packages"]
        locked = json.loads(LOCK.read_text())["packages"]
    except (OSError, ValueError, KeyError):
        return False
    wanted = {k: v for k, v in locked.items() if k}
    return bool(wanted) and all(installed.get(k) == v for k, v in wanted.items())


def ensure_installed(*, force: bool = False) -> None:
    """Run ``npm ci`` in ``bench/node_baseline`` unless ``node_modules`` already matches the
    lock (``force``: always). Raises :class:`NodeUnavailable` with a one-line reason."""
    if shutil.which("node") is None:
        raise NodeUnavailable("node (Node.js) not found on PATH; the comparison needs it")
    if not force and installed_matches_lock():
        return
    npm = shutil.which("npm")
    if npm is None:
        raise NodeUnavailable("npm not found on PATH; run `npm ci` in bench/node_baseline")
    done = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund"],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise NodeUnavailable(f"npm ci in {NODE_DIR} failed: {tail[0]}")


class NodeProc:
    """``node bench/node_baseline/index.js`` with its mailbox file (see that script)."""

    def __init__(self, workdir: Path, name: str, env: Mapping[str, str]) -> None:
        self.name = name
        self.env = dict(env)
        self.rows_file = workdir / f"{name}-mailboxes.json"
        self.log_path = workdir / f"{name}.log"
        self.process: trio.Process | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def start(self) -> None:
        """Start with no mailboxes; return once it has written its ready line."""
        exe = shutil.which("node")
        if exe is None:
            raise NodeUnavailable("node (Node.js) not found on PATH")
        write_atomically(self.rows_file, "[]")
        env = {
            "PATH": os.environ.get("PATH", ""),
            "MAILBOXES_FILE": str(self.rows_file),
            "IMAP_HOST": "127.0.0.1",
            "IMAP_PASSWORD": PASSWORD,
            "ADMIN_SECRET": ADMIN_SECRET,
            **self.env,
        }
        with self.log_path.open("wb") as log:
            self.process = await trio.lowlevel.open_process(
                [exe, str(SCRIPT)],
                env=env,
                cwd=NODE_DIR,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        with trio.fail_after(60):
            while b'"ready":true' not in self.log_path.read_bytes():
                if self.process.poll() is not None:
                    raise RuntimeError(f"node baseline exited early; see {self.log_path}")
                await trio.sleep(0.02)  # another process: nothing to wait on but its output

    def set_rows(self, rows: Sequence[tuple[str, int]]) -> float:
        """Rewrite the mailbox file and SIGHUP; return the wall time of the signal."""
        write_atomically(self.rows_file, json.dumps([{"email": e, "port": p} for e, p in rows]))
        assert self.process is not None
        now = time.time()
        self.process.send_signal(signal.SIGHUP)
        return now

    async def terminate(self, limit: float = 60.0) -> tuple[float, int | None]:
        """SIGTERM; return (seconds until exit, exit code)."""
        assert self.process is not None
        return await terminate_process(self.process, limit)

    def kill(self) -> None:
        """SIGKILL if still running (cleanup after a failed phase)."""
        if self.process is not None and self.process.returncode is None:
            self.process.kill()

    def error_lines(self) -> int:
        """Lines the script wrote to stderr about failures (connect errors and the like)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return 0
        return sum(
            1
            for line in text.splitlines()
            if line and not line.startswith(("{", "STALL ", "STALLPROBE "))
        )

    def stalls(self) -> list[tuple[float, float]]:
        """``(wall time, ms)`` of every stall the script's probe logged."""
        return read_stalls(self.log_path)

    async def event_loop_delay(self) -> dict[str, float] | None:
        """SIGUSR2: the script's ``monitorEventLoopDelay`` figures (``maxMs``, ``minMs``,
        ``resolutionMs``; whole timer intervals, the resolution included), None if it
        did not answer within 10 s."""
        assert self.process is not None
        before = self.log_path.read_bytes().count(b'"eld"')
        self.process.send_signal(signal.SIGUSR2)
        with trio.move_on_after(10):
            while True:
                text = self.log_path.read_bytes()
                if text.count(b'"eld"') > before:
                    last = [ln for ln in text.splitlines() if b'"eld"' in ln][-1]
                    eld: dict[str, float] = json.loads(last)["eld"]
                    return eld
                await trio.sleep(0.05)  # another process: nothing to wait on but its output
        return None


def tick_ms(tick: str) -> int:
    """A trio-idle duration (``2m``, ``90s``, ``24h``) as the baseline's ``TICK_MS``."""
    from trio_idle.core.values import parse_duration

    # setTimeout cannot wait longer than 2**31 - 1 ms (it would fire at once)
    return min(2**31 - 1, max(1, round(parse_duration(tick) * 1000)))
