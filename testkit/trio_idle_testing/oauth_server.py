"""A real OAuth2 token endpoint over HTTP/1.1 on 127.0.0.1, for tests.

:class:`OAuthTestServer` (h11 on trio) answers the refresh-token grant the way Google and
Microsoft do (RFC 6749 section 6)::

    POST {url}/token   grant_type=refresh_token&refresh_token=..&client_id=..&client_secret=..
    200 {"access_token": "...", "token_type": "Bearer", "expires_in": N,
         "refresh_token": "..." (only for grants that rotate)}
    400 {"error": "invalid_grant"}     unknown, revoked or already rotated-away token
    401 {"error": "invalid_client"}    wrong client id or secret

and, for Dovecot's ``passdb { driver = oauth2 }`` (``introspection_mode = post``),
``POST {url}/introspect`` with ``token=<access token>`` → ``{"active": true|false,
"username": "<user>"}``. Rotation is strict: once a grant has rotated, its previous
refresh token is refused, so a client that keeps using an old one is caught.

Test controls: :meth:`add_grant`, :meth:`revoke`, :meth:`fail_next` (scripted replies:
500s, 429s, slow answers, dropped connections), :meth:`hold` (requests wait until
released), and :attr:`requests` with :meth:`wait_for` to wait on them. Nothing here
sleeps to poll; every wait is on an event.
"""

from __future__ import annotations

import itertools
import json
import secrets
import socket
import urllib.parse
from collections.abc import Callable
from typing import Any, Final

import attrs
import h11
import trio

from trio_idle.ops.http_serve import Received, encode_response, read_request
from trio_idle_testing import witness

MAX_BODY_BYTES: Final = 64 * 1024
_RECEIVE_CHUNK: Final = 65536


@attrs.define(eq=False)
class Grant:
    """One user's consent: the refresh token that currently represents it."""

    user: str
    refresh_token: str
    rotate: bool
    expires_in: int
    revoked: bool = False
    #: refresh tokens this grant had before rotating (refused from then on)
    retired: list[str] = attrs.field(factory=list)


@attrs.frozen
class Fault:
    """A scripted answer to the next token request, instead of the real one.

    ``delay`` seconds pass first; then ``disconnect`` closes the connection unanswered, or
    ``status`` is answered with ``json`` (default ``{"error": "HTTP <status>"}``) and
    ``headers``. ``Fault(delay=5, status=None)`` is only slow: the real answer follows.
    """

    status: int | None = 500
    json: Any = None
    headers: dict[str, str] = attrs.field(factory=dict)
    delay: float = 0.0
    disconnect: bool = False


@attrs.define(eq=False)
class TokenRequest:
    """One request received: path, form fields, and what was answered (``None`` until then
    or if nothing was)."""

    path: str
    form: dict[str, str]
    #: :func:`trio.current_time` when its body had arrived
    received_at: float
    status: int | None = None
    issued: str | None = None

    @property
    def refresh_token(self) -> str | None:
        return self.form.get("refresh_token")


@attrs.frozen
class Issued:
    """An access token the server handed out."""

    user: str
    expires_at: float


