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
  store (:class:`~trio_idle.state.records.TokenBackend`) together with a fingerprint of the
  row's token it replaced, and used from then on, across restarts too. The row's token
  wins again as soon as it changes (the user signed in again in the app). The backend's
  tables are never written;
- the refresh token, the client secret and the access token never appear in a log line,
  an error or a repr; text from the provider is scrubbed of them and cut short;
- each request is bounded by ``TRIO_IDLE_OAUTH_TIMEOUT`` as a whole (its phases too: the
  connect by at most 10 s; a failure names the limit that fired), its reply by
  :data:`MAX_REPLY_BYTES`; no redirects, no proxy from the environment unless
  ``TRIO_IDLE_HTTP_TRUST_ENV`` (the plumbing is :class:`~trio_idle.backend.client.HttpClient`'s;
  a provider's endpoint is not the backend, so these requests feed no backend watch).

Cancellation abandons a refresh in progress (nothing is cached from it), except that a
rotated refresh token already received is always kept in memory, and its write to the
store is shielded for at most :data:`~trio_idle.auth.rotation.STORE_WRITE_TIMEOUT` seconds
(the rotation store: :mod:`trio_idle.auth.rotation`).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Final

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
from trio_idle.auth.oauth_provider import (
    GOOGLE,
    MAX_REPLY_BYTES,
    MICROSOFT,
    ProviderClient,
    TokenGrant,
    parse_token_reply,
    provider_clients,
    provider_for,
    refresh_body,
)
from trio_idle.auth.rotation import RotatedTokens, fingerprint, fingerprint_key
from trio_idle.backend.client import HttpClient, HttpFailure, Limits, Timeouts
from trio_idle.core.backoff import Backoff, BackoffPolicy
from trio_idle.core.crypto import derive_key
from trio_idle.core.limiter import Pacer
from trio_idle.core.scrub import PLAIN, Scrubs
from trio_idle.core.stats import Stats
from trio_idle.state.backends import make_token_backend
from trio_idle.state.records import TokenBackend

if TYPE_CHECKING:
    from trio_idle.accounts.connections import MailConnection
    from trio_idle.core.config import OAuthSettings, Settings

#: an access token is refreshed this many seconds before it expires
REFRESH_AHEAD: Final = 300.0
#: a token this close to expiry is not handed out even when no fresher one can be had
MIN_LEFT: Final = 60.0
#: refresh requests in flight at once, over all providers and connections
MAX_REFRESHES_IN_FLIGHT: Final = 20


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
        stats: Stats | None = None,
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
        # the provider gets the same client as the backend: explicit timeouts, no
        # redirects, no compression (the reply cap counts wire bytes), no env proxies
        self._http = HttpClient(
            timeouts=Timeouts.within(self._timeout),
            limits=Limits(MAX_REFRESHES_IN_FLIGHT, max_reply_bytes=MAX_REPLY_BYTES),
            trust_env=trust_env,
            transport=transport,
            stats=stats,
        )

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        env: Mapping[str, str],
        *,
        stats: Stats | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> RefreshingTokens:
        """The source the settings describe; rotations go to the state store's file or
        database (:func:`~trio_idle.state.backends.make_token_backend`)."""
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
            stats=stats,
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
        ``token_error`` outcomes. The whole attempt is bounded by the timeout; its text
        names the limit that fired."""
        what = f"{client.name} token endpoint"
        headers = {
            "content-type": "application/x-www-form-urlencoded",
            "accept": "application/json",
        }
        outcome = await self._http.request("POST", client.token_url, content=body, headers=headers)
        if isinstance(outcome, HttpFailure):
            # the text names no secret (nor the URL); the scrubber makes sure of the first
            return TokenUnavailable(TOKEN_ERROR, scrubber.scrub(outcome.text(what), 240))
        return parse_token_reply(
            client.name, outcome.status, outcome.headers, outcome.body, scrubber=scrubber
        )


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
