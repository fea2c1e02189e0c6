"""Signing a user in at a mail provider, once, to get a refresh token: the pure parts.

``trio-idle oauth authorize`` (:mod:`trio_idle.oauth_commands`) runs two flows; what they
decide is here, as plain functions, and the I/O (sockets, HTTP) is the command's:

* the authorization code grant with PKCE (RFC 6749 section 4.1, RFC 7636) and a loopback
  redirect for native apps (RFC 8252 section 7.3): :func:`new_flow` makes the secrets of
  one attempt (the PKCE verifier, its S256 challenge, the ``state``), :func:`authorization_url`
  the URL the user opens, :func:`parse_callback` judges the request the browser then makes
  to ``http://127.0.0.1:<port>``, :func:`code_exchange_body` is the token request;
* the device authorization grant (RFC 8628) for machines without a browser:
  :func:`device_request_body`, :func:`parse_device_authorization`, :func:`device_poll_body`,
  :func:`classify_poll_reply` and the polling schedule :class:`PollSchedule`;
  :func:`poll_device` is the polling loop over a caller's poll function.

Guarantees: the verifier, the ``state``, the authorization code, the device code and every
token are :class:`~trio_idle.core.secret.Secret` or live in reprs that hide them; no message
of :class:`SignInFailed` holds one of them, and text from the provider is scrubbed
(``scrubber``) and cut before it is quoted. A callback whose ``state`` is not the one this
attempt sent is refused (compared in constant time), whatever else it carries.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import re
import secrets
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from typing import Final

import attrs
import trio

from trio_idle.accounts.credentials import TokenUnavailable
from trio_idle.auth.oauth_provider import (
    ERROR_CODE_RE,
    TokenGrant,
    json_object,
    parse_token_reply,
)
from trio_idle.core.scrub import PLAIN, Scrubs
from trio_idle.core.secret import Secret

#: RFC 7636 4.1: 32 random bytes make a 43-character verifier
VERIFIER_BYTES: Final = 32
STATE_BYTES: Final = 24
#: RFC 8628 3.2: the polling interval when the provider names none
DEFAULT_INTERVAL: Final = 5.0
#: RFC 8628 3.5: what ``slow_down`` adds to the interval, for good
SLOW_DOWN_STEP: Final = 5.0
#: a provider cannot make the client poll faster than this, or wait longer between polls
MIN_INTERVAL: Final = 1.0
MAX_INTERVAL: Final = 60.0
#: how long a device code is taken to live when the reply omits it (Microsoft: 15 min)
DEFAULT_DEVICE_EXPIRES_IN: Final = 900.0
MAX_DEVICE_EXPIRES_IN: Final = 3600.0
DEVICE_GRANT_TYPE: Final = "urn:ietf:params:oauth:grant-type:device_code"
#: a code or device code longer than this is not one (Microsoft's are ~1 KiB)
MAX_CODE_CHARS: Final = 4096
_USER_CODE_RE: Final = re.compile(r"[A-Za-z0-9-]{1,32}")


class SignInFailed(Exception):
    """The sign-in did not produce a refresh token. The message is one line, safe to show
    (no secret, provider text scrubbed)."""


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def code_challenge(verifier: str) -> str:
    """RFC 7636 4.2, ``S256``: ``BASE64URL(SHA256(ASCII(verifier)))`` without padding."""
    return _b64url(hashlib.sha256(verifier.encode("ascii")).digest())


def is_loopback_host(host: str | None) -> bool:
    """True for ``localhost`` and addresses in 127.0.0.0/8 or ``::1``."""
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_endpoint_url(text: str) -> str:
    """``text`` if it is an https URL with a host, or an http one on loopback (a test
    server); raises ``ValueError`` saying what is wrong. An authorization code or a token
    must never travel in clear text over a network."""
    try:
        parts = urllib.parse.urlsplit(text.strip())
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise ValueError("is not a URL") from None
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not carry credentials")
    if parts.fragment:
        raise ValueError("must not have a #fragment")
    if parts.scheme == "https" and parts.hostname:
        return text.strip()
    if parts.scheme == "http" and is_loopback_host(parts.hostname):
        return text.strip()
    raise ValueError("must be an https:// URL (http:// only on 127.0.0.1, ::1 or localhost)")


@attrs.frozen(repr=False)
class SignInClient:
    """This installation as a client of one provider's authorization server."""

    provider: str
    client_id: str
    client_secret: Secret | None
    authorization_url: str
    token_url: str
    device_url: str | None
    scope: str
    extra: tuple[tuple[str, str], ...] = ()

    def __repr__(self) -> str:
        return f"SignInClient(provider={self.provider!r}, client_id={self.client_id!r})"

    def secrets(self) -> list[str]:
        """What of the client must be masked in whatever the provider says."""
        return [self.client_secret.reveal()] if self.client_secret is not None else []


