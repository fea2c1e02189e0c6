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

The sign-in itself, for ``trio-idle oauth authorize``:

* ``GET {url}/authorize`` (RFC 6749 4.1 with PKCE, RFC 7636): checks ``client_id``,
  ``response_type=code``, a loopback ``redirect_uri`` and an ``S256`` ``code_challenge``,
  then — the user :attr:`~OAuthTestServer.consent_user` consents at once — answers 302 to
  ``redirect_uri?code=..&state=..``; :attr:`~OAuthTestServer.deny_consent` redirects with
  ``error=access_denied``, :attr:`~OAuthTestServer.tamper_state` with another ``state``
  (a forged redirect). A broken request is a 400 page, not a redirect (RFC 6749 4.1.2.1).
* ``grant_type=authorization_code`` at the token endpoint: the code is single-use, bound
  to its client and ``redirect_uri``, and ``code_verifier`` must hash to the challenge;
  otherwise ``invalid_grant``. Success makes a new :class:`Grant` and returns its refresh
  token with an access token.
* ``POST {url}/devicecode`` (RFC 8628 3.1) hands out a device code (interval
  ``device_interval``); polls with ``grant_type=urn:ietf:params:oauth:grant-type:device_code``
  get ``authorization_pending`` until :meth:`~OAuthTestServer.approve_device` (then the
  tokens, once), ``access_denied`` after :meth:`~OAuthTestServer.deny_device`,
  ``expired_token`` after its ``expires_in``, ``slow_down`` when polled sooner than the
  interval (which then grows by 5 s, as RFC 8628 3.5 says).

Test controls: :meth:`add_grant`, :meth:`revoke`, :meth:`fail_next` (scripted replies:
500s, 429s, slow answers, dropped connections), :meth:`hold` (requests wait until
released), and :attr:`requests` with :meth:`wait_for` to wait on them. Nothing here
sleeps to poll; every wait is on an event.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import itertools
import json
import re
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


@attrs.define(eq=False)
class AuthorizationCode:
    """A code handed out by the authorization endpoint, and what it is bound to."""

    client_id: str
    redirect_uri: str
    challenge: str
    user: str
    used: bool = False


@attrs.define(eq=False)
class DeviceCode:
    """One device authorization in progress (RFC 8628)."""

    client_id: str
    user_code: str
    expires_at: float
    interval: float
    approved_by: str | None = None
    denied: bool = False
    used: bool = False
    last_poll: float | None = None
    polls: int = 0


_CHALLENGE_RE: Final = re.compile(r"[A-Za-z0-9_-]{43}")
DEVICE_GRANT_TYPE: Final = "urn:ietf:params:oauth:grant-type:device_code"


