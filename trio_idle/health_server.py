"""The health/metrics HTTP endpoint (HTTP/1.1 with h11 on trio sockets, same process).

Routes (``GET`` and ``HEAD`` only):

- ``/healthz``: 200 while the event loop is responsive, 503 when its lag exceeds
  ``max_loop_lag`` (:func:`~trio_idle.health.assess_liveness`);
- ``/readyz``: 200 when the connection list is fresh and enough sessions watch their
  mailbox, else 503 (:func:`~trio_idle.health.assess_readiness`); JSON counts either way;
- ``/metrics``: Prometheus text format (:mod:`trio_idle.metrics`);
- ``/status``: JSON detail per connection (:meth:`Reconciler.snapshot`, no secrets).

Off unless ``TRIO_IDLE_HEALTH_ADDR`` is set. Every connection is bounded: a request must
arrive within :data:`REQUEST_TIMEOUT` seconds (slow or idle clients are dropped), at most
:data:`MAX_CONNECTIONS` are served at once (more wait in the kernel's accept queue), and
bodies are never read (none of the routes takes one).

Cancellation: :meth:`HealthServer.serve` runs until cancelled, then closes the listener
and every open connection.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, Final

import attrs
import h11
import trio
from loguru import logger
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from trio_idle import __version__

REQUEST_TIMEOUT: Final = 10.0
MAX_CONNECTIONS: Final = 64
_MAX_HEADER_BYTES: Final = 16384
_RECEIVE_CHUNK: Final = 16384


@attrs.frozen
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"


def json_response(status: int, payload: Any) -> Response:
    return Response(status, json.dumps(payload, indent=2).encode() + b"\n")


@attrs.frozen
class HealthRoutes:
    """What the routes answer; each callable builds a fresh answer at request time."""

    healthz: Callable[[], Response]
    readyz: Callable[[], Response]
    status: Callable[[], Response]
    registry: CollectorRegistry

    def answer(self, method: str, path: str) -> Response:
        if method not in ("GET", "HEAD"):
            return json_response(405, {"error": "method not allowed"})
        route = path.split("?", 1)[0]
        if route == "/healthz":
            return self.healthz()
        if route == "/readyz":
            return self.readyz()
        if route == "/status":
            return self.status()
        if route == "/metrics":
            return Response(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)
        return json_response(404, {"error": "not found", "routes": list(ROUTES)})


ROUTES: Final = ("/healthz", "/readyz", "/metrics", "/status")


class HealthServer:
    """Serves :class:`HealthRoutes` on ``host:port`` (port 0: a free one)."""

    def __init__(self, routes: HealthRoutes, host: str, port: int) -> None:
        self.routes = routes
        self.host = host
        self.port = port
        self._limit = trio.Semaphore(MAX_CONNECTIONS)
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
            logger.info(f"[idle/health] listening on {self.url}")
            async with trio.open_nursery() as nursery:
                for listener in listeners:
                    nursery.start_soon(self._accept_loop, listener, nursery)
                task_status.started(self.url)
        finally:
            for listener in listeners:
                with trio.CancelScope(shield=True):
                    await listener.aclose()

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            await self._limit.acquire()
            try:
                stream = await listener.accept()
            except OSError as exc:  # EMFILE and friends: back off instead of spinning
                self._limit.release()
                logger.warning(f"[idle/health] accept failed: {exc.strerror or exc}")
                await trio.sleep(0.5)
                continue
            except BaseException:
                self._limit.release()
                raise
            nursery.start_soon(self._connection, stream)

    async def _connection(self, stream: trio.SocketStream) -> None:
        try:
            conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEADER_BYTES)
            while True:
                with trio.move_on_after(REQUEST_TIMEOUT):
                    keep_going = await self._one_request(conn, stream)
                    if keep_going and conn.our_state is h11.DONE:
                        conn.start_next_cycle()
                        continue
                return  # closed, timed out, or not reusable
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            pass
        finally:
            self._limit.release()
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _next_event(self, conn: h11.Connection, stream: trio.SocketStream) -> Any:
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            conn.receive_data(await stream.receive_some(_RECEIVE_CHUNK))

    async def _one_request(self, conn: h11.Connection, stream: trio.SocketStream) -> bool:
        try:
            event = await self._next_event(conn, stream)
        except h11.RemoteProtocolError as exc:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                await self._send(conn, stream, "GET", json_response(exc.error_status_hint, {}))
            return False
        if not isinstance(event, h11.Request):
            return False
        self.requests += 1
        method = event.method.decode("ascii", "replace")
        try:
            response = self.routes.answer(method, event.target.decode("latin-1"))
        except Exception as exc:  # a bug in a route must not take the endpoint down
            logger.opt(exception=exc).error(f"[idle/health] request failed: {exc!r}")
            response = json_response(500, {"error": "internal error"})
        # drain the (unexpected) body so the connection can be reused, within the timeout
        part = await self._next_event(conn, stream)
        while isinstance(part, h11.Data):
            part = await self._next_event(conn, stream)
        if not isinstance(part, h11.EndOfMessage):
            return False  # the client went away mid-request
        await self._send(conn, stream, method, response)
        return conn.their_state is h11.DONE

    async def _send(
        self, conn: h11.Connection, stream: trio.SocketStream, method: str, response: Response
    ) -> None:
        headers = [
            ("content-type", response.content_type),
            ("content-length", str(len(response.body))),
            ("cache-control", "no-store"),
            ("server", f"trio-idle/{__version__}"),
        ]
        try:
            reason = HTTPStatus(response.status).phrase.encode("ascii")
        except ValueError:
            reason = b""
        response_head = h11.Response(status_code=response.status, headers=headers, reason=reason)
        data = conn.send(response_head) or b""
        if method != "HEAD":
            data += conn.send(h11.Data(data=response.body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        await stream.send_all(data)