@attrs.frozen(repr=False)
class Flow:
    """One authorization-code attempt's secrets: PKCE verifier and ``state``."""

    verifier: Secret
    state: Secret

    @property
    def challenge(self) -> str:
        return code_challenge(self.verifier.reveal())

    def __repr__(self) -> str:
        return "Flow(verifier=********, state=********)"


def new_flow(random_bytes: Callable[[int], bytes] = secrets.token_bytes) -> Flow:
    """Fresh secrets for one attempt: a 43-character verifier (RFC 7636 4.1, 256 bits)
    and a 32-character ``state`` (192 bits), both base64url."""
    return Flow(
        Secret(_b64url(random_bytes(VERIFIER_BYTES))), Secret(_b64url(random_bytes(STATE_BYTES)))
    )


def loopback_redirect_uri(port: int) -> str:
    """RFC 8252 7.3: the loopback IP literal, not ``localhost`` (which a resolver or a
    firewall may send elsewhere), with the listener's port."""
    return f"http://127.0.0.1:{port}"


def authorization_url(client: SignInClient, redirect_uri: str, flow: Flow) -> str:
    """The URL the user opens. The parameters of ``client.authorization_url``'s own query
    are kept; ours follow."""
    params = [
        ("response_type", "code"),
        ("client_id", client.client_id),
        ("redirect_uri", redirect_uri),
        ("scope", client.scope),
        ("state", flow.state.reveal()),
        ("code_challenge", flow.challenge),
        ("code_challenge_method", "S256"),
        *client.extra,
    ]
    parts = urllib.parse.urlsplit(client.authorization_url)
    query = "&".join(q for q in (parts.query, urllib.parse.urlencode(params)) if q)
    return urllib.parse.urlunsplit(parts._replace(query=query))


@attrs.frozen(repr=False)
class CallbackCode:
    """The redirect carried this attempt's ``state`` and a code."""

    code: Secret

    def __repr__(self) -> str:
        return "CallbackCode(code=********)"


@attrs.frozen
class CallbackRefused:
    """The redirect came, but it ends the attempt: the provider said no, or it is not
    the redirect of this attempt. ``message`` is safe to show."""

    message: str


@attrs.frozen
class NotTheCallback:
    """A request for something else (``/favicon.ico``): answer 404 and keep waiting."""


Callback = CallbackCode | CallbackRefused | NotTheCallback


def _error_text(code: object, description: object, scrubber: Scrubs) -> str:
    error = code if isinstance(code, str) and ERROR_CODE_RE.fullmatch(code) else "error"
    if isinstance(description, str) and description.strip():
        return f"{error}: {scrubber.scrub(description, 200)}"
    return error


def parse_callback(target: str, flow: Flow, *, scrubber: Scrubs = PLAIN) -> Callback:
    """Judge the request target (``/?code=..&state=..``) the browser sent to the loopback
    listener. Pure.

    Only ``/`` is the redirect. Its ``state`` must be this attempt's (constant-time
    compare) before anything else it says is believed, an ``error`` included: a page
    that knows the port could otherwise end or steer the sign-in. A redirect without a
    code, or with more than one, is refused.
    """
    path, _, query = target.partition("?")
    if path != "/":
        return NotTheCallback()
    try:
        fields = urllib.parse.parse_qs(query, keep_blank_values=True, strict_parsing=False)
    except ValueError:
        return CallbackRefused("the redirect's query could not be read")
    states = fields.get("state", [])
    expected = flow.state.reveal().encode("ascii")
    if len(states) != 1 or not hmac.compare_digest(states[0].encode("utf-8"), expected):
        return CallbackRefused(
            "the redirect did not carry this sign-in's state (a stale or forged "
            "redirect): nothing was exchanged; run the command again"
        )
    if "error" in fields:
        said = _error_text(
            fields["error"][0], (fields.get("error_description") or [""])[0], scrubber
        )
        return CallbackRefused(f"the provider refused the sign-in ({said})")
    codes = fields.get("code", [])
    if len(codes) != 1 or not codes[0] or len(codes[0]) > MAX_CODE_CHARS:
        return CallbackRefused("the redirect carried no usable code")
    return CallbackCode(Secret(codes[0]))