def _loopback_http(uri: str) -> bool:
    parts = urllib.parse.urlsplit(uri)
    try:
        return parts.scheme == "http" and ipaddress.ip_address(parts.hostname or "").is_loopback
    except ValueError:
        return False


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
        consent_user: str = "user@example.test",
        device_interval: float = 1.0,
        device_expires_in: int = 900,
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
        #: who signs in at the authorization endpoint (consent is given at once)
        self.consent_user = consent_user
        #: the user refuses: redirect with ``error=access_denied``
        self.deny_consent = False
        #: a forged redirect: the ``state`` sent back is not the one received
        self.tamper_state = False
        self.device_interval = device_interval
        self.device_expires_in = device_expires_in
        self.codes: dict[str, AuthorizationCode] = {}
        self.devices: dict[str, DeviceCode] = {}

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def token_url(self) -> str:
        return self.url + "/token"

    @property
    def introspection_url(self) -> str:
        return self.url + "/introspect"

    @property
    def authorization_url(self) -> str:
        return self.url + "/authorize"

    @property
    def device_url(self) -> str:
        return self.url + "/devicecode"

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

    def approve_device(self, user: str | None = None) -> None:
        """The user entered the code (of every device authorization pending) and consented."""
        for device in self.devices.values():
            device.approved_by = user or self.consent_user
        self._notify()

    def deny_device(self) -> None:
        """The user entered the code and declined."""
        for device in self.devices.values():
            device.denied = True
        self._notify()

    def authorization_requests(self) -> list[TokenRequest]:
        return [r for r in self.requests if r.path.endswith("/authorize")]

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
        path, _, query = request.target.decode("ascii", "replace").partition("?")
        if request.method == b"GET":
            form = dict(urllib.parse.parse_qsl(query))
        else:
            form = dict(urllib.parse.parse_qsl(body.decode("utf-8", "replace")))
        record = TokenRequest(path, form, trio.current_time())
        self.requests.append(record)
        self.in_flight += 1
        self._notify()
        headers: dict[str, str] = {}
        payload: Any
        try:
            if request.method == b"GET" and path.endswith("/authorize"):
                status, payload, headers = self._authorize(form)
            elif request.method != b"POST":
                status, payload = 405, {"error": "method not allowed"}
            elif path.endswith("/devicecode"):
                status, payload = self._device_authorization(form)
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
        grant_type = form.get("grant_type")
        if grant_type == "authorization_code":
            return self._code_grant(form, record)
        if grant_type == DEVICE_GRANT_TYPE:
            return self._device_grant(form, record)
        if grant_type != "refresh_token":
            return 400, {"error": "unsupported_grant_type"}
        grant = self.grants.get(form.get("refresh_token", ""))
        if grant is None or grant.revoked:
            return 400, {"error": "invalid_grant", "error_description": "Token has been revoked."}
        return self._issue(grant, record, rotate=grant.rotate)

    def _issue(
        self, grant: Grant, record: TokenRequest, *, rotate: bool, new: bool = False
    ) -> tuple[int, dict[str, Any]]:
        access = f"{self.prefix}at-{grant.user}-{next(self._serial)}-{secrets.token_hex(6)}"
        self.issued[access] = Issued(grant.user, trio.current_time() + grant.expires_in)
        record.issued = access
        witness.issued(access)
        payload: dict[str, Any] = {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": grant.expires_in,
        }
        if new:
            payload["refresh_token"] = grant.refresh_token
        elif rotate:
            rotated = f"{self.prefix}rt-{grant.user}-{secrets.token_hex(8)}"
            del self.grants[grant.refresh_token]
            grant.retired.append(grant.refresh_token)
            grant.refresh_token = rotated
            self.grants[rotated] = grant
            witness.issued(rotated)
            payload["refresh_token"] = rotated
        return 200, payload

    # -- sign-in: authorization code with PKCE, device authorization ----------------

    def _authorize(self, query: dict[str, str]) -> tuple[int, dict[str, Any], dict[str, str]]:
        redirect_uri = query.get("redirect_uri", "")
        if query.get("client_id") != self.client_id:
            return 400, {"error": "invalid_client", "error_description": "unknown client"}, {}
        if not _loopback_http(redirect_uri):
            return 400, {"error": "invalid_request", "error_description": "bad redirect_uri"}, {}
        state = query.get("state", "")
        if self.tamper_state:
            state = secrets.token_urlsafe(24)
        reply: dict[str, str]
        challenge = query.get("code_challenge", "")
        if query.get("response_type") != "code":
            reply = {"error": "unsupported_response_type"}
        elif query.get("code_challenge_method") != "S256" or not _CHALLENGE_RE.fullmatch(challenge):
            reply = {"error": "invalid_request", "error_description": "PKCE S256 is required"}
        elif self.deny_consent:
            reply = {"error": "access_denied", "error_description": "The user said no."}
        else:
            code = f"{self.prefix}code-{secrets.token_urlsafe(24)}"
            self.codes[code] = AuthorizationCode(
                self.client_id, redirect_uri, challenge, self.consent_user
            )
            witness.issued(code)
            reply = {"code": code}
        if state:
            reply["state"] = state
        location = f"{redirect_uri}?{urllib.parse.urlencode(reply)}"
        return 302, {}, {"location": location}

    def _code_grant(self, form: dict[str, str], record: TokenRequest) -> tuple[int, dict[str, Any]]:
        refused = {"error": "invalid_grant", "error_description": "Bad code or code_verifier."}
        issued = self.codes.get(form.get("code", ""))
        if issued is None or issued.used or issued.client_id != form.get("client_id"):
            return 400, refused
        if issued.redirect_uri != form.get("redirect_uri"):
            return 400, refused
        verifier = form.get("code_verifier", "")
        digest = hashlib.sha256(verifier.encode("ascii", "replace")).digest()
        expected = base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")
        if not verifier or not hmac.compare_digest(expected, issued.challenge):
            return 400, refused
        issued.used = True
        grant = self.add_grant(issued.user)
        return self._issue(grant, record, rotate=False, new=True)

    def _device_authorization(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        if form.get("client_id") != self.client_id:
            return 400, {"error": "invalid_client", "error_description": "unknown client"}
        device_code = f"{self.prefix}dc-{secrets.token_urlsafe(24)}"
        user_code = "-".join(secrets.token_hex(2).upper() for _ in range(2))
        self.devices[device_code] = DeviceCode(
            self.client_id,
            user_code,
            trio.current_time() + self.device_expires_in,
            self.device_interval,
        )
        witness.issued(device_code)
        return 200, {
            "device_code": device_code,
            "user_code": user_code,
            "verification_uri": self.url + "/device",
            "expires_in": self.device_expires_in,
            "interval": self.device_interval,
            "message": f"To sign in, open {self.url}/device and enter {user_code}.",
        }

    def _device_grant(
        self, form: dict[str, str], record: TokenRequest
    ) -> tuple[int, dict[str, Any]]:
        device = self.devices.get(form.get("device_code", ""))
        if device is None or device.used or device.client_id != form.get("client_id"):
            return 400, {"error": "invalid_grant"}
        now = trio.current_time()
        device.polls += 1
        too_soon = device.last_poll is not None and now - device.last_poll < device.interval
        device.last_poll = now
        if now >= device.expires_at:
            return 400, {"error": "expired_token"}
        if device.denied:
            return 400, {"error": "access_denied"}
        if too_soon:
            device.interval += 5
            return 400, {"error": "slow_down"}
        if device.approved_by is None:
            return 400, {"error": "authorization_pending"}
        device.used = True
        grant = self.add_grant(device.approved_by)
        return self._issue(grant, record, rotate=False, new=True)

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
