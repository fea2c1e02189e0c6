"""Account health: what a connection's last outcome means for its user, and when to say so.

Pure (no I/O, no clock of its own): :func:`classify` turns a session outcome into a
:class:`Health` — ``ok``; ``auth_failed`` with a reason the app can act on;
``unreachable`` with a network reason; ``degraded`` (watched, but not as well as it
could be) — and :class:`HealthTracker` decides which of those changes are worth a report
to the backend (:mod:`trio_idle.mailbox.health_reporter` sends them):

- ``auth_failed``, ``degraded`` and a recovery to ``ok`` are reported at once;
- ``unreachable`` only once the connection has been unreachable (for any network
  reason) for ``unreachable_after`` seconds without a success in between: a server
  restart or a short outage pages nobody;
- a classification equal to the last one reported is not reported again (only
  ``attempts`` grows); the first classification of a connection is reported unless it
  equals what the backend was told before the restart (the state store keeps it: a
  backend that still shows an old failure learns of the recovery; one that shows ``ok``
  is not told ``ok`` again). Without a state store the first one is always reported.

Outcomes the classifier cannot judge (an internal error, a token source that fails for
now) change nothing: the previous health stands.

Every ``message`` is text of a :class:`~trio_idle.accounts.outcome_text.Failure`: made by the
connection's :class:`~trio_idle.accounts.outcome_text.ConnectionSecrets` (password, refresh token,
current and previous access token masked) before it gets here, and cut to
:data:`MESSAGE_CHARS`: the server's own words (or our diagnosis of a network failure),
never a secret. Nothing here turns an exception into text.
"""

from __future__ import annotations

import re
from typing import Final

import attrs

from trio_idle.accounts.credentials import TOKEN_REVOKED, TOKEN_UNAVAILABLE
from trio_idle.accounts.outcome_text import CONNECTION, NO_TOKEN, REFUSED, Failure
from trio_idle.accounts.providers import GENERIC, Preset, classify_server_text
from trio_idle.core.errors import (
    CONNECT_KINDS,
    KIND_SERVER_CLOSED,
)

OK: Final = "ok"
AUTH_FAILED: Final = "auth_failed"
UNREACHABLE: Final = "unreachable"
DEGRADED: Final = "degraded"
HEALTH_STATES: Final = (OK, AUTH_FAILED, UNREACHABLE, DEGRADED)

INVALID_CREDENTIALS: Final = "invalid_credentials"
APP_PASSWORD_REQUIRED: Final = "app_password_required"
IMAP_DISABLED: Final = "imap_disabled"
WEB_LOGIN_REQUIRED: Final = "web_login_required"
TOKEN_INVALID: Final = "token_invalid"
TOO_MANY_CONNECTIONS: Final = "too_many_connections"
ACCOUNT_LOCKED: Final = "account_locked"
UNKNOWN: Final = "unknown"
#: why a login failed (``auth_failed``)
AUTH_REASONS: Final = (
    INVALID_CREDENTIALS,
    APP_PASSWORD_REQUIRED,
    IMAP_DISABLED,
    WEB_LOGIN_REQUIRED,
    TOKEN_INVALID,
    TOKEN_REVOKED,
    TOKEN_UNAVAILABLE,
    TOO_MANY_CONNECTIONS,
    ACCOUNT_LOCKED,
    UNKNOWN,
)
#: why the server could not be reached (``unreachable``): the connect kinds
UNREACHABLE_REASONS: Final = CONNECT_KINDS
NO_IDLE: Final = "no_idle"
#: why a connection is watched less well than it could be (``degraded``)
DEGRADED_REASONS: Final = (NO_IDLE,)

#: the longest ``message`` a report carries
MESSAGE_CHARS: Final = 200

