"""Access tokens from the backend's token endpoint: the default :class:`TokenSource`.

Contract (``/work``'s shared contracts, section 1): ``POST {BACKEND_URL}{token_path}``
(``TRIO_IDLE_TOKEN_PATH``, default ``/api/mail/imap-token-internal``) with the same secret
header and optional ``x-signature`` as the scan webhook, body ``{"connectionId",
"userId", "email", "force"}`` (``force``: the last token was refused, mint a new one).
A 2xx reply is ``{"accessToken", "expiresAt" (ISO-8601 or epoch seconds), "user"?}``;
404/410: the backend holds no grant for the connection (``token_unavailable``); 5xx,
429 (``Retry-After``), timeouts and refused connections: ``token_error``, which the
session retries with its normal backoff.

:func:`interpret_token_reply` judges a reply and is pure (tested with plain values);
:class:`BackendTokenSource` sends the requests and caches tokens;
:func:`make_token_source` is where the daemon gets its source (one place, so that other
sources can wrap or replace this one).

Guarantees of :class:`BackendTokenSource`:

- a token is returned only if it is valid for at least ``refresh_ahead`` seconds more
  (a cached one closer to its expiry is replaced first), so every (re)connect signs in
  with a token that outlives the sign-in;
- one request in flight per connection (callers for the same connection wait for it and
  share its token); at most ``concurrency`` requests in flight in all (a slow endpoint
  holds those slots, never the IMAP connect slots: sessions fetch before connecting);
- each request is bounded by ``token_timeout`` in total (its phases too: the connect by
  at most 10 s; a failure names the limit that fired); a reply larger than
  :data:`MAX_TOKEN_REPLY_BYTES` fails it unread; the requests go over an
  :class:`~trio_idle.backend.client.HttpClient` that feeds the backend watch;
- the token never appears in an error, a log line or a repr (it is a
  :class:`~trio_idle.core.secret.Secret` from the moment it is parsed);
- cancellation abandons the request; nothing is cached from it.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, ClassVar, Final

import attrs
import httpx
import trio

from trio_idle.accounts.connections import MailConnection
from trio_idle.accounts.credentials import (
    TOKEN_ERROR,
    TOKEN_UNAVAILABLE,
    AccessToken,
    TokenSource,
    TokenUnavailable,
)
from trio_idle.auth.token_refresh import PerConnectionTokens, RefreshingTokens
from trio_idle.backend.client import HttpClient, HttpFailure
from trio_idle.backend.watch import BackendWatch
from trio_idle.backend.webhook import BackendAuth, backend_http, parse_retry_after
from trio_idle.core.scrub import escape_controls
from trio_idle.core.secret import Secret
from trio_idle.core.stats import Stats

if TYPE_CHECKING:
    from trio_idle.core.config import Settings, WebhookSettings

#: a token reply is a JWT or an opaque string and a date: a few KiB at most
MAX_TOKEN_REPLY_BYTES: Final = 64 * 1024
MAX_TOKEN_CHARS: Final = 16 * 1024
MAX_USER_CHARS: Final = 320
#: token requests in flight towards the backend at once, over all connections
DEFAULT_TOKEN_CONCURRENCY: Final = 8
#: ``expiresAt`` numbers above this are milliseconds (JavaScript's ``Date.now()``), not
#: seconds: as seconds they would lie past the year 5000
_MILLISECONDS_FROM: Final = 1e11
SOURCE_NAME: Final = "backend"


def request_body(conn: MailConnection, *, force: bool) -> bytes:
    """The JSON body of a token request for ``conn``."""
    return json.dumps(
        {"connectionId": conn.id, "userId": conn.user_id, "email": conn.email, "force": force},
        separators=(",", ":"),
    ).encode()


def parse_expiry(value: object) -> float | None:
    """``expiresAt`` → epoch seconds: a number (seconds, or milliseconds when it is too
    large to be seconds) or an ISO-8601 date (UTC when it names no zone). ``None`` when
    unusable (booleans, NaN, infinities, other text)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        seconds = float(value)
        if not math.isfinite(seconds) or seconds <= 0:
            return None
        return seconds / 1000.0 if seconds > _MILLISECONDS_FROM else seconds
    if isinstance(value, str) and 0 < len(value) <= 64:
        text = value.strip()
        if text.isascii() and text.replace(".", "", 1).isdigit():
            return parse_expiry(float(text))
        try:
            when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.UTC)
        return when.timestamp()
    return None


