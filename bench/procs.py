"""The processes a benchmark run drives: IMAP server processes and the daemon."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import trio

from bench.loop_probe import read_stalls
from bench.procinfo import catches_signal

#: child processes run ``python -m bench.…`` from here, whatever the caller's cwd
REPO_ROOT = Path(__file__).resolve().parent.parent

_LOG_LINE = re.compile(rb"^\d{4}-\d\d-\d\d [\d:.+-]+ ([A-Z]+) ")

#: The password of every benchmark account (read by the daemon from this variable).
PASSWORD_ENV = "TRIO_IDLE_BENCH_PASSWORD"
PASSWORD = "bench-password"
ADMIN_SECRET = "bench-admin-secret"
ENCRYPTION_KEY = "bench-encryption-key-0123456789abcdef"


class MeasuredProc(Protocol):
    """What the phases need of a process under test (``trio-idle serve`` or the Node
    baseline): its pid, a way to hand it mailboxes, and SIGTERM."""

    @property
    def pid(self) -> int: ...

    def set_rows(self, rows: Sequence[tuple[str, int]]) -> float: ...

    async def terminate(self, limit: float = 60.0) -> tuple[float, int | None]: ...


class ServerProc:
    """An :mod:`bench.imap_proc` process and its control connection."""

    def __init__(self, index: int, users: Sequence[str]) -> None:
        self.index = index
        self.users = list(users)
        self.process: trio.Process | None = None
        self.port = 0
        self.tls_port = 0
        self.pid = 0
        self._stream: trio.SocketStream | None = None
        self._buffer = b""
        self._lock = trio.Lock()

    async def start(
        self,
        workdir: Path,
        keepalive: float,
        tls_files: tuple[str, str] | None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        """Start the process and connect to its control port; ``extra`` goes into its spec
        (``login_rate``: see :mod:`bench.imap_proc`)."""
        spec = {
            "users": self.users,
            "password": PASSWORD,
            "keepalive": keepalive,
            "tls_cert": tls_files[0] if tls_files else None,
            "tls_key": tls_files[1] if tls_files else None,
            **(extra or {}),
        }
        spec_path = workdir / f"server{self.index}.json"
        spec_path.write_text(json.dumps(spec))
        log = (workdir / f"server{self.index}.log").open("wb")
        self.process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "bench.imap_proc", str(spec_path)],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=log,
        )
        log.close()
        assert self.process.stdout is not None
        line = b""
        with trio.fail_after(60):
            while not line.endswith(b"\n"):
                chunk = await self.process.stdout.receive_some(4096)
                if not chunk:
                    raise RuntimeError(f"server process {self.index} exited; see its log")
                line += chunk
        ready = json.loads(line)
        self.port, self.tls_port, self.pid = ready["port"], ready["tls_port"], ready["pid"]
        self._stream = await trio.open_tcp_stream("127.0.0.1", ready["control_port"])

    async def call(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one control request and return the answer."""
        assert self._stream is not None
        async with self._lock:
            await self._stream.send_all(json.dumps({"op": op, **fields}).encode() + b"\n")
            while b"\n" not in self._buffer:
                data = await self._stream.receive_some(1 << 20)
                if not data:
                    raise RuntimeError(f"server process {self.index} closed its control port")
                self._buffer += data
            line, self._buffer = self._buffer.split(b"\n", 1)
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"server {self.index}: {answer['error']}")
        return answer

    async def stop(self) -> None:
        """Terminate the process."""
        if self._stream is not None:
            await self._stream.aclose()
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            with trio.move_on_after(5):
                await self.process.wait()
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()


