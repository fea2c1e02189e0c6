"""HTTP/1.1 for httpx, on trio sockets and h11: the transport of the daemon's HTTP client.

:class:`TrioHTTPTransport` is where :class:`trio_idle.backend.client.HttpClient` sends its
requests (scans, health reports, tokens, pings); with ``trust_env``, for proxies, the
client uses httpx's own transport instead. httpx's default transport (httpcore) spent most
of a scan request's CPU on its pool bookkeeping, trace hooks, locks, trio's stream layers
and one ``send`` per part of the request (the figures: docs/performance.md, "Figures behind
the code"). This one writes the
head and a small body in one ``send``, reads and writes the socket through the same
:class:`~trio_idle.net.transport.ImapTransport` the IMAP sessions use (no scheduler
round trip when the kernel takes the bytes at once) and keeps its pool in a list, so a
scan costs about what h11 and the socket cost.

Guarantees:

* Limits: at most ``max_idle`` keep-alive connections kept, each for at most
  ``idle_expiry`` seconds. How many requests are in flight is the caller's to bound (the
  :class:`~trio_idle.backend.client.HttpClient`'s limiter, the one limit on the way): a
  connection is opened whenever no idle one of the origin is free.
* Timeouts: the request's ``connect``, ``write`` and ``read`` timeouts bound each phase
  (each read separately, as httpx documents it), raising httpx's exceptions of those
  names.
* Bounded reads: a response head larger than ``max_head_bytes`` is a
  :class:`httpx.RemoteProtocolError`; the body is handed out as it arrives, one read
  (≤ :data:`READ_SIZE`) at a time, so the caller bounds the total (``read_capped``).
* A connection goes back to the pool only after a complete, reusable exchange (both
  sides done, no ``Connection: close``). Anything else — an error, a cancellation, a
  response closed before its end, bytes past the end of the reply — closes it. A pooled
  connection that the server has closed (or written to, unasked) is found readable and
  dropped before reuse, so no byte is ever taken for the reply to a later request.
* Writes: a request is handed to the kernel in pieces of at most :data:`COALESCE_BYTES`
  (a small one, head and body, in one piece), each waited for under the write timeout.
* Cancellation: a cancelled request closes its connection; nothing is left half-sent on
  a pooled connection.
* Stale connections: a server may close an idle keep-alive connection just as a request
  goes out on it (its keep-alive timeout), too late for the check above. When a *reused*
  connection fails (``ReadError``, ``WriteError``, or closed without a reply) before a
  single byte of the reply arrived, the request is sent once more, at once, on a fresh
  connection, as browsers and httpcore do; it is counted as
  ``backend_stale_connection_retries`` in ``stats``. Never for a fresh connection (its
  failure is the server's answer), never once a reply byte arrived (the server had
  answered: a POST must not run twice), never twice, never with a body that cannot be
  sent again (a streamed one), never after a timeout.

Errors are httpx's: :class:`httpx.ConnectError` (with the underlying ``OSError`` or
``ssl.SSLError`` as its ``__cause__``), :class:`httpx.ConnectTimeout`,
:class:`httpx.WriteError`/``WriteTimeout``, :class:`httpx.ReadError`/``ReadTimeout``,
:class:`httpx.RemoteProtocolError`.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from typing import Final

import h11
import httpx
import trio

from trio_idle.core.stats import Stats
from trio_idle.net.transport import ImapTransport, TransportClosed

#: bytes asked of the socket per read; a scan reply is a few dozen bytes
READ_SIZE: Final = 64 * 1024
#: a request body is written with its head while the whole is at most this large
COALESCE_BYTES: Final = 64 * 1024
#: the largest response head (status line and headers) accepted
MAX_HEAD_BYTES: Final = 16 * 1024

_Origin = tuple[bytes, str, int]


class _Connection:
    """One socket (plain or TLS) and its h11 state; used by one request at a time."""

    __slots__ = ("h11", "idle_since", "origin", "received", "reused", "transport")

    def __init__(self, origin: _Origin, transport: ImapTransport, max_head_bytes: int) -> None:
        self.origin = origin
        self.transport = transport
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_head_bytes)
        self.idle_since = 0.0
        #: bytes given to h11 since the request started (the head check counts them; none
        #: means the server had not begun to answer)
        self.received = 0
        #: whether this connection carried an earlier exchange (it came from the pool)
        self.reused = False

    def is_readable(self) -> bool:
        """Whether the idle socket has something to read: EOF (the server closed it) or
        bytes nobody asked for. Either way it cannot carry another request."""
        if self.transport.is_closing():
            return True
        sock: socket.socket = self.transport.get_extra_info("socket")
        # a peek, not select(): select() cannot take a descriptor above 1023, and a
        # daemon with thousands of IMAP sockets has nothing below that for HTTP
        try:
            sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True
        return True  # b"" (closed) or a byte nobody asked for

    def close(self) -> None:
        """Close at once (TLS without close_notify: nothing waits on a goodbye)."""
        self.transport.close()


class TrioHTTPTransport(httpx.AsyncBaseTransport):
    """An ``httpx.AsyncBaseTransport`` speaking HTTP/1.1 over trio (see the module doc).

    ``ssl_context`` verifies ``https`` servers (required for ``https`` URLs). ``stats``,
    when given, counts the requests sent again after a stale pooled connection. Must be
    used from one trio run; :meth:`aclose` closes every pooled connection.
    """

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None,
        max_idle: int,
        idle_expiry: float,
        max_head_bytes: int = MAX_HEAD_BYTES,
        stats: Stats | None = None,
    ) -> None:
        self._ssl_context = ssl_context
        self._max_idle = max(0, max_idle)
        self._idle_expiry = idle_expiry
        self._max_head_bytes = max_head_bytes
        #: keep-alive connections, most recently used first
        self._idle: list[_Connection] = []
        self._closed = False
        self._stats = stats

    @property
    def idle_connections(self) -> int:
        """Keep-alive connections held right now."""
        return len(self._idle)

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        await trio.lowlevel.checkpoint()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        # a request made from a cancelled scope sends nothing (a pooled connection would
        # otherwise let it leave before the first real wait)
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._closed:
            raise RuntimeError("the transport is closed")
        scheme = request.url.raw_scheme
        if scheme not in (b"http", b"https"):
            raise httpx.UnsupportedProtocol(f"unsupported URL scheme {scheme.decode()!r}")
        timeouts = request.extensions.get("timeout", {})
        origin: _Origin = (
            scheme,
            # the ASCII (IDNA-encoded) name: what is resolved and what TLS checks agree
            request.url.raw_host.decode("ascii"),
            request.url.port or (443 if scheme == b"https" else 80),
        )
        conn: _Connection | None = None
        try:
            conn = self._take_idle(origin)
            if conn is not None:
                try:
                    return await _exchange(self, conn, request, timeouts)
                except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
                    if not _stale(conn, request):
                        raise
                conn.close()
                conn = None
                if self._stats is not None:
                    self._stats.inc("backend_stale_connection_retries")
            conn = await self._connect(origin, timeouts)
            return await _exchange(self, conn, request, timeouts)
        except BaseException as exc:
            if conn is not None:
                conn.close()
            if not isinstance(exc, h11.LocalProtocolError):
                raise
        # Only a request h11 will not write gets here (a header value with a newline,
        # say). h11's text quotes the value, which may be a secret: raised out here, the
        # error has no context to carry it into a traceback.
        raise httpx.LocalProtocolError("a request header cannot be sent as HTTP/1.1")

    # ------------------------------------------------------------------ the pool

    def _take_idle(self, origin: _Origin) -> _Connection | None:
        # newest first (see _give_back): the most recently used connection of the origin
        # is taken, the one least likely to have been closed by the server meanwhile
        now = time.monotonic()
        found: _Connection | None = None
        keep: list[_Connection] = []
        for conn in self._idle:
            if now - conn.idle_since > self._idle_expiry or conn.is_readable():
                conn.close()
            elif found is None and conn.origin == origin:
                found = conn
            else:
                keep.append(conn)
        self._idle = keep
        return found

    def _give_back(self, conn: _Connection) -> None:
        """Pool ``conn`` after its response was closed, if the exchange left it reusable."""
        h = conn.h11
        if (
            self._closed
            or self._max_idle == 0
            or h.our_state is not h11.DONE
            or h.their_state is not h11.DONE
            or h.trailing_data[0]  # bytes past the reply: nothing asked for them
        ):
            conn.close()
            return
        h.start_next_cycle()
        conn.reused = True
        conn.idle_since = time.monotonic()
        self._idle.insert(0, conn)
        while len(self._idle) > self._max_idle:
            self._idle.pop().close()

    async def _connect(self, origin: _Origin, timeouts: Mapping[str, float | None]) -> _Connection:
        scheme, host, port = origin
        if scheme == b"https" and self._ssl_context is None:
            raise httpx.ConnectError("https needs an SSL context")
        transport: ImapTransport | None = None
        try:
            with trio.fail_after(_seconds(timeouts.get("connect"))):
                transport = ImapTransport(await _open_tcp(host, port))
                if self._ssl_context is not None and scheme == b"https":
                    await transport.start_tls(self._ssl_context, host)
        except BaseException as exc:
            if transport is not None:
                transport.close()
            if isinstance(exc, trio.TooSlowError):
                raise httpx.ConnectTimeout(f"connecting to {host}:{port} timed out") from exc
            if isinstance(exc, (OSError, TransportClosed)):  # ssl.SSLError is an OSError
                first = _first_attempt(exc)
                raise httpx.ConnectError(error_text(first)) from first
            raise
        return _Connection(origin, transport, self._max_head_bytes)


async def _exchange(
    pool: TrioHTTPTransport,
    conn: _Connection,
    request: httpx.Request,
    timeouts: Mapping[str, float | None],
) -> httpx.Response:
    """Send ``request`` on ``conn`` and read the response head; the body is left to
    :class:`_ResponseBody`. Raises httpx's exceptions; the caller closes ``conn`` then."""
    h = conn.h11
    conn.received = 0
    head = h11.Request(
        method=request.method, target=request.url.raw_path, headers=request.headers.raw
    )
    out = [h.send(head) or b""]
    size = len(out[0])
    write_timeout = _seconds(timeouts.get("write"))
    if not isinstance(request.stream, httpx.AsyncByteStream):
        raise TypeError("an async client's request has an async body")
    async for chunk in request.stream:
        if chunk:
            out.append(h.send(h11.Data(data=chunk)) or b"")
            size += len(out[-1])
            if size >= COALESCE_BYTES:
                await _write(conn, b"".join(out), write_timeout)
                out, size = [], 0
    out.append(h.send(h11.EndOfMessage()) or b"")
    await _write(conn, b"".join(out), write_timeout)

    read_timeout = _seconds(timeouts.get("read"))
    while True:
        event = await _next_event(conn, read_timeout)
        if conn.received - len(h.trailing_data[0]) > pool._max_head_bytes:
            raise httpx.RemoteProtocolError("the response head is too large")
        if isinstance(event, h11.Response):
            break
        if not isinstance(event, h11.InformationalResponse):
            raise httpx.RemoteProtocolError(f"unexpected {type(event).__name__} from the server")
    return httpx.Response(
        status_code=event.status_code,
        headers=event.headers.raw_items(),
        stream=_ResponseBody(pool, conn, read_timeout),
        extensions={"http_version": b"HTTP/" + event.http_version, "reason_phrase": event.reason},
    )


