"""Fixtures for the supervised-deployment tests: scan backend, log capture, ping receiver,
a real Prometheus loading the shipped rules."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import h11
import pytest
import trio

from tests.servers.prometheus import PrometheusServer

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "trio-idle.rules.yml"


def closed_port() -> int:
    """A TCP port on 127.0.0.1 where nobody listens (connects are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def cli_env(**extra: str) -> dict[str, str]:
    """The test process's environment without any trio-idle setting, plus ``extra``."""
    drop = {"ADMIN_SECRET", "ENCRYPTION_KEY", "DATABASE_URL", "BACKEND_URL", "NOTIFY_SOCKET"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIO_IDLE_") and k not in drop}
    env.update(extra)
    return env


@attrs.frozen
class Ping:
    method: str
    target: str
    at: float


class PingReceiver:
    """A push-monitoring endpoint (healthchecks.io style) on 127.0.0.1: answers 200 "OK" to
    everything and records each request; :meth:`wait_for` wakes on each new one."""

    def __init__(self) -> None:
        self.pings: list[Ping] = []
        self.url = ""
        self._changed = trio.Event()

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            task_status.started(self.url)

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    conn.receive_data(data)
                    continue
                if isinstance(event, h11.Request):
                    self.pings.append(
                        Ping(event.method.decode(), event.target.decode(), trio.current_time())
                    )
                    self._changed.set()
                    self._changed = trio.Event()
                elif isinstance(event, h11.EndOfMessage):
                    body = b"OK"
                    headers = [("content-length", str(len(body))), ("connection", "close")]
                    out = conn.send(h11.Response(status_code=200, headers=headers)) or b""
                    out += conn.send(h11.Data(data=body)) or b""
                    out += conn.send(h11.EndOfMessage()) or b""
                    await stream.send_all(out)
                    return
                else:
                    return
        except (trio.BrokenResourceError, h11.ProtocolError):
            return
        finally:
            await stream.aclose()

    async def wait_for(self, predicate: Callable[[Ping], bool]) -> Ping:
        """The first recorded ping matching ``predicate`` (waits; bound it with fail_after)."""
        while True:
            for ping in self.pings:
                if predicate(ping):
                    return ping
            changed = self._changed
            await changed.wait()


@pytest.fixture
async def ping_receiver(nursery: trio.Nursery) -> PingReceiver:
    receiver = PingReceiver()
    await nursery.start(receiver.serve)
    return receiver


@pytest.fixture
def in_process_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    """For tests calling ``cli.main`` in-process: keep loguru's sinks as they are (the real
    ``setup_logging`` replaces them all; subprocess tests cover it)."""
    from trio_idle import cli

    monkeypatch.setattr(cli, "setup_logging", lambda *args, **kwargs: None)


def short_for(rules: str) -> str:
    """The rules with every ``for:`` cut to 1 s (the expressions untouched)."""
    cut, count = re.subn(r"^(\s+)for: \S+$", r"\1for: 1s", rules, flags=re.MULTILINE)
    assert count >= 5, "the rules file changed layout"
    return cut


@pytest.fixture
def prometheus_for(
    prometheus_bin: Path, tmp_path: Path
) -> Iterator[Callable[[str], PrometheusServer]]:
    """Starts (blocking: call it through ``trio.to_thread``) a real Prometheus scraping one
    ``127.0.0.1:<port>`` target every second, with the shipped rules (``for:`` cut to 1 s)
    evaluated as often; stopped and deleted after the test."""
    servers: list[PrometheusServer] = []

    def start(target: str) -> PrometheusServer:
        rules = tmp_path / "rules-short-for.yml"
        rules.write_text(short_for(RULES.read_text()))
        server = PrometheusServer([target], rules)
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.cleanup()
