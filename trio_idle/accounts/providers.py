"""Provider presets: what is known about the mail providers users actually have, as data.

One frozen :class:`Preset` per provider (server, security, sign-in methods, documented
limits, how long it keeps an idle connection, the server texts that name a reason), and
two pure lookups the rest of the daemon uses:

* :func:`preset_for` — which preset a mailbox belongs to, by its IMAP host, or by its
  email domain when the row names no host;
* :func:`classify_server_text` — which reason code a server's reply text means.

The presets of providers that grant IMAP access tokens also carry where and how a user
signs in (:class:`OAuthEndpoints`, :func:`oauth_endpoints`; ``trio-idle oauth authorize``).

There is no code path per provider: everything provider-specific is a field here, and
every fact is sourced in ``docs/providers.md`` (a fact without a public source is left
at the generic default). Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Final

import attrs

from trio_idle.core.config import GOOGLE_TOKEN_URL, MICROSOFT_TOKEN_URL
from trio_idle.core.host_pacing import GENERIC_KEY, HostRates

if TYPE_CHECKING:
    from trio_idle.core.config import LimitSettings, TimerSettings

# sign-in methods a provider accepts
PASSWORD: Final = "password"
APP_PASSWORD: Final = "app_password"
OAUTH2: Final = "oauth2"
AUTH_METHODS: Final = (PASSWORD, APP_PASSWORD, OAUTH2)

# reason codes a server text can mean (the account-health classifier's vocabulary)
IMAP_DISABLED: Final = "imap_disabled"
APP_PASSWORD_REQUIRED: Final = "app_password_required"
WEB_LOGIN_REQUIRED: Final = "web_login_required"
TOO_MANY_CONNECTIONS: Final = "too_many_connections"
ACCOUNT_LOCKED: Final = "account_locked"
INVALID_CREDENTIALS: Final = "invalid_credentials"
REASONS: Final = (
    IMAP_DISABLED,
    APP_PASSWORD_REQUIRED,
    WEB_LOGIN_REQUIRED,
    TOO_MANY_CONNECTIONS,
    ACCOUNT_LOCKED,
    INVALID_CREDENTIALS,
)

#: security modes a preset (or a row's ``imapSecurity``) may name
SECURITIES: Final = ("tls", "starttls", "plain")

GENERIC: Final = "generic"

_MINUTE: Final = 60.0


@attrs.frozen
class ServerText:
    """A piece of server reply text and the reason it means. ``fragment`` is matched
    case-insensitively as a substring of the whole reply line (response code included)."""

    fragment: str
    reason: str


#: the scopes an IMAP access token needs at each provider
GOOGLE_SCOPE: Final = "https://mail.google.com/"
MICROSOFT_SCOPE: Final = "https://outlook.office.com/IMAP.AccessAsUser.All offline_access"


@attrs.frozen
class OAuthEndpoints:
    """Where a user grants IMAP access at a provider (RFC 6749 authorization code with
    PKCE, RFC 8628 device authorization) and what to ask for. ``{tenant}`` in a URL is
    Microsoft's tenant (``TRIO_IDLE_MICROSOFT_TENANT``), filled in by the caller."""

    #: the name ``trio-idle oauth authorize --provider`` and the token refresh use
    provider: str
    authorization_url: str
    token_url: str
    #: RFC 8628 device authorization endpoint; ``None``: the provider offers none that
    #: grants the IMAP scope
    device_url: str | None
    scope: str
    #: further authorization-request parameters (Google returns a refresh token only
    #: with ``access_type=offline``, and again for a user who consented before only with
    #: ``prompt=consent``)
    extra: tuple[tuple[str, str], ...] = ()
    #: the provider's token endpoint insists on a client secret (Google's desktop clients
    #: have one; Microsoft's public clients have none)
    secret_required: bool = False


