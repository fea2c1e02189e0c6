"""TLS sessions use a small read buffer (asyncio's default is 256 KiB per connection)."""

import asyncio.sslproto

from trio_idle import imap_client


def test_importing_the_imap_client_shrinks_asyncios_tls_buffer() -> None:
    assert asyncio.sslproto.SSLProtocol.max_size == imap_client.TLS_READ_BUFFER
    assert imap_client.TLS_READ_BUFFER >= 16 * 1024 + 512  # a whole TLS record still fits