class ServerPool:
    """All server processes of a run; users are spread round-robin over them."""

    def __init__(self, servers: Sequence[ServerProc]) -> None:
        self.servers = list(servers)
        self.owner: dict[str, ServerProc] = {u: s for s in servers for u in s.users}

    def split(self, users: Sequence[str]) -> dict[int, list[str]]:
        """``users`` grouped by server index (order kept)."""
        out: dict[int, list[str]] = {s.index: [] for s in self.servers}
        for user in users:
            out[self.owner[user].index].append(user)
        return out

    async def call_all(self, op: str, **fields: Any) -> list[dict[str, Any]]:
        """The same request to every server, answers in server order."""
        return [await s.call(op, **fields) for s in self.servers]

    async def totals(self) -> dict[str, float]:
        """Server counters summed over the processes."""
        total: dict[str, float] = {}
        for answer in await self.call_all("stats"):
            for key, value in answer.items():
                if isinstance(value, int | float):  # not ``up_at`` (a time, or None)
                    total[key] = total.get(key, 0) + value
        return total

    async def idle_marks(self, users: Sequence[str] | None) -> tuple[int, float | None]:
        """How many of ``users`` (None: all) entered IDLE since the reset, and the latest."""
        count, latest = 0, None
        if users is None:
            answers = await self.call_all("marks", all_idle=True)
        else:
            groups = self.split(users)
            answers = [await s.call("marks", idle=groups[s.index]) for s in self.servers]
        for a in answers:
            count += a["idle_count"]
            if a["idle_max"] is not None:
                latest = a["idle_max"] if latest is None else max(latest, a["idle_max"])
        return count, latest

    async def gone_marks(self, users: Sequence[str]) -> tuple[int, float | None]:
        """How many of ``users`` disconnected since the reset and have no connection."""
        count, latest = 0, None
        groups = self.split(users)
        for s in self.servers:
            a = await s.call("marks", gone=groups[s.index])
            count += a["gone_count"]
            if a["gone_max"] is not None:
                latest = a["gone_max"] if latest is None else max(latest, a["gone_max"])
        return count, latest

    async def stop(self) -> None:
        for s in self.servers:
            await s.stop()


def connections_toml(rows: Sequence[tuple[str, int]]) -> str:
    """The TOML connection file for ``(email, port)`` rows; all share one password variable."""
    parts = []
    for email, port in rows:
        parts.append(
            f'[[connection]]\nid = "{email}"\nemail = "{email}"\nimap_host = "127.0.0.1"\n'
            f'imap_port = {port}\npassword_env = "{PASSWORD_ENV}"\n'
        )
    return "\n".join(parts)