@attrs.frozen
class Preset:
    """Everything known about one provider. ``None`` means "not documented: use the
    generic behaviour / global setting"."""

    #: stable identifier, stored in ``MailConnection.provider`` and used in metrics
    name: str
    #: human name for docs and ``check --login``
    title: str
    #: IMAP server a row without a host gets; ``None`` only for the generic preset
    host: str | None
    port: int
    security: str
    #: accepted sign-in methods (:data:`AUTH_METHODS`)
    auth: tuple[str, ...]
    #: True: the account password is refused, a separately created password is needed
    app_password_required: bool
    #: simultaneous IMAP connections per account, where documented
    max_connections: int | None
    #: new IMAP logins per second the provider accepts from one client address, where
    #: published (none is, so far: docs/providers.md); ``None``: no own pace, only a fair
    #: share of TRIO_IDLE_CONNECT_RATE. TRIO_IDLE_HOST_CONNECT_RATES overrides it.
    login_rate: float | None
    #: how long the provider keeps one IDLE command or an idle connection (seconds)
    idle_limit: float | None
    #: re-issue IDLE after this long instead of the global setting (sooner only)
    idle_renew: float | None
    #: NOOP tick interval instead of the global setting (sooner only)
    tick: float | None
    #: email domains whose mailboxes live at this provider (lowercase)
    domains: tuple[str, ...]
    #: IMAP host names that identify this provider (lowercase); ``host`` first
    hosts: tuple[str, ...]
    #: reply texts that name a reason, checked before the generic ones
    texts: tuple[ServerText, ...]
    #: where users grant IMAP access tokens, for providers that sign in with OAuth2
    oauth: OAuthEndpoints | None = None


def _texts(pairs: Mapping[str, str]) -> tuple[ServerText, ...]:
    return tuple(ServerText(fragment.lower(), reason) for fragment, reason in pairs.items())


#: RFC 5530 response codes and widespread server texts, checked after a preset's own
GENERIC_TEXTS: Final = _texts(
    {
        # RFC 5530 3: the credentials were refused
        "[AUTHENTICATIONFAILED]": INVALID_CREDENTIALS,
        # RFC 5530 3: the passphrase is no longer valid (expired)
        "[EXPIRED]": INVALID_CREDENTIALS,
        # Dovecot's mail_max_userip_connections refusal
        "Maximum number of connections from user+IP exceeded": TOO_MANY_CONNECTIONS,
        "Too many simultaneous connections": TOO_MANY_CONNECTIONS,
    }
)

GENERIC_PRESET: Final = Preset(
    name=GENERIC,
    title="Any other IMAP server",
    host=None,
    port=993,
    security="tls",
    auth=(PASSWORD,),
    app_password_required=False,
    max_connections=None,
    login_rate=None,
    idle_limit=29 * _MINUTE,  # RFC 2177: servers may drop an idler after 30 minutes
    idle_renew=None,
    tick=None,
    domains=(),
    hosts=(),
    texts=(),
)

