"""What OpenSSL keeps per idle TLS connection does not grow with what once passed through it.

An :class:`ssl.MemoryBIO` never gives memory back: its buffer stays at 4/3 of the largest
amount written into it at once, for the life of the connection. Handed whole socket reads
(up to 16 KiB: a FETCH answer, a LIST) and whole commands (an XOAUTH2 token is
kilobytes), one large answer or command left each connection ≈ 21 KiB (3.5 KiB) heavier
for good (``bench.memory_probe --tls`` measures ≈ 22 KiB per idle TLS connection in all).
``net/transport.py`` therefore feeds the BIOs in slices (``_BIO_SLICE``), decrypting
(reading out) after each; these tests fail when it hands them whole reads or writes.

Measured from glibc's ``mallinfo2()`` (OpenSSL's allocations; tracemalloc does not see
them) in this process, against a TLS server in another process so that only the client's
side is counted. Linux/glibc only.
"""

from __future__ import annotations

import gc
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trustme

from bench.mallinfo import malloc_info
from tests.conftest import unavailable
from trio_idle.imap.connect import make_ssl_context
from trio_idle.net.transport import ImapTransport

#: connections measured together (the figure is per connection)
N = 40
#: an answer the size of a full TLS record, and a command the size of an XOAUTH2 token
BIG_ANSWER = 16_000
BIG_COMMAND = 3_000
#: allowed growth per connection: well under either BIO's growth (≈ 21 and 4 KiB)
SLACK = 2048

#: one line per connection: "* OK" greeting; "BIG" -> a BIG_ANSWER-byte line back;
#: anything else is read and dropped
_SERVER = r"""
import asyncio, ssl, sys
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(sys.argv[1], sys.argv[2])
async def handle(reader, writer):
    writer.write(b"* OK ready\r\n")
    try:
        while line := await reader.readline():
            if line.startswith(b"BIG"):
                writer.write(b"* " + b"x" * (int(sys.argv[3]) - 4) + b"\r\n")
            await writer.drain()
    except (OSError, ssl.SSLError):
        pass
    writer.close()
async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.sleep(600)
asyncio.run(main())
"""


def _malloc_in_use() -> int:
    info = malloc_info()
    if info is None:
        unavailable("needs glibc >= 2.33 (mallinfo2)")
    return info["in_use"]


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, str]]:
    """(port, CA file) of the server process."""
    if malloc_info() is None:
        unavailable("needs glibc >= 2.33 (mallinfo2)")
    workdir: Path = tmp_path_factory.mktemp("tls-memory")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    chain, key, ca_file = workdir / "chain.pem", workdir / "key.pem", workdir / "ca.pem"
    cert.private_key_pem.write_to_path(str(key))
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    ca.cert_pem.write_to_path(str(ca_file))
    process = subprocess.Popen(
        [sys.executable, "-c", _SERVER, str(chain), str(key), str(BIG_ANSWER)],
        stdout=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        port = int(process.stdout.readline())
        yield port, str(ca_file)
    finally:
        process.kill()
        process.wait()


async def _line(transport: ImapTransport, size: int = 1) -> bytes:
    got = b""
    while len(got) < size or not got.endswith(b"\r\n"):
        data = await transport.receive()
        assert data, "server closed"
        got += data
    return got


async def _open(port: int, context: ssl.SSLContext) -> ImapTransport:
    transport = ImapTransport(socket.create_connection(("127.0.0.1", port)))
    await transport.start_tls(context, "localhost")
    assert (await _line(transport)).startswith(b"* OK")
    # a first command: OpenSSL frees its post-handshake buffers at the first write
    transport.write(b"a NOOP\r\n")
    return transport


async def _growth_per_connection(port: int, ca_file: str, command: bytes, answer: int) -> float:
    """malloc in use after ``command`` (and its ``answer``-byte reply) minus before, per
    connection, with every connection idle (nothing in flight) at both ends."""
    context = make_ssl_context(ca_file)
    transports = []
    try:
        with trio.fail_after(30):
            for _ in range(N):
                transports.append(await _open(port, context))
            gc.collect()
            before = _malloc_in_use()
            for transport in transports:
                transport.write(command)
                if answer:
                    await _line(transport, answer)
            await trio.sleep(0.2)  # the server reads the commands: nothing left to send
            gc.collect()
            after = _malloc_in_use()
    finally:
        for transport in transports:
            transport.close()
    return (after - before) / N


async def test_a_large_answer_leaves_no_larger_buffer_behind(tls_server: tuple[int, str]) -> None:
    port, ca_file = tls_server
    growth = await _growth_per_connection(port, ca_file, b"BIG\r\n", BIG_ANSWER)
    assert growth < SLACK, f"{growth:.0f} bytes more per idle connection"


async def test_a_large_command_leaves_no_larger_buffer_behind(
    tls_server: tuple[int, str],
) -> None:
    port, ca_file = tls_server
    command = b"a AUTHENTICATE XOAUTH2 " + b"t" * BIG_COMMAND + b"\r\n"
    growth = await _growth_per_connection(port, ca_file, command, 0)
    assert growth < SLACK, f"{growth:.0f} bytes more per idle connection"


async def test_small_traffic_costs_nothing_per_connection(tls_server: tuple[int, str]) -> None:
    # the yardstick's own check: an exchange that grows no buffer measures ~0
    port, ca_file = tls_server
    growth = await _growth_per_connection(port, ca_file, b"a NOOP\r\n", 0)
    assert growth < SLACK, f"{growth:.0f} bytes more per idle connection"
