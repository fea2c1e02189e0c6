"""TrioHTTPTransport over real sockets on 127.0.0.1, against a scripted raw HTTP server.

Every guarantee of :mod:`trio_idle.backend.http_transport`'s module docstring is checked the way
a user would notice it: how many connections the server accepted, whether the server saw
a connection closed, which exception (by type) a request raised and whether a later
request still gets through. (How many requests are in flight is the HttpClient's to
bound: tests/unit/test_backend_client.py.)
"""

from __future__ import annotations

import os
import resource
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field

import h11
import httpx
import pytest
import trio
import trio.testing
import trustme

from trio_idle.backend.http_transport import COALESCE_BYTES, TrioHTTPTransport
from trio_idle.core.stats import Stats

HOST = "127.0.0.1"
#: the deadline of every test: nothing here should take more than a fraction of it
TIMEOUT = 10.0
#: a short timeout of the transport, asserted only by the exception it raises
SHORT = 0.2


# --------------------------------------------------------------------------- the server


@dataclass
class Received:
    """One request as the scripted server read it."""

    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes


class Peer:
    """One accepted connection, as a scripted handler drives it."""

    def __init__(self, server: ScriptedServer, number: int, stream: trio.abc.Stream) -> None:
        self.server = server
        #: 1 for the first accepted connection, 2 for the second, ...
        self.number = number
        self.stream = stream
        self.requests: list[Received] = []
        #: the client closed (or reset) the connection
        self.closed_by_client = trio.Event()
        #: the handler closed the connection
        self.closed_by_server = trio.Event()
        self._buffer = b""

    async def _receive(self) -> bytes:
        try:
            data = await self.stream.receive_some(64 * 1024)
        except trio.BrokenResourceError:  # a reset (or a TLS stream torn down)
            data = b""
        if not data:
            self.closed_by_client.set()
            self.server.notify()
        return bytes(data)

    async def read_request(self) -> Received | None:
        """The next request, or None once the client has closed the connection."""
        h = h11.Connection(h11.SERVER)
        if self._buffer:  # (b"" would tell h11 the connection was closed)
            h.receive_data(self._buffer)
            self._buffer = b""
        head: h11.Request | None = None
        body = bytearray()
        while True:
            try:
                event = h.next_event()
            except h11.RemoteProtocolError:  # closed mid-request
                return None
            if event is h11.NEED_DATA:
                h.receive_data(await self._receive())
            elif isinstance(event, h11.ConnectionClosed):
                return None
            elif isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                self._buffer = h.trailing_data[0]
                received = Received(head.method, head.target, list(head.headers), bytes(body))
                self.requests.append(received)
                self.server.notify()
                return received

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def wait_closed(self) -> None:
        """Read (and drop) whatever comes until the client closes the connection."""
        while await self._receive():
            pass

    async def close(self) -> None:
        await self.stream.aclose()
        self.closed_by_server.set()
        self.server.notify()


Handler = Callable[[Peer], Awaitable[None]]


@dataclass
class ScriptedServer:
    """A raw HTTP/1.1 server on 127.0.0.1 whose handler writes scripted bytes."""

    handler: Handler
    ssl_context: ssl.SSLContext | None = None
    port: int = 0
    peers: list[Peer] = field(default_factory=list)
    _changed: trio.Event = field(default_factory=trio.Event)

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{HOST}:{self.port}/path"

    @property
    def accepted(self) -> int:
        return len(self.peers)

    @property
    def request_count(self) -> int:
        return sum(len(peer.requests) for peer in self.peers)

    def notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._changed.wait()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        tcp = await trio.open_tcp_listeners(0, host=HOST)
        self.port = tcp[0].socket.getsockname()[1]
        listeners: list[trio.abc.Listener[trio.abc.Stream]] = list(tcp)
        if self.ssl_context is not None:
            listeners = [
                trio.SSLListener(listener, self.ssl_context, https_compatible=True)
                for listener in tcp
            ]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.abc.Stream) -> None:
        peer = Peer(self, len(self.peers) + 1, stream)
        self.peers.append(peer)
        self.notify()
        try:
            await self.handler(peer)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            peer.closed_by_client.set()
            self.notify()
        finally:
            await stream.aclose()


async def start(
    nursery: trio.Nursery, handler: Handler, ssl_context: ssl.SSLContext | None = None
) -> ScriptedServer:
    server = ScriptedServer(handler, ssl_context)
    await nursery.start(server.serve)
    return server