#: RFC 5530 response codes in a refused login → reason, when the provider's texts say nothing
_RESPONSE_CODES: Final = {
    "AUTHENTICATIONFAILED": INVALID_CREDENTIALS,
    "AUTHORIZATIONFAILED": INVALID_CREDENTIALS,
    "EXPIRED": INVALID_CREDENTIALS,
    "LIMIT": TOO_MANY_CONNECTIONS,
    "CONTACTADMIN": ACCOUNT_LOCKED,
}
_CODE_RE: Final = re.compile(r"\[([A-Z-]+)[\] ]")

#: one line per reason: what the user (or operator) can do about it. ``{provider}`` is
#: the preset's name ("GMX"; "provider's" for the generic preset).
HINTS: Final = {
    OK: "nothing to do",
    INVALID_CREDENTIALS: "check the password stored for this account (reconnect it in the app)",
    APP_PASSWORD_REQUIRED: "create an app password in the {provider} account settings "
    "and store it instead of the account password",
    IMAP_DISABLED: "enable IMAP in the {provider} settings",
    WEB_LOGIN_REQUIRED: "sign in once on the {provider} website and confirm the account",
    TOKEN_INVALID: "reconnect the account in the app (the access token was refused)",
    TOKEN_REVOKED: "reconnect the account in the app (access was revoked)",
    TOKEN_UNAVAILABLE: "reconnect the account in the app (there is no sign-in grant for it)",
    TOO_MANY_CONNECTIONS: "close other mail apps on this account: the {provider} server "
    "limits simultaneous connections",
    ACCOUNT_LOCKED: "unlock the account on the {provider} website",
    UNKNOWN: "read the server's message; check the account with its provider",
    "dns": "check the IMAP host name (it does not resolve)",
    "refused": "check the IMAP host and port (nothing accepts connections there, or "
    "TRIO_IDLE_REFUSE_NETWORKS refuses the address)",
    "timeout": "the server did not answer in time: check host, port and firewalls",
    "tls": "check the connection security (imapSecurity, TRIO_IDLE_IMAP_SECURITY) and "
    "the CA file (TRIO_IDLE_CA_FILE)",
    "server_closed": "the server closed the connection; retried automatically",
    NO_IDLE: "the server has no IDLE: new mail is noticed at each tick (TRIO_IDLE_TICK_INTERVAL)",
}


@attrs.frozen
class Health:
    """A classified health. ``reason`` is ``None`` for ``ok``; ``message`` is log-safe."""

    state: str
    reason: str | None = None
    message: str = ""

    @property
    def key(self) -> tuple[str, str | None]:
        """What a change is judged by: the message alone changing is no change."""
        return (self.state, self.reason)


HEALTHY: Final = Health(OK)


@attrs.frozen
class Connected:
    """A session is up: logged in and selected; ``idle`` false means polling."""

    idle: bool = True


def hint(reason: str | None, provider: str = "provider's") -> str:
    """The one-line fix for ``reason`` (``None``: ``ok``)."""
    text = HINTS.get(reason or OK, HINTS[UNKNOWN])
    return text.format(provider=provider)


def auth_reason(text: str, preset: Preset, *, oauth: bool, sasl_status: str | None) -> str:
    """Why a login was refused, from the server's ``text`` (pure).

    The provider's own texts win (:func:`trio_idle.accounts.providers.classify_server_text`),
    then RFC 5530 codes. For an OAuth2 connection a refusal of the credentials is a
    refused token (``token_invalid``), as is a SASL error status of 400/401."""
    reason = classify_server_text(preset, text)
    if reason is None:
        codes = _CODE_RE.findall(text.upper())
        reason = next((_RESPONSE_CODES[c] for c in codes if c in _RESPONSE_CODES), None)
    if oauth and (reason in (None, INVALID_CREDENTIALS, UNKNOWN) or sasl_status in ("400", "401")):
        return TOKEN_INVALID
    return reason or UNKNOWN


