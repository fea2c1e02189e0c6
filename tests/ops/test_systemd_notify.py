"""systemd Type=notify against a fake NOTIFY_SOCKET (a Unix datagram socket we own)."""

from __future__ import annotations

import os
import secrets
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
import trio
from trio_idle_testing.backend import ScanBackend

from tests.harness import ListSource, LogCapture, make_settings, running_daemon

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="Linux socket timestamps")

#: ``SO_TIMESTAMPNS`` (Linux): the kernel stamps each datagram with its arrival time
#: (CLOCK_REALTIME), so arrival times are known even while our event loop was blocked.
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)


@attrs.frozen
class Datagram:
    fields: dict[str, str]
    arrived: float  # unix time, from the kernel


class FakeSystemd:
    """The supervisor's end of NOTIFY_SOCKET."""

    def __init__(self) -> None:
        self.sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.received: list[Datagram] = []

    async def bind(self, address: str) -> None:
        await self.sock.bind(address)

    async def receive(self) -> Datagram:
        data, ancillary, _flags, _addr = await self.sock.recvmsg(4096, socket.CMSG_SPACE(16))
        arrived = time.time()
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                sec, nsec = struct.unpack("qq", payload[:16])
                arrived = sec + nsec / 1e9
        lines = data.decode().splitlines()
        datagram = Datagram(dict(line.split("=", 1) for line in lines), arrived)
        self.received.append(datagram)
        return datagram

    async def receive_until(self, key: str) -> Datagram:
        while key not in (datagram := await self.receive()).fields:
            pass
        return datagram

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory whose socket paths fit in sun_path (108 bytes)."""
    with tempfile.TemporaryDirectory(prefix="ti-", dir="/tmp") as name:
        yield Path(name)


async def test_ready_watchdog_stopping_in_order_and_no_watchdog_while_blocked(
    backend: ScanBackend, logs: LogCapture, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"trio-idle-test-{secrets.token_hex(6)}"
    systemd = FakeSystemd()
    await systemd.bind("\0" + name)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)  # abstract namespace
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # WATCHDOG=1 every 0.1 s
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    settings = make_settings(backend.url, TRIO_IDLE_MAX_LOOP_LAG="300ms")
    try:
        async with running_daemon(settings, ListSource()) as daemon:
            with trio.fail_after(10):
                ready = await systemd.receive_until("READY")
                await systemd.receive_until("WATCHDOG")
            assert ready.fields["READY"] == "1"
            assert "0/0 sessions watching" in ready.fields["STATUS"]

            # block the event loop for 1 s (ten watchdog intervals): no ping may arrive
            before = time.time()
            time.sleep(1.0)  # noqa: ASYNC251 - blocking the loop is the point of this test
            after = time.time()
            with trio.fail_after(10):
                await logs.wait_for("withholding WATCHDOG=1")
                await logs.wait_for("WATCHDOG=1 resumed")
                resumed = await systemd.receive_until("WATCHDOG")
            assert resumed.arrived > after
            daemon.shutdown("test")
            with trio.fail_after(10):
                await systemd.receive_until("STOPPING")
    finally:
        systemd.close()

    kinds = [next(iter(d.fields)) for d in systemd.received]
    assert kinds[0] in ("READY", "STATUS") and kinds.count("READY") == 1
    # WATCHDOG=1 may come before READY=1: systemd runs the watchdog from the start, and a
    # first refresh (and its full collection) longer than the interval must not be fatal
    assert "WATCHDOG" in kinds[kinds.index("READY") :]
    assert kinds[-1] == "STOPPING" and kinds.count("STOPPING") == 1
    blocked = [d for d in systemd.received if "WATCHDOG" in d.fields and before < d.arrived < after]
    assert blocked == [], "WATCHDOG=1 arrived while the event loop was blocked"


async def test_path_socket_gets_ready_and_stopping(
    backend: ScanBackend, monkeypatch: pytest.MonkeyPatch, short_dir: Path
) -> None:
    path = str(short_dir / "notify")
    systemd = FakeSystemd()
    await systemd.bind(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    try:
        async with running_daemon(make_settings(backend.url), ListSource()):
            with trio.fail_after(10):
                await systemd.receive_until("READY")
        with trio.fail_after(10):
            await systemd.receive_until("STOPPING")
    finally:
        systemd.close()
    assert not any("WATCHDOG" in d.fields for d in systemd.received)


async def test_a_vanished_notify_socket_is_not_fatal(
    backend: ScanBackend, logs: LogCapture, monkeypatch: pytest.MonkeyPatch, short_dir: Path
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(short_dir / "nobody-listens"))
    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    async with running_daemon(make_settings(backend.url), ListSource()) as daemon:
        with trio.fail_after(10):
            await logs.wait_for("[idle/systemd] notification to NOTIFY_SOCKET failed")
            await daemon.wait_refreshed(after=0)
            await logs.wait_for("[idle/db] refreshed — 0 active connections, 0 sessions")
        assert not daemon.status().stopping
