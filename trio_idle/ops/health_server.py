"""The health/metrics HTTP endpoint (HTTP/1.1 with h11 on trio sockets, same process).

Routes (``GET`` and ``HEAD`` only):

- ``/healthz``: 200 while the event loop is responsive, 503 when its lag exceeds
  ``max_loop_lag`` (:func:`~trio_idle.ops.health.assess_liveness`);
- ``/readyz``: 200 unless something the operator must fix is wrong (stale list, too few
  of the operator's sessions watching, backend failing, fenced; never what end users
  cause), else 503 (:func:`~trio_idle.ops.health.assess_readiness`); JSON counts either way;
- ``/metrics``: Prometheus text format (:mod:`trio_idle.ops.metrics`);
- ``/status``: JSON detail per connection (:meth:`Reconciler.snapshot`: ids, emails,
  hosts, last errors; no secrets), the cluster and the LISTEN/NOTIFY listener
  (:mod:`trio_idle.runtime.supervision` builds it). Only with
  ``Authorization: Bearer <token>`` matching
  ``TRIO_IDLE_STATUS_TOKEN`` (401 otherwise), off (404) without a token configured, and
  served on its own address instead when ``TRIO_IDLE_STATUS_ADDR`` is set
  (:meth:`HealthRoutes.only`).

The first three carry counts, states and durations only: nothing that comes from a row
or from a server.

Off unless ``TRIO_IDLE_HEALTH_ADDR`` is set. Hostile clients are bounded (each bound is a
constant below):

- a client has :data:`HEAD_TIMEOUT` seconds from connecting (or from the first byte of a
  keep-alive request) to deliver a complete request, :data:`IDLE_TIMEOUT` seconds of
  keep-alive silence after a response, :data:`SEND_TIMEOUT` seconds to take a response;
- request heads are at most :data:`MAX_HEAD_BYTES`, bodies (no route reads one) at most
  :data:`MAX_BODY_BYTES`;
- at most :data:`MAX_CLIENTS` clients are open at once. A new client beyond that pushes
  out the client that has waited longest without delivering a complete request
  (:class:`ClientTable`), so the accept loop never waits on slow clients and a fresh
  request is served at once. Only clients that have been waiting for at least
  :data:`EVICT_GRACE` seconds are pushed out (a burst of honest clients, each about to
  send its request, is not cut down); the accept loop waits at most that long.

Cancellation: :meth:`HealthServer.serve` runs until cancelled, then closes the listener
and every open connection.
"""

from __future__ import annotations

import enum
import hmac
import itertools
import json
import math
from collections.abc import Callable, Iterable
from typing import Any, Final, Literal

import attrs
import h11
import trio
from loguru import logger
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from trio_idle import __version__
from trio_idle.core.secret import Secret
from trio_idle.core.stats import Stats
from trio_idle.ops.http_serve import Refused, encode_response, read_request

#: From connecting (or a keep-alive request's first byte) to a complete request.
HEAD_TIMEOUT: Final = 5.0
#: Keep-alive: from a response to the next request's first byte; then the client is closed.
IDLE_TIMEOUT: Final = 5.0
#: Writing one response to a client that does not read.
SEND_TIMEOUT: Final = 10.0
#: Clients open at once (per listening address).
MAX_CLIENTS: Final = 128
#: A new client only pushes out a waiting client that has waited at least this long.
EVICT_GRACE: Final = 0.2
MAX_HEAD_BYTES: Final = 16384
MAX_BODY_BYTES: Final = 4096
#: Rejected /status requests and pushed-out clients: at most one log line per this many s.
LOG_EVERY: Final = 60.0
#: After an error response: how long, and how much, unread input is drained before closing.
LINGER_TIMEOUT: Final = 1.0
LINGER_BYTES: Final = 1 << 20
_RECEIVE_CHUNK: Final = 16384

ROUTES: Final = ("/healthz", "/readyz", "/metrics", "/status")
_REALM: Final = 'Bearer realm="trio-idle"'


@attrs.frozen
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    #: extra headers, e.g. ``("www-authenticate", ...)``
    headers: tuple[tuple[str, str], ...] = ()