PRESETS: Final[tuple[Preset, ...]] = (
    Preset(
        name="gmail",
        title="Gmail / Google Workspace",
        host="imap.gmail.com",
        port=993,
        security="tls",
        auth=(APP_PASSWORD, OAUTH2),
        app_password_required=True,
        max_connections=15,
        login_rate=None,
        idle_limit=29 * _MINUTE,
        idle_renew=None,
        tick=None,
        domains=("gmail.com", "googlemail.com"),
        hosts=("imap.gmail.com", "imap.googlemail.com"),
        texts=_texts(
            {
                "Application-specific password required": APP_PASSWORD_REQUIRED,
                "Please log in via your web browser": WEB_LOGIN_REQUIRED,
                "[WEBALERT": WEB_LOGIN_REQUIRED,
                "not enabled for IMAP use": IMAP_DISABLED,
                "IMAP access is disabled for your domain": IMAP_DISABLED,  # Workspace admin
                "Too many simultaneous connections": TOO_MANY_CONNECTIONS,
                "Invalid credentials": INVALID_CREDENTIALS,
            }
        ),
        oauth=OAuthEndpoints(
            provider="google",
            authorization_url="https://accounts.google.com/o/oauth2/v2/auth",
            token_url=GOOGLE_TOKEN_URL,
            # Google's device flow does not grant https://mail.google.com/
            device_url=None,
            scope=GOOGLE_SCOPE,
            extra=(("access_type", "offline"), ("prompt", "consent")),
            secret_required=True,
        ),
    ),
    Preset(
        name="microsoft",
        title="Outlook.com / Microsoft 365",
        host="outlook.office365.com",
        port=993,
        security="tls",
        auth=(OAUTH2,),
        app_password_required=False,
        max_connections=None,
        login_rate=None,
        idle_limit=None,
        idle_renew=None,
        tick=None,
        domains=(
            "outlook.com",
            "hotmail.com",
            "live.com",
            "msn.com",
            "outlook.de",
            "hotmail.de",
            "live.de",
            "hotmail.co.uk",
            "live.co.uk",
            "outlook.fr",
            "hotmail.fr",
            "live.fr",
        ),
        hosts=("outlook.office365.com",),
        texts=_texts(
            {
                "User is authenticated but not connected": INVALID_CREDENTIALS,
                "AUTHENTICATE failed": INVALID_CREDENTIALS,
                "LOGIN failed": INVALID_CREDENTIALS,
            }
        ),
        oauth=OAuthEndpoints(
            provider="microsoft",
            authorization_url="https://login.microsoftonline.com/{tenant}/oauth2/v2.0/authorize",
            token_url=MICROSOFT_TOKEN_URL,
            device_url="https://login.microsoftonline.com/{tenant}/oauth2/v2.0/devicecode",
            scope=MICROSOFT_SCOPE,
        ),
    ),
    Preset(
        name="icloud",
        title="iCloud Mail",
        host="imap.mail.me.com",
        port=993,
        security="tls",
        auth=(APP_PASSWORD,),
        app_password_required=True,
        max_connections=None,
        login_rate=None,
        idle_limit=None,
        idle_renew=None,
        tick=None,
        domains=("icloud.com", "me.com", "mac.com"),
        hosts=("imap.mail.me.com",),
        texts=(),
    ),
    Preset(
        name="yahoo",
        title="Yahoo Mail / AOL",
        host="imap.mail.yahoo.com",
        port=993,
        security="tls",
        auth=(APP_PASSWORD, OAUTH2),
        app_password_required=True,
        max_connections=None,
        login_rate=None,
        idle_limit=None,
        idle_renew=None,
        tick=None,
        domains=(
            "yahoo.com",
            "yahoo.de",
            "yahoo.co.uk",
            "yahoo.fr",
            "yahoo.it",
            "yahoo.es",
            "ymail.com",
            "rocketmail.com",
            "aol.com",
            "aim.com",
        ),
        hosts=("imap.mail.yahoo.com", "export.imap.mail.yahoo.com", "imap.aol.com"),
        texts=_texts({"LOGIN Invalid credentials": INVALID_CREDENTIALS}),
    ),
    Preset(
        name="gmx",
        title="GMX",
        host="imap.gmx.net",
        port=993,
        security="tls",
        auth=(PASSWORD, APP_PASSWORD),
        app_password_required=False,
        max_connections=None,
        login_rate=None,
        # not documented by GMX: users report idle connections dropped silently after
        # 10-15 minutes, so renew well before that (the NOOP tick stays global)
        idle_limit=10 * _MINUTE,
        idle_renew=8 * _MINUTE,
        tick=None,
        domains=("gmx.net", "gmx.de", "gmx.at", "gmx.ch", "gmx.eu", "gmx.com"),
        hosts=("imap.gmx.net", "imap.gmx.com"),
        texts=_texts({"authentication failed": INVALID_CREDENTIALS}),
    ),
    Preset(
        name="webde",
        title="WEB.DE",
        host="imap.web.de",
        port=993,
        security="tls",
        auth=(PASSWORD, APP_PASSWORD),
        app_password_required=False,
        max_connections=None,
        login_rate=None,
        idle_limit=None,
        idle_renew=None,
        tick=None,
        domains=("web.de",),
        hosts=("imap.web.de",),
        texts=_texts({"authentication failed": INVALID_CREDENTIALS}),
    ),
    Preset(
        name="tonline",
        title="T-Online (Telekom)",
        host="secureimap.t-online.de",
        port=993,
        security="tls",
        auth=(APP_PASSWORD,),
        app_password_required=True,
        max_connections=None,
        login_rate=None,
        idle_limit=None,
        idle_renew=None,
        tick=None,
        domains=("t-online.de", "magenta.de"),
        hosts=("secureimap.t-online.de",),
        texts=(),
    ),
)