def reply(body: bytes = b"ok", status: int = 200, headers: Iterable[tuple[str, str]] = ()) -> bytes:
    """A complete HTTP/1.1 response with a Content-Length."""
    lines = [f"HTTP/1.1 {status} X", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def serve_forever(peer: Peer, body: Callable[[Peer], bytes] | None = None) -> None:
    """Answer every request of the connection with ``body`` (default: ``"<conn>:<n>"``,
    the connection's number and the request's number on it)."""
    while await peer.read_request() is not None:
        text = body(peer) if body else f"{peer.number}:{len(peer.requests)}".encode()
        await peer.send(reply(text))


def first_then_serve(
    first: Callable[[Peer], Awaitable[None]],
) -> Callable[[Peer], Awaitable[None]]:
    """A handler: ``first`` plays the first connection (the fault under test), every
    later connection is served normally (:func:`serve_forever`)."""

    async def handler(peer: Peer) -> None:
        if peer.number == 1:
            await first(peer)
        else:
            await serve_forever(peer)

    return handler


def new_transport(
    *,
    ssl_context: ssl.SSLContext | None = None,
    max_idle: int = 4,
    idle_expiry: float = 60.0,
    max_head_bytes: int | None = None,
    stats: Stats | None = None,
) -> TrioHTTPTransport:
    if max_head_bytes is None:
        return TrioHTTPTransport(
            ssl_context=ssl_context,
            max_idle=max_idle,
            idle_expiry=idle_expiry,
            stats=stats,
        )
    return TrioHTTPTransport(
        ssl_context=ssl_context,
        max_idle=max_idle,
        idle_expiry=idle_expiry,
        max_head_bytes=max_head_bytes,
        stats=stats,
    )


def client_for(transport: TrioHTTPTransport) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(TIMEOUT))


async def wait_pooled_socket_readable(transport: TrioHTTPTransport) -> None:
    """Wait until the kernel has handed the client's pooled socket what the server did
    (a FIN or bytes): the state the transport promises to notice before reuse. Looks
    inside the pool, since nothing public shows the socket."""
    (conn,) = transport._idle
    await trio.lowlevel.wait_readable(conn.transport.get_extra_info("socket"))


# --------------------------------------------------------------------------- keep-alive


async def test_sequential_requests_share_one_connection(nursery: trio.Nursery) -> None:
    server = await start(nursery, serve_forever)
    transport = new_transport()
    async with client_for(transport) as client:
        with trio.fail_after(TIMEOUT):
            first = await client.get(server.url)
            second = await client.get(server.url)
        assert (first.status_code, first.content) == (200, b"1:1")
        assert (second.status_code, second.content) == (200, b"1:2")
        assert server.accepted == 1
        assert transport.idle_connections == 1