def json_response(status: int, payload: Any, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    return Response(status, json.dumps(payload, indent=2).encode() + b"\n", headers=headers)


@attrs.frozen
class Request:
    """What the routes look at in one request."""

    method: str
    target: str
    #: the ``Authorization`` header; ``None`` when absent, ``b""`` when sent more than once
    authorization: bytes | None = None
    #: ``host:port`` of the client, for log lines
    peer: str = "?"


class Auth(enum.Enum):
    """The bearer-token check of ``/status``."""

    OFF = "off"  # no token configured: /status is not served
    MISSING = "missing"  # no Authorization header
    WRONG = "wrong"  # a header, but not "Bearer <the token>"
    OK = "ok"


def check_bearer(token: Secret | None, authorization: bytes | None) -> Auth:
    """Compare ``Authorization: Bearer <token>`` with ``token`` in constant time.

    The scheme is case-insensitive (RFC 7235); the token is compared byte for byte with
    :func:`hmac.compare_digest`, so the time taken does not tell how much of it matched.
    """
    if token is None:
        return Auth.OFF
    if authorization is None:
        return Auth.MISSING
    scheme, _, credentials = authorization.strip().partition(b" ")
    matches = hmac.compare_digest(credentials.strip(), token.reveal().encode())
    return Auth.OK if matches and scheme.lower() == b"bearer" else Auth.WRONG


@attrs.define
class LogThrottle:
    """At most one log line per ``every`` seconds for one kind of event; the line says how
    many events were not logged since the previous one. Pure: the caller passes the time."""

    every: float = LOG_EVERY
    _last: float = -math.inf
    _unlogged: int = 0

    def line(self, now: float, text: str) -> str | None:
        """``text`` (with the count of unlogged events) if a line is due, else ``None``."""
        if now - self._last < self.every:
            self._unlogged += 1
            return None
        more = f" ({self._unlogged} more since the last such line)" if self._unlogged else ""
        self._last, self._unlogged = now, 0
        return text + more


@attrs.frozen
class HealthRoutes:
    """What the routes answer; each callable builds a fresh answer at request time.

    ``served`` is the set of routes this listening address answers (others: 404).
    """

    healthz: Callable[[], Response]
    readyz: Callable[[], Response]
    status: Callable[[], Response]
    registry: CollectorRegistry
    stats: Stats = attrs.field(factory=Stats)
    status_token: Secret | None = None
    served: tuple[str, ...] = ROUTES
    #: shared by every :meth:`only` copy: one rate limit for all addresses
    auth_log: LogThrottle = attrs.field(factory=LogThrottle)

    def only(self, routes: Iterable[str]) -> HealthRoutes:
        """The same answers, restricted to ``routes``."""
        wanted = set(routes)
        return attrs.evolve(self, served=tuple(r for r in ROUTES if r in wanted))

    def answer(self, request: Request, now: float) -> Response:
        """The response to ``request`` (``now``: a monotonic time, for the log rate limit)."""
        if request.method not in ("GET", "HEAD"):
            return json_response(405, {"error": "method not allowed"})
        route = request.target.split("?", 1)[0]
        if route not in self.served:
            return json_response(404, {"error": "not found", "routes": list(self.served)})
        if route == "/healthz":
            return self.healthz()
        if route == "/readyz":
            return self.readyz()
        if route == "/metrics":
            return Response(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)
        return self._status(request, now)

    def _status(self, request: Request, now: float) -> Response:
        verdict = check_bearer(self.status_token, request.authorization)
        if verdict is Auth.OK:
            return self.status()
        if verdict is Auth.OFF:
            return json_response(
                404,
                {
                    "error": "/status is off",
                    "enable": "set TRIO_IDLE_STATUS_TOKEN in the daemon's environment and "
                    "send Authorization: Bearer <token>",
                },
            )
        self.stats.inc("status_auth_failures", verdict.value)
        line = self.auth_log.line(
            now,
            f"[idle/health] /status refused: {verdict.value} bearer token (from {request.peer})",
        )
        if line is not None:
            logger.warning(line)
        challenge = _REALM if verdict is Auth.MISSING else _REALM + ', error="invalid_token"'
        return json_response(
            401,
            {"error": "/status needs Authorization: Bearer <TRIO_IDLE_STATUS_TOKEN>"},
            headers=(("www-authenticate", challenge),),
        )


@attrs.frozen
class Room:
    """What to do with a new client: ``admit`` it, ``evict`` ``client`` first, or ``wait``
    until ``until`` (or until a client leaves or finishes a request) and decide again."""

    action: Literal["admit", "evict", "wait"]
    client: int | None = None
    until: float = math.inf


@attrs.define
class ClientTable:
    """The open clients of one server and the eviction choice; pure (the caller passes
    the time and closes the evicted client).

    A client is *waiting* from when it connects (or its last response was sent) until
    it has delivered a complete request, then *busy* while it is answered.
    """

    capacity: int = MAX_CLIENTS
    grace: float = EVICT_GRACE
    #: waiting client → since when; insertion order is that order (oldest first)
    _waiting: dict[int, float] = attrs.field(factory=dict)
    _busy: set[int] = attrs.field(factory=set)

    def __len__(self) -> int:
        return len(self._waiting) + len(self._busy)

    def waiting(self, client: int, now: float) -> None:
        self._busy.discard(client)
        self._waiting.pop(client, None)
        self._waiting[client] = now

    def busy(self, client: int) -> None:
        self._waiting.pop(client, None)
        self._busy.add(client)

    def remove(self, client: int) -> bool:
        """Forget ``client``; ``False`` if it was not open (e.g. already evicted)."""
        known = client in self._busy or client in self._waiting
        self._busy.discard(client)
        self._waiting.pop(client, None)
        return known

    def room(self, now: float) -> Room:
        """Whether a new client fits now (see :class:`Room`)."""
        if len(self) < self.capacity:
            return Room("admit")
        for client, since in self._waiting.items():  # the oldest waiting client
            if now >= since + self.grace:  # the same sum as `until`: no float gap
                return Room("evict", client)
            return Room("wait", until=since + self.grace)
        return Room("wait")  # all busy; each is done within SEND_TIMEOUT


class HealthServer:
    """Serves :class:`HealthRoutes` on ``host:port`` (port 0: a free one)."""

    def __init__(self, routes: HealthRoutes, host: str, port: int) -> None:
        self.routes = routes
        self.host = host
        self.port = port
        self.stats = routes.stats
        self.clients = ClientTable()
        self._scopes: dict[int, trio.CancelScope] = {}
        self._ids = itertools.count()
        self._changed = trio.Event()
        self._evict_log = LogThrottle()
        #: requests answered so far
        self.requests = 0

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind (``OSError`` if impossible, before ``started``), report :attr:`url`, serve."""
        listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        try:
            self.port = listeners[0].socket.getsockname()[1]
            logger.info(f"[idle/health] listening on {self.url} ({self._describe()})")
            async with trio.open_nursery() as nursery:
                for listener in listeners:
                    nursery.start_soon(self._accept_loop, listener, nursery)
                task_status.started(self.url)
        finally:
            for listener in listeners:
                with trio.CancelScope(shield=True):
                    await listener.aclose()

    def _describe(self) -> str:
        parts = [r for r in self.routes.served if r != "/status"]
        if "/status" in self.routes.served:
            on = self.routes.status_token is not None
            parts.append("/status" if on else "/status off: TRIO_IDLE_STATUS_TOKEN is not set")
        return ", ".join(parts)

    def _signal(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:  # EMFILE and friends: back off instead of spinning
                logger.warning(f"[idle/health] accept failed: {exc.strerror or exc}")
                await trio.sleep(0.5)
                continue
            try:
                await self._make_room()
            except BaseException:
                with trio.CancelScope(shield=True):
                    await stream.aclose()
                raise
            client = next(self._ids)
            self.clients.waiting(client, trio.current_time())
            scope = self._scopes[client] = trio.CancelScope()
            nursery.start_soon(self._connection, stream, client, scope)

    async def _make_room(self) -> None:
        while True:
            now = trio.current_time()
            room = self.clients.room(now)
            if room.action == "admit":
                return
            if room.action == "evict" and room.client is not None:
                self._evict(room.client, now)
                continue
            changed = self._changed
            with trio.move_on_at(room.until):
                await changed.wait()

    def _evict(self, client: int, now: float) -> None:
        self.clients.remove(client)
        self._scopes.pop(client).cancel()
        self.stats.inc("health_clients_dropped", "evicted")
        line = self._evict_log.line(
            now,
            f"[idle/health] {self.clients.capacity} clients open on {self.url}: closed the "
            f"one waiting longest without a complete request",
        )
        if line is not None:
            logger.warning(line)

    def _leave(self, client: int) -> None:
        self._scopes.pop(client, None)
        if self.clients.remove(client):
            self._signal()

    async def _connection(
        self, stream: trio.SocketStream, client: int, scope: trio.CancelScope
    ) -> None:
        try:
            with scope:
                await self._serve_client(stream, client, _peer(stream))
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            pass
        finally:
            self._leave(client)
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _serve_client(self, stream: trio.SocketStream, client: int, peer: str) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        deadline = trio.current_time() + HEAD_TIMEOUT
        while True:
            with trio.move_on_at(deadline) as head_timer:
                received = await self._receive_request(conn, stream, peer)
            if head_timer.cancelled_caught:
                self.stats.inc("health_clients_dropped", "timeout")
                return
            if received is None:
                return
            if isinstance(received, Response):  # malformed or too large: answer and close
                with trio.move_on_after(SEND_TIMEOUT):
                    await self._send(conn, stream, received, close=True)
                    await _linger(stream)
                return
            self.clients.busy(client)
            self._signal()
            self.requests += 1
            try:
                response = self.routes.answer(received, trio.current_time())
            except Exception as exc:  # a bug in a route must not take the endpoint down
                logger.opt(exception=exc).error(f"[idle/health] request failed: {exc!r}")
                response = json_response(500, {"error": "internal error"})
            with trio.move_on_after(SEND_TIMEOUT) as send_timer:
                await self._send(conn, stream, response)
            if send_timer.cancelled_caught:
                self.stats.inc("health_clients_dropped", "timeout")
                return
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()
            self.clients.waiting(client, trio.current_time())
            self._signal()
            if not conn.trailing_data[0]:  # nothing pipelined: wait for the next request
                data = b""
                with trio.move_on_after(IDLE_TIMEOUT):
                    data = await stream.receive_some(_RECEIVE_CHUNK)
                    conn.receive_data(data)
                if not data:
                    return
            deadline = trio.current_time() + HEAD_TIMEOUT

    async def _receive_request(
        self, conn: h11.Connection, stream: trio.SocketStream, peer: str
    ) -> Request | Response | None:
        """The next complete request (body read and dropped: no route reads one), an
        error response to send before closing, or ``None`` when the client closed."""
        received = await read_request(conn, stream, max_body=MAX_BODY_BYTES, chunk=_RECEIVE_CHUNK)
        if isinstance(received, Refused):
            error = "request body too large" if received.body_too_large else "bad request"
            return json_response(received.status, {"error": error})
        if received is None:
            return None
        event = received.request
        auth = [value for name, value in event.headers if name == b"authorization"]
        return Request(
            method=event.method.decode("ascii", "replace"),
            target=event.target.decode("latin-1"),
            authorization=None if not auth else auth[0] if len(auth) == 1 else b"",
            peer=peer,
        )

    async def _send(
        self,
        conn: h11.Connection,
        stream: trio.SocketStream,
        response: Response,
        *,
        close: bool = False,
    ) -> None:
        headers = [
            ("content-type", response.content_type),
            ("content-length", str(len(response.body))),
            ("cache-control", "no-store"),
            ("server", f"trio-idle/{__version__}"),
            *response.headers,
        ]
        if close:
            headers.append(("connection", "close"))
        # to HEAD: these headers, no body (encode_response knows the request's method)
        await stream.send_all(encode_response(conn, response.status, headers, response.body))


async def _linger(stream: trio.SocketStream) -> None:
    """Half-close, then read and discard what the client still sends (bounded): closing
    with unread input would reset the connection and could destroy the error response
    before the client has read it."""
    await stream.send_eof()
    with trio.move_on_after(LINGER_TIMEOUT):
        drained = 0
        while drained < LINGER_BYTES and (data := await stream.receive_some(_RECEIVE_CHUNK)):
            drained += len(data)


def _peer(stream: trio.SocketStream) -> str:
    try:
        address = stream.socket.getpeername()
    except OSError:
        return "?"
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
