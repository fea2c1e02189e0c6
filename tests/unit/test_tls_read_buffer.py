"""TLS sessions use a small read buffer (asyncio's default is 256 KiB per connection)."""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import ssl
import subprocess
import sys

import pytest
import trio_asyncio
import trustme

from tests.harness import ListSource, make_settings, running_daemon
from trio_idle import imap_client

ASYNCIO_DEFAULT = 256 * 1024


@pytest.fixture
def asyncio_default_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    """asyncio's own size for the test; the process-wide value is restored afterwards."""
    monkeypatch.setattr(asyncio.sslproto.SSLProtocol, "max_size", ASYNCIO_DEFAULT)


def test_importing_the_imap_client_leaves_asyncio_alone() -> None:
    # a fresh interpreter: in this one the daemon tests have shrunk the buffer already
    code = (
        "import asyncio.sslproto, trio_idle.imap_client\n"
        "print(asyncio.sslproto.SSLProtocol.max_size)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert int(done.stdout) == ASYNCIO_DEFAULT


def test_the_explicit_call_shrinks_asyncios_tls_buffer(asyncio_default_buffer: None) -> None:
    imap_client.shrink_tls_read_buffer()
    assert asyncio.sslproto.SSLProtocol.max_size == imap_client.TLS_READ_BUFFER
    assert imap_client.TLS_READ_BUFFER < 16 * 1024  # smaller than one full TLS record
    imap_client.shrink_tls_read_buffer()  # idempotent
    assert asyncio.sslproto.SSLProtocol.max_size == imap_client.TLS_READ_BUFFER


async def _fetch_over_tls(server: ssl.SSLContext, client: ssl.SSLContext, payload: bytes) -> bytes:
    async def send(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(payload)
        await writer.drain()
        writer.close()

    listener = await asyncio.start_server(send, "127.0.0.1", 0, ssl=server)
    port = listener.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client)
        data = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        return data
    finally:
        listener.close()


async def test_answers_larger_than_the_buffer_arrive_whole(asyncio_default_buffer: None) -> None:
    # full 16 KiB records and a tail: each record spans several 4 KiB reads
    imap_client.shrink_tls_read_buffer()
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    payload = bytes(range(256)) * 401
    async with trio_asyncio.open_loop():
        received = await trio_asyncio.aio_as_trio(_fetch_over_tls)(server, client, payload)
    assert received == payload


async def test_the_daemon_shrinks_the_buffer_before_its_sessions_start(
    asyncio_default_buffer: None,
) -> None:
    # the backend URL is never called: the source is empty
    async with running_daemon(make_settings("http://127.0.0.1:9"), ListSource()):
        assert asyncio.sslproto.SSLProtocol.max_size == imap_client.TLS_READ_BUFFER