def interpret_token_reply(
    status: int, headers: Mapping[str, str], body: bytes, *, now: float
) -> AccessToken | TokenUnavailable:
    """Judge a token endpoint reply (pure; ``now`` is epoch seconds). Never raises:
    a problem is a :class:`TokenUnavailable` value with a log-safe message."""
    headers = {k.lower(): v for k, v in headers.items()}
    if 200 <= status < 300:
        return _parse_token(status, body, now)
    if status in (404, 410):
        return TokenUnavailable(
            TOKEN_UNAVAILABLE, f"backend has no OAuth2 grant for this connection ({status})"
        )
    if status == 429 or status >= 500:
        wait = parse_retry_after(headers.get("retry-after"), now)
        what = "429 (rate limited)" if status == 429 else str(status)
        return TokenUnavailable(TOKEN_ERROR, f"token endpoint answered {what}", retry_after=wait)
    if status in (401, 403):
        return TokenUnavailable(
            TOKEN_ERROR,
            f"token endpoint answered {status}: the backend rejected ADMIN_SECRET "
            "(check that it matches the backend's)",
        )
    return TokenUnavailable(TOKEN_ERROR, f"token endpoint answered {status}")


def _parse_token(status: int, body: bytes, now: float) -> AccessToken | TokenUnavailable:
    try:
        data = json.loads(body) if body else None
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return TokenUnavailable(TOKEN_ERROR, f"token endpoint answered {status} without JSON")
    token = data.get("accessToken")
    if not isinstance(token, str) or not token:
        return TokenUnavailable(TOKEN_ERROR, "token endpoint reply has no accessToken")
    if len(token) > MAX_TOKEN_CHARS or escape_controls(token) != token or " " in token:
        return TokenUnavailable(
            TOKEN_ERROR, "token endpoint reply's accessToken is not a usable token"
        )
    expires_at = parse_expiry(data.get("expiresAt"))
    if expires_at is None:
        return TokenUnavailable(TOKEN_ERROR, "token endpoint reply has no usable expiresAt")
    if expires_at <= now:
        return TokenUnavailable(TOKEN_ERROR, "token endpoint returned an expired token")
    user = data.get("user")
    if not isinstance(user, str) or not user.strip():
        user = None
    elif len(user) > MAX_USER_CHARS or escape_controls(user) != user:
        return TokenUnavailable(TOKEN_ERROR, "token endpoint reply's user is not usable")
    return AccessToken(Secret(token), expires_at, user, source=SOURCE_NAME)