def classify(outcome: Connected | Failure, preset: Preset, *, oauth: bool = False) -> Health | None:
    """The health ``outcome`` means (pure), or ``None`` if it says nothing about it.

    ``outcome``: :class:`Connected`, or a :class:`~trio_idle.accounts.outcome_text.Failure`: a
    refused login, no access token, or a failed connection (its ``kind`` says what
    failed). The message is the failure's (scrubbed) text.
    """
    if isinstance(outcome, Connected):
        if outcome.idle:
            return HEALTHY
        return Health(DEGRADED, NO_IDLE, "server has no IDLE capability; polling")
    if outcome.what == NO_TOKEN:
        if outcome.token_reason not in (TOKEN_REVOKED, TOKEN_UNAVAILABLE):
            return None  # the source fails for now and is retried: it says nothing yet
        return Health(AUTH_FAILED, outcome.token_reason, _short(outcome.text))
    if outcome.what == REFUSED:
        message = _short(outcome.words)
        reason = auth_reason(message, preset, oauth=oauth, sasl_status=outcome.sasl_status)
        return Health(AUTH_FAILED, reason, message)
    if outcome.what == CONNECTION:
        kind = outcome.kind
        if kind not in UNREACHABLE_REASONS:
            # a lost connection (BYE, EOF) or a protocol failure: the session ended there
            kind = KIND_SERVER_CLOSED
        return Health(UNREACHABLE, kind, _short(outcome.text))
    return None


def explain(failure: Failure, preset: Preset, *, oauth: bool = False) -> str:
    """A failure for a person (``check --login``): its (scrubbed) text, then its
    classified health and the hint, e.g. ``login rejected …: NO … —
    auth_failed/imap_disabled: enable IMAP in the GMX settings``."""
    text = failure.text
    health = classify(failure, preset, oauth=oauth)
    if health is None or health.state == OK:
        return text
    provider = "provider's" if preset.name == GENERIC else preset.title
    return f"{text} — {health.state}/{health.reason}: {hint(health.reason, provider)}"


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MESSAGE_CHARS else text[: MESSAGE_CHARS - 1] + "…"


@attrs.frozen
class Report:
    """One report for the backend: a health, since when, after how many attempts.

    ``since`` is unix time (when this state began); ``attempts`` counts the outcomes in a
    row that had this state (0 for ``ok``)."""

    health: Health
    since: float
    attempts: int


@attrs.define
class HealthTracker:
    """The health state machine of one connection (pure: callers pass the time).

    ``now`` is a monotonic clock (``trio.current_time()``: virtual in tests), ``wall`` the
    unix time the same instant (for ``since``). Not thread-safe; one per connection.
    """

    unreachable_after: float
    #: the latest classification (``None`` until the first outcome)
    current: Health | None = None
    #: monotonic/unix time the current *state* began (reasons may change within it)
    since: float = 0.0
    since_wall: float = 0.0
    attempts: int = 0
    #: what the backend last accepted (or refused for good); ``None``: nothing yet
    reported: Health | None = None
    #: bumped on every observation: lets a waiting reporter see that something happened
    version: int = 0

    def observe(self, health: Health | None, now: float, wall: float) -> None:
        """Record one outcome's classification (``None``: no information, ignored)."""
        if health is None:
            return
        self.version += 1
        if self.current is None or self.current.state != health.state:
            self.since, self.since_wall, self.attempts = now, wall, 0
        if health.state != OK:
            self.attempts += 1
        self.current = health

    def due(self, now: float) -> Report | None:
        """What should be reported at ``now``, or ``None`` (nothing new, or debounced)."""
        current = self.current
        if current is None:
            return None
        if self.reported is not None and self.reported.key == current.key:
            return None
        if current.state == UNREACHABLE and now < self.since + self.unreachable_after:
            return None
        return Report(current, self.since_wall, self.attempts)

    def next_due(self) -> float | None:
        """When a debounced report becomes due (monotonic), or ``None`` if none waits."""
        current = self.current
        if current is None or current.state != UNREACHABLE:
            return None
        if self.reported is not None and self.reported.key == current.key:
            return None
        return self.since + self.unreachable_after

    def delivered(self, report: Report) -> None:
        """The backend has ``report`` (or refused it for good: it is not sent again)."""
        self.reported = report.health
