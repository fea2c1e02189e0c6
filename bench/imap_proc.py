"""One benchmark IMAP server process: :class:`ImapTestServer` plus a JSON-line control port.

Run as ``python -m bench.imap_proc SPEC.json``; the spec holds the users, their
password, the keepalive interval and optional TLS certificate files. Once listening, one
JSON line goes to stdout: ``{"port", "tls_port", "control_port", "pid"}``.

The control port speaks one JSON object per line each way (request → answer). Operations:

``stats``          server counters, plus this process's RSS and CPU time
``reset_marks``    forget the per-user first-IDLE and disconnect times recorded so far
``marks``          ``{"idle": [users] | null, "gone": [users] | null}`` → how many of
                   ``idle`` have entered IDLE since the reset (and the latest such time),
                   how many of ``gone`` have no connection and disconnected since the reset
``appends``        ``{"users": [...], "offsets": [...], "start_at": t}``: append one
                   message to ``users[i]`` at wall time ``t + offsets[i]``
``append_results`` ``{"done", "records": [[user, t_append, t_exists | null], ...]}``
``restart``        ``{"downtime": s}``: reset every connection, refuse new ones for
                   ``downtime`` seconds, listen again (answers at once; ``up_at`` in
                   ``stats`` is the wall time it listened again)
``drop_all``       reset every connection now; answers how many

With ``"coalesce_replies": true`` in the spec the answers to commands that arrived
together go out in one write (:class:`ImapTestServer`'s option; off by default).

With ``"login_rate": r`` in the spec the server accepts at most ``r`` connections per
second (a token bucket holding one second's worth): any more are greeted with
``* BYE [UNAVAILABLE]`` and closed, as a provider refusing a login burst would
(``throttled`` in ``stats`` counts them).

``t_exists`` is the wall time at which the server built the ``* N EXISTS`` line for that
append (just before writing it to the socket). All times are :func:`time.time`.
"""

from __future__ import annotations

import contextlib
import json
import os
import ssl
import sys
import time
from typing import Any

import trio
from trio_idle_testing import ImapTestServer, ImapTestSession, LogEntry

from bench.procinfo import cpu_seconds, raise_nofile_limit, rss_kib

MESSAGE = b"From: bench@example.test\r\nTo: user@example.test\r\nSubject: bench\r\n\r\nhello\r\n"