class _ResponseBody(httpx.AsyncByteStream):
    """A response's body, read from its connection as the caller iterates; closing it
    returns the connection to the pool (after a complete exchange) or closes it."""

    def __init__(self, pool: TrioHTTPTransport, conn: _Connection, read_timeout: float) -> None:
        self._pool = pool
        self._conn: _Connection | None = conn
        self._read_timeout = read_timeout

    async def __aiter__(self) -> AsyncIterator[bytes]:
        conn = self._conn
        if conn is None:
            raise httpx.StreamClosed()
        while True:
            event = await _next_event(conn, self._read_timeout)
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return
            else:
                raise httpx.RemoteProtocolError(f"unexpected {type(event).__name__} in a body")

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool._give_back(conn)


def _stale(conn: _Connection, request: httpx.Request) -> bool:
    """Whether ``request``, which just failed on ``conn`` with a connection error, may go
    again on a fresh connection: ``conn`` came from the pool, the server sent not one
    byte of a reply (with none received, a protocol error can only be its close), and
    the body can be sent again (bytes, not a stream already consumed)."""
    return conn.reused and conn.received == 0 and isinstance(request.stream, httpx.ByteStream)


async def _write(conn: _Connection, data: bytes, limit: float) -> None:
    """Hand ``data`` to the kernel, waiting (at most ``limit`` seconds) only for what it
    does not take at once."""
    transport = conn.transport
    try:
        for start in range(0, len(data), COALESCE_BYTES):
            transport.write(data[start : start + COALESCE_BYTES])
            with trio.fail_after(limit):
                await transport.flush()
            transport.raise_if_failed()
    except trio.TooSlowError as exc:
        raise httpx.WriteTimeout("writing the request timed out") from exc
    except (OSError, TransportClosed, trio.ClosedResourceError) as exc:
        raise httpx.WriteError(error_text(exc)) from exc


