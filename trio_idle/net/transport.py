"""One IMAP connection's socket, with or without TLS, read and written from trio.

(The backend clients' HTTP transport, :mod:`trio_idle.backend.http_transport`, uses it too: the
same socket handling for both kinds of outgoing connection.)

This replaces the asyncio transport (and trio-asyncio's reader task per socket) under
aioimaplib's parser: the session task that waits for the server reads the socket itself,
so a keepalive line costs one task wake-up and no trip through the asyncio bridge, and
:meth:`ImapTransport.write` is synchronous, as the parser's callbacks need it (aioimaplib
writes from inside ``data_received``). Reading comes in two forms: :meth:`receive` waits
and reads (the backend's HTTP client, the TLS handshake), and :meth:`receive_nowait` only
reads, for a reader that waits on :attr:`socket` itself
(``trio.lowlevel.wait_readable``) — the IMAP session's read loop, which then sleeps in
one frame of its own instead of three more of ours per idle connection.

TLS is an :class:`ssl.SSLObject` over two memory BIOs, the way asyncio and trio both do
it, with the socket read in chunks of :data:`RECV_SIZE` (asyncio gave every TLS
connection a 256 KiB read buffer; here nothing is kept between reads but what OpenSSL
keeps). The certificate is verified against the name the user typed.

Guarantees: :meth:`write` never blocks and never raises; bytes the kernel does not take
at once wait (at most :data:`MAX_UNSENT`) until the next :meth:`receive` or
:meth:`flush`, which sends them first (a reader of :meth:`receive_nowait` flushes
while :attr:`unsent` says so, before it waits to read). A failed write or an overfull
queue closes the connection, and the next :meth:`receive` (or :meth:`receive_nowait`)
reports it. :meth:`close` is synchronous, idempotent and wakes a task blocked in
:meth:`receive` or waiting on :attr:`socket` (with :class:`trio.ClosedResourceError`).
Not safe for two tasks receiving at once: one session task owns a connection.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from typing import Any, Final

import trio

#: bytes asked of the kernel per read: keepalives and IDLE lines are tens of bytes, and a
#: larger answer only takes more reads (OpenSSL reassembles TLS records across them)
RECV_SIZE: Final = 16 * 1024
#: plaintext handed out per TLS read (one record at most)
_TLS_CHUNK: Final = 16 * 1024
#: bytes handed to a TLS memory buffer at once. OpenSSL's memory BIOs never shrink: each
#: keeps 4/3 of the largest write it ever took, for the connection's whole life. Fed
#: whole, one 16 KiB read (an envelope FETCH, a LIST) left +20 KiB per connection, one
#: XOAUTH2 command +3.5 KiB, the handshake's certificate ~0.9 KiB; fed in slices, each
#: consumed before the next, they stay at a slice (bench.memory_probe --tls,
#: tests/unit/test_tls_memory.py)
_BIO_SLICE: Final = 256
#: written but not yet accepted by the kernel: IMAP commands are lines; a server that
#: stops reading while we have this much to send is not a server we can use
MAX_UNSENT: Final = 256 * 1024


class TransportClosed(Exception):
    """The connection is closed, by us or the server (``str()`` says which)."""


class ImapTransport:
    """The asyncio-transport subset aioimaplib uses, plus trio reads (see module doc)."""

    __slots__ = ("_closed", "_error", "_incoming", "_outgoing", "_sock", "_tls", "_unsent")

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._tls: ssl.SSLObject | None = None
        self._incoming: ssl.MemoryBIO | None = None
        self._outgoing: ssl.MemoryBIO | None = None
        self._unsent = b""
        self._closed = False
        #: why the connection failed on our side (a write), reported by the next receive
        self._error: BaseException | None = None

    # -- what aioimaplib calls ---------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self._closed or not data:
            return
        tls = self._tls
        if tls is not None:
            outgoing = self._outgoing
            assert outgoing is not None
            sealed = []
            try:
                for i in range(0, len(data), _BIO_SLICE):  # see _BIO_SLICE
                    tls.write(data[i : i + _BIO_SLICE])
                    sealed.append(outgoing.read())
            except ssl.SSLError as exc:  # e.g. a renegotiation asked for mid-write
                self._fail(exc)
                return
            data = sealed[0] if len(sealed) == 1 else b"".join(sealed)
        self._send(data)

    def is_closing(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(RuntimeError):  # not inside trio (the interpreter exiting)
            trio.lowlevel.notify_closing(self._sock)
        self._sock.close()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            return self._sock
        if name == "ssl_object":
            return self._tls
        return default

    # -- what the connection calls -----------------------------------------------------

    @property
    def tls(self) -> bool:
        return self._tls is not None

    @property
    def socket(self) -> socket.socket:
        """The socket, for a reader that waits for it itself before
        :meth:`receive_nowait` (not to be read or written directly)."""
        return self._sock

    @property
    def unsent(self) -> bool:
        """Bytes written wait for the kernel: :meth:`flush` before waiting to read."""
        return bool(self._unsent)

    async def receive(self) -> bytes:
        """The next bytes from the server (decrypted); ``b""`` once it has closed.

        Sends what is still queued first. Raises :class:`OSError` / :class:`ssl.SSLError`
        on a broken connection, :class:`TransportClosed` once closed, and
        :class:`trio.ClosedResourceError` if :meth:`close` is called meanwhile.
        Cancellation loses no byte: a read happens only after the wait.
        """
        while True:
            if self._unsent:
                await self.flush()
            self._raise_if_closed()
            await trio.lowlevel.wait_readable(self._sock)
            data = self.receive_nowait()
            if data is not None:
                return data
            # nothing after all, a record split across reads, or a TLS 1.3 session
            # ticket: wait on

    def receive_nowait(self) -> bytes | None:
        """What the server sent that the socket has now, decrypted: the bytes; ``b""``
        once the server has closed; None when there is nothing to hand out yet (the read
        would block, or it brought only part of a TLS record, a TLS 1.3 session ticket or
        key update — whose answer is sent here). Never blocks, never waits: the caller
        waits for :attr:`socket` to be readable first, and sends what is :attr:`unsent`
        before that. Raises as :meth:`receive` does (:class:`TransportClosed` once
        closed, :class:`OSError` / :class:`ssl.SSLError` on a broken connection)."""
        self._raise_if_closed()
        try:
            data = self._sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return None
        tls = self._tls
        if tls is None:
            return data
        assert self._incoming is not None
        if data:
            plain = self._feed(tls, self._incoming, data)
        else:
            self._incoming.write_eof()
            plain = self._decrypt(tls)
        if self._outgoing is not None and self._outgoing.pending:
            self._send(self._outgoing.read())  # e.g. an answer to a key update
        return plain

    async def flush(self) -> None:
        """Wait until the kernel has taken every queued byte."""
        while self._unsent:
            self._raise_if_closed()
            await trio.lowlevel.wait_writable(self._sock)
            self._send(b"")

    async def start_tls(
        self, context: ssl.SSLContext, server_hostname: str, *, buffered: bytes = b""
    ) -> None:
        """Handshake on this socket (implicit TLS, or after STARTTLS); verify the server.

        Raises :class:`ssl.SSLError` (:class:`ssl.SSLCertVerificationError` for an
        untrusted certificate) or :class:`OSError`; the caller's deadline bounds it.
        """
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(
            incoming, outgoing, server_side=False, server_hostname=server_hostname
        )
        if buffered:
            incoming.write(buffered)
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
            if outgoing.pending:
                self._send(outgoing.read())
            await self.flush()
            data = await self._recv()
            if not data:
                raise ConnectionResetError("server closed the connection during the TLS handshake")
            if _feed_handshake(tls, incoming, data):
                break
        if outgoing.pending:
            self._send(outgoing.read())
        self._tls, self._incoming, self._outgoing = tls, incoming, outgoing

    def raise_if_failed(self) -> None:
        """Raise what broke the connection (a failed write, say), or
        :class:`TransportClosed` if it was closed; nothing while it is usable."""
        self._raise_if_closed()

    # -- internals ---------------------------------------------------------------------

    async def _recv(self) -> bytes:
        """Bytes as the socket has them (ciphertext under TLS), after waiting for them."""
        while True:
            self._raise_if_closed()
            await trio.lowlevel.wait_readable(self._sock)
            self._raise_if_closed()
            try:
                return self._sock.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                continue

    def _feed(self, tls: ssl.SSLObject, incoming: ssl.MemoryBIO, data: bytes) -> bytes | None:
        """:meth:`_decrypt` after writing ``data`` to ``incoming``, in slices (see
        :data:`_BIO_SLICE`): what each slice completes is decrypted before the next."""
        if len(data) <= _BIO_SLICE:
            incoming.write(data)
            return self._decrypt(tls)
        parts = []
        view = memoryview(data)
        for i in range(0, len(data), _BIO_SLICE):
            incoming.write(view[i : i + _BIO_SLICE])
            part = self._decrypt(tls)
            if part is None:
                continue
            parts.append(part)
            if not part:  # close_notify: what follows it is not the server's
                break
        if not parts:
            return None
        return b"".join(parts)

    def _decrypt(self, tls: ssl.SSLObject) -> bytes | None:
        """All plaintext OpenSSL can give now; ``b""`` at the server's close_notify or
        EOF; None if it needs more bytes."""
        chunks = []
        try:
            while True:
                chunk = tls.read(_TLS_CHUNK)
                if not chunk:  # close_notify (or EOF where OpenSSL allows it)
                    break
                chunks.append(chunk)
        except ssl.SSLWantReadError:
            if not chunks:
                return None
        except ssl.SSLZeroReturnError:
            pass
        except ssl.SSLEOFError:
            if not chunks:
                return b""
        return b"".join(chunks)

    def _send(self, data: bytes) -> None:
        if self._closed:
            return
        data = self._unsent + data if self._unsent else data
        sent = 0
        try:
            while sent < len(data):
                sent += self._sock.send(data[sent:] if sent else data)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            self._fail(exc)
            return
        self._unsent = data[sent:] if sent < len(data) else b""
        if len(self._unsent) > MAX_UNSENT:
            self._fail(TransportClosed("server stopped reading (send queue full)"))

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self._unsent = b""
        self.close()

    def _raise_if_closed(self) -> None:
        if self._error is not None:
            raise self._error
        if self._closed:
            raise TransportClosed("connection closed")


def _feed_handshake(tls: ssl.SSLObject, incoming: ssl.MemoryBIO, data: bytes) -> bool:
    """Write ``data`` to the handshake's ``incoming`` buffer in slices (see
    :data:`_BIO_SLICE`), advancing the handshake after each; True once it is done (the
    rest of ``data``, already application data, is then in the buffer)."""
    view = memoryview(data)
    for i in range(0, len(data), _BIO_SLICE):
        incoming.write(view[i : i + _BIO_SLICE])
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            continue
        incoming.write(view[i + _BIO_SLICE :])
        return True
    return False