class OAuthTestServer:
    """The token (and introspection) endpoint; ``url = await nursery.start(server.serve)``.

    ``client_secret=None`` accepts public clients (no secret sent). ``expires_in`` and
    ``rotate`` are the defaults of :meth:`add_grant`. Any path ending in ``/token`` is the
    token endpoint (``/{tenant}/oauth2/v2.0/token`` like Microsoft's, or ``/token``).
    Times are :func:`trio.current_time`.
    """

    def __init__(
        self,
        client_id: str,
        client_secret: str | None,
        *,
        host: str = "127.0.0.1",
        expires_in: int = 3600,
        rotate: bool = False,
        prefix: str = "",
    ) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.host = host
        self.expires_in = expires_in
        self.rotate = rotate
        #: put before every token issued, so tests can recognise them (leak checks)
        self.prefix = prefix
        self.port = 0
        self.requests: list[TokenRequest] = []
        self.grants: dict[str, Grant] = {}
        self.issued: dict[str, Issued] = {}
        self._faults: list[Fault] = []
        self._gate: trio.Event | None = None
        self._serial = itertools.count(1)
        self._changed = trio.Event()
        self.in_flight = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def token_url(self) -> str:
        return self.url + "/token"

    @property
    def introspection_url(self) -> str:
        return self.url + "/introspect"

    # -- controls -------------------------------------------------------------------

    def add_grant(
        self,
        user: str,
        refresh_token: str | None = None,
        *,
        rotate: bool | None = None,
        expires_in: int | None = None,
    ) -> Grant:
        """A user consented; returns the grant (its ``refresh_token`` goes in the row)."""
        token = refresh_token or f"{self.prefix}rt-{user}-{secrets.token_hex(8)}"
        grant = Grant(
            user,
            token,
            self.rotate if rotate is None else rotate,
            self.expires_in if expires_in is None else expires_in,
        )
        self.grants[token] = grant
        witness.issued(token)
        return grant

    def grant_of(self, user: str) -> Grant:
        return next(g for g in self.grants.values() if g.user == user)

    def revoke(self, user: str) -> None:
        """The user withdrew consent: the refresh token and its access tokens stop working."""
        grant = self.grant_of(user)
        grant.revoked = True
        for token, issued in list(self.issued.items()):
            if issued.user == user:
                del self.issued[token]

    def fail_next(self, *faults: Fault) -> None:
        """Answer the next token requests with these, in order."""
        self._faults.extend(faults)

    def hold(self) -> trio.Event:
        """Make token requests wait until the returned event is set."""
        self._gate = trio.Event()
        return self._gate

    def token_requests(self) -> list[TokenRequest]:
        return [r for r in self.requests if r.path.endswith("/token")]

    async def wait_for(self, done: Callable[[], bool]) -> None:
        """Return once ``done()`` holds (checked after every change); bound it yourself."""
        while not done():
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # -- serving --------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on ``host`` (a free port) and serve until cancelled."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((self.host, self.port))
        sock.listen(64)
        self.port = sock.getsockname()[1]
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        async with listener, trio.open_nursery() as nursery:
            task_status.started(self.url)
            while True:
                stream = await listener.accept()
                nursery.start_soon(self._connection, stream)

    async def _connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_BODY_BYTES)
        try:
            while True:
                received = await read_request(
                    conn, stream, max_body=MAX_BODY_BYTES, chunk=_RECEIVE_CHUNK
                )
                if not isinstance(received, Received):
                    return  # closed, malformed or too large: closed without an answer
                keep = await self._handle(conn, stream, received.request, received.body)
                if not keep or conn.our_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            pass
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _handle(
        self, conn: h11.Connection, stream: trio.SocketStream, request: h11.Request, body: bytes
    ) -> bool:
        path = request.target.decode("ascii", "replace").split("?")[0]
        form = dict(urllib.parse.parse_qsl(body.decode("utf-8", "replace")))
        record = TokenRequest(path, form, trio.current_time())
        self.requests.append(record)
        self.in_flight += 1
        self._notify()
        headers: dict[str, str] = {}
        payload: Any
        try:
            if request.method != b"POST":
                status, payload = 405, {"error": "method not allowed"}
            elif path == "/introspect":
                status, payload = 200, self._introspect(form)
            elif not path.endswith("/token"):
                status, payload = 404, {"error": "not found"}
            else:
                if self._gate is not None:
                    await self._gate.wait()
                fault = self._faults.pop(0) if self._faults else None
                if fault is not None and fault.delay:
                    await trio.sleep(fault.delay)
                if fault is not None and fault.disconnect:
                    return False
                if fault is not None and fault.status is not None:
                    status = fault.status
                    payload = fault.json if fault.json is not None else {"error": f"HTTP {status}"}
                    headers = fault.headers
                else:
                    status, payload = self._token(form, record)
            record.status = status
            await self._send(conn, stream, status, payload, headers)
            return True
        finally:
            self.in_flight -= 1
            self._notify()

    def _token(self, form: dict[str, str], record: TokenRequest) -> tuple[int, dict[str, Any]]:
        if form.get("client_id") != self.client_id or form.get("client_secret") != (
            self.client_secret
        ):
            return 401, {"error": "invalid_client", "error_description": "bad client"}
        if form.get("grant_type") != "refresh_token":
            return 400, {"error": "unsupported_grant_type"}
        grant = self.grants.get(form.get("refresh_token", ""))
        if grant is None or grant.revoked:
            return 400, {"error": "invalid_grant", "error_description": "Token has been revoked."}
        access = f"{self.prefix}at-{grant.user}-{next(self._serial)}-{secrets.token_hex(6)}"
        self.issued[access] = Issued(grant.user, trio.current_time() + grant.expires_in)
        record.issued = access
        witness.issued(access)
        payload: dict[str, Any] = {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": grant.expires_in,
        }
        if grant.rotate:
            new = f"{self.prefix}rt-{grant.user}-{secrets.token_hex(8)}"
            del self.grants[grant.refresh_token]
            grant.retired.append(grant.refresh_token)
            grant.refresh_token = new
            self.grants[new] = grant
            witness.issued(new)
            payload["refresh_token"] = new
        return 200, payload

    def _introspect(self, form: dict[str, str]) -> dict[str, Any]:
        issued = self.issued.get(form.get("token", ""))
        if issued is None or issued.expires_at <= trio.current_time():
            return {"active": False}
        return {"active": True, "username": issued.user}

    async def _send(
        self,
        conn: h11.Connection,
        stream: trio.SocketStream,
        status: int,
        payload: Any,
        headers: dict[str, str],
    ) -> None:
        body = json.dumps(payload).encode()
        all_headers = {
            "content-type": "application/json",
            "content-length": str(len(body)),
            **{k.lower(): v for k, v in headers.items()},
        }
        await stream.send_all(encode_response(conn, status, list(all_headers.items()), body))