async def terminate_process(process: trio.Process, limit: float) -> tuple[float, int | None]:
    """SIGTERM ``process``, wait up to ``limit`` s; ``(seconds until exit, exit code)``,
    or ``(seconds waited, None)`` after a SIGKILL when it did not exit in time."""
    start = time.perf_counter()
    process.send_signal(signal.SIGTERM)
    with trio.move_on_after(limit):
        await process.wait()
    elapsed = time.perf_counter() - start
    if process.returncode is None:
        process.kill()
        await process.wait()
        return elapsed, None
    return elapsed, process.returncode


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` in one rename, so the daemon never reads half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class DaemonProc:
    """``python -m trio_idle.cli serve`` with the file source."""

    def __init__(
        self,
        workdir: Path,
        name: str,
        env: Mapping[str, str],
        module: str = "trio_idle.cli",
        state_from: Path | None = None,
    ) -> None:
        """``state_from``: start with a copy of that state file (a restart), else a new one."""
        self.module = module
        self.state_from = state_from
        self.state_path = workdir / f"{name}-state.sqlite3"
        self.workdir = workdir
        self.name = name
        self.env = dict(env)
        self.conn_file = workdir / f"{name}-connections.toml"
        self.log_path = workdir / f"{name}.log"
        self.process: trio.Process | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def start(self) -> None:
        """Start with an empty connection list; return once its signal handlers are set."""
        write_atomically(self.conn_file, "")
        if self.state_from is not None:
            shutil.copyfile(self.state_from, self.state_path)
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRIO_IDLE_")}
        env.update(
            {
                "ADMIN_SECRET": ADMIN_SECRET,
                "ENCRYPTION_KEY": ENCRYPTION_KEY,
                "TRIO_IDLE_SOURCE": "file",
                "TRIO_IDLE_CONNECTIONS_FILE": str(self.conn_file),
                "TRIO_IDLE_REFRESH_INTERVAL": "24h",
                # the product default (SQLite), one file per daemon: a new one means one
                # startup catch-up scan per mailbox, a copied one is a restart
                "TRIO_IDLE_STATE_PATH": str(self.state_path),
                PASSWORD_ENV: PASSWORD,
            }
        )
        env.update(self.env)
        with self.log_path.open("wb") as log:
            self.process = await trio.lowlevel.open_process(
                [sys.executable, "-m", self.module, "serve"],
                env=env,
                cwd=REPO_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        with trio.fail_after(60):
            while not catches_signal(self.pid, signal.SIGHUP):
                if self.process.poll() is not None:
                    raise RuntimeError(f"daemon exited early; see {self.log_path}")
                await trio.sleep(0.02)
        await trio.sleep(0.5)  # the first (empty) refresh

    def set_rows(self, rows: Sequence[tuple[str, int]]) -> float:
        """Rewrite the connection file and SIGHUP; return the wall time of the signal."""
        write_atomically(self.conn_file, connections_toml(rows))
        assert self.process is not None
        now = time.time()
        self.process.send_signal(signal.SIGHUP)
        return now

    async def terminate(self, limit: float = 60.0) -> tuple[float, int | None]:
        """SIGTERM; return (seconds until exit, exit code)."""
        assert self.process is not None
        return await terminate_process(self.process, limit)

    def _probe_lines(self) -> Iterator[tuple[float, bytes, dict[bytes, bytes]]]:
        """``(wall time, kind, fields)`` of each line :mod:`bench.gc_probe` wrote;
        kind is ``gen=<n>``, ``forced-full`` or ``freeze``."""
        try:
            with self.log_path.open("rb") as f:
                for line in f:
                    if line.startswith(b"GCPROBE "):
                        parts = line.split()
                        fields = dict(p.split(b"=", 1) for p in parts[2:] if b"=" in p)
                        yield float(parts[1]), parts[2], fields
        except OSError:
            return

    def gc_passes(self) -> list[tuple[float, int, float, int]]:
        """``(wall time, generation, ms, collected)`` of every collection
        :mod:`bench.gc_probe` logged (generation 2 and slow young ones)."""
        return [
            (when, int(fields[b"gen"]), float(fields[b"ms"]), int(fields.get(b"collected", b"0")))
            for when, kind, fields in self._probe_lines()
            if kind.startswith(b"gen=")
        ]

    def refresh_collections(self) -> list[tuple[float, str, float, int]]:
        """``(wall time, kind, ms, collected)`` of every after-refresh collection
        :mod:`bench.gc_probe` logged (kind ``young``, ``full`` or ``unfrozen``)."""
        return [
            (when, fields[b"kind"].decode(), float(fields[b"ms"]), int(fields[b"collected"]))
            for when, kind, fields in self._probe_lines()
            if kind == b"refresh"
        ]

    def forced_full(self) -> dict[str, float] | None:
        """The last ``forced-full`` collection :mod:`bench.gc_probe` logged."""
        found = None
        for _, kind, fields in self._probe_lines():
            if kind == b"forced-full":
                found = {"ms": float(fields[b"ms"]), "collected": int(fields[b"collected"])}
        return found

    def snapshots(self) -> list[dict[str, Any]]:
        """The tracemalloc snapshots :mod:`bench.gc_probe` dumped: ``at`` (wall time),
        ``path``, ``ms`` (the loop was blocked that long), ``traced_kib``."""
        return [
            {
                "at": when,
                "path": fields[b"path"].decode(),
                "ms": float(fields[b"ms"]),
                "traced_kib": int(fields[b"traced_kib"]),
            }
            for when, kind, fields in self._probe_lines()
            if kind == b"tracemalloc" and b"path" in fields
        ]

    def gc_summary(self, windows: Mapping[str, tuple[float, float]]) -> dict[str, Any]:
        """Generation-2 collections logged by :mod:`bench.gc_probe`, per window."""
        passes = self.gc_passes()
        out: dict[str, Any] = {}
        for name, (start, end) in windows.items():
            full = [ms for t, g, ms, _ in passes if start <= t <= end and g == 2]
            slow = [ms for t, g, ms, _ in passes if start <= t <= end and g != 2]
            out[name] = {
                "gen2_collections": len(full),
                "gen2_ms_total": round(sum(full), 1),
                "gen2_ms_max": max(full, default=None),
                "slow_young_collections": len(slow),
            }
        return out

    def kill(self) -> None:
        """SIGKILL if still running (cleanup after a failed phase)."""
        if self.process is not None and self.process.returncode is None:
            self.process.kill()

    def stalls(self) -> list[tuple[float, float]]:
        """``(wall time, ms)`` of every stall :mod:`bench.loop_probe` logged (none when
        the daemon runs without it)."""
        return read_stalls(self.log_path)

    def log_counts(self) -> dict[str, int]:
        """Log lines by level, plus other stderr lines (``other``: tracebacks, asyncio's
        "Task was destroyed but it is pending!" notices, counted as ``task_destroyed``)."""
        counts: dict[str, int] = {}
        try:
            with self.log_path.open("rb") as f:
                for line in f:
                    match = _LOG_LINE.match(line)
                    if match:
                        key = match.group(1).decode()
                    elif line.startswith(b"Task was destroyed but it is pending"):
                        key = "task_destroyed"
                    elif line.startswith((b"task: <Task", b"STALL", b"GCPROBE ")):
                        continue
                    else:
                        key = "other"
                    counts[key] = counts.get(key, 0) + 1
        except OSError:
            pass
        return counts
