"""Access tokens the daemon refreshes itself, for rows that carry an OAuth2 refresh token.

For deployments without a backend token endpoint (the file source, small setups): the row
holds the user's refresh token (``encryptedRefreshToken``, decrypted like the password),
the environment holds the daemon's client id and secret at each provider
(:class:`~trio_idle.core.config.OAuthSettings`), and :class:`RefreshingTokens` exchanges the one
for access tokens at the provider's token endpoint (RFC 6749 section 6)::

    POST <token url>      content-type: application/x-www-form-urlencoded
    grant_type=refresh_token&refresh_token=...&client_id=...&client_secret=...&scope=...

    200 {"access_token": "...", "expires_in": 3599, "token_type": "Bearer",
         "refresh_token": "..." (optional: the provider rotated it)}
    400 {"error": "invalid_grant", ...}   the grant is gone: the user must sign in again

Guarantees of :class:`RefreshingTokens` (on top of
:class:`~trio_idle.accounts.credentials.TokenSource`'s):

- one access token cached per connection, refreshed :data:`REFRESH_AHEAD` seconds before
  it expires; one refresh in flight per connection (concurrent callers wait for it and
  share its outcome, success or failure); refreshes of all connections together start no
  faster than ``TRIO_IDLE_OAUTH_RATE`` per second;
- a failed refresh is not retried before its backoff has passed (callers in between get
  the same :class:`~trio_idle.accounts.credentials.TokenUnavailable` at once, with
  ``retry_after``): 5xx, 429, timeouts and unreachable endpoints on the reconnect schedule,
  ``invalid_grant`` (:data:`~trio_idle.accounts.credentials.TOKEN_REVOKED`) on the slower
  authentication-failure schedule; a new refresh token in the row starts over at once;
  while the endpoint fails (not revoked), a cached token with more than :data:`MIN_LEFT`
  seconds left is still handed out (not for ``force``);
- rotation: when the provider hands out a new refresh token, the newest one is kept,
  encrypted with ``ENCRYPTION_KEY`` (the ``iv:tag:ct`` format), in the daemon's state
  store (:class:`~trio_idle.state.store.TokenBackend`) together with a fingerprint of the
  row's token it replaced, and used from then on, across restarts too. The row's token
  wins again as soon as it changes (the user signed in again in the app). The backend's
  tables are never written;
- the refresh token, the client secret and the access token never appear in a log line,
  an error or a repr; text from the provider is scrubbed of them and cut short;
- each request is bounded by ``TRIO_IDLE_OAUTH_TIMEOUT`` as a whole, its reply by
  :data:`MAX_REPLY_BYTES`; no redirects, no proxy from the environment unless
  ``TRIO_IDLE_HTTP_TRUST_ENV``.

Cancellation abandons a refresh in progress (nothing is cached from it), except that a
rotated refresh token already received is always kept in memory, and its write to the
store is shielded for at most :data:`STORE_WRITE_TIMEOUT` seconds.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import random
import re
import time
import urllib.parse
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

import attrs
import httpx
import trio
from loguru import logger

from trio_idle.accounts.credentials import (
    TOKEN_ERROR,
    TOKEN_REVOKED,
    TOKEN_UNAVAILABLE,
    AccessToken,
    TokenSource,
    TokenUnavailable,
)
from trio_idle.accounts.outcome_text import ConnectionSecrets
from trio_idle.accounts.providers import MICROSOFT_SCOPE
from trio_idle.backend.webhook import new_http_client, parse_retry_after, read_capped
from trio_idle.core.backoff import Backoff, BackoffPolicy
from trio_idle.core.crypto import DecryptionError, decrypt_password, derive_key, encrypt_password
from trio_idle.core.limiter import Pacer
from trio_idle.core.scrub import PLAIN, Scrubs
from trio_idle.core.secret import Secret
from trio_idle.state.store import StoredRefreshToken, TokenBackend, make_token_backend

if TYPE_CHECKING:
    from trio_idle.accounts.connections import MailConnection
    from trio_idle.core.config import OAuthSettings, Settings

GOOGLE: Final = "google"
MICROSOFT: Final = "microsoft"
#: email domains whose provider is known without a preset (:mod:`trio_idle.accounts.providers`
#: may replace this with its table)
PROVIDER_DOMAINS: Final[Mapping[str, str]] = {
    "gmail.com": GOOGLE,
    "googlemail.com": GOOGLE,
    "outlook.com": MICROSOFT,
    "hotmail.com": MICROSOFT,
    "live.com": MICROSOFT,
    "msn.com": MICROSOFT,
}

#: an access token is refreshed this many seconds before it expires
REFRESH_AHEAD: Final = 300.0
#: a token this close to expiry is not handed out even when no fresher one can be had
MIN_LEFT: Final = 60.0
#: what a reply without ``expires_in`` is taken to mean (RFC 6749 leaves it optional)
DEFAULT_EXPIRES_IN: Final = 3600.0
#: a longer ``expires_in`` is cut to this, so a confused provider cannot pin a token forever
MAX_EXPIRES_IN: Final = 86400.0
#: a token reply is a few KiB of JSON (a Microsoft JWT is the largest part)
MAX_REPLY_BYTES: Final = 64 * 1024
#: how long a rotated token's write to the store may hold up a cancellation
STORE_WRITE_TIMEOUT: Final = 5.0
#: error codes that mean the user has to sign in again (RFC 6749 5.2, Microsoft's additions)
REVOKED_ERRORS: Final = frozenset(
    {"invalid_grant", "invalid_scope", "interaction_required", "consent_required"}
)
_ERROR_CODE_RE: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")
#: what a SASL XOAUTH2 / OAUTHBEARER message can carry: visible ASCII, no spaces
_ACCESS_TOKEN_RE: Final = re.compile(r"[\x21-\x7e]{1,16384}")


def provider_for(provider: str | None, email: str) -> str | None:
    """Which provider's token endpoint serves a connection: its own ``provider`` if that
    is one the daemon can refresh at, else the one of its email domain, else ``None``.

    Pure. ``provider`` is :attr:`MailConnection.provider` (a preset name or the row's)."""
    if provider is not None and provider.strip().lower() in (GOOGLE, MICROSOFT):
        return provider.strip().lower()
    domain = email.rpartition("@")[2].strip().lower().rstrip(".")
    return PROVIDER_DOMAINS.get(domain)


@attrs.frozen
class ProviderClient:
    """The daemon as a client of one provider's token endpoint."""

    name: str
    token_url: str
    client_id: str
    #: ``None`` for a public client (Microsoft allows it; Google requires a secret)
    client_secret: Secret | None
    scope: str | None


def provider_clients(oauth: OAuthSettings) -> dict[str, ProviderClient]:
    """The providers the settings configure a client id for, by name."""
    clients: dict[str, ProviderClient] = {}
    if oauth.google_client_id:
        clients[GOOGLE] = ProviderClient(
            GOOGLE,
            oauth.google_token_url,
            oauth.google_client_id,
            oauth.google_client_secret,
            # Google keeps the scopes of the grant; asking again is allowed but not needed
            None,
        )
    if oauth.microsoft_client_id:
        clients[MICROSOFT] = ProviderClient(
            MICROSOFT,
            oauth.microsoft_url,
            oauth.microsoft_client_id,
            oauth.microsoft_client_secret,
            # v2.0 endpoints hand out a token for the scopes asked for, so ask for IMAP
            MICROSOFT_SCOPE,
        )
    return clients


def refresh_body(client: ProviderClient, refresh_token: str) -> bytes:
    """The form-encoded body of one refresh request. Pure; the result holds secrets."""
    fields = [
        ("grant_type", "refresh_token"),
        ("refresh_token", refresh_token),
        ("client_id", client.client_id),
    ]
    if client.client_secret is not None:
        fields.append(("client_secret", client.client_secret.reveal()))
    if client.scope is not None:
        fields.append(("scope", client.scope))
    return urllib.parse.urlencode(fields).encode("ascii")


@attrs.frozen(repr=False)
class TokenGrant:
    """A successful refresh: the access token, for how long, and the rotated refresh
    token if the provider sent one."""

    access_token: Secret
    expires_in: float
    refresh_token: Secret | None = None

    def __repr__(self) -> str:
        rotated = self.refresh_token is not None
        return (
            f"TokenGrant(access_token=********, expires_in={self.expires_in!r}, rotated={rotated})"
        )


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(body) if body else None
    except ValueError:  # also UnicodeDecodeError
        return None
    return data if isinstance(data, dict) else None


def _expires_in(value: object) -> float | None:
    """Seconds from ``expires_in`` (a number, or digits as some providers send), or
    ``None`` if unusable."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        value = int(value.strip()[:9])
    if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        return None
    return min(float(value), MAX_EXPIRES_IN)


def parse_token_reply(
    provider: str,
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    scrubber: Scrubs = PLAIN,
    now: float | None = None,
) -> TokenGrant | TokenUnavailable:
    """Judge a token endpoint's reply. Pure: the outcome is returned, not raised.

    ``scrubber`` masks the secrets of the request in whatever text of the reply is quoted
    (the provider's ``error_description``); header names are case-insensitive.
    """
    what = f"{provider} token endpoint"
    headers = {k.lower(): v for k, v in headers.items()}
    data = _json_object(body)
    if 200 <= status < 300:
        if data is None:
            return TokenUnavailable(TOKEN_ERROR, f"{what} answered {status} without a JSON object")
        access = data.get("access_token")
        if not isinstance(access, str) or not _ACCESS_TOKEN_RE.fullmatch(access):
            return TokenUnavailable(
                TOKEN_ERROR, f"{what} answered {status} without a usable access_token"
            )
        token_type = data.get("token_type")
        if token_type is not None and (
            not isinstance(token_type, str) or token_type.lower() != "bearer"
        ):
            return TokenUnavailable(
                TOKEN_ERROR,
                f"{what} answered token_type {PLAIN.scrub(repr(token_type), 40)}, not Bearer",
            )
        raw_expiry = data.get("expires_in")
        expires_in = DEFAULT_EXPIRES_IN if raw_expiry is None else _expires_in(raw_expiry)
        if expires_in is None:
            return TokenUnavailable(TOKEN_ERROR, f"{what} answered an unusable expires_in")
        refresh = data.get("refresh_token")
        rotated = Secret(refresh) if isinstance(refresh, str) and refresh.strip() else None
        return TokenGrant(Secret(access), expires_in, rotated)
    code = data.get("error") if data is not None else None
    error = code if isinstance(code, str) and _ERROR_CODE_RE.fullmatch(code) else None
    described = data.get("error_description") if data is not None else None
    detail = f"{error}: {scrubber.scrub(described, 160)}" if error and described else error
    said = f" ({detail})" if detail else ""
    if status == 429 or status >= 500:
        wait = parse_retry_after(headers.get("retry-after"), time.time() if now is None else now)
        return TokenUnavailable(TOKEN_ERROR, f"{what} answered {status}{said}", retry_after=wait)
    if error in REVOKED_ERRORS:
        return TokenUnavailable(
            TOKEN_REVOKED,
            f"{what} refused the refresh token{said}: the user must sign in again",
        )
    if error in ("invalid_client", "unauthorized_client"):
        name = provider.upper()
        return TokenUnavailable(
            TOKEN_ERROR,
            f"{what} rejected the client{said}: check TRIO_IDLE_{name}_CLIENT_ID and "
            f"TRIO_IDLE_{name}_CLIENT_SECRET",
        )
    return TokenUnavailable(TOKEN_ERROR, f"{what} answered {status}{said}")


def fingerprint_key(key: bytes) -> bytes:
    """The key of :func:`fingerprint`, derived from the AES key so neither reveals the other."""
    return hmac.new(key, b"trio-idle refresh-token fingerprint", hashlib.sha256).digest()


def fingerprint(fp_key: bytes, refresh_token: str) -> str:
    """Which row token a stored rotation replaced, without storing that token: a keyed
    hash (HMAC-SHA256, hex)."""
    return hmac.new(fp_key, refresh_token.encode("utf-8"), hashlib.sha256).hexdigest()


class RotatedTokens:
    """The newest refresh token of each connection whose provider rotated it.

    Loaded once from the store (on first use, retried until it worked); each rotation is
    kept in memory at once and written to the store straight away. A write that fails
    stays pending and is tried again before the connection's next refresh, so at worst
    the store is one rotation behind while it is down. Without a store (``state =
    none``) rotations last as long as the process.
    """

    def __init__(self, backend: TokenBackend | None, key: bytes) -> None:
        self.backend = backend
        self._key = key
        self._tokens: dict[str, StoredRefreshToken] = {}
        self._pending: dict[str, StoredRefreshToken] = {}
        self._loaded = backend is None
        self._load_lock = trio.Lock()
        self._warned_no_store = False
        self._load_failures = 0

    async def ensure_loaded(self) -> None:
        """Read the store once. Raises :class:`TokenUnavailable` (``token_error``) while
        it cannot be read: refreshing with the row's token instead could spend a token
        the provider has already replaced."""
        if self._loaded:
            return
        async with self._load_lock:
            if self._loaded or self.backend is None:
                return
            try:
                loaded = await self.backend.load_tokens()
            except Exception as exc:
                self._load_failures += 1
                # every connection's refresh tries again: one error line, then quieter
                log = logger.error if self._load_failures == 1 else logger.debug
                log(
                    f"[idle/oauth] cannot read the rotated refresh tokens "
                    f"({self.backend.name}): {type(exc).__name__}: {PLAIN.scrub(exc, 200)}"
                    + _migrate_hint(self.backend)
                )
                raise TokenUnavailable(
                    TOKEN_ERROR, f"cannot read the rotated refresh tokens ({self.backend.name})"
                ) from None
            # a rotation that happened before the load finished is newer than the store
            self._tokens = {**loaded, **self._tokens}
            self._loaded = True
            if loaded or self._load_failures:
                logger.info(f"[idle/oauth] loaded {len(loaded)} rotated refresh tokens")

    def current(self, conn_id: str, row_fingerprint: str) -> str | None:
        """The rotated token to use instead of the row's, or ``None`` (use the row's): none
        stored, or the row's token changed since (its fingerprint differs), or the stored
        one no longer decrypts (``ENCRYPTION_KEY`` changed)."""
        stored = self._tokens.get(conn_id)
        if stored is None or not hmac.compare_digest(stored.replaces, row_fingerprint):
            return None
        try:
            return decrypt_password(stored.encrypted, self._key)
        except DecryptionError as exc:
            logger.warning(
                f"[idle/oauth] connection {PLAIN.scrub(conn_id, 80)}: the stored rotated "
                f"refresh token does not decrypt ({exc}); using the row's"
            )
            return None

    async def keep(self, conn_id: str, refresh_token: str, row_fingerprint: str) -> None:
        """The provider rotated ``conn_id``'s token: use ``refresh_token`` from now on and
        write it to the store (shielded, at most :data:`STORE_WRITE_TIMEOUT` seconds)."""
        stored = StoredRefreshToken(
            encrypt_password(refresh_token, self._key), row_fingerprint, time.time()
        )
        self._tokens[conn_id] = stored
        if self.backend is None:
            if not self._warned_no_store:
                self._warned_no_store = True
                logger.warning(
                    "[idle/oauth] a provider rotated a refresh token and TRIO_IDLE_STATE=none: "
                    "the new one is kept only until the daemon stops"
                )
            return
        self._pending[conn_id] = stored
        with trio.CancelScope(shield=True), trio.move_on_after(STORE_WRITE_TIMEOUT):
            await self.flush(conn_id)

    async def flush(self, conn_id: str) -> bool:
        """Write ``conn_id``'s pending rotation, if any. False if it stays pending."""
        stored = self._pending.get(conn_id)
        if stored is None or self.backend is None:
            return True
        try:
            await self.backend.save_token(conn_id, stored)
        except Exception as exc:
            logger.error(
                f"[idle/oauth] connection {PLAIN.scrub(conn_id, 80)}: cannot store the "
                f"rotated refresh token ({self.backend.name}): {type(exc).__name__}: "
                f"{PLAIN.scrub(exc, 200)}; using it from memory, will retry"
                + _migrate_hint(self.backend)
            )
            return False
        if self._pending.get(conn_id) is stored:  # a newer rotation may have come meanwhile
            del self._pending[conn_id]
        return True


def _migrate_hint(backend: TokenBackend) -> str:
    return " (run `trio-idle db migrate`)" if backend.name == "postgres" else ""


@attrs.define(eq=False)
class _Entry:
    """One connection's cached token and refresh bookkeeping."""

    #: the row's refresh token this entry belongs to (a new one starts a new entry)
    row_fingerprint: str
    retry: Backoff
    revoked_retry: Backoff
    lock: trio.Lock = attrs.field(factory=trio.Lock)
    token: AccessToken | None = None
    #: counts successful refreshes, so a waiter can tell a fresh token from the one it had
    generation: int = 0
    failure: TokenUnavailable | None = None
    not_before: float = -math.inf


class RefreshingTokens:
    """:class:`~trio_idle.accounts.credentials.TokenSource` of connections with a refresh token:
    the daemon refreshes at the provider itself (guarantees in the module docstring).

    ``transport`` replaces httpx's network transport (tests); ``wall`` is the clock of
    token expiry (epoch seconds), trio's clock paces backoff. :meth:`aclose` closes the
    HTTP client.
    """

    #: how ``check --login`` names this source
    name: Final = "the provider (daemon-side refresh)"

    def __init__(
        self,
        oauth: OAuthSettings,
        *,
        key: bytes,
        backend: TokenBackend | None,
        retry: BackoffPolicy,
        revoked_retry: BackoffPolicy,
        trust_env: bool = False,
        refresh_ahead: float = REFRESH_AHEAD,
        transport: httpx.AsyncBaseTransport | None = None,
        wall: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.clients: Final = provider_clients(oauth)
        self.rotated = RotatedTokens(backend, key)
        self._fp_key = fingerprint_key(key)
        self._retry = retry
        self._revoked_retry = revoked_retry
        self._timeout = oauth.oauth_timeout
        self._pacer = Pacer(oauth.oauth_rate)
        self._refresh_ahead = refresh_ahead
        self._wall = wall
        self._rng = rng or random.Random()
        self._entries: dict[str, _Entry] = {}
        # the provider gets the same client shape as the backend: explicit timeouts, no
        # redirects, no compression (the reply cap counts wire bytes), no env proxies
        self._http = new_http_client(self._timeout, 20, trust_env, transport)

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        env: Mapping[str, str],
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> RefreshingTokens:
        """The source the settings describe; rotations go to the state store's file or
        database (:func:`~trio_idle.state.store.make_token_backend`)."""
        key = derive_key(
            settings.connections.encryption_key.reveal(), settings.connections.key_derivation
        )
        return cls(
            settings.oauth,
            key=key,
            backend=make_token_backend(settings, env),
            retry=BackoffPolicy(settings.backoff.backoff_initial, settings.backoff.backoff_max),
            revoked_retry=BackoffPolicy(
                settings.backoff.auth_backoff, settings.backoff.auth_backoff_max
            ),
            trust_env=settings.webhook.http_trust_env,
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    def cached(self, conn_id: str) -> AccessToken | None:
        """The access token held for ``conn_id`` now, if any (no I/O)."""
        entry = self._entries.get(conn_id)
        return None if entry is None else entry.token

    def _client_for(self, conn: MailConnection) -> ProviderClient:
        name = provider_for(conn.provider, conn.email)
        if name is None:
            raise TokenUnavailable(
                TOKEN_UNAVAILABLE,
                "the daemon cannot refresh this connection's token: its provider is not "
                f"known (supported: {GOOGLE}, {MICROSOFT})",
            )
        client = self.clients.get(name)
        if client is None:
            raise TokenUnavailable(
                TOKEN_UNAVAILABLE,
                f"the daemon cannot refresh {name} tokens: TRIO_IDLE_{name.upper()}_CLIENT_ID "
                "is not set",
            )
        return client

    def _fresh(self, token: AccessToken | None) -> bool:
        return token is not None and token.expires_at - self._wall() > self._refresh_ahead

    def _usable(self, token: AccessToken | None) -> bool:
        return token is not None and token.expires_at - self._wall() > MIN_LEFT

    def _entry(self, conn_id: str, row_fingerprint: str) -> _Entry:
        entry = self._entries.get(conn_id)
        if entry is None or entry.row_fingerprint != row_fingerprint:
            # New connection, or the user signed in again: nothing learnt from the old
            # token (a revocation, a backoff) applies to the new one.
            entry = self._entries[conn_id] = _Entry(
                row_fingerprint,
                Backoff(self._retry, self._rng),
                Backoff(self._revoked_retry, self._rng),
            )
        return entry

    def forget(self, conn_id: str) -> None:
        """Drop ``conn_id``'s cached token and backoff (the connection left the list)."""
        self._entries.pop(conn_id, None)

    async def get(self, conn: MailConnection, *, force: bool = False) -> AccessToken:
        """A token valid for more than :data:`REFRESH_AHEAD` seconds where the provider
        grants that long; ``force``: refresh even if the cached one looks valid (unless a
        refresh finished while this call waited for it). Raises :class:`TokenUnavailable`
        (reason and a log-safe message)."""
        if conn.refresh_token is None or not conn.refresh_token:
            raise TokenUnavailable(TOKEN_UNAVAILABLE, "the connection has no refresh token")
        client = self._client_for(conn)
        row_fp = fingerprint(self._fp_key, conn.refresh_token.reveal())
        entry = self._entry(conn.id, row_fp)
        seen = entry.generation
        if not force and self._fresh(entry.token):
            await trio.lowlevel.checkpoint()
            assert entry.token is not None
            return entry.token
        async with entry.lock:
            if self._fresh(entry.token) and (not force or entry.generation != seen):
                assert entry.token is not None
                return entry.token
            wait = entry.not_before - trio.current_time()
            if entry.failure is not None and wait > 0:
                if not force and self._usable(entry.token):
                    assert entry.token is not None
                    return entry.token
                raise TokenUnavailable(entry.failure.reason, str(entry.failure), retry_after=wait)
            try:
                return await self._refresh(conn, client, entry)
            except TokenUnavailable as exc:
                # The provider is down for now: a token that is still good for a while
                # serves this connect (and costs a running session nothing).
                if exc.reason == TOKEN_ERROR and not force and self._usable(entry.token):
                    assert entry.token is not None
                    return entry.token
                raise

    async def _refresh(
        self, conn: MailConnection, client: ProviderClient, entry: _Entry
    ) -> AccessToken:
        assert conn.refresh_token is not None
        await self.rotated.ensure_loaded()
        await self.rotated.flush(conn.id)
        row_token = conn.refresh_token.reveal()
        refresh_token = self.rotated.current(conn.id, entry.row_fingerprint) or row_token
        secret = client.client_secret.reveal() if client.client_secret is not None else None
        scrubber = ConnectionSecrets.of(conn, refresh_token, secret)
        await self._pacer.wait()
        outcome = await self._post(client, refresh_body(client, refresh_token), scrubber)
        if isinstance(outcome, TokenUnavailable):
            self._failed(conn, entry, outcome)
            raise outcome
        token = AccessToken(
            outcome.access_token, self._wall() + outcome.expires_in, source=client.name
        )
        new_refresh = outcome.refresh_token
        if new_refresh is not None and new_refresh.reveal() != refresh_token:
            await self.rotated.keep(conn.id, new_refresh.reveal(), entry.row_fingerprint)
            logger.info(
                f"[idle/{PLAIN.scrub(conn.label, 120)}] {client.name} rotated the refresh "
                "token; the new one is kept (encrypted) in the state store"
            )
        entry.token = token
        entry.generation += 1
        entry.failure = None
        entry.not_before = -math.inf
        entry.retry.succeeded()
        entry.revoked_retry.succeeded()
        logger.debug(
            f"[idle/{PLAIN.scrub(conn.label, 120)}] {client.name} access token refreshed, "
            f"valid for {outcome.expires_in:.0f}s"
        )
        return token

    def _failed(self, conn: MailConnection, entry: _Entry, failure: TokenUnavailable) -> None:
        revoked = failure.reason == TOKEN_REVOKED
        delay = (entry.revoked_retry if revoked else entry.retry).next_delay()
        if failure.retry_after is not None:
            delay = max(delay, failure.retry_after)
        failure.retry_after = delay
        entry.failure = failure
        entry.not_before = trio.current_time() + delay
        if revoked:
            entry.token = None  # whatever it was, its grant is gone
        logger.debug(
            f"[idle/{PLAIN.scrub(conn.label, 120)}] token refresh failed ({failure.reason}): "
            f"{failure}; next attempt in {delay:.0f}s at the earliest"
        )

    async def _post(
        self, client: ProviderClient, body: bytes, scrubber: Scrubs
    ) -> TokenGrant | TokenUnavailable:
        """One request. Never raises for network trouble or a bad reply: those are
        ``token_error`` outcomes. The whole attempt is bounded by the timeout."""
        what = f"{client.name} token endpoint"
        headers = {
            "content-type": "application/x-www-form-urlencoded",
            "accept": "application/json",
        }
        with trio.move_on_after(self._timeout):
            try:
                async with self._http.stream(
                    "POST", client.token_url, content=body, headers=headers
                ) as response:
                    reply = await read_capped(response, MAX_REPLY_BYTES)
                    if reply is None:
                        return TokenUnavailable(
                            TOKEN_ERROR,
                            f"{what} sent a reply larger than {MAX_REPLY_BYTES // 1024} KiB",
                        )
                    return parse_token_reply(
                        client.name,
                        response.status_code,
                        response.headers,
                        reply,
                        scrubber=scrubber,
                    )
            except httpx.TimeoutException:
                pass  # the same outcome as the trio deadline below
            except httpx.ConnectError as exc:
                return TokenUnavailable(
                    TOKEN_ERROR, f"{what} unreachable ({scrubber.scrub(_first_text(exc), 120)})"
                )
            except httpx.HTTPError as exc:
                return TokenUnavailable(
                    TOKEN_ERROR, f"{what}: request failed ({type(exc).__name__})"
                )
        return TokenUnavailable(TOKEN_ERROR, f"{what} did not answer within {self._timeout:g}s")


def _first_text(exc: BaseException) -> str:
    # httpx wraps the real error (refused, TLS) in one without text
    cause: BaseException | None = exc
    while cause is not None and not str(cause):
        cause = cause.__cause__ or cause.__context__
    text = str(cause) if cause is not None else type(exc).__name__
    return "connection refused" if "refused" in text.lower() else text


class PerConnectionTokens:
    """The daemon's :class:`~trio_idle.accounts.credentials.TokenSource`: a connection whose row
    carries a refresh token gets its tokens from ``refreshing`` (the daemon refreshes
    them itself), every other one from ``fallback`` (the backend's token endpoint).

    Without a fallback, a connection without a refresh token gets
    :class:`TokenUnavailable` (``token_unavailable``). :meth:`aclose` closes both.
    """

    def __init__(self, refreshing: TokenSource, fallback: TokenSource | None) -> None:
        self.refreshing = refreshing
        self.fallback = fallback

    def source_for(self, conn: MailConnection) -> TokenSource | None:
        """Which source serves ``conn`` (``None``: none can)."""
        if conn.refresh_token is not None and conn.refresh_token:
            return self.refreshing
        return self.fallback

    async def get(self, conn: MailConnection, *, force: bool = False) -> AccessToken:
        source = self.source_for(conn)
        if source is None:
            raise TokenUnavailable(
                TOKEN_UNAVAILABLE,
                "the row has no refresh token and no backend token endpoint is configured",
            )
        return await source.get(conn, force=force)

    async def aclose(self) -> None:
        for source in (self.refreshing, self.fallback):
            close = getattr(source, "aclose", None)
            if close is not None:
                await close()