def _form(fields: list[tuple[str, str]]) -> bytes:
    return urllib.parse.urlencode(fields).encode("ascii")


def _client_fields(client: SignInClient) -> list[tuple[str, str]]:
    fields = [("client_id", client.client_id)]
    if client.client_secret is not None:
        fields.append(("client_secret", client.client_secret.reveal()))
    return fields


def code_exchange_body(client: SignInClient, code: Secret, redirect_uri: str, flow: Flow) -> bytes:
    """RFC 6749 4.1.3 with RFC 7636 4.5: the form that trades the code for tokens; the
    verifier proves this is the client that started the attempt. Holds secrets."""
    return _form(
        [
            ("grant_type", "authorization_code"),
            ("code", code.reveal()),
            ("redirect_uri", redirect_uri),
            ("code_verifier", flow.verifier.reveal()),
            *_client_fields(client),
        ]
    )


def refresh_token_of(provider: str, outcome: TokenGrant | TokenUnavailable) -> Secret:
    """The refresh token a successful token reply carries; :class:`SignInFailed` if the
    reply failed or holds none (Google sends one only with ``access_type=offline``,
    Microsoft only with the ``offline_access`` scope)."""
    if isinstance(outcome, TokenUnavailable):
        raise SignInFailed(str(outcome))
    if outcome.refresh_token is None:
        raise SignInFailed(
            f"{provider} token endpoint granted access but sent no refresh token "
            "(is offline access requested and allowed for this app?)"
        )
    return outcome.refresh_token


# ------------------------------------------------------------------ device authorization


def device_request_body(client: SignInClient) -> bytes:
    """RFC 8628 3.1: the device authorization request."""
    return _form([("client_id", client.client_id), ("scope", client.scope)])


@attrs.frozen(repr=False)
class DeviceAuthorization:
    """RFC 8628 3.2: what the user is told (``verification_uri``, ``user_code``) and what
    the client polls with (``device_code``)."""

    device_code: Secret
    user_code: str
    verification_uri: str
    expires_in: float
    interval: float

    def __repr__(self) -> str:
        return (
            f"DeviceAuthorization(user_code={self.user_code!r}, "
            f"verification_uri={self.verification_uri!r}, expires_in={self.expires_in!r}, "
            f"interval={self.interval!r})"
        )


def _seconds(value: object, default: float, low: float, high: float) -> float | None:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        return None
    return min(max(float(value), low), high)


def parse_device_authorization(
    provider: str, status: int, body: bytes, *, scrubber: Scrubs = PLAIN
) -> DeviceAuthorization:
    """Judge the device authorization reply; :class:`SignInFailed` if it is unusable.

    ``interval`` is held within [:data:`MIN_INTERVAL`, :data:`MAX_INTERVAL`] and
    ``expires_in`` at most :data:`MAX_DEVICE_EXPIRES_IN`, so a confused provider can
    neither make the client hammer it nor wait forever. The verification URI must be
    https (or loopback http); the user code is checked for shape, since both are shown.
    """
    what = f"{provider} device authorization endpoint"
    data = json_object(body)
    if not 200 <= status < 300:
        said = (
            _error_text(data.get("error"), data.get("error_description"), scrubber) if data else ""
        )
        raise SignInFailed(f"{what} answered {status}" + (f" ({said})" if said else ""))
    if data is None:
        raise SignInFailed(f"{what} answered {status} without a JSON object")
    device_code = data.get("device_code")
    user_code = data.get("user_code")
    # RFC 8628 says verification_uri; Google and older Microsoft replies say _url
    uri = data.get("verification_uri", data.get("verification_url"))
    if not isinstance(device_code, str) or not device_code or len(device_code) > MAX_CODE_CHARS:
        raise SignInFailed(f"{what} sent no usable device_code")
    if not isinstance(user_code, str) or not _USER_CODE_RE.fullmatch(user_code):
        raise SignInFailed(f"{what} sent no usable user_code")
    try:
        checked_uri = check_endpoint_url(uri) if isinstance(uri, str) else None
    except ValueError:
        checked_uri = None
    if checked_uri is None:
        raise SignInFailed(f"{what} sent no usable verification_uri")
    expires_in = _seconds(
        data.get("expires_in"), DEFAULT_DEVICE_EXPIRES_IN, 1.0, MAX_DEVICE_EXPIRES_IN
    )
    interval = _seconds(data.get("interval"), DEFAULT_INTERVAL, MIN_INTERVAL, MAX_INTERVAL)
    if expires_in is None or interval is None:
        raise SignInFailed(f"{what} sent an unusable expires_in or interval")
    return DeviceAuthorization(Secret(device_code), user_code, checked_uri, expires_in, interval)


