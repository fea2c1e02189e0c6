"""TLS sessions use a small read buffer (asyncio's default is 256 KiB per connection)."""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import ssl

import trio_asyncio
import trustme

from trio_idle import imap_client


def test_importing_the_imap_client_shrinks_asyncios_tls_buffer() -> None:
    assert asyncio.sslproto.SSLProtocol.max_size == imap_client.TLS_READ_BUFFER
    assert imap_client.TLS_READ_BUFFER < 16 * 1024  # smaller than one full TLS record


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


async def test_answers_larger_than_the_buffer_arrive_whole() -> None:
    # full 16 KiB records and a tail: each record spans several 4 KiB reads
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    payload = bytes(range(256)) * 401
    async with trio_asyncio.open_loop():
        received = await trio_asyncio.aio_as_trio(_fetch_over_tls)(server, client, payload)
    assert received == payload
