"""Access tokens for OAuth2 connections: what a token source hands a session.

A session of an ``oauth2`` connection (:data:`trio_idle.accounts.connections.AUTH_OAUTH2`) asks a
:class:`TokenSource` for an :class:`AccessToken` before every (re)connect, and once more
with ``force=True`` after the server refused the token. Two sources implement it: the
backend's token endpoint (the default) and the daemon's own refresh-token flow.

Guarantees every source keeps: the token is a :class:`~trio_idle.core.secret.Secret` and never
appears in a log line, an error or a repr; :meth:`TokenSource.get` either returns a token
valid for at least ``min_validity`` seconds from now or raises :class:`TokenUnavailable`
within its own deadline (a backend that is down costs a running IDLE session nothing: only
new connects wait for tokens). Cancellation abandons the request; nothing is cached from a
cancelled fetch.
"""

from __future__ import annotations

from typing import Final, Protocol

import attrs

from trio_idle.accounts.connections import MailConnection
from trio_idle.core.secret import Secret

#: reasons a token could not be had, as account health reports them
TOKEN_UNAVAILABLE: Final = "token_unavailable"  # no grant for this connection (404/410)
TOKEN_REVOKED: Final = "token_revoked"  # the grant was revoked (invalid_grant)
TOKEN_ERROR: Final = "token_error"  # the source failed for now (5xx, 429, timeout): retried


@attrs.frozen(repr=False)
class AccessToken:
    """An OAuth2 access token. ``expires_at`` is epoch seconds; ``user`` overrides the
    SASL user (else the connection's login)."""

    token: Secret
    expires_at: float
    user: str | None = None
    #: where it came from, for ``check --login`` and logs ("backend", "google", ...)
    source: str = "backend"

    def __repr__(self) -> str:
        return f"AccessToken(token=********, expires_at={self.expires_at!r}, user={self.user!r})"


class TokenUnavailable(Exception):
    """No token now. ``reason`` is one of the ``TOKEN_*`` constants; the message is
    log-safe (no token, no refresh token, no client secret)."""

    def __init__(self, reason: str, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after = retry_after


class TokenSource(Protocol):
    """Where a connection's access tokens come from (see the module docstring)."""

    async def get(self, conn: MailConnection, *, force: bool = False) -> AccessToken:
        """A token valid for a few minutes at least; ``force``: the last one was refused,
        do not return it again."""
        ...