async def _next_event(conn: _Connection, limit: float) -> object:
    """The next h11 event of the response, reading the socket (each read at most
    ``limit`` seconds) as needed."""
    h = conn.h11
    while True:
        try:
            event = h.next_event()
        except h11.RemoteProtocolError as exc:
            raise httpx.RemoteProtocolError(str(exc)) from exc
        if event is not h11.NEED_DATA:
            if isinstance(event, h11.ConnectionClosed):
                raise httpx.RemoteProtocolError("the server closed the connection mid-response")
            return event
        try:
            with trio.fail_after(limit):
                data = await conn.transport.receive()
        except trio.TooSlowError as exc:
            raise httpx.ReadTimeout("reading the response timed out") from exc
        except (OSError, TransportClosed, trio.ClosedResourceError) as exc:
            raise httpx.ReadError(error_text(exc)) from exc
        if not data and h.their_state is h11.SEND_RESPONSE:
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
        conn.received += len(data)
        h.receive_data(data)


async def _open_tcp(host: str, port: int) -> socket.socket:
    """A connected socket to ``host``: trio's happy eyeballs (RFC 8305: the next address
    is tried 250 ms into an attempt, so a black-holed IPv6 route costs 250 ms, not the
    connect timeout), TCP_NODELAY set. The backend is the operator's URL, so no address
    is refused here (IMAP hosts go through :func:`trio_idle.net.tcp_connect.open_socket`)."""
    stream = await trio.open_tcp_stream(host, port)
    # no checkpoint between connecting and taking the descriptor: nothing can leak it
    return socket.socket(fileno=stream.socket.detach())


def _first_attempt(exc: BaseException) -> BaseException:
    """The first address's own error when trio reports that every attempt failed (its
    text says why: refused, unreachable, ...)."""
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup) and cause.exceptions:
        return cause.exceptions[0]
    return exc


def error_text(exc: BaseException) -> str:
    """The first non-empty text down ``exc``'s chain, or its type's name: an
    ``ssl.SSLError`` wrapped in an exception without text of its own (trio's, httpx's)
    says what went wrong. Unscrubbed: callers that log it scrub it."""
    cause: BaseException | None = exc
    while cause is not None and not str(cause):
        cause = cause.__cause__ or cause.__context__
    return str(cause) if cause is not None else type(exc).__name__


def _seconds(value: float | None) -> float:
    return float("inf") if value is None else value