class BenchServer:
    """The server, the marks the harness asks about, and the append schedule."""

    def __init__(self, spec: dict[str, Any]) -> None:
        context: ssl.SSLContext | None = None
        if spec.get("tls_cert"):
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(spec["tls_cert"], spec["tls_key"])
        self.server = ImapTestServer(
            keepalive_interval=spec.get("keepalive", 120.0),
            tls_context=context,
            implicit_tls=context is not None,
            log_limit=1000,
            coalesce_replies=bool(spec.get("coalesce_replies", False)),
        )
        for user in spec["users"]:
            self.server.add_user(user, spec["password"])
        self.users: list[str] = list(spec["users"])
        self.first_idle: dict[str, float] = {}
        self.disconnected: dict[str, float] = {}
        self.server.on_event = self._on_event
        #: records of the current append run: [user, t_append, t_exists | None]
        self.records: list[list[Any]] = []
        self._awaiting_exists: dict[str, list[Any]] = {}
        self.appends_done = True
        self._nursery: trio.Nursery | None = None
        self.login_rate: float | None = spec.get("login_rate")
        self._tokens = self.login_rate or 0.0
        self._tokens_at = time.monotonic()
        self.throttled = 0
        self.up_at: float | None = None
        _install_exists_hook(self)
        if self.login_rate:
            _install_throttle(self)

    def take_token(self) -> bool:
        """One connection's worth of the login rate, if there is one now."""
        assert self.login_rate
        now = time.monotonic()
        self._tokens = min(
            self.login_rate, self._tokens + (now - self._tokens_at) * self.login_rate
        )
        self._tokens_at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def _on_event(self, entry: LogEntry) -> None:
        if entry.event == "IDLE":
            self.first_idle.setdefault(entry.user, time.time())
        elif entry.event == "DISCONNECT":
            self.disconnected[entry.user] = time.time()

    def exists_sent(self, user: str | None) -> None:
        """Called when an EXISTS line is built for ``user``."""
        if user is None:
            return
        record = self._awaiting_exists.pop(user, None)
        if record is not None:
            record[2] = time.time()

    # ---- control operations ------------------------------------------------------------

    def op_stats(self, _req: dict[str, Any]) -> dict[str, Any]:
        s = self.server.stats
        return {
            "connections_open": s.connections_open,
            "connections_total": s.connections_total,
            "idle_clients": s.idle_clients,
            "logins": s.logins,
            "login_failures": s.login_failures,
            "logouts": s.logouts,
            "keepalives": s.keepalives,
            "pushes": s.pushes,
            "appends": s.appends,
            "noops": s.commands["NOOP"],
            "idle_commands": s.commands["IDLE"],
            "throttled": self.throttled,
            "up_at": self.up_at,
            "rss_kib": rss_kib(os.getpid()),
            "cpu_s": cpu_seconds(os.getpid()),
        }

    def op_reset_marks(self, _req: dict[str, Any]) -> dict[str, Any]:
        self.first_idle.clear()
        self.disconnected.clear()
        return {"ok": True}

    def op_marks(self, req: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        idle = req.get("idle")
        if idle is not None or req.get("all_idle"):
            wanted = self.users if idle is None else idle
            times = [t for u in wanted if (t := self.first_idle.get(u)) is not None]
            out.update(
                idle_total=len(wanted), idle_count=len(times), idle_max=max(times, default=None)
            )
        gone = req.get("gone")
        if gone is not None:
            times = [
                t
                for u in gone
                if (t := self.disconnected.get(u)) is not None and not self.server.connections(u)
            ]
            out.update(
                gone_total=len(gone), gone_count=len(times), gone_max=max(times, default=None)
            )
        return out

    def op_appends(self, req: dict[str, Any]) -> dict[str, Any]:
        self.records = []
        self._awaiting_exists = {}
        self.appends_done = False
        assert self._nursery is not None
        self._nursery.start_soon(
            self._run_appends, list(req["users"]), list(req["offsets"]), float(req["start_at"])
        )
        return {"ok": True}

    def op_append_results(self, _req: dict[str, Any]) -> dict[str, Any]:
        return {"done": self.appends_done, "records": self.records}

    def op_restart(self, req: dict[str, Any]) -> dict[str, Any]:
        assert self._nursery is not None
        self.up_at = None
        self._nursery.start_soon(self._restart, float(req["downtime"]))
        return {"ok": True}

    async def _restart(self, downtime: float) -> None:
        await self.server.restart(how="rst", downtime=downtime)
        self.up_at = time.time()

    def op_drop_all(self, _req: dict[str, Any]) -> dict[str, Any]:
        return {"dropped": self.server.drop_all("rst")}

    async def _run_appends(self, users: list[str], offsets: list[float], start_at: float) -> None:
        start = trio.current_time() + (start_at - time.time())
        try:
            for user, offset in zip(users, offsets, strict=True):
                await trio.sleep_until(start + offset)
                record: list[Any] = [user, time.time(), None]
                self.records.append(record)
                self._awaiting_exists[user] = record
                self.server.append(user, MESSAGE)
        finally:
            self.appends_done = True

    # ---- serving -------------------------------------------------------------------------

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.server.serve)
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            control_port = listeners[0].socket.getsockname()[1]
            nursery.start_soon(trio.serve_listeners, self._control, listeners)
            ready = {
                "port": self.server.port,
                "tls_port": self.server.tls_port,
                "control_port": control_port,
                "pid": os.getpid(),
            }
            sys.stdout.write(json.dumps(ready) + "\n")
            sys.stdout.flush()

    async def _control(self, stream: trio.SocketStream) -> None:
        buffer = b""
        async with stream:
            while True:
                while b"\n" not in buffer:
                    data = await stream.receive_some(1 << 16)
                    if not data:
                        return
                    buffer += data
                line, buffer = buffer.split(b"\n", 1)
                request = json.loads(line)
                handler = getattr(self, "op_" + request["op"], None)
                if handler is None:
                    answer: dict[str, Any] = {"error": f"unknown op {request['op']!r}"}
                else:
                    answer = handler(request)
                await stream.send_all(json.dumps(answer).encode() + b"\n")


def _install_exists_hook(bench: BenchServer) -> None:
    """Wrap ``ImapTestSession._updates`` to note when an EXISTS line is built for a user."""
    original = ImapTestSession._updates

    def _updates(self: ImapTestSession, *, counting: bool = False) -> bytes:
        out: bytes = original(self, counting=counting)
        if out and b"EXISTS" in out:
            bench.exists_sent(self.user)
        return out

    ImapTestSession._updates = _updates  # type: ignore[method-assign]


def _install_throttle(bench: BenchServer) -> None:
    """Refuse connections beyond the spec's ``login_rate`` with a BYE greeting."""
    original = bench.server._handle

    async def _handle(stream: trio.SocketStream, *, tls: bool) -> None:
        if bench.take_token():
            await original(stream, tls=tls)
            return
        bench.throttled += 1
        async with stream:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(b"* BYE [UNAVAILABLE] Too many logins, try later\r\n")

    bench.server._handle = _handle  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``python -m bench.imap_proc SPEC.json``."""
    args = sys.argv[1:] if argv is None else argv
    with open(args[0], encoding="utf-8") as f:
        spec = json.load(f)
    raise_nofile_limit()
    trio.run(BenchServer(spec).run)


if __name__ == "__main__":
    main()
