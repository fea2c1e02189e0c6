"""Slow, idle and numerous clients of the health port, over real sockets on 127.0.0.1.

The endpoint must keep answering ``/healthz`` whatever other clients do: that is what a
liveness probe relies on.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import h11
import httpx
import pytest
import trio
from trio_idle_testing.backend import ScanBackend

from tests.harness import ListSource, make_settings, running_daemon
from tests.ops.helpers import sample
from trio_idle.ops import health_server
from trio_idle.runtime.daemon import Daemon

SLOW_CLIENTS = 200
CONCURRENT_SCRAPES = 300


@asynccontextmanager
async def health_daemon(backend: ScanBackend) -> AsyncIterator[tuple[Daemon, int]]:
    settings = make_settings(backend.url, TRIO_IDLE_HEALTH_ADDR="127.0.0.1:0")
    async with running_daemon(settings, ListSource()) as daemon:
        assert daemon.supervisor is not None and daemon.supervisor.health_url is not None
        port = urlsplit(daemon.supervisor.health_url).port
        assert port is not None
        yield daemon, port


class SlowClients:
    """Clients that connect, send part of a request line, then nothing (or one byte now
    and then). Counts how many the server has closed."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.connected = 0
        self.closed_by_server = 0
        self.all_connected = trio.Event()
        self.closed_changed = trio.Event()

    async def run(self, n: int, trickle: bool) -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", self.port)
        async with stream:
            await stream.send_all(b"GET /heal")
            self.connected += 1
            if self.connected == n:
                self.all_connected.set()
            try:
                while True:
                    with trio.move_on_after(0.3 if trickle else float("inf")):
                        if not await stream.receive_some(1024):
                            break
                    await stream.send_all(b"t")
            except trio.BrokenResourceError:  # reset: the server closed with a byte unread
                pass
            self.closed_by_server += 1
            self.closed_changed.set()
            self.closed_changed = trio.Event()

    async def wait_closed(self, n: int) -> None:
        while self.closed_by_server < n:
            await self.closed_changed.wait()


async def test_slowloris_clients_do_not_delay_healthz(backend: ScanBackend) -> None:
    """200 clients each hold a connection with an incomplete request: a fresh /healthz is
    still answered within 1 s (the bound the issue asks for), by pushing out the slow
    clients that waited longest."""
    async with health_daemon(backend) as (_, port), trio.open_nursery() as clients:
        slow = SlowClients(port)
        for i in range(SLOW_CLIENTS):
            clients.start_soon(slow.run, SLOW_CLIENTS, i % 2 == 1)
        with trio.fail_after(10):
            await slow.all_connected.wait()

        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            with trio.fail_after(1):
                healthz = await http.get("/healthz")
            assert healthz.status_code == 200 and healthz.json()["ok"] is True

            # those pushed out were closed, and counted; at most MAX_CLIENTS stayed open
            pushed_out = SLOW_CLIENTS + 1 - health_server.MAX_CLIENTS
            with trio.fail_after(5):
                await slow.wait_closed(pushed_out)
            metrics = (await http.get("/metrics")).text
            evicted = sample(metrics, "trio_idle_health_clients_dropped_total", reason="evicted")
            assert evicted >= pushed_out
            assert slow.closed_by_server == evicted
        clients.cancel_scope.cancel()


async def scrape(port: int) -> tuple[int, bytes]:
    """One ``GET /metrics`` on its own connection: status and body."""
    conn = h11.Connection(h11.CLIENT)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        request = h11.Request(
            method="GET",
            target="/metrics",
            headers=[("host", f"127.0.0.1:{port}"), ("connection", "close")],
        )
        await stream.send_all((conn.send(request) or b"") + (conn.send(h11.EndOfMessage()) or b""))
        status, body = 0, b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            else:
                assert isinstance(event, h11.EndOfMessage), event
                return status, body


@pytest.mark.timeout(120)  # its own 60 s limit must fire first, with its message
async def test_300_concurrent_scrapes_are_all_answered(backend: ScanBackend) -> None:
    async with health_daemon(backend) as (_, port):
        answers: list[tuple[int, bytes]] = []

        async def one() -> None:
            answers.append(await scrape(port))

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for _ in range(CONCURRENT_SCRAPES):
                    nursery.start_soon(one)
        assert len(answers) == CONCURRENT_SCRAPES
        assert [status for status, _ in answers] == [200] * CONCURRENT_SCRAPES
        assert all(b"trio_idle_build_info" in body for _, body in answers)
        _, last = await scrape(port)
        for reason in ("evicted", "timeout"):  # none dropped
            assert (
                sample(last.decode(), "trio_idle_health_clients_dropped_total", reason=reason) == 0
            )


async def test_a_client_too_slow_to_finish_its_request_is_closed(
    backend: ScanBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With room to spare, a slow client is closed by its own deadline (shortened here):
    a byte now and then does not extend it; an idle keep-alive client is closed too."""
    monkeypatch.setattr(health_server, "HEAD_TIMEOUT", 0.5)
    monkeypatch.setattr(health_server, "IDLE_TIMEOUT", 0.5)
    async with health_daemon(backend) as (_, port):
        slow = SlowClients(port)
        with trio.fail_after(5):
            await slow.run(1, True)  # returns once the server has closed it
        assert slow.closed_by_server == 1

        # keep-alive: one request answered, then silence until the server hangs up
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            conn = h11.Connection(h11.CLIENT)
            request = h11.Request(method="GET", target="/healthz", headers=[("host", "x")])
            await stream.send_all(
                (conn.send(request) or b"") + (conn.send(h11.EndOfMessage()) or b"")
            )
            with trio.fail_after(5):
                while not isinstance(event := conn.next_event(), h11.EndOfMessage):
                    if event is h11.NEED_DATA:
                        conn.receive_data(await stream.receive_some(65536))
                    elif isinstance(event, h11.Response):
                        assert event.status_code == 200
                assert await stream.receive_some(1024) == b""  # closed by the server

        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            metrics = (await http.get("/metrics")).text
        # only the unfinished request counts as dropped; ending keep-alive is normal
        assert sample(metrics, "trio_idle_health_clients_dropped_total", reason="timeout") == 1


async def test_an_oversized_request_head_is_refused(backend: ScanBackend) -> None:
    async with health_daemon(backend) as (_, port):
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            head = b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-pad: " + b"a" * 40000 + b"\r\n\r\n"
            with trio.fail_after(5):
                # the server may hang up before it has read everything
                with contextlib.suppress(trio.BrokenResourceError):
                    await stream.send_all(head)
                answer = b""
                try:
                    while data := await stream.receive_some(65536):
                        answer += data
                except trio.BrokenResourceError:
                    pass
        assert answer.startswith(b"HTTP/1.1 431 ")