@pytest.fixture
def high_descriptors() -> Iterator[None]:
    """Enough descriptors open that the next socket's number is above 1023, as in a
    daemon holding thousands of IMAP connections (select() cannot take those)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    held: list[int] = []
    try:
        while not held or held[-1] < 1100:
            held.append(os.open(os.devnull, os.O_RDONLY))
        yield
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_connections_are_reused_with_descriptors_above_1023(
    nursery: trio.Nursery, high_descriptors: None
) -> None:
    server = await start(nursery, serve_forever)
    transport = new_transport()
    async with client_for(transport) as client:
        with trio.fail_after(TIMEOUT):
            for _ in range(3):
                assert (await client.get(server.url)).status_code == 200
        assert server.accepted == 1


async def test_an_idle_connection_the_server_closed_is_replaced(nursery: trio.Nursery) -> None:
    async def one_request_then_close(peer: Peer) -> None:
        if await peer.read_request() is not None:
            await peer.send(reply(f"{peer.number}".encode()))  # no Connection: close
        await peer.close()

    server = await start(nursery, one_request_then_close)
    transport = new_transport()
    async with client_for(transport) as client:
        with trio.fail_after(TIMEOUT):
            assert (await client.get(server.url)).content == b"1"
            await server.peers[0].closed_by_server.wait()
            await wait_pooled_socket_readable(transport)
            second = await client.get(server.url)
        assert (second.status_code, second.content) == (200, b"2")
        assert server.accepted == 2


async def test_an_idle_connection_the_server_wrote_to_is_dropped(nursery: trio.Nursery) -> None:
    first_read = trio.Event()
    stray_sent = trio.Event()

    async def reply_then_write_unasked(peer: Peer) -> None:
        if peer.number == 1 and await peer.read_request() is not None:
            await peer.send(reply(b"1"))
            await first_read.wait()  # the stray bytes come in a later read of the client
            await peer.send(reply(b"stray", status=408))  # as servers do before closing
            stray_sent.set()
        await serve_forever(peer)

    server = await start(nursery, reply_then_write_unasked)
    transport = new_transport()
    async with client_for(transport) as client:
        with trio.fail_after(TIMEOUT):
            assert (await client.get(server.url)).content == b"1"
            first_read.set()
            await stray_sent.wait()
            await wait_pooled_socket_readable(transport)
            second = await client.get(server.url)
            await server.peers[0].closed_by_client.wait()
        assert (second.status_code, second.content) == (200, b"2:1")
        assert server.peers[0].requests[1:] == []


async def test_bytes_past_the_end_of_a_reply_are_never_taken_for_the_next_reply(
    nursery: trio.Nursery,
) -> None:
    """A server that writes more than its reply (in the same segment) has left the
    connection unusable: the next request must not be answered by those bytes."""

    async def reply_with_extra_bytes(peer: Peer) -> None:
        if peer.number == 1 and await peer.read_request() is not None:
            await peer.send(reply(b"first") + reply(b"stale"))
        await serve_forever(peer, lambda _: b"fresh")

    server = await start(nursery, reply_with_extra_bytes)
    async with client_for(new_transport()) as client:
        with trio.fail_after(TIMEOUT):
            assert (await client.get(server.url)).content == b"first"
            second = await client.get(server.url)
        assert second.content == b"fresh"


async def test_a_connection_close_reply_is_not_reused(nursery: trio.Nursery) -> None:
    async def close_announced(peer: Peer) -> None:
        # the server announces the close but keeps reading: only the client ends it
        while await peer.read_request() is not None:
            await peer.send(reply(f"{peer.number}".encode(), headers=[("Connection", "close")]))

    server = await start(nursery, close_announced)
    transport = new_transport()
    async with client_for(transport) as client:
        with trio.fail_after(TIMEOUT):
            assert (await client.get(server.url)).content == b"1"
            await server.peers[0].closed_by_client.wait()
            assert transport.idle_connections == 0
            assert (await client.get(server.url)).content == b"2"
        assert server.accepted == 2
        assert len(server.peers[0].requests) == 1


# A server closing a kept-alive connection as the next request goes out on it (its
# keep-alive timeout crossing the request) is found only once the request is on its way:
# the close reaches the client after the pool's check. The handlers below play that
# moment deterministically: the server takes the second request's bytes, then closes.

STALE = "backend_stale_connection_retries"


async def close_on_request(peer: Peer, how: str) -> None:
    """Close ``peer`` once its next request has arrived: ``fin`` after reading it (the
    client reads an end of stream), ``reset`` without reading it (unread bytes make the
    kernel answer with RST: the client's read fails with ECONNRESET, ``ReadError``)."""
    if how == "fin":
        await peer.read_request()
    else:
        await trio.lowlevel.wait_readable(peer.stream.socket)  # type: ignore[attr-defined]
    await peer.close()


def answer_once_then_close(how: str) -> Handler:
    """Connection 1 answers its first request (kept alive), then closes on the second;
    later connections are served normally."""

    async def handler(peer: Peer) -> None:
        if peer.number == 1:
            if await peer.read_request() is not None:
                await peer.send(reply(b"1:1"))
            await close_on_request(peer, how)
        else:
            await serve_forever(peer)

    return handler


@pytest.mark.parametrize("how", ["fin", "reset"])
async def test_a_reused_connection_closed_before_any_reply_byte_is_retried_at_once(
    nursery: trio.Nursery, how: str
) -> None:
    """The POST goes again on a fresh connection inside the same request: the caller
    gets the reply, not an error and a backoff wait."""
    server = await start(nursery, answer_once_then_close(how))
    stats = Stats()
    transport = new_transport(stats=stats)
    async with client_for(transport) as client:
        with trio.fail_after(TIMEOUT):
            assert (await client.post(server.url, content=b"one")).content == b"1:1"
            second = await client.post(server.url, content=b"two")
        assert (second.status_code, second.content) == (200, b"2:1")
        assert [r.body for r in server.peers[1].requests] == [b"two"]
        assert server.accepted == 2
        assert stats.get(STALE) == 1


@pytest.mark.parametrize("how", ["fin", "reset"])
async def test_a_fresh_connection_closed_before_any_reply_byte_is_not_retried(
    nursery: trio.Nursery, how: str
) -> None:
    """On a connection that never carried a reply, the close is the server's answer to
    this request: the caller hears of it (and backs off), nothing goes again."""

    async def close_the_first(peer: Peer) -> None:
        await close_on_request(peer, how)

    server = await start(nursery, first_then_serve(close_the_first))
    stats = Stats()
    transport = new_transport(stats=stats)
    async with client_for(transport) as client:
        with trio.fail_after(TIMEOUT):
            with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
                await client.post(server.url, content=b"one")
            assert server.accepted == 1
            # the next request is the caller's own: it gets through
            assert (await client.post(server.url, content=b"two")).content == b"2:1"
        assert stats.get(STALE) == 0


async def test_a_reused_connection_closed_after_a_reply_byte_is_not_retried(
    nursery: trio.Nursery,
) -> None:
    """The server had begun to answer: it may have acted on the POST, so the request
    must not run twice."""

    async def answer_then_cut_the_second(peer: Peer) -> None:
        if peer.number == 1:
            if await peer.read_request() is not None:
                await peer.send(reply(b"1:1"))
            await peer.read_request()
            await peer.send(b"HTTP/1.1 200 OK\r\n")
            await peer.close()
        else:
            await serve_forever(peer)

    server = await start(nursery, answer_then_cut_the_second)
    stats = Stats()
    transport = new_transport(stats=stats)
    async with client_for(transport) as client:
        with trio.fail_after(TIMEOUT):
            assert (await client.post(server.url, content=b"one")).content == b"1:1"
            with pytest.raises(httpx.RemoteProtocolError):
                await client.post(server.url, content=b"two")
        assert server.accepted == 1
        assert [r.body for r in server.peers[0].requests] == [b"one", b"two"]
        assert stats.get(STALE) == 0


async def test_a_stale_connection_is_retried_only_once(nursery: trio.Nursery) -> None:
    """The fresh connection's own failure is the answer: no third attempt."""

    async def handler(peer: Peer) -> None:
        if peer.number == 1:
            await answer_once_then_close("fin")(peer)
        elif peer.number == 2:
            await close_on_request(peer, "fin")
        else:
            await serve_forever(peer)

    server = await start(nursery, handler)
    stats = Stats()
    transport = new_transport(stats=stats)
    async with client_for(transport) as client:
        with trio.fail_after(TIMEOUT):
            assert (await client.post(server.url, content=b"one")).content == b"1:1"
            with pytest.raises(httpx.RemoteProtocolError):
                await client.post(server.url, content=b"two")
        assert server.accepted == 2
        assert server.request_count == 3
        assert stats.get(STALE) == 1


async def test_a_streamed_body_is_not_sent_again_after_a_stale_connection(
    nursery: trio.Nursery,
) -> None:
    """A body from an iterator cannot be replayed: the failure is the caller's to see."""

    async def body() -> AsyncIterator[bytes]:
        yield b"streamed"

    server = await start(nursery, answer_once_then_close("fin"))
    stats = Stats()
    transport = new_transport(stats=stats)
    async with client_for(transport) as client:
        with trio.fail_after(TIMEOUT):
            assert (await client.post(server.url, content=b"one")).content == b"1:1"
            with pytest.raises(httpx.RemoteProtocolError):
                await client.post(server.url, content=body())
        assert server.accepted == 1
        assert stats.get(STALE) == 0


async def test_with_max_idle_zero_nothing_is_kept(nursery: trio.Nursery) -> None:
    server = await start(nursery, serve_forever)
    transport = new_transport(max_idle=0)
    async with client_for(transport) as client:
        with trio.fail_after(TIMEOUT):
            assert (await client.get(server.url)).content == b"1:1"
            await server.peers[0].closed_by_client.wait()
            assert (await client.get(server.url)).content == b"2:1"
        assert transport.idle_connections == 0


async def test_an_expired_idle_connection_is_closed_not_reused(nursery: trio.Nursery) -> None:
    server = await start(nursery, serve_forever)
    transport = new_transport(idle_expiry=0)
    async with client_for(transport) as client:
        with trio.fail_after(TIMEOUT):
            assert (await client.get(server.url)).content == b"1:1"
            assert (await client.get(server.url)).content == b"2:1"
            await server.peers[0].closed_by_client.wait()
        assert server.accepted == 2


async def test_at_most_max_idle_connections_are_kept_after_a_burst(
    nursery: trio.Nursery,
) -> None:
    burst = 5

    async def reply_once_all_arrived(peer: Peer) -> None:
        while await peer.read_request() is not None:
            await peer.server.wait_until(lambda: peer.server.request_count >= burst)
            await peer.send(reply(f"{peer.number}".encode()))

    server = await start(nursery, reply_once_all_arrived)
    transport = new_transport(max_idle=2)
    answers: list[bytes] = []

    async def get() -> None:
        answers.append((await client.get(server.url)).content)

    async with client_for(transport) as client:
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as requests:
                for _ in range(burst):
                    requests.start_soon(get)
            assert sorted(answers) == [str(n).encode() for n in range(1, burst + 1)]
            assert transport.idle_connections == 2
            await server.wait_until(
                lambda: sum(p.closed_by_client.is_set() for p in server.peers) == burst - 2
            )
            # the two kept are the ones used next
            await client.get(server.url)
            await client.get(server.url)
        assert server.accepted == burst
        assert transport.idle_connections == 2


async def test_aclose_closes_pooled_connections_and_pools_nothing_after(
    nursery: trio.Nursery,
) -> None:
    server = await start(nursery, serve_forever)
    transport = new_transport()
    client = client_for(transport)
    with trio.fail_after(TIMEOUT):
        async with client.stream("GET", server.url) as in_flight:
            assert (await client.get(server.url)).content == b"2:1"
            assert transport.idle_connections == 1
            await transport.aclose()
            assert transport.idle_connections == 0
            await server.peers[1].closed_by_client.wait()
            assert await in_flight.aread() == b"1:1"
        # the reply in flight when the transport closed ends its connection too
        await server.peers[0].closed_by_client.wait()
        assert transport.idle_connections == 0
        with pytest.raises(RuntimeError):
            await transport.handle_async_request(httpx.Request("GET", server.url))
        await client.aclose()
    assert server.accepted == 2


# --------------------------------------------------------------------------- closing


@pytest.mark.parametrize("read", [False, True], ids=["unread", "partly-read"])
async def test_a_reply_closed_before_its_end_closes_the_connection(
    nursery: trio.Nursery, read: bool
) -> None:
    async def big_reply_first(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\n\r\n" + b"x" * 1024)
        await peer.wait_closed()

    server = await start(nursery, first_then_serve(big_reply_first))
    transport = new_transport()
    async with client_for(transport) as client:
        with trio.fail_after(TIMEOUT):
            async with client.stream("GET", server.url) as response:
                assert response.status_code == 200
                if read:
                    async for chunk in response.aiter_raw():
                        assert chunk
                        break
            await server.peers[0].closed_by_client.wait()
            assert transport.idle_connections == 0
            after = await client.get(server.url)
        assert after.content == b"2:1"


async def test_a_cancelled_request_closes_its_connection(
    nursery: trio.Nursery,
) -> None:
    async def never_answer_the_first(peer: Peer) -> None:
        await peer.read_request()
        await peer.wait_closed()

    server = await start(nursery, first_then_serve(never_answer_the_first))
    transport = new_transport()
    finished: list[httpx.Response] = []
    cancelled: list[trio.Cancelled] = []

    async def get() -> None:
        try:
            finished.append(await client.get(server.url))
        except trio.Cancelled as exc:
            cancelled.append(exc)  # kept: the close must not wait for the garbage collector
            raise

    async with client_for(transport) as client:
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as waiting:
                waiting.start_soon(get)
                await server.wait_until(lambda: server.request_count == 1)
                waiting.cancel_scope.cancel()
            assert finished == []
            assert len(cancelled) == 1
            await server.peers[0].closed_by_client.wait()
            after = await client.get(server.url)
        assert after.content == b"2:1"
        assert transport.idle_connections == 1


async def test_a_request_while_another_is_in_flight_opens_its_own_connection(
    nursery: trio.Nursery,
) -> None:
    """The transport does not limit requests in flight (the HttpClient's limiter does, the
    one limit on the way): a second request never waits behind a first one's reply."""
    server = await start(nursery, serve_forever)
    transport = new_transport()
    async with client_for(transport) as client:
        with trio.fail_after(TIMEOUT):
            async with client.stream("GET", server.url) as held:
                assert held.status_code == 200
                second = await client.get(server.url)
                assert await held.aread() == b"1:1"
        assert second.content == b"2:1"
        assert server.accepted == 2


# --------------------------------------------------------------------------- timeouts


@pytest.mark.parametrize("stall", ["head", "body"])
async def test_a_server_that_stops_answering_is_a_read_timeout(
    nursery: trio.Nursery, stall: str
) -> None:
    async def stall_the_first(peer: Peer) -> None:
        await peer.read_request()
        if stall == "body":
            await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
        await peer.wait_closed()

    server = await start(nursery, first_then_serve(stall_the_first))
    transport = new_transport()
    async with client_for(transport) as client:
        with trio.fail_after(TIMEOUT):
            with pytest.raises(httpx.ReadTimeout) as caught:
                await client.get(server.url, timeout=httpx.Timeout(TIMEOUT, read=SHORT))
            # closed while the error is still referenced, not by the garbage collector
            await server.peers[0].closed_by_client.wait()
            after = await client.get(server.url)
        assert after.content == b"2:1"
        assert caught.value.__traceback__ is not None


async def test_a_server_that_stops_reading_is_a_write_timeout(nursery: trio.Nursery) -> None:
    timed_out = trio.Event()

    async def read_the_first_only_after_the_timeout(peer: Peer) -> None:
        await timed_out.wait()
        await peer.wait_closed()

    async def more_than_the_socket_buffers_hold() -> AsyncIterator[bytes]:
        # 64 MiB, far past what loopback buffers take from a peer that does not read
        # (tcp_wmem's 4 MiB at most), yet bounded: a transport that never writes
        # must fail this test, not eat the machine's memory
        piece = b"x" * (64 * 1024)
        for _ in range(1024):
            yield piece

    server = await start(nursery, first_then_serve(read_the_first_only_after_the_timeout))
    transport = new_transport()
    async with client_for(transport) as client:
        with trio.fail_after(TIMEOUT):
            with pytest.raises(httpx.WriteTimeout) as caught:
                await client.post(
                    server.url,
                    content=more_than_the_socket_buffers_hold(),
                    timeout=httpx.Timeout(TIMEOUT, write=SHORT),
                )
            timed_out.set()
            # closed while the error is still referenced, not by the garbage collector
            await server.peers[0].closed_by_client.wait()
            after = await client.get(server.url)
        assert after.content == b"2:1"
        assert caught.value.__traceback__ is not None


async def test_a_tls_handshake_that_never_ends_is_a_connect_timeout(
    nursery: trio.Nursery, ca: trustme.CA
) -> None:
    async def silent(peer: Peer) -> None:
        await peer.wait_closed()

    server = await start(nursery, silent)  # plain TCP: never answers the ClientHello
    transport = new_transport(ssl_context=trusting(ca))
    async with client_for(transport) as client:
        with trio.fail_after(TIMEOUT):
            with pytest.raises(httpx.ConnectTimeout) as caught:
                await client.get(
                    f"https://{HOST}:{server.port}/", timeout=httpx.Timeout(TIMEOUT, connect=SHORT)
                )
            # closed while the error is still referenced, not by the garbage collector
            await server.peers[0].closed_by_client.wait()
            # the next request tries again
            with pytest.raises(httpx.ConnectTimeout):
                await client.get(
                    f"https://{HOST}:{server.port}/",
                    timeout=httpx.Timeout(TIMEOUT, connect=SHORT),
                )
        assert caught.value.__traceback__ is not None


# --------------------------------------------------------------------------- protocol faults


@pytest.mark.parametrize("ending", ["complete", "never-ending"])
async def test_a_reply_head_over_max_head_bytes_is_a_protocol_error(
    nursery: trio.Nursery, ending: str
) -> None:
    async def huge_head_first(peer: Peer) -> None:
        await peer.read_request()
        head = b"HTTP/1.1 200 OK\r\nX-Filler: " + b"a" * 4096 + b"\r\nContent-Length: 2\r\n"
        await peer.send(head + b"\r\nok" if ending == "complete" else head)
        await peer.wait_closed()

    server = await start(nursery, first_then_serve(huge_head_first))
    transport = new_transport(max_head_bytes=1024)
    async with client_for(transport) as client:
        with trio.fail_after(TIMEOUT):
            with pytest.raises(httpx.RemoteProtocolError) as caught:
                await client.get(server.url)
            # closed while the error is still referenced, not by the garbage collector
            await server.peers[0].closed_by_client.wait()
            after = await client.get(server.url)
        assert after.content == b"2:1"
        assert caught.value.__traceback__ is not None


async def test_a_reply_head_within_max_head_bytes_is_read(nursery: trio.Nursery) -> None:
    async def big_head(peer: Peer) -> None:
        while await peer.read_request() is not None:
            await peer.send(reply(b"ok", headers=[("X-Filler", "a" * 700)]))

    server = await start(nursery, big_head)
    async with client_for(new_transport(max_head_bytes=1024)) as client:
        with trio.fail_after(TIMEOUT):
            response = await client.get(server.url)
        assert response.headers["x-filler"] == "a" * 700


async def test_a_server_closing_without_a_reply_is_a_protocol_error(
    nursery: trio.Nursery,
) -> None:
    async def close_the_first(peer: Peer) -> None:
        await peer.read_request()
        await peer.close()

    server = await start(nursery, first_then_serve(close_the_first))
    transport = new_transport()
    async with client_for(transport) as client:
        with trio.fail_after(TIMEOUT):
            with pytest.raises(httpx.RemoteProtocolError):
                await client.get(server.url)
            after = await client.get(server.url)
        assert after.content == b"2:1"


async def test_a_body_cut_short_is_a_protocol_error(nursery: trio.Nursery) -> None:
    async def cut_the_first(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        await peer.close()

    server = await start(nursery, first_then_serve(cut_the_first))
    transport = new_transport()
    async with client_for(transport) as client:
        with trio.fail_after(TIMEOUT):
            with pytest.raises(httpx.RemoteProtocolError):
                await client.get(server.url)
            assert transport.idle_connections == 0
            after = await client.get(server.url)
        assert after.content == b"2:1"


async def test_a_header_h11_will_not_write_is_a_local_protocol_error(
    nursery: trio.Nursery,
) -> None:
    server = await start(nursery, serve_forever)
    transport = new_transport()
    async with client_for(transport) as client:
        with trio.fail_after(TIMEOUT):
            with pytest.raises(httpx.LocalProtocolError):
                await client.get(server.url, headers={"x-bad": "a\r\nInjected: yes"})
            after = await client.get(server.url)
        assert after.status_code == 200
        assert all(b"injected" not in dict(r.headers) for p in server.peers for r in p.requests)


# --------------------------------------------------------------------------- bodies


def pattern(size: int) -> bytes:
    return bytes(range(256)) * (size // 256) + bytes(range(size % 256))


async def in_pieces(data: bytes, piece: int) -> AsyncIterator[bytes]:
    for start_at in range(0, len(data), piece):
        yield data[start_at : start_at + piece]


@pytest.mark.parametrize(
    ("size", "streamed"),
    [(300 * 1024, False), (300 * 1024, True), (16 << 20, False), (4 << 20, True)],
    # 16 MiB in one piece: more than the kernel takes in one send (tcp_wmem's 4 MiB)
    ids=["300KiB", "300KiB-streamed", "16MiB", "4MiB-streamed"],
)
async def test_a_large_request_body_arrives_intact(
    nursery: trio.Nursery, size: int, streamed: bool
) -> None:
    assert size > COALESCE_BYTES
    server = await start(nursery, lambda peer: serve_forever(peer, lambda _: b"got it"))
    body = pattern(size)
    async with client_for(new_transport()) as client:
        with trio.fail_after(TIMEOUT):
            content = in_pieces(body, 16 * 1024) if streamed else body
            response = await client.post(server.url, content=content)
            again = await client.get(server.url)
        assert response.content == b"got it"
        assert server.peers[0].requests[0].body == body
        assert again.content == b"got it"
        assert server.accepted == 1


async def test_a_chunked_reply_is_reassembled(nursery: trio.Nursery) -> None:
    async def chunked(peer: Peer) -> None:
        while await peer.read_request() is not None:
            await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for piece in (b"5\r\nhello\r\n", b"6\r\n wor", b"ld\r\n", b"0\r\n\r\n"):
                await peer.send(piece)

    server = await start(nursery, chunked)
    async with client_for(new_transport()) as client:
        with trio.fail_after(TIMEOUT):
            first = await client.get(server.url)
            second = await client.get(server.url)
        assert first.content == second.content == b"hello world"
        assert server.accepted == 1


async def test_informational_replies_before_the_final_one_are_skipped(
    nursery: trio.Nursery,
) -> None:
    async def early_hints(peer: Peer) -> None:
        while await peer.read_request() is not None:
            await peer.send(b"HTTP/1.1 100 Continue\r\n\r\n")
            await peer.send(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>\r\n\r\n")
            await peer.send(reply(b"final", status=201))

    server = await start(nursery, early_hints)
    async with client_for(new_transport()) as client:
        with trio.fail_after(TIMEOUT):
            first = await client.post(server.url, content=b"{}")
            second = await client.get(server.url)
        assert (first.status_code, first.content) == (201, b"final")
        assert (second.status_code, second.content) == (201, b"final")
        assert server.accepted == 1


# --------------------------------------------------------------------------- TLS


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def trusting(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(context)
    return context


def serving(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(HOST).configure_cert(context)
    return context


async def test_https_to_a_trusted_server_works_and_keeps_alive(
    nursery: trio.Nursery, ca: trustme.CA
) -> None:
    server = await start(nursery, serve_forever, serving(ca))
    transport = new_transport(ssl_context=trusting(ca))
    async with client_for(transport) as client:
        with trio.fail_after(TIMEOUT):
            first = await client.get(server.url)
            second = await client.post(server.url, content=pattern(200 * 1024))
        assert (first.content, second.content) == (b"1:1", b"1:2")
        assert server.peers[0].requests[1].body == pattern(200 * 1024)
        assert server.accepted == 1


async def test_https_to_an_untrusted_server_is_a_connect_error(
    nursery: trio.Nursery, ca: trustme.CA
) -> None:
    server = await start(nursery, serve_forever, serving(ca))
    transport = new_transport(ssl_context=trusting(trustme.CA()))
    async with client_for(transport) as client:
        with trio.fail_after(TIMEOUT):
            with pytest.raises(httpx.ConnectError) as caught:
                await client.get(server.url)
            # closed while the error is still referenced, not by the garbage collector
            await server.wait_until(
                lambda: server.accepted == 1 and server.peers[0].closed_by_client.is_set()
            )
            with pytest.raises(httpx.ConnectError):  # the next request tries again
                await client.get(server.url)
        assert "CERTIFICATE_VERIFY_FAILED" in str(caught.value)
        assert isinstance(caught.value.__cause__, ssl.SSLError)
        assert server.request_count == 0


async def test_https_without_an_ssl_context_is_a_connect_error(nursery: trio.Nursery) -> None:
    async def silent(peer: Peer) -> None:
        await peer.wait_closed()

    server = await start(nursery, silent)
    async with client_for(new_transport()) as client:
        with trio.fail_after(TIMEOUT), pytest.raises(httpx.ConnectError):
            await client.get(f"https://{HOST}:{server.port}/")
        assert server.accepted == 0


# --------------------------------------------------------------------------- connecting


async def test_a_refused_connection_is_a_connect_error_saying_so() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as unused:
        unused.bind((HOST, 0))
        port = unused.getsockname()[1]
    transport = new_transport()
    async with client_for(transport) as client:
        with trio.fail_after(TIMEOUT):
            with pytest.raises(httpx.ConnectError) as caught:
                await client.get(f"http://{HOST}:{port}/")
            with pytest.raises(httpx.ConnectError):  # the next request tries again
                await client.get(f"http://{HOST}:{port}/")
    assert "refused" in str(caught.value).lower()
    assert isinstance(caught.value.__cause__, ConnectionRefusedError)


async def test_a_header_value_never_appears_in_the_error(nursery: trio.Nursery) -> None:
    """A secret read from a file with its trailing newline is refused by h11, whose own
    text quotes the value: the error must not carry it to a log or traceback."""
    server = await start(nursery, serve_forever)
    transport = new_transport()
    request = httpx.Request(
        "POST", server.url, content=b"{}", headers={"x-admin-secret": "s3cret-value\n"}
    )
    with trio.fail_after(TIMEOUT), pytest.raises(httpx.LocalProtocolError) as raised:
        await transport.handle_async_request(request)
    await transport.aclose()
    assert "s3cret-value" not in str(raised.value)
    assert raised.value.__cause__ is None and raised.value.__context__ is None
