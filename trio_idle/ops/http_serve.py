"""The server side of one HTTP/1.1 exchange over h11: read a request with its body bounded,
encode a response.

The health endpoint (:mod:`trio_idle.ops.health_server`) and the test kit's HTTP servers
(:mod:`trio_idle_testing.backend`, :mod:`trio_idle_testing.oauth_server`) share this;
each keeps its own accept loop, keep-alive handling, timeouts and limits, and passes the
limits in (the head bound is the ``max_incomplete_event_size`` of its ``h11.Connection``).

A response to HEAD carries the head a GET would get and no body (h11 refuses one):
:func:`encode_response` knows the method from :func:`read_request`, so no caller has to.

Nothing here sets a deadline: a caller bounds each call with its own cancel scope.
Cancelled mid-request, the ``h11.Connection`` is left mid-request, so the caller closes
the stream.
"""

from __future__ import annotations

import weakref
from http import HTTPStatus
from typing import Any

import attrs
import h11
import trio

#: the method of the request each connection is answering, as :func:`read_request` read
#: it (absent when no request head could be read): a response to HEAD has no body
_methods: weakref.WeakKeyDictionary[h11.Connection, bytes] = weakref.WeakKeyDictionary()


@attrs.frozen
class Received:
    """A complete request: its head and its whole body."""

    request: h11.Request
    body: bytes


@attrs.frozen
class Refused:
    """A request that cannot be served. A response can still be sent (h11 lets a server
    answer a request it could not read); the connection must be closed after it, since
    the rest of the request was not read."""

    #: 413 when the body passed the bound, else h11's hint for the malformed input
    #: (400, 431 for a head too large, 501 for an unsupported transfer coding)
    status: int
    body_too_large: bool


async def _next_event(conn: h11.Connection, stream: trio.SocketStream, chunk: int) -> Any:
    """The next h11 event, reading at most ``chunk`` bytes at a time until there is one
    (``h11.ConnectionClosed`` once the peer closed). Raises ``h11.RemoteProtocolError``
    on malformed input."""
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await stream.receive_some(chunk))


async def read_request(
    conn: h11.Connection, stream: trio.SocketStream, *, max_body: int, chunk: int
) -> Received | Refused | None:
    """The next request with its body (at most ``max_body`` bytes), a :class:`Refused`
    one to answer before closing, or None when the client closed (before a request or in
    the middle of one) or sent something no response can follow.

    Raises what ``stream.receive_some`` raises (a broken or closed stream)."""
    _methods.pop(conn, None)  # the previous cycle's
    try:
        event = await _next_event(conn, stream, chunk)
        if not isinstance(event, h11.Request):
            return None  # ConnectionClosed (not PAUSED: callers start each cycle first)
        _methods[conn] = event.method
        chunks: list[bytes] = []
        size = 0
        part = await _next_event(conn, stream, chunk)
        while isinstance(part, h11.Data):
            size += len(part.data)
            if size > max_body:
                return Refused(413, body_too_large=True)
            chunks.append(bytes(part.data))
            part = await _next_event(conn, stream, chunk)
    except h11.RemoteProtocolError as exc:
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            return Refused(exc.error_status_hint, body_too_large=False)
        return None
    if not isinstance(part, h11.EndOfMessage):
        return None  # the client went away mid-request
    return Received(event, b"".join(chunks))


def reason_phrase(status: int) -> bytes:
    """``b"Not Found"`` for 404; empty for a status HTTP does not name (a test's 599)."""
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


def encode_response(
    conn: h11.Connection, status: int, headers: list[tuple[str, str]], body: bytes
) -> bytes:
    """A whole response to the request :func:`read_request` read last on ``conn`` (or
    could not read), as bytes to send: head, ``body`` and its end. The headers must frame
    ``body`` (``content-length``); to HEAD they are sent as they are, without the body."""
    data = conn.send(
        h11.Response(status_code=status, headers=headers, reason=reason_phrase(status))
    )
    data = data or b""
    if _methods.get(conn) != b"HEAD":
        data += conn.send(h11.Data(data=body)) or b""
    data += conn.send(h11.EndOfMessage()) or b""
    return data