def device_poll_body(client: SignInClient, device: DeviceAuthorization) -> bytes:
    """RFC 8628 3.4: one poll of the token endpoint. Holds secrets."""
    return _form(
        [
            ("grant_type", DEVICE_GRANT_TYPE),
            ("device_code", device.device_code.reveal()),
            *_client_fields(client),
        ]
    )


#: what one poll's reply means for the loop
PENDING: Final = "pending"
SLOW_DOWN: Final = "slow_down"
#: the endpoint could not answer now (5xx, 429, network): poll again, more slowly
TRANSIENT: Final = "transient"


@attrs.frozen
class PollAgain:
    """Not yet: :data:`PENDING`, :data:`SLOW_DOWN` or :data:`TRANSIENT`."""

    why: str


PollOutcome = TokenGrant | PollAgain | SignInFailed

#: RFC 8628 3.5 and Microsoft's names for a user who said no or a code that ran out
_DENIED: Final = frozenset({"access_denied", "authorization_declined"})
_EXPIRED: Final = frozenset({"expired_token", "code_expired"})


def classify_poll_reply(
    provider: str, status: int, headers: Mapping[str, str], body: bytes, *, scrubber: Scrubs = PLAIN
) -> PollOutcome:
    """What one poll's reply means (RFC 8628 3.5). Pure."""
    if status == 429 or status >= 500:
        return PollAgain(TRANSIENT)
    data = json_object(body) if not 200 <= status < 300 else None
    error = data.get("error") if data is not None else None
    if error == "authorization_pending":
        return PollAgain(PENDING)
    if error == "slow_down":
        return PollAgain(SLOW_DOWN)
    if error in _DENIED:
        return SignInFailed(f"the user declined the sign-in at {provider}")
    if error in _EXPIRED:
        return SignInFailed("the code expired before the user signed in; run the command again")
    outcome = parse_token_reply(provider, status, headers, body, scrubber=scrubber)
    if isinstance(outcome, TokenUnavailable):
        return SignInFailed(str(outcome))
    return outcome


@attrs.frozen
class PollSchedule:
    """When to poll next (RFC 8628 3.5): every ``interval`` seconds; ``slow_down`` adds
    :data:`SLOW_DOWN_STEP` for good; an endpoint that cannot answer doubles the wait (up
    to :data:`MAX_INTERVAL`). No poll is made after ``expires_at`` (the device code is
    dead then). Times are on one monotonic clock the caller chooses."""

    interval: float
    expires_at: float

    def after(self, why: str) -> PollSchedule:
        if why == SLOW_DOWN:
            return attrs.evolve(self, interval=min(self.interval + SLOW_DOWN_STEP, MAX_INTERVAL))
        if why == TRANSIENT:
            return attrs.evolve(self, interval=min(self.interval * 2, MAX_INTERVAL))
        return self

    def next_poll(self, now: float) -> float | None:
        """When the next poll goes out, or ``None`` if that would be past expiry."""
        at = now + self.interval
        return None if at >= self.expires_at else at


async def poll_device(
    poll: Callable[[], Awaitable[PollOutcome]], schedule: PollSchedule
) -> TokenGrant:
    """Poll until the user has signed in (the grant), declined or the code expired
    (:class:`SignInFailed`). The first poll waits one interval (RFC 8628 3.4: the user
    cannot have signed in yet). Times are :func:`trio.current_time`.

    Cancellation: stops at once; nothing is left behind (``poll`` owns its own I/O).
    """
    while True:
        at = schedule.next_poll(trio.current_time())
        if at is None:
            raise SignInFailed("the code expired before the user signed in; run the command again")
        await trio.sleep_until(at)
        outcome = await poll()
        if isinstance(outcome, SignInFailed):
            raise outcome
        if isinstance(outcome, PollAgain):
            schedule = schedule.after(outcome.why)
            continue
        return outcome
