"""The IMAP socket transport: TLS over memory BIOs, reads from trio, writes that never block.

Real sockets on 127.0.0.1 and a real TLS handshake (a trustme CA); the peer is trio's own
TLS server stream.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import trio
import trio.testing
import trustme

from trio_idle.net.transport import MAX_UNSENT, ImapTransport, TransportClosed

Peer = Callable[[trio.abc.Stream], Awaitable[None]]


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


async def serve_one(
    nursery: trio.Nursery, peer: Peer, server_context: ssl.SSLContext | None
) -> ImapTransport:
    """A listener on 127.0.0.1 running ``peer`` for one client; the connected transport."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]

    async def accept() -> None:
        stream: trio.abc.Stream = await listener.accept()
        await listener.aclose()
        if server_context is not None:
            stream = trio.SSLStream(stream, server_context, server_side=True)
        async with stream:
            await peer(stream)

    nursery.start_soon(accept)
    sock = socket.create_connection(("127.0.0.1", port))
    return ImapTransport(sock)


async def receive_all(transport: ImapTransport) -> bytes:
    received = bytearray()
    while data := await transport.receive():
        received += data
    return bytes(received)


@pytest.fixture
async def nursery() -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as n:
        yield n
        n.cancel_scope.cancel()


async def test_answers_larger_than_a_tls_record_arrive_whole(
    ca: trustme.CA, nursery: trio.Nursery
) -> None:
    # full 16 KiB records and a tail, each spanning several socket reads
    payload = bytes(range(256)) * 401
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("imap.example.test").configure_cert(server)

    async def peer(stream: trio.abc.Stream) -> None:
        await stream.send_all(payload)

    transport = await serve_one(nursery, peer, server)
    with trio.fail_after(10):
        await transport.start_tls(client_context(ca), "imap.example.test")
        assert await receive_all(transport) == payload  # then b"": the server closed
    transport.close()


async def test_what_we_write_reaches_the_server_through_tls(
    ca: trustme.CA, nursery: trio.Nursery
) -> None:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("imap.example.test").configure_cert(server)
    got = trio.Event()
    seen = bytearray()

    async def peer(stream: trio.abc.Stream) -> None:
        while len(seen) < 12:
            seen.extend(await stream.receive_some())
        got.set()
        await stream.send_all(b"* OK thanks\r\n")

    transport = await serve_one(nursery, peer, server)
    with trio.fail_after(10):
        await transport.start_tls(client_context(ca), "imap.example.test")
        transport.write(b"a1 NOOP\r\n")
        transport.write(b"DONE")
        await got.wait()
        assert await transport.receive() == b"* OK thanks\r\n"
    assert bytes(seen) == b"a1 NOOP\r\nDONE"
    transport.close()


async def test_a_certificate_for_another_name_is_refused(
    ca: trustme.CA, nursery: trio.Nursery
) -> None:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("other.example.test").configure_cert(server)

    async def peer(stream: trio.abc.Stream) -> None:
        with pytest.raises(trio.BrokenResourceError):
            await stream.send_all(b"* OK never readable\r\n")

    transport = await serve_one(nursery, peer, server)
    with trio.fail_after(10), pytest.raises(ssl.SSLCertVerificationError):
        await transport.start_tls(client_context(ca), "imap.example.test")
    transport.close()


async def test_a_server_that_stops_reading_breaks_the_connection_not_the_writer(
    nursery: trio.Nursery,
) -> None:
    stop = trio.Event()

    async def peer(stream: trio.abc.Stream) -> None:
        await stop.wait()  # reads nothing

    transport = await serve_one(nursery, peer, None)
    chunk = b"x" * 65536
    for _ in range(4 * MAX_UNSENT // len(chunk) + 64):  # more than the kernel buffers too
        transport.write(chunk)  # never blocks
        if transport.is_closing():
            break
    assert transport.is_closing()
    with trio.fail_after(5), pytest.raises(TransportClosed, match="stopped reading"):
        await transport.receive()
    stop.set()


async def test_close_wakes_a_task_waiting_to_read(nursery: trio.Nursery) -> None:
    stop = trio.Event()

    async def peer(stream: trio.abc.Stream) -> None:
        await stop.wait()

    transport = await serve_one(nursery, peer, None)
    failed = trio.Event()

    async def reader() -> None:
        with pytest.raises(trio.ClosedResourceError):
            await transport.receive()
        failed.set()

    async with trio.open_nursery() as inner:
        inner.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        transport.close()
        with trio.fail_after(5):
            await failed.wait()
    stop.set()
    with pytest.raises(TransportClosed):
        await transport.receive()


async def test_plaintext_end_of_stream_is_empty_bytes(nursery: trio.Nursery) -> None:
    async def peer(stream: trio.abc.Stream) -> None:
        await stream.send_all(b"* OK hello\r\n")

    transport = await serve_one(nursery, peer, None)
    with trio.fail_after(5):
        assert await receive_all(transport) == b"* OK hello\r\n"
    transport.close()