@attrs.define(eq=False, repr=False)
class BackendTokenSource:
    """Tokens from the backend's endpoint, cached per connection (see the module doc).

    ``http`` is the client of the backend the requests go over (:func:`token_http`: its
    limiter is the ``concurrency`` bound, its watch the backend's); ``now`` is the wall
    clock tokens' expiry is compared with (``time.time``; tests pass their own). Call
    :meth:`aclose` when done (it closes ``http``).
    """

    name: ClassVar[str] = SOURCE_NAME

    url: str
    auth: BackendAuth
    http: HttpClient
    refresh_ahead: float = attrs.field(kw_only=True)
    _now: Callable[[], float] = attrs.field(default=time.time, kw_only=True)
    _cache: dict[str, AccessToken] = attrs.field(factory=dict, init=False)
    _locks: dict[str, trio.Lock] = attrs.field(factory=dict, init=False)
    _sweep_at: int = attrs.field(default=64, init=False)
    #: requests sent (for tests and ``check``)
    requests: int = attrs.field(default=0, init=False)

    @classmethod
    def from_settings(
        cls,
        webhook: WebhookSettings,
        *,
        watch: BackendWatch | None = None,
        stats: Stats | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> BackendTokenSource:
        http = token_http(
            webhook.token_timeout,
            trust_env=webhook.http_trust_env,
            watch=watch,
            stats=stats,
            transport=transport,
        )
        return cls(
            webhook.token_url,
            BackendAuth.from_settings(webhook),
            http,
            refresh_ahead=webhook.token_refresh_ahead,
        )

    async def aclose(self) -> None:
        await self.http.aclose()

    def _usable(self, token: AccessToken | None) -> bool:
        return token is not None and token.expires_at - self._now() >= self.refresh_ahead

    async def get(self, conn: MailConnection, *, force: bool = False) -> AccessToken:
        """A token for ``conn`` valid for ``refresh_ahead`` more seconds: the cached one,
        else a fresh one from the backend (``force``: always a fresh one, minted anew).
        Raises :class:`TokenUnavailable` (log-safe) within ``token_timeout`` of the
        request starting (waiting for a slot comes first)."""
        if not force and self._usable(cached := self._cache.get(conn.id)):
            assert cached is not None
            await trio.lowlevel.checkpoint()
            return cached
        lock = self._locks.setdefault(conn.id, trio.Lock())
        try:
            async with lock:
                # another caller may have fetched while this one waited (never for force:
                # the caller saw a token refused and must not get it again)
                if not force and self._usable(cached := self._cache.get(conn.id)):
                    assert cached is not None
                    return cached
                token = await self._fetch(conn, force=force)
                self._store(conn.id, token)
                return token
        finally:
            if not lock.locked() and self._locks.get(conn.id) is lock:
                del self._locks[conn.id]

    def forget(self, conn_id: str) -> None:
        """Drop ``conn_id``'s cached token (e.g. the connection was removed)."""
        self._cache.pop(conn_id, None)

    def _store(self, conn_id: str, token: AccessToken) -> None:
        self._cache[conn_id] = token
        if len(self._cache) >= self._sweep_at:
            # connections come and go: tokens of removed ones expire and are dropped here
            now = self._now()
            for key in [k for k, t in self._cache.items() if t.expires_at <= now]:
                del self._cache[key]
            self._sweep_at = 2 * len(self._cache) + 64

    async def _fetch(self, conn: MailConnection, *, force: bool) -> AccessToken:
        self.requests += 1
        body = request_body(conn, force=force)
        outcome = await self.http.request(
            "POST", self.url, content=body, headers=self.auth.headers(body)
        )
        if isinstance(outcome, HttpFailure):
            raise TokenUnavailable(TOKEN_ERROR, outcome.text("token endpoint"))
        result = interpret_token_reply(
            outcome.status, outcome.headers, outcome.body, now=self._now()
        )
        if isinstance(result, TokenUnavailable):
            raise result
        return result


def token_http(
    total_timeout: float,
    *,
    concurrency: int = DEFAULT_TOKEN_CONCURRENCY,
    trust_env: bool = False,
    watch: BackendWatch | None = None,
    stats: Stats | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> HttpClient:
    """The client of the backend's token endpoint: no request outlasts ``total_timeout``
    (``TRIO_IDLE_TOKEN_TIMEOUT``), ``concurrency`` in flight, replies capped at
    :data:`MAX_TOKEN_REPLY_BYTES`, every request feeding ``watch``."""
    return backend_http(
        total_timeout,
        concurrency,
        max_reply_bytes=MAX_TOKEN_REPLY_BYTES,
        trust_env=trust_env,
        watch=watch,
        stats=stats,
        transport=transport,
    )


def make_token_source(
    settings: Settings,
    env: Mapping[str, str] | None = None,
    *,
    watch: BackendWatch | None = None,
    stats: Stats | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> PerConnectionTokens:
    """The daemon's token source for ``oauth2`` connections — the one place it is chosen:
    rows with a refresh token get tokens the daemon refreshes at the provider itself
    (:class:`~trio_idle.auth.token_refresh.RefreshingTokens`, rotations kept in the state
    store), every other row gets them from the backend's endpoint, whose requests feed
    ``watch`` (the backend's, shared with the scan webhook). ``env`` (default
    ``os.environ``) locates the state store; ``stats`` counts stale-connection retries."""
    refreshing = RefreshingTokens.from_settings(
        settings, os.environ if env is None else env, stats=stats, transport=transport
    )
    backend = BackendTokenSource.from_settings(
        settings.webhook, watch=watch, stats=stats, transport=transport
    )
    return PerConnectionTokens(refreshing, backend)


def _is_token_source(source: BackendTokenSource) -> TokenSource:
    return source  # mypy checks that BackendTokenSource implements the protocol
