"""A provider's OAuth2 token endpoint, as pure code: which provider serves an account, the
refresh request's body, and what the reply means (a grant, a revoked grant, a failure to
retry). No I/O: :mod:`trio_idle.auth.token_refresh` sends the requests and caches the
tokens; ``trio-idle oauth authorize`` (:mod:`trio_idle.oauth_commands`) reads replies the
same way.

Guarantees: :func:`parse_token_reply` never raises for what a provider sends (a reply it
cannot read is a :class:`~trio_idle.accounts.credentials.TokenUnavailable`); an access
token, refresh token or client secret never appears in its texts (they are scrubbed and
cut short); sizes and expiry times are bounded.
"""

from __future__ import annotations

import json
import math
import re
import time
import urllib.parse
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

import attrs

from trio_idle.accounts.credentials import (
    TOKEN_ERROR,
    TOKEN_REVOKED,
    TokenUnavailable,
)
from trio_idle.accounts.providers import MICROSOFT_SCOPE, preset_for
from trio_idle.backend.webhook import parse_retry_after
from trio_idle.core.scrub import PLAIN, Scrubs
from trio_idle.core.secret import Secret

if TYPE_CHECKING:
    from trio_idle.core.config import OAuthSettings


GOOGLE: Final = "google"
MICROSOFT: Final = "microsoft"
#: the token endpoint of each provider preset whose accounts the daemon can refresh
#: (the presets' table, :mod:`trio_idle.accounts.providers`, knows their email domains)
TOKEN_PROVIDER_OF_PRESET: Final[Mapping[str, str]] = {"gmail": GOOGLE, "microsoft": MICROSOFT}

#: what a reply without ``expires_in`` is taken to mean (RFC 6749 leaves it optional)
DEFAULT_EXPIRES_IN: Final = 3600.0
#: a longer ``expires_in`` is cut to this, so a confused provider cannot pin a token forever
MAX_EXPIRES_IN: Final = 86400.0
#: a token reply is a few KiB of JSON (a Microsoft JWT is the largest part)
MAX_REPLY_BYTES: Final = 64 * 1024
#: error codes that mean the user has to sign in again (RFC 6749 5.2, Microsoft's additions)
REVOKED_ERRORS: Final = frozenset(
    {"invalid_grant", "invalid_scope", "interaction_required", "consent_required"}
)
#: the shape of an OAuth2 ``error`` code a message may quote (anything else is not quoted)
ERROR_CODE_RE: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")
#: what a SASL XOAUTH2 / OAUTHBEARER message can carry: visible ASCII, no spaces
_ACCESS_TOKEN_RE: Final = re.compile(r"[\x21-\x7e]{1,16384}")


def provider_for(provider: str | None, email: str) -> str | None:
    """Which provider's token endpoint serves a connection: its own ``provider`` if that
    is one the daemon can refresh at, else the one of its email domain, else ``None``.

    Pure. ``provider`` is :attr:`MailConnection.provider` (a preset name or the row's)."""
    if provider is not None and provider.strip().lower() in (GOOGLE, MICROSOFT):
        return provider.strip().lower()
    return TOKEN_PROVIDER_OF_PRESET.get(preset_for(email, None).name)


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


def json_object(body: bytes) -> dict[str, Any] | None:
    """``body`` as a JSON object, or ``None`` (not JSON, not UTF-8, not an object)."""
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
    data = json_object(body)
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
    error = code if isinstance(code, str) and ERROR_CODE_RE.fullmatch(code) else None
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