_BY_NAME: Final = {p.name: p for p in (*PRESETS, GENERIC_PRESET)}
_BY_DOMAIN: Final = {domain: p for p in PRESETS for domain in p.domains}
_BY_HOST: Final = {host: p for p in PRESETS for host in p.hosts}


def _norm(name: str) -> str:
    return name.strip().lower().rstrip(".")


def preset_named(name: str | None) -> Preset:
    """The preset called ``name`` (``MailConnection.provider``); the generic one for
    ``None`` or a name the table does not have."""
    return _BY_NAME.get(name or GENERIC, GENERIC_PRESET)


def oauth_endpoints(provider: str) -> OAuthEndpoints | None:
    """The sign-in endpoints of ``provider`` (``google``, ``microsoft``), or ``None``."""
    for preset in PRESETS:
        if preset.oauth is not None and preset.oauth.provider == provider:
            return preset.oauth
    return None


#: the providers :func:`oauth_endpoints` knows, in table order
OAUTH_PROVIDERS: Final = tuple(p.oauth.provider for p in PRESETS if p.oauth is not None)


def preset_for(email: str, host: str | None) -> Preset:
    """Which provider a mailbox belongs to. Pure, total, never raises.

    A given host decides alone (a Workspace mailbox with its own domain is found by
    ``imap.gmail.com``; a gmail.com address behind some other server is *not* Gmail's
    server). Without a host the email's domain decides. No match: the generic preset.
    """
    if host and _norm(host):
        return _BY_HOST.get(_norm(host), GENERIC_PRESET)
    _, at, domain = email.rpartition("@")
    return _BY_DOMAIN.get(_norm(domain), GENERIC_PRESET) if at else GENERIC_PRESET


def classify_server_text(preset: Preset, text: str) -> str | None:
    """The reason code a server reply means, or ``None`` if nothing in the table says.

    Pure. The preset's own texts are checked first (in table order), then the generic
    ones (RFC 5530 codes, common wordings); the first fragment found in ``text``
    (case-insensitive) wins.
    """
    folded = text.lower()
    for known in (*preset.texts, *GENERIC_TEXTS):
        if known.fragment in folded:
            return known.reason
    return None


def provider_timers(timers: TimerSettings, provider: str | None) -> TimerSettings:
    """``timers`` with the provider's IDLE renewal and tick applied.

    A preset can only make these timers shorter: it says "the provider drops you after
    this long", so an operator's shorter setting still holds. Pure; returns ``timers``
    itself when nothing changes.
    """
    preset = preset_named(provider)
    renew = timers.idle_renew_interval
    tick = timers.tick_interval
    if preset.idle_renew is not None:
        renew = min(renew, preset.idle_renew)
    if preset.tick is not None:
        tick = min(tick, preset.tick)
    if renew == timers.idle_renew_interval and tick == timers.tick_interval:
        return timers
    return attrs.evolve(timers, idle_renew_interval=renew, tick_interval=tick)


def connection_preset(provider: str | None, email: str, host: str | None) -> Preset:
    """The preset of a connection: the one its row matched (``MailConnection.provider``),
    else a lookup by host and email domain."""
    return preset_named(provider) if provider else preset_for(email, host)


def pace_key(provider: str | None, host: str, port: int) -> str:
    """What a connection's connects are paced and shared under (the *host key*).

    A preset's name for a connection of a known provider (every Gmail host name is one
    provider, with one login budget); ``host:port`` for any other server (host lowercased,
    final dot dropped): two servers on one address but different ports are two hosts.
    """
    preset = preset_named(provider)
    if preset.name != GENERIC:
        return preset.name
    return f"{_norm(host)}:{port}"


def host_rates(limits: LimitSettings) -> HostRates:
    """Own connect rates per host key: the presets' published login rates, replaced or
    extended by ``TRIO_IDLE_HOST_CONNECT_RATES`` (``generic``: every other server)."""
    rates = {p.name: p.login_rate for p in PRESETS if p.login_rate is not None}
    generic = GENERIC_PRESET.login_rate
    for name, rate in limits.host_connect_rates:
        if name == GENERIC_KEY:
            generic = rate
        else:
            rates[name] = rate
    return HostRates(rates, generic)
