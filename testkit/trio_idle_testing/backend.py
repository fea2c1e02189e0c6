"""A real HTTP/1.1 scan backend, for tests and the demo.

:class:`ScanBackend` speaks the daemon's webhook contract over a real TCP socket bound to
``127.0.0.1`` (h11 on trio, keep-alive connections, so the backend clients' keep-alive pool,
:mod:`trio_idle.backend.http_transport`, is exercised exactly as in production)::

    POST {url}/api/mail/scan-internal
    x-admin-secret: <secret>            content-type: application/json
    user-agent: trio-idle/<version>     x-scan-id: <unique id>
    x-signature: sha256=<hex hmac of body>          (optional)

    {"connectionId": "...", "userId": "..." | null, "email": "...", "mailbox": "INBOX",
     "reason": "exists" | "tick" | "reconnect" | "startup"}

and answers ``{"scanned": <int>, "blocked": <int>}``. Tests can record, hold, script and
count what arrives, and take the backend down and up again on the same port.

Order in which a request is handled (each step can end it):

1. it is recorded in :attr:`ScanBackend.requests` as soon as its body has been read;
2. a path other than :attr:`ScanBackend.path` → 404, a method other than POST → 405;
3. a missing or wrong ``x-admin-secret`` → 401 ``{"error": "unauthorized"}``;
4. body not a JSON object → 400; with ``strict`` (the default), any other contract violation
   (see :attr:`ScanRequest.problems`) → 400 ``{"error": "bad request", "problems": [...]}``;
5. the reply is chosen: the next scripted :class:`Reply` for the email, else
   :attr:`ScanBackend.default_reply`;
6. if the email is held (:meth:`ScanBackend.hold`), it waits for the gate;
7. it waits ``reply.delay`` seconds, then answers.

A request counts as in flight (:meth:`ScanBackend.in_flight`) from step 1 until its answer
has been written (or it was aborted). Nothing here sleeps to poll: every wait is on an event.

Account health reports (``POST {url}/api/mail/connection-status-internal``, path
:attr:`ScanBackend.status_path`) are served beside scans but kept apart from them: they
are recorded in :attr:`ScanBackend.status_reports` (never in ``requests``, nor counted in
``in_flight``), checked for the same secret and for their own contract
(:data:`HEALTH_STATES`, ``since``, ``attempts``...), and answered by
:attr:`ScanBackend.status_reply` (default ``200 {}``; a test swaps it to fail or slow down).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import socket
from collections.abc import Callable, Iterable, Sequence
from email import message_from_bytes
from email import policy as email_policy
from typing import Any, Final

import attrs
import h11
import trio

from trio_idle.ops.http_serve import Refused, encode_response, read_request, reason_phrase
from trio_idle_testing import witness

__all__ = [
    "DEFAULT_GAMBLING_KEYWORDS",
    "SCAN_REASONS",
    "Gate",
    "KeywordScanner",
    "Reply",
    "ScanBackend",
    "ScanRequest",
]

#: The ``reason`` values the contract allows.
SCAN_REASONS: Final = frozenset({"exists", "tick", "reconnect", "startup"})
#: The ``state`` values of an account health report.
HEALTH_STATES: Final = frozenset({"ok", "auth_failed", "unreachable", "degraded"})
#: Request bodies larger than this are answered 413 and the connection is closed.
MAX_BODY_BYTES: Final = 1 << 20
_RECEIVE_CHUNK: Final = 65536
_SEND_CHUNK: Final = 65536
_SIGNATURE_RE: Final = re.compile(r"sha256=([0-9a-f]{64})")


def _json_object(value: Any) -> dict[str, Any]:
    """Shallow-copy ``value`` if it is a JSON object (dict with str keys), else ``{}``."""
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return dict(value)
    return {}


@attrs.frozen
class Reply:
    """What the backend answers to one scan request.

    ``Reply()`` is ``200 {"scanned": 1, "blocked": 0}``. Without ``json`` and ``body``, a 2xx
    reply carries that default body and any other status ``{"error": "HTTP <status>"}``.
    ``body`` (raw bytes, sent as-is) wins over ``json``. ``headers`` are added to (or replace,
    by lower-cased name) the defaults ``content-type: application/json`` and the computed
    ``content-length``, e.g. ``Reply(429, headers={"retry-after": "1"})``. ``delay`` seconds
    pass before answering. ``close`` sends ``connection: close`` and closes the connection
    after the answer; ``disconnect`` closes it without answering at all (the recorded status
    stays ``None``).

    ``body_size`` makes the body that many bytes long, written chunk by chunk and never
    held whole (for oversized replies: ``Reply(body_size=300 << 20)``): the JSON body
    padded with spaces, still valid JSON when read whole. It is announced by
    ``content-length`` unless ``chunked``, which sends it with
    ``transfer-encoding: chunked`` so the client learns its size only by reading it.
    """

    status: int = 200
    json: Any = None
    headers: dict[str, str] = attrs.field(factory=dict)
    delay: float = 0.0
    body: bytes | None = None
    close: bool = False
    disconnect: bool = False
    body_size: int | None = None
    chunked: bool = False

    def __attrs_post_init__(self) -> None:
        if not 200 <= self.status <= 599:
            raise ValueError(f"status must be 200..599, got {self.status}")
        if self.delay < 0:
            raise ValueError("delay must not be negative")
        if self.body_size is not None and self.body_size < len(self.encoded_body()):
            raise ValueError("body_size must be at least the length of the JSON body")
        if self.chunked and self.body_size is None:
            raise ValueError("chunked needs body_size")

    def encoded_body(self) -> bytes:
        """The exact bytes this reply sends as its body."""
        if self.body is not None:
            return self.body
        payload = self.json
        if payload is None:
            payload = (
                {"scanned": 1, "blocked": 0}
                if 200 <= self.status < 300
                else {"error": f"HTTP {self.status}"}
            )
        return json.dumps(payload).encode("utf-8")


def _default_reply(_request: ScanRequest) -> Reply:
    return Reply()


def _default_status_reply(_request: ScanRequest) -> Reply:
    return Reply(200, json={})


@attrs.define(eq=False)
class ScanRequest:
    """One HTTP request the backend received (whatever its path, auth or outcome).

    ``headers`` has lower-cased names (repeated headers joined with ``", "``); ``body`` is the
    decoded JSON object, or ``{}`` when the body was not a JSON object; ``email`` is
    ``body["email"]`` when that is a string. ``received_at`` and ``finished_at`` are
    :func:`trio.current_time` values; ``finished_at`` is set once the answer has been written,
    or when the request ended without one (client gone, :meth:`ScanBackend.down`, server
    stopped). ``status`` is what was answered, ``None`` until then or if nothing was.
    ``problems`` lists contract violations found in it (empty for a well-formed request).
    ``connection_number`` is the 1-based index of the TCP connection it came on, so tests
    can see keep-alive reuse.
    """

    method: str
    path: str
    headers: dict[str, str]
    raw_body: bytes
    body: dict[str, Any]
    received_at: float
    connection_number: int
    email: str | None = None
    problems: list[str] = attrs.field(factory=list)
    reply: Reply | None = None
    status: int | None = None
    finished_at: float | None = None

    @property
    def connection_id(self) -> Any:
        """``body["connectionId"]`` (``None`` when absent)."""
        return self.body.get("connectionId")

    @property
    def reason(self) -> Any:
        """``body["reason"]`` (``None`` when absent)."""
        return self.body.get("reason")

    @property
    def scan_id(self) -> str | None:
        """The ``x-scan-id`` header (``None`` when absent)."""
        return self.headers.get("x-scan-id")

    @property
    def finished(self) -> bool:
        """Whether the request is over (answered, or ended without an answer)."""
        return self.finished_at is not None

    def signature_matches(self, signing_key: str | bytes) -> bool:
        """Whether ``x-signature`` is ``sha256=<hex HMAC-SHA256 of the raw body>`` under
        ``signing_key`` (compared in constant time; ``False`` when the header is absent)."""
        header = self.headers.get("x-signature")
        if header is None:
            return False
        key = signing_key.encode("utf-8") if isinstance(signing_key, str) else signing_key
        expected = "sha256=" + hmac.new(key, self.raw_body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(header.encode("latin-1"), expected.encode("ascii"))


class Gate:
    """Blocks the requests of one email until :meth:`release` (see :meth:`ScanBackend.hold`).

    Once released it stays open; holding the email again makes a new gate.
    """

    def __init__(self, email: str) -> None:
        self.email: Final = email
        self._event = trio.Event()
        self._waiting = 0

    def release(self) -> None:
        """Let every request waiting on this gate (and any arriving later) proceed."""
        self._event.set()

    def is_set(self) -> bool:
        """Whether :meth:`release` has been called (``trio.Event`` spelling)."""
        return self._event.is_set()

    @property
    def released(self) -> bool:
        """Whether :meth:`release` has been called."""
        return self._event.is_set()

    @property
    def waiting(self) -> int:
        """How many requests are blocked on this gate right now."""
        return self._waiting

    async def wait(self) -> None:
        """Return once the gate is released."""
        self._waiting += 1
        try:
            await self._event.wait()
        finally:
            self._waiting -= 1


class ScanBackend:
    """The scan webhook endpoint, served over real HTTP/1.1 on ``host`` (127.0.0.1).

    Run it with ``url = await nursery.start(backend.serve)``; it serves until that nursery
    is cancelled. ``port=0`` picks a free port; :attr:`port` and :attr:`url` are valid once
    started and stay the same across :meth:`down`/:meth:`up`.

    ``strict`` (default ``True``): requests that break the contract are answered 400 instead
    of being served (the problems are recorded either way). ``signing_key``: when given,
    ``x-signature`` is required and must be the HMAC-SHA256 of the body under this key;
    otherwise a present ``x-signature`` only has to be well-formed.

    Everything here runs in one trio run and must be used from it; the synchronous methods
    take effect immediately.
    """

    def __init__(
        self,
        secret: str,
        path: str = "/api/mail/scan-internal",
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        strict: bool = True,
        signing_key: str | bytes | None = None,
        status_path: str = "/api/mail/connection-status-internal",
    ) -> None:
        if not secret:
            raise ValueError("secret must not be empty")
        if not path.startswith("/"):
            raise ValueError("path must start with '/'")
        self.secret: Final = secret
        self.path: Final = path
        self.status_path: Final = status_path
        #: Answers each authorized, well-formed account health report.
        self.status_reply: Callable[[ScanRequest], Reply] = _default_status_reply
        #: Every account health report received (whatever its outcome), in arrival order.
        self.status_reports: list[ScanRequest] = []
        #: The most health reports one connection id ever had in flight at once.
        self.max_status_in_flight = 0
        self._status_in_flight: dict[Any, int] = {}
        self.host: Final = host
        self.strict = strict
        self.signing_key: bytes | None = (
            signing_key.encode("utf-8") if isinstance(signing_key, str) else signing_key
        )
        #: Called for each authorized, well-formed request with no scripted reply left.
        self.default_reply: Callable[[ScanRequest], Reply] = _default_reply
        #: The OAuth2 token endpoint: when set, authorized POSTs to :attr:`token_path` are
        #: answered with what it returns (gates apply; the scan contract checks do not).
        self.token_reply: Callable[[ScanRequest], Reply] | None = None
        self.token_path = "/api/mail/imap-token-internal"
        #: Every request received, in arrival order.
        self.requests: list[ScanRequest] = []
        #: How many TCP connections have been accepted so far.
        self.connections_accepted = 0
        self._port = port
        self._listener: trio.socket.SocketType | None = None
        self._listening_changed = trio.Event()
        self._serving = False
        self._scripts: dict[str, list[Reply]] = {}
        self._gates: dict[str, Gate] = {}
        self._in_flight: dict[str | None, int] = {}
        self._max_in_flight: dict[str | None, int] = {}
        self._in_flight_total = 0
        self._max_in_flight_total = 0
        self._connection_scopes: set[trio.CancelScope] = set()
        self._changed = trio.Event()
        self._open_connections = 0

    # ----------------------------------------------------------------- lifecycle

    @property
    def port(self) -> int:
        """The TCP port (the real one once :meth:`serve` has started)."""
        return self._port

    @property
    def url(self) -> str:
        """``http://HOST:PORT``: what the daemon's ``BACKEND_URL`` should be."""
        return f"http://{self.host}:{self._port}"

    @property
    def scan_url(self) -> str:
        """:attr:`url` + :attr:`path`."""
        return self.url + self.path

    @property
    def is_up(self) -> bool:
        """Whether the backend is accepting connections."""
        return self._listener is not None

    @property
    def open_connections(self) -> int:
        """TCP connections open right now (idle keep-alive ones included)."""
        return self._open_connections

    def _bind(self) -> trio.socket.SocketType:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self._port))
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._port = sock.getsockname()[1]
        return trio.socket.from_stdlib_socket(sock)

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and serve until cancelled; reports :attr:`url` to ``nursery.start``.

        Raises ``OSError`` if the port cannot be bound, ``RuntimeError`` if already serving.
        On exit the listener and every connection are closed.
        """
        if self._serving:
            raise RuntimeError("this ScanBackend is already serving")
        self._serving = True
        try:
            self._listener = self._bind()
            async with trio.open_nursery() as nursery:
                task_status.started(self.url)
                await self._accept_loop(nursery)
        finally:
            if self._listener is not None:
                self._listener.close()
                self._listener = None
            self._serving = False

    async def _accept_loop(self, nursery: trio.Nursery) -> None:
        while True:
            listener = self._listener
            if listener is None:
                changed = self._listening_changed
                await changed.wait()
                continue
            try:
                sock, _addr = await listener.accept()
            except (trio.ClosedResourceError, OSError):
                if listener is self._listener:  # a genuine accept error, not down()
                    raise
                continue
            self.connections_accepted += 1
            nursery.start_soon(
                self._handle_connection, trio.SocketStream(sock), self.connections_accepted
            )

    def down(self) -> None:
        """Stop accepting: close the listener, so new connects are refused, and abort every
        open connection (idle keep-alive ones and requests in progress, which end unanswered),
        like a crashed backend. Recorded requests, scripts and gates are kept. Idempotent."""
        listener, self._listener = self._listener, None
        if listener is None:
            return
        listener.close()
        for scope in list(self._connection_scopes):
            scope.cancel()
        self._notify_listening_changed()

    def up(self) -> None:
        """Listen again on the same port (no-op if already up). Raises ``OSError`` if the port
        has been taken meanwhile, ``RuntimeError`` if :meth:`serve` is not running."""
        if not self._serving:
            raise RuntimeError("up() needs serve() to be running")
        if self._listener is not None:
            return
        self._listener = self._bind()
        self._notify_listening_changed()

    def _notify_listening_changed(self) -> None:
        self._listening_changed.set()
        self._listening_changed = trio.Event()

    # ----------------------------------------------------------------- test controls

    def status_for(self, connection_id: str, *, accepted: bool = False) -> list[ScanRequest]:
        """The account health reports of ``connection_id``, in arrival order; with
        ``accepted`` only those answered 2xx."""
        found = [r for r in self.status_reports if r.connection_id == connection_id]
        if accepted:
            found = [r for r in found if r.status is not None and 200 <= r.status < 300]
        return found

    async def wait_for_status(self, predicate: Callable[[], bool]) -> None:
        """Return once ``predicate()`` holds, re-checked whenever a health report arrives or
        is answered. Never times out by itself: wrap it in :func:`trio.fail_after`."""
        while not predicate():
            changed = self._changed
            await changed.wait()

    def requests_for(self, email: str) -> list[ScanRequest]:
        """The recorded requests whose body ``email`` equals ``email`` exactly, in order."""
        return [r for r in self.requests if r.email == email]

    async def wait_for_requests(
        self, n: int, email: str | None = None, *, finished: bool = False
    ) -> list[ScanRequest]:
        """Return the matching requests once at least ``n`` are recorded (all emails when
        ``email`` is ``None``; only finished ones when ``finished``). Waits on an event, never
        times out by itself: wrap it in :func:`trio.fail_after`."""
        while True:
            found = self.requests if email is None else self.requests_for(email)
            if finished:
                found = [r for r in found if r.finished]
            if len(found) >= n:
                return found
            changed = self._changed
            await changed.wait()

    def in_flight(self, email: str | None = None) -> int:
        """Requests for ``email`` (all requests if ``None``) received but not yet finished."""
        if email is None:
            return self._in_flight_total
        return self._in_flight.get(email, 0)

    def max_in_flight(self, email: str | None = None) -> int:
        """The highest :meth:`in_flight` value seen so far for ``email`` (or overall)."""
        if email is None:
            return self._max_in_flight_total
        return self._max_in_flight.get(email, 0)

    def hold(self, email: str) -> Gate:
        """Make authorized, well-formed requests for ``email`` wait until the returned gate
        is released (requests already past the gate step are unaffected). Holding an email
        that is already held returns the same gate."""
        gate = self._gates.get(email)
        if gate is None or gate.released:
            gate = self._gates[email] = Gate(email)
        return gate

    def release_all(self) -> None:
        """Release every gate made by :meth:`hold`."""
        for gate in self._gates.values():
            gate.release()
        self._gates.clear()

    def script(self, email: str, replies: Iterable[Reply]) -> None:
        """Queue ``replies`` for ``email``: its next authorized, well-formed requests get
        them one each in arrival order (appended after any still queued); then
        :attr:`default_reply` applies again."""
        self._scripts.setdefault(email, []).extend(replies)

    def scripted_left(self, email: str) -> int:
        """How many scripted replies for ``email`` are still unused."""
        return len(self._scripts.get(email, ()))

    # ----------------------------------------------------------------- HTTP

    async def _handle_connection(self, stream: trio.SocketStream, number: int) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_BODY_BYTES)
        self._open_connections += 1
        try:
            with trio.CancelScope() as scope:
                self._connection_scopes.add(scope)
                try:
                    await self._serve_connection(conn, stream, number)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # the client went away
                finally:
                    self._connection_scopes.discard(scope)
        finally:
            self._open_connections -= 1
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _serve_connection(
        self, conn: h11.Connection, stream: trio.SocketStream, number: int
    ) -> None:
        while True:
            received = await read_request(
                conn, stream, max_body=MAX_BODY_BYTES, chunk=_RECEIVE_CHUNK
            )
            if isinstance(received, Refused):
                error = "body too large" if received.body_too_large else "bad http"
                await self._send(conn, stream, received.status, {"error": error})
                return
            if received is None:
                return  # closed (before a request or mid-body)
            keep_open = await self._handle_request(
                conn, stream, received.request, received.body, number
            )
            if not keep_open or conn.our_state is not h11.DONE:
                return
            if conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    async def _send(
        self,
        conn: h11.Connection,
        stream: trio.SocketStream,
        status: int,
        payload: Any = None,
        *,
        reply: Reply | None = None,
    ) -> None:
        body = reply.encoded_body() if reply is not None else json.dumps(payload).encode()
        headers = {
            "content-type": "application/json",
            "server": "trio-idle-test-backend",
        }
        if reply is not None:
            headers.update({k.lower(): v for k, v in reply.headers.items()})
            if reply.close:
                headers["connection"] = "close"
        body_size = reply.body_size if reply is not None else None
        if body_size is not None and reply is not None and reply.chunked:
            headers["transfer-encoding"] = "chunked"
        else:
            headers["content-length"] = str(len(body) if body_size is None else body_size)
        if body_size is None:
            await stream.send_all(encode_response(conn, status, list(headers.items()), body))
            return
        head = h11.Response(
            status_code=status, headers=list(headers.items()), reason=reason_phrase(status)
        )
        await stream.send_all(conn.send(head) or b"")
        await self._send_padded_body(conn, stream, body, body_size)

    async def _send_padded_body(
        self, conn: h11.Connection, stream: trio.SocketStream, body: bytes, size: int
    ) -> None:
        """``body`` then spaces up to ``size`` bytes, one chunk at a time (``Reply.body_size``),
        and the end of the message."""
        await stream.send_all(conn.send(h11.Data(data=body)) or b"")
        left = size - len(body)
        padding = b" " * _SEND_CHUNK
        while left > 0:
            piece = padding if left >= _SEND_CHUNK else padding[:left]
            await stream.send_all(conn.send(h11.Data(data=piece)) or b"")
            left -= len(piece)
        await stream.send_all(conn.send(h11.EndOfMessage()) or b"")

    def _record(self, request: ScanRequest) -> None:
        self.requests.append(request)
        key = request.email
        count = self._in_flight[key] = self._in_flight.get(key, 0) + 1
        self._max_in_flight[key] = max(self._max_in_flight.get(key, 0), count)
        self._in_flight_total += 1
        self._max_in_flight_total = max(self._max_in_flight_total, self._in_flight_total)
        self._notify_changed()

    def _finish(self, request: ScanRequest) -> None:
        request.finished_at = trio.current_time()
        self._in_flight[request.email] -= 1
        self._in_flight_total -= 1
        self._notify_changed()

    def _notify_changed(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _handle_request(
        self,
        conn: h11.Connection,
        stream: trio.SocketStream,
        event: h11.Request,
        raw_body: bytes,
        number: int,
    ) -> bool:
        """Handle one complete request; return whether the connection may be kept open."""
        headers: dict[str, str] = {}
        for name, value in event.headers:
            key, text = name.decode("latin-1").lower(), value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        target = event.target.decode("latin-1")
        try:
            decoded: Any = json.loads(raw_body)
            json_ok = isinstance(decoded, dict)
        except (ValueError, UnicodeDecodeError):
            decoded, json_ok = None, False
        body = _json_object(decoded)
        request_email = body.get("email")
        request = ScanRequest(
            method=event.method.decode("ascii", "replace"),
            path=target.split("?", 1)[0],
            headers=headers,
            raw_body=raw_body,
            body=body,
            received_at=trio.current_time(),
            connection_number=number,
            email=request_email if isinstance(request_email, str) else None,
        )
        witness.received(raw_body)
        if request.path == self.status_path:
            return await self._status(conn, stream, request, json_ok)
        self._record(request)
        try:
            return await self._respond(conn, stream, request, json_ok)
        finally:
            self._finish(request)

    async def _status(
        self, conn: h11.Connection, stream: trio.SocketStream, request: ScanRequest, json_ok: bool
    ) -> bool:
        """One account health report: recorded apart from scans, then answered."""
        self.status_reports.append(request)
        key = request.connection_id
        count = self._status_in_flight[key] = self._status_in_flight.get(key, 0) + 1
        self.max_status_in_flight = max(self.max_status_in_flight, count)
        self._notify_changed()
        try:
            given = request.headers.get("x-admin-secret", "").encode("latin-1")
            error: tuple[int, Any] | None = None
            if request.method != "POST":
                error = 405, {"error": "method not allowed"}
            elif not hmac.compare_digest(given, self.secret.encode("utf-8")):
                error = 401, {"error": "unauthorized"}
            elif not json_ok:
                request.problems.append("body is not a JSON object")
                error = 400, {"error": "body is not a JSON object"}
            else:
                request.problems.extend(self._status_problems(request))
                if request.problems and self.strict:
                    error = 400, {"error": "bad request", "problems": request.problems}
            if error is not None:
                request.status = error[0]
                await self._send(conn, stream, *error)
                return True
            reply = request.reply = self.status_reply(request)
            if reply.delay:
                await trio.sleep(reply.delay)
            if reply.disconnect:
                return False
            request.status = reply.status
            await self._send(conn, stream, reply.status, reply=reply)
            return not reply.close
        finally:
            self._status_in_flight[key] -= 1
            request.finished_at = trio.current_time()
            self._notify_changed()

    def _status_problems(self, request: ScanRequest) -> list[str]:
        """Everything about an authorized health report that breaks its contract."""
        problems = self._header_problems(request, scan_id=False)
        body = request.body
        for field in ("connectionId", "email", "since"):
            value = body.get(field)
            if not isinstance(value, str) or not value:
                problems.append(f"{field} must be a non-empty string")
        if "userId" not in body or not isinstance(body["userId"], (str, type(None))):
            problems.append("userId must be present (a string or null)")
        if body.get("state") not in HEALTH_STATES:
            problems.append(f"state must be one of {sorted(HEALTH_STATES)}")
        if not isinstance(body.get("reason", 0), (str, type(None))):
            problems.append("reason must be a string or null")
        if not isinstance(body.get("message"), str):
            problems.append("message must be a string")
        attempts = body.get("attempts")
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 0:
            problems.append("attempts must be a non-negative integer")
        return problems

    async def _respond(
        self,
        conn: h11.Connection,
        stream: trio.SocketStream,
        request: ScanRequest,
        json_ok: bool,
    ) -> bool:
        async def answer(status: int, payload: Any) -> bool:
            request.status = status
            await self._send(conn, stream, status, payload)
            return True

        token_route = self.token_reply is not None and request.path == self.token_path
        if request.path != self.path and not token_route:
            return await answer(404, {"error": "not found"})
        if request.method != "POST":
            return await answer(405, {"error": "method not allowed"})
        given = request.headers.get("x-admin-secret", "").encode("latin-1")
        if not hmac.compare_digest(given, self.secret.encode("utf-8")):
            return await answer(401, {"error": "unauthorized"})
        if not json_ok:
            request.problems.append("body is not a JSON object")
            return await answer(400, {"error": "body is not a JSON object"})
        if token_route:
            assert self.token_reply is not None
            reply = self.token_reply(request)
            if isinstance(reply.json, dict) and isinstance(reply.json.get("accessToken"), str):
                witness.issued(reply.json["accessToken"])
        else:
            request.problems.extend(self._contract_problems(request))
            if request.problems and self.strict:
                return await answer(400, {"error": "bad request", "problems": request.problems})
            reply = self._choose_reply(request)
        request.reply = reply
        if request.email is not None:
            gate = self._gates.get(request.email)
            if gate is not None and not gate.released:
                await gate.wait()
        if reply.delay:
            await trio.sleep(reply.delay)
        if reply.disconnect:
            return False
        request.status = reply.status
        await self._send(conn, stream, reply.status, reply=reply)
        return not reply.close

    def _choose_reply(self, request: ScanRequest) -> Reply:
        queue = self._scripts.get(request.email) if request.email is not None else None
        if queue:
            return queue.pop(0)
        return self.default_reply(request)

    def _contract_problems(self, request: ScanRequest) -> list[str]:
        """Everything about an authorized request that breaks the webhook contract."""
        problems = self._header_problems(request, scan_id=True)
        body = request.body
        for field in ("connectionId", "email", "mailbox"):
            value = body.get(field)
            if not isinstance(value, str) or not value:
                problems.append(f"{field} must be a non-empty string")
        if "userId" not in body:
            problems.append("userId must be present (a string or null)")
        elif body["userId"] is not None and not isinstance(body["userId"], str):
            problems.append("userId must be a string or null")
        if body.get("reason") not in SCAN_REASONS:
            problems.append(f"reason must be one of {sorted(SCAN_REASONS)}")
        if "folder" in body and body["folder"] != body.get("mailbox"):
            problems.append("folder, when present, must name the mailbox scanned")
        return problems

    def _header_problems(self, request: ScanRequest, *, scan_id: bool) -> list[str]:
        """The headers every request to the backend must carry (``x-scan-id``: scans)."""
        problems: list[str] = []
        headers = request.headers
        content_type = headers.get("content-type", "")
        if content_type.split(";", 1)[0].strip().lower() != "application/json":
            problems.append(f"content-type must be application/json, got {content_type!r}")
        if not headers.get("user-agent", "").startswith("trio-idle/"):
            problems.append("user-agent must be trio-idle/<version>")
        if scan_id and not headers.get("x-scan-id", "").strip():
            problems.append("x-scan-id header missing")
        signature = headers.get("x-signature")
        if signature is not None and not _SIGNATURE_RE.fullmatch(signature):
            problems.append("x-signature must be sha256=<64 lower-case hex digits>")
        elif self.signing_key is not None and not request.signature_matches(self.signing_key):
            problems.append("x-signature missing or wrong")
        return problems


# --------------------------------------------------------------------- keyword scanner

#: Matched case-insensitively as whole words (a trailing "s" allowed, whitespace in
#: phrases flexible), in the subject and the text/plain and text/html parts.
DEFAULT_GAMBLING_KEYWORDS: Final = (
    "casino",
    "bet",
    "betting",
    "jackpot",
    "poker",
    "slot",
    "bonus spin",
    "free spin",
    "roulette",
    "sportsbook",
)


class KeywordScanner:
    """A ``default_reply`` for the demo that really looks at the mail.

    ``fetch_new(email)`` returns the raw RFC 5322 messages that arrived in that mailbox since
    the previous call (e.g. read from the test IMAP server). Each call to the scanner counts
    them, "blocks" those whose subject or text matches a gambling keyword, and answers
    ``Reply(200, json={"scanned": s, "blocked": b})``. Totals are kept in
    :attr:`scanned_total`, :attr:`blocked_total` and :attr:`blocked_subjects`.
    Messages that cannot be parsed are counted as scanned, not blocked.
    """

    def __init__(
        self,
        fetch_new: Callable[[str], Sequence[bytes]],
        keywords: Iterable[str] = DEFAULT_GAMBLING_KEYWORDS,
    ) -> None:
        words = [w.strip() for w in keywords if w.strip()]
        if not words:
            raise ValueError("keywords must not be empty")
        alternatives = "|".join(r"\s+".join(map(re.escape, w.split())) + "s?" for w in words)
        self.pattern: Final = re.compile(rf"\b(?:{alternatives})\b", re.IGNORECASE)
        self.fetch_new = fetch_new
        self.scanned_total = 0
        self.blocked_total = 0
        self.blocked_subjects: list[str] = []

    def is_gambling(self, raw_message: bytes) -> bool:
        """Whether the message's subject or text parts match a keyword."""
        return self.pattern.search(self._text_of(raw_message)[1]) is not None

    def _text_of(self, raw_message: bytes) -> tuple[str, str]:
        """(subject, subject + decoded text parts) of a raw message, best effort."""
        try:
            msg = message_from_bytes(raw_message, policy=email_policy.default)
            subject = str(msg.get("subject", ""))
            texts = [subject]
            for part in msg.walk():
                if part.get_content_maintype() != "text" or part.is_multipart():
                    continue
                try:
                    texts.append(str(part.get_content()))
                except (LookupError, ValueError, AttributeError):
                    payload = part.get_payload(decode=True)
                    if isinstance(payload, bytes):
                        texts.append(payload.decode("utf-8", "replace"))
            return subject, "\n".join(texts)
        except Exception:  # a demo scanner must not crash on odd mail
            text = raw_message.decode("utf-8", "replace")
            return "", text

    def __call__(self, request: ScanRequest) -> Reply:
        """Scan the new messages of ``request.email``; see the class docstring."""
        if request.email is None:
            return Reply(400, json={"error": "email missing"})
        scanned = blocked = 0
        for raw in self.fetch_new(request.email):
            scanned += 1
            subject, text = self._text_of(raw)
            if self.pattern.search(text):
                blocked += 1
                self.blocked_subjects.append(subject)
        self.scanned_total += scanned
        self.blocked_total += blocked
        return Reply(200, json={"scanned": scanned, "blocked": blocked})
