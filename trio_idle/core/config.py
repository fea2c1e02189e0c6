"""Configuration: environment variables and CLI flags, parsed once into a frozen object.

Parsing is a pure function of two mappings (environment, CLI overrides), so every rule
here is tested without a process. A bad value raises :class:`ConfigError` whose message
is one line naming the variable (or flag) and what was expected; the CLI exits with 2.
Secrets are only ever read from the environment (argv is visible in ``ps``) and are
wrapped in :class:`~trio_idle.core.secret.Secret`.

Each setting is declared once, as a field of the frozen group of its concern
(:class:`TimerSettings`, :class:`WebhookSettings`, ...) made by :func:`setting`: variable,
flag, parser, default text, help, secrecy. :class:`Settings` holds the groups, and
:data:`OPTIONS` (CLI flags, docs/configuration.md, :func:`parse_settings`) is derived from
them. To add a setting, add one field to its group; nothing else lists it.

The parsers live with what they parse (:mod:`~trio_idle.core.values`,
:mod:`~trio_idle.core.urls`, :mod:`~trio_idle.core.destinations`,
:mod:`~trio_idle.core.crypto`); the rules between settings in
:mod:`~trio_idle.core.config_checks`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final, TypeVar, overload

import attrs

from trio_idle.core.config_checks import cross_check
from trio_idle.core.crypto import KEY_DERIVATIONS, MIN_KEY_CHARS, key_problem
from trio_idle.core.destinations import (
    DEFAULT_REFUSE_NETWORKS,
    Network,
    parse_networks,
)
from trio_idle.core.folders import FOLDER_WATCH_MODES, parse_folders
from trio_idle.core.host_pacing import parse_host_rates
from trio_idle.core.scrub import url_secrets
from trio_idle.core.secret import Secret
from trio_idle.core.urls import (
    parse_http_url,
    parse_postgres_url,
    parse_secret_http_url,
    parse_tenant,
    parse_token_url,
    parse_url_path,
)
from trio_idle.core.values import (
    one_of,
    parse_bearer_token,
    parse_bool,
    parse_buffer_size,
    parse_duration,
    parse_fraction,
    parse_header_name,
    parse_instance_id,
    parse_listen_addr,
    parse_nonempty,
    parse_nonempty_secret,
    parse_positive_float,
    parse_positive_int,
    parse_share,
    parse_stripped,
    parse_table_name,
)

#: The optional columns are read from the whole row as JSON (``->>`` gives NULL for a
#: key the table lacks), so one plain statement works on tables with and without them:
#: no schema query, no prepared statement, nothing a transaction pooler could break.
DEFAULT_QUERY: Final = (
    'SELECT id, "userId", email, "imapHost", "imapPort", "imapUser", "encryptedPassword", '
    'to_jsonb("MailConnection") ->> \'authType\' AS "authType", '
    'to_jsonb("MailConnection") ->> \'encryptedRefreshToken\' AS "encryptedRefreshToken", '
    'to_jsonb("MailConnection") ->> \'imapSecurity\' AS "imapSecurity", '
    'to_jsonb("MailConnection") ->> \'imapFolders\' AS "imapFolders", '
    'to_jsonb("MailConnection") ->> \'imapFolderWatch\' AS "imapFolderWatch" '
    'FROM "MailConnection" WHERE "isActive" = true'
)
SECURITY_MODES: Final = ("auto", "tls", "starttls", "plain")
#: TRIO_IDLE_NOTIFY: use IMAP NOTIFY where the server announces it, or never
NOTIFY_MODES: Final = ("auto", "off")
SOURCES: Final = ("postgres", "file")
STATE_BACKENDS: Final = ("sqlite", "postgres", "none")
#: where a mailbox with no stored state starts (TRIO_IDLE_START_FROM)
START_FROM: Final = ("full", "now")
GC_MODES: Final = ("tuned", "python")
CLUSTER_MODES: Final = ("single", "shared")
LOG_FORMATS: Final = ("text", "json")
#: deploy/env.example marks every value an operator must fill in with this; a value that
#: still holds it is refused, whichever setting it is (a secret of the example would be
#: a known secret)
PLACEHOLDER: Final = "change-me"
LOG_LEVELS: Final = ("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL")


class ConfigError(ValueError):
    """A configuration value is missing or invalid. ``str()`` is the one-line message.

    :func:`parse_settings` reports every problem it finds at once: :attr:`problems` lists
    them all (this error first), one line each; ``str()`` is the first one's line.
    """

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name
        self.problems: list[ConfigError] = [self]

    @classmethod
    def of(cls, problems: list[ConfigError]) -> ConfigError:
        first = problems[0]
        first.problems = list(problems)
        return first

    def lines(self) -> list[str]:
        """One line per problem, in the order they were found."""
        return [str(problem) for problem in self.problems]


_T = TypeVar("_T")
#: the key under which :func:`setting` stores a field's :class:`Declaration`
_DECLARATION: Final = "trio_idle.setting"


@attrs.frozen
class Declaration:
    """Where one setting comes from and what it means, as written next to its field."""

    env: str
    flag: str | None
    parse: Callable[[str], Any]
    default: str | None
    help: str
    secret: bool


@overload
def setting(
    env: str,
    flag: str | None,
    parse: Callable[[str], _T],
    default: str,
    help: str,
    *,
    secret: bool = False,
) -> _T: ...
@overload
def setting(
    env: str,
    flag: str | None,
    parse: Callable[[str], _T],
    default: None,
    help: str,
    *,
    secret: bool = False,
) -> _T | None: ...
@overload
def setting(
    env: str,
    flag: str | None,
    parse: Callable[[str], _T],
    default: None,
    help: str,
    *,
    unset: _T,
    secret: bool = False,
) -> _T: ...
def setting(
    env: str,
    flag: str | None,
    parse: Callable[[str], Any],
    default: str | None,
    help: str,
    *,
    unset: Any = None,
    secret: bool = False,
) -> Any:
    """Declare one setting as an attrs field of a settings group.

    ``default`` is the text a user would write; it goes through ``parse`` here, at import,
    so an invalid default fails every import instead of one unlucky start. Without a
    default the field holds ``unset`` (``None`` unless given) when nothing sets it;
    :func:`parse_settings` may still require it or derive it (``BACKEND_URL``). A flag is
    ignored for secrets: they are read from the environment only.
    """
    declaration = Declaration(env, flag, parse, default, help, secret)
    value = parse(default) if default is not None else unset
    return attrs.field(default=value, metadata={_DECLARATION: declaration})


# -- the settings, one frozen group per concern ------------------------------------------
#
# Each field is declared exactly once, with its variable, flag, parser, default and help;
# OPTIONS (CLI flags, docs/configuration.md, parse_settings) is derived from these classes.
# Field names are unique across groups: they are the keys of CLI overrides.


@attrs.frozen(kw_only=True)
class ConnectionSettings:
    """Where the connection list comes from and how its passwords decrypt."""

    source: str = setting(
        "TRIO_IDLE_SOURCE",
        "--source",
        one_of(SOURCES),
        "postgres",
        "where the connection list comes from: postgres (DATABASE_URL) or file",
    )
    database_url: Secret | None = setting(
        "DATABASE_URL",
        None,
        parse_postgres_url,
        None,
        "PostgreSQL URL (direct or through a transaction pooler)",
        secret=True,
    )
    connections_query: str = setting(
        "TRIO_IDLE_QUERY",
        "--query",
        parse_nonempty,
        DEFAULT_QUERY,
        "SQL returning id, userId, email, imapHost, imapPort, imapUser, encryptedPassword",
    )
    connections_file: str | None = setting(
        "TRIO_IDLE_CONNECTIONS_FILE",
        "--connections-file",
        parse_nonempty,
        None,
        "TOML file with the connections (source=file)",
    )
    encryption_key: Secret = setting(
        "ENCRYPTION_KEY",
        None,
        parse_nonempty_secret,
        None,
        f"AES-256 key string (at least {MIN_KEY_CHARS} characters with utf8-prefix)",
        unset=Secret(""),
        secret=True,
    )
    key_derivation: str = setting(
        "TRIO_IDLE_KEY_DERIVATION",
        "--key-derivation",
        one_of(KEY_DERIVATIONS),
        "utf8-prefix",
        "how ENCRYPTION_KEY becomes the AES key: utf8-prefix (first 32 bytes) or sha256",
    )


@attrs.frozen(kw_only=True)
class ImapSettings:
    """How each IMAP session connects, and what it accepts from the server."""

    mailbox: str = setting(
        "TRIO_IDLE_MAILBOX", "--mailbox", parse_nonempty, "INBOX", "mailbox to watch"
    )
    folders: tuple[str, ...] = setting(
        "TRIO_IDLE_FOLDERS",
        "--folders",
        parse_folders,
        "INBOX",
        "comma-separated folders to watch: names or RFC 6154 special uses (INBOX,\\Junk); "
        "TRIO_IDLE_MAILBOX is IDLEd on, the others are watched as TRIO_IDLE_FOLDER_WATCH "
        "(and TRIO_IDLE_NOTIFY) say",
    )
    folder_watch: str = setting(
        "TRIO_IDLE_FOLDER_WATCH",
        "--folder-watch",
        one_of(FOLDER_WATCH_MODES),
        "status",
        "how the folders beside TRIO_IDLE_MAILBOX are watched: status (on the mailbox's "
        "connection: pushed by NOTIFY where the server has it, see TRIO_IDLE_NOTIFY, else "
        "STATUS every tick) or idle (an IDLE connection of their own each: new mail at once, "
        "one more login per folder, within the provider's connection limit); a row's "
        "imapFolderWatch overrides it",
    )
    imap_notify: str = setting(
        "TRIO_IDLE_NOTIFY",
        "--imap-notify",
        one_of(NOTIFY_MODES),
        "auto",
        "IMAP NOTIFY (RFC 5465) for the folders checked on the mailbox's connection: auto "
        "(where the server announces it, their new mail is pushed during IDLE and they are "
        "checked with STATUS only after each connect) or off (STATUS every tick)",
    )
    imap_security: str = setting(
        "TRIO_IDLE_IMAP_SECURITY",
        "--imap-security",
        one_of(SECURITY_MODES),
        "auto",
        "auto (993: TLS, 143: STARTTLS, other: TLS), tls, starttls or plain",
    )
    ca_file: str | None = setting(
        "TRIO_IDLE_CA_FILE",
        "--ca-file",
        parse_stripped,
        None,
        "PEM file of extra CAs to trust (private CAs); system CAs are used otherwise",
    )
    tcp_keepalive: float = setting(
        "TRIO_IDLE_TCP_KEEPALIVE",
        "--tcp-keepalive",
        parse_duration,
        "60s",
        "TCP keepalive idle time on IMAP sockets (probes every 15 s, 4 probes)",
    )
    max_line: int = setting(
        "TRIO_IDLE_MAX_LINE",
        "--max-line",
        parse_buffer_size,
        "1MiB",
        "longest IMAP response line accepted (text outside literals); more drops the connection",
    )
    max_literal: int = setting(
        "TRIO_IDLE_MAX_LITERAL",
        "--max-literal",
        parse_buffer_size,
        "1MiB",
        "most literal data ({n} blocks) in one IMAP response; more drops the connection",
    )
    refuse_networks: tuple[Network, ...] = setting(
        "TRIO_IDLE_REFUSE_NETWORKS",
        "--refuse-networks",
        parse_networks,
        DEFAULT_REFUSE_NETWORKS,
        "comma-separated networks (CIDR) no IMAP connection may go to, checked on the "
        "resolved address; none: refuse nothing. Default: link-local incl. cloud metadata",
    )


@attrs.frozen(kw_only=True)
class TimerSettings:
    """How often things happen, and how long one IMAP step may take, in seconds."""

    refresh_interval: float = setting(
        "TRIO_IDLE_REFRESH_INTERVAL",
        "--refresh-interval",
        parse_duration,
        "5m",
        "how often the connection list is re-read",
    )
    idle_renew_interval: float = setting(
        "TRIO_IDLE_IDLE_RENEW",
        "--idle-renew",
        parse_duration,
        "25m",
        "re-issue IDLE after this long (servers drop IDLE at 29 min)",
    )
    tick_interval: float = setting(
        "TRIO_IDLE_TICK_INTERVAL",
        "--tick-interval",
        parse_duration,
        "2m",
        "leave IDLE, NOOP under a deadline, check the mailbox, re-enter IDLE",
    )
    connect_timeout: float = setting(
        "TRIO_IDLE_CONNECT_TIMEOUT",
        "--connect-timeout",
        parse_duration,
        "30s",
        "deadline for TCP connect + TLS + greeting",
    )
    command_timeout: float = setting(
        "TRIO_IDLE_COMMAND_TIMEOUT",
        "--command-timeout",
        parse_duration,
        "30s",
        "deadline for each IMAP command (LOGIN, SELECT, NOOP, DONE); missing answer = dead",
    )
    logout_timeout: float = setting(
        "TRIO_IDLE_LOGOUT_TIMEOUT",
        "--logout-timeout",
        parse_duration,
        "2s",
        "how long a closed session waits for the server to answer LOGOUT and hang up",
    )


@attrs.frozen(kw_only=True)
class BackoffSettings:
    """Reconnect delays of one session, in seconds.

    :func:`parse_settings` checks ``backoff_initial <= backoff_max`` and
    ``auth_backoff <= auth_backoff_max``.
    """

    backoff_initial: float = setting(
        "TRIO_IDLE_BACKOFF_INITIAL",
        "--backoff-initial",
        parse_duration,
        "5s",
        "first reconnect delay (full jitter below the exponential bound, first one exact)",
    )
    backoff_max: float = setting(
        "TRIO_IDLE_BACKOFF_MAX",
        "--backoff-max",
        parse_duration,
        "5m",
        "cap of the reconnect delay",
    )
    backoff_reset_after: float = setting(
        "TRIO_IDLE_BACKOFF_RESET_AFTER",
        "--backoff-reset-after",
        parse_duration,
        "2m",
        "a session up this long resets the backoff",
    )
    auth_backoff: float = setting(
        "TRIO_IDLE_AUTH_BACKOFF",
        "--auth-backoff",
        parse_duration,
        "15m",
        "first delay after an authentication failure (doubles up to auth-backoff-max)",
    )
    auth_backoff_max: float = setting(
        "TRIO_IDLE_AUTH_BACKOFF_MAX",
        "--auth-backoff-max",
        parse_duration,
        "2h",
        "cap of the delay after repeated authentication failures",
    )


@attrs.frozen(kw_only=True)
class LimitSettings:
    """How fast connections and catch-up scans may start, all mailboxes together."""

    connect_concurrency: int = setting(
        "TRIO_IDLE_CONNECT_CONCURRENCY",
        "--connect-concurrency",
        parse_positive_int,
        "20",
        "max IMAP handshakes + logins in progress at once",
    )
    connect_rate: float = setting(
        "TRIO_IDLE_CONNECT_RATE",
        "--connect-rate",
        parse_positive_float,
        "50",
        "max new IMAP connections started per second (all mailboxes)",
    )
    connect_host_share: float = setting(
        "TRIO_IDLE_CONNECT_HOST_SHARE",
        "--connect-host-share",
        parse_share,
        "0.25",
        "share of the connect slots one host key (a provider preset, else host:port) may "
        "hold (at least one slot), so a host that never answers cannot make every other "
        "mailbox wait",
    )
    host_pacing: bool = setting(
        "TRIO_IDLE_HOST_PACING",
        "--host-pacing",
        parse_bool,
        "true",
        "pace connects per host key (a provider preset, else host:port): each at its own "
        "rate (TRIO_IDLE_HOST_CONNECT_RATES), the global rate shared round robin among the "
        "hosts waiting; false: one first-come-first-served pace for every host",
    )
    host_connect_rates: tuple[tuple[str, float], ...] = setting(
        "TRIO_IDLE_HOST_CONNECT_RATES",
        "--host-connect-rates",
        parse_host_rates,
        None,
        "own connect rates (per second) of providers or hosts, e.g. "
        "gmail=10,imap.example.com:993=5,generic=20 (generic: every host matching no "
        "preset); unnamed: the preset's published rate, none published: no own limit",
        unset=(),
    )
    catchup_rate: float = setting(
        "TRIO_IDLE_CATCHUP_RATE",
        "--catchup-rate",
        parse_positive_float,
        "20",
        "max catch-up scans (startup/reconnect) sent per second, all mailboxes; "
        "EXISTS-driven scans are not paced",
    )


@attrs.frozen(kw_only=True)
class WebhookSettings:
    """The scan webhook: where it goes, how it is authenticated, retried and pooled."""

    backend_url: str = setting(
        "BACKEND_URL",
        "--backend-url",
        parse_http_url,
        None,
        "backend base URL (default http://127.0.0.1:3016, :3015 when NODE_ENV=production)",
        unset="http://127.0.0.1:3016",
    )
    scan_path: str = setting(
        "TRIO_IDLE_SCAN_PATH",
        "--scan-path",
        parse_url_path,
        "/api/mail/scan-internal",
        "path of the scan webhook on the backend",
    )
    secret_header: str = setting(
        "TRIO_IDLE_SECRET_HEADER",
        "--secret-header",
        parse_header_name,
        "x-admin-secret",
        "header that carries ADMIN_SECRET",
    )
    admin_secret: Secret = setting(
        "ADMIN_SECRET",
        None,
        parse_nonempty_secret,
        None,
        "shared secret sent in the scan request header",
        unset=Secret(""),
        secret=True,
    )
    signing_secret: Secret | None = setting(
        "TRIO_IDLE_SIGNING_SECRET",
        None,
        parse_nonempty_secret,
        None,
        "if set, the body is signed: x-signature: sha256=<hex HMAC-SHA256>",
        secret=True,
    )
    scan_timeout: float = setting(
        "TRIO_IDLE_SCAN_TIMEOUT",
        "--scan-timeout",
        parse_duration,
        "60s",
        "per-phase timeout of a scan request (connect at most 10s); whole attempt: this + 5s",
    )
    scan_retry_initial: float = setting(
        "TRIO_IDLE_SCAN_RETRY_INITIAL",
        "--scan-retry-initial",
        parse_duration,
        "1s",
        "first delay before retrying a failed scan",
    )
    scan_retry_max: float = setting(
        "TRIO_IDLE_SCAN_RETRY_MAX",
        "--scan-retry-max",
        parse_duration,
        "60s",
        "cap of the scan retry delay (the scan is retried while it stays the active one)",
    )
    http_max_connections: int = setting(
        "TRIO_IDLE_HTTP_MAX_CONNECTIONS",
        "--http-max-connections",
        parse_positive_int,
        "100",
        "connection pool size towards the backend (requests beyond it wait their turn; "
        "at most 10 idle connections are kept)",
    )
    http_trust_env: bool = setting(
        "TRIO_IDLE_HTTP_TRUST_ENV",
        "--http-trust-env",
        parse_bool,
        "false",
        "send the scan webhook and health pings through the proxy named by HTTP_PROXY, "
        "HTTPS_PROXY, ALL_PROXY (and NO_PROXY); off: always connect directly",
    )
    scan_envelopes: bool = setting(
        "TRIO_IDLE_SCAN_ENVELOPES",
        "--scan-envelopes",
        parse_bool,
        "false",
        "also send the envelopes (uid, from, subject, date, message id, size) of up to 50 "
        "new messages in each scan request, fetched on the session's own connection",
    )
    token_path: str = setting(
        "TRIO_IDLE_TOKEN_PATH",
        "--token-path",
        parse_url_path,
        "/api/mail/imap-token-internal",
        "path of the backend's OAuth2 access-token endpoint (for oauth2 connections)",
    )
    token_timeout: float = setting(
        "TRIO_IDLE_TOKEN_TIMEOUT",
        "--token-timeout",
        parse_duration,
        "20s",
        "total deadline for one access-token request to the backend",
    )
    token_refresh_ahead: float = setting(
        "TRIO_IDLE_TOKEN_REFRESH_AHEAD",
        "--token-refresh-ahead",
        parse_duration,
        "5m",
        "a cached access token is replaced when it expires within this time; every "
        "(re)connect signs in with a token valid at least this long",
    )

    @property
    def scan_url(self) -> str:
        return self.backend_url + self.scan_path

    @property
    def token_url(self) -> str:
        return self.backend_url + self.token_path


@attrs.frozen(kw_only=True)
class StateSettings:
    """Where the per-mailbox scan state lives (restart catch-up) and how long it is kept."""

    state: str = setting(
        "TRIO_IDLE_STATE",
        "--state",
        one_of(STATE_BACKENDS),
        "sqlite",
        "where the per-mailbox scan state lives (restart catch-up): sqlite, postgres "
        "(table from `trio-idle db migrate`, uses DATABASE_URL) or none",
    )
    state_path: str | None = setting(
        "TRIO_IDLE_STATE_PATH",
        "--state-path",
        parse_nonempty,
        None,
        "SQLite state file (default $STATE_DIRECTORY/state.sqlite3, else "
        "~/.local/state/trio-idle/state.sqlite3)",
    )
    state_grace: float = setting(
        "TRIO_IDLE_STATE_GRACE",
        "--state-grace",
        parse_duration,
        "168h",
        "how long the state of a connection removed from the source is kept",
    )
    start_from: str = setting(
        "TRIO_IDLE_START_FROM",
        "--start-from",
        one_of(START_FROM),
        "full",
        "a mailbox with no stored state (first start, new connection): full = one scan of "
        "everything; now = no scan, its UIDNEXT is stored and only mail from then on is "
        "scanned (migrating from a daemon whose backend already scanned it; "
        "docs/migrating-from-node.md)",
    )


@attrs.frozen(kw_only=True)
class HealthSettings:
    """The health port, the /status route, the loop-lag bound and the push-monitoring ping."""

    health_addr: tuple[str, int] | None = setting(
        "TRIO_IDLE_HEALTH_ADDR",
        "--health-addr",
        parse_listen_addr,
        None,
        "serve /healthz, /readyz, /metrics (and /status unless TRIO_IDLE_STATUS_ADDR is "
        "set) on PORT or HOST:PORT (127.0.0.1 when only a port is given); off when unset",
    )
    status_addr: tuple[str, int] | None = setting(
        "TRIO_IDLE_STATUS_ADDR",
        "--status-addr",
        parse_listen_addr,
        None,
        "serve /status on its own PORT or HOST:PORT instead of the health address "
        "(127.0.0.1 when only a port is given); keep it on loopback or a private network",
    )
    status_token: Secret | None = setting(
        "TRIO_IDLE_STATUS_TOKEN",
        None,
        parse_bearer_token,
        None,
        "the token /status requires in an Authorization: Bearer header (16 to 512 of the "
        "characters A-Z a-z 0-9 - . _ ~ + / and trailing =); /status is off without it",
        secret=True,
    )
    ready_share: float = setting(
        "TRIO_IDLE_READY_SHARE",
        "--ready-share",
        parse_fraction,
        "0.9",
        "share of the sessions (auth-failed ones left out: their users must act) that must be "
        "idle or polling for /readyz and the health ping",
    )
    backend_down_after: float = setting(
        "TRIO_IDLE_BACKEND_DOWN_AFTER",
        "--backend-down-after",
        parse_duration,
        "60s",
        "how long every request to the backend (scans, account health reports) may fail "
        "(no answer, timeout, 5xx, 401/403) before /readyz and the health ping say so",
    )
    max_loop_lag: float = setting(
        "TRIO_IDLE_MAX_LOOP_LAG",
        "--max-loop-lag",
        parse_duration,
        "5s",
        "event-loop lag above which /healthz answers 503 and the systemd watchdog stops",
    )
    ping_url: Secret | None = setting(
        "TRIO_IDLE_PING_URL",
        None,
        parse_secret_http_url,
        None,
        "push-monitoring URL (healthchecks.io, Uptime Kuma) pinged while healthy",
        secret=True,
    )
    ping_interval: float = setting(
        "TRIO_IDLE_PING_INTERVAL",
        "--ping-interval",
        parse_duration,
        "60s",
        "how often the health ping is sent",
    )
    ping_fail_suffix: str = setting(
        "TRIO_IDLE_PING_FAIL_SUFFIX",
        "--ping-fail-suffix",
        parse_nonempty,
        "/fail",
        "appended to the ping URL when unhealthy (a ?reason=... query is added)",
    )


@attrs.frozen(kw_only=True)
class LogSettings:
    """What is logged and in which format (every command that logs takes these)."""

    log_level: str = setting(
        "TRIO_IDLE_LOG_LEVEL",
        "--log-level",
        one_of(LOG_LEVELS, upper=True),
        "INFO",
        "minimum log level",
    )
    log_format: str = setting(
        "TRIO_IDLE_LOG_FORMAT",
        "--log-format",
        one_of(LOG_FORMATS),
        "text",
        "text (the documented lines) or json (one flat object per line, the schema in "
        "docs/operations.md)",
    )
    log_email: bool = setting(
        "TRIO_IDLE_LOG_EMAIL",
        "--log-email",
        parse_bool,
        "true",
        "name each mailbox by its email address in log lines (and the JSON email field); "
        "false: by #<connection id> instead, the address is never logged",
    )


@attrs.frozen(kw_only=True)
class ProcessSettings:
    """The process as a whole: memory management, deadlines of start and stop, NODE_ENV."""

    gc_mode: str = setting(
        "TRIO_IDLE_GC",
        "--gc",
        one_of(GC_MODES),
        "tuned",
        "tuned: no automatic full garbage collections (they pause ≈ 2 s at 10,000 "
        "sessions); the young generations collected every 0.25 s; after each refresh a "
        "young collection and a freeze, a full one only after many sessions ended, "
        "unexplained memory growth, and every 6 h (docs/performance.md); "
        "python: CPython's defaults",
    )
    shutdown_timeout: float = setting(
        "TRIO_IDLE_SHUTDOWN_TIMEOUT",
        "--shutdown-timeout",
        parse_duration,
        "5s",
        "total time allowed for LOGOUTs on SIGTERM before the process exits",
    )
    db_timeout: float = setting(
        "TRIO_IDLE_DB_TIMEOUT",
        "--db-timeout",
        parse_duration,
        "30s",
        "deadline for connecting to the database and running the query",
    )
    node_env: str = setting(
        "NODE_ENV",
        None,
        parse_stripped,
        "development",
        "production switches the default BACKEND_URL port to 3015",
    )


#: the token endpoints of the providers whose refresh flow the daemon runs itself
GOOGLE_TOKEN_URL: Final = "https://oauth2.googleapis.com/token"
MICROSOFT_TOKEN_URL: Final = "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token"


@attrs.frozen(kw_only=True)
class OAuthSettings:
    """The daemon's own OAuth2 token refresh, for rows with a refresh token.

    Which client the daemon is at each provider, where it asks for access tokens, how
    fast and how long (:mod:`trio_idle.auth.token_refresh`)."""

    google_client_id: str | None = setting(
        "TRIO_IDLE_GOOGLE_CLIENT_ID",
        "--google-client-id",
        parse_nonempty,
        None,
        "OAuth2 client id at Google, for rows with a refresh token (daemon-side refresh)",
    )
    google_client_secret: Secret | None = setting(
        "TRIO_IDLE_GOOGLE_CLIENT_SECRET",
        None,
        parse_nonempty_secret,
        None,
        "OAuth2 client secret at Google",
        secret=True,
    )
    google_token_url: str = setting(
        "TRIO_IDLE_GOOGLE_TOKEN_URL",
        "--google-token-url",
        parse_token_url,
        GOOGLE_TOKEN_URL,
        "Google's token endpoint (tests point it at a local server)",
    )
    microsoft_client_id: str | None = setting(
        "TRIO_IDLE_MICROSOFT_CLIENT_ID",
        "--microsoft-client-id",
        parse_nonempty,
        None,
        "OAuth2 client (application) id at Microsoft, for rows with a refresh token",
    )
    microsoft_client_secret: Secret | None = setting(
        "TRIO_IDLE_MICROSOFT_CLIENT_SECRET",
        None,
        parse_nonempty_secret,
        None,
        "OAuth2 client secret at Microsoft (unset for a public client)",
        secret=True,
    )
    microsoft_tenant: str = setting(
        "TRIO_IDLE_MICROSOFT_TENANT",
        "--microsoft-tenant",
        parse_tenant,
        "common",
        "Microsoft tenant: common, organizations, consumers, a tenant id or domain",
    )
    microsoft_token_url: str = setting(
        "TRIO_IDLE_MICROSOFT_TOKEN_URL",
        "--microsoft-token-url",
        parse_token_url,
        MICROSOFT_TOKEN_URL,
        "Microsoft's token endpoint; {tenant} is replaced by TRIO_IDLE_MICROSOFT_TENANT",
    )
    oauth_timeout: float = setting(
        "TRIO_IDLE_OAUTH_TIMEOUT",
        "--oauth-timeout",
        parse_duration,
        "30s",
        "total deadline for one token refresh at a provider",
    )
    oauth_rate: float = setting(
        "TRIO_IDLE_OAUTH_RATE",
        "--oauth-rate",
        parse_positive_float,
        "5",
        "max token refreshes started per second at the providers, all connections",
    )

    @property
    def microsoft_url(self) -> str:
        """The Microsoft token endpoint with the tenant filled in."""
        return self.microsoft_token_url.replace("{tenant}", self.microsoft_tenant)


@attrs.frozen(kw_only=True)
class AccountHealthSettings:
    """Account health reports to the backend (state and reason of each connection)."""

    connection_status: bool = setting(
        "TRIO_IDLE_CONNECTION_STATUS",
        "--connection-status",
        parse_bool,
        "true",
        "report each connection's account health (ok, auth_failed, unreachable, degraded) "
        "to the backend when it changes",
    )
    status_path: str = setting(
        "TRIO_IDLE_CONNECTION_STATUS_PATH",
        "--connection-status-path",
        parse_url_path,
        "/api/mail/connection-status-internal",
        "path of the account health endpoint on the backend",
    )
    unreachable_after: float = setting(
        "TRIO_IDLE_UNREACHABLE_AFTER",
        "--unreachable-after",
        parse_duration,
        "10min",
        "how long a server must stay unreachable before the backend is told "
        "(auth failures and recoveries are reported at once)",
    )


@attrs.frozen(kw_only=True)
class ClusterSettings:
    """Several instances sharing the mailboxes through Postgres (shared mode)."""

    cluster: str = setting(
        "TRIO_IDLE_CLUSTER",
        "--cluster",
        one_of(CLUSTER_MODES),
        "single",
        "single: this process watches every connection; shared: the live instances split "
        "them (membership table from `trio-idle db migrate`, needs TRIO_IDLE_STATE=postgres)",
    )
    instance_id: str | None = setting(
        "TRIO_IDLE_INSTANCE_ID",
        "--instance-id",
        parse_instance_id,
        None,
        "this instance's name in the membership table (default hostname-pid); unique "
        "per running process",
    )
    cluster_ttl: float = setting(
        "TRIO_IDLE_CLUSTER_TTL",
        "--cluster-ttl",
        parse_duration,
        "15s",
        "an instance whose heartbeat is older than this (database clock) is dead and its "
        "connections move; one that cannot renew for half of it stops its sessions",
    )
    cluster_poll: float = setting(
        "TRIO_IDLE_CLUSTER_POLL",
        "--cluster-poll",
        parse_duration,
        "5s",
        "how often each instance renews its heartbeat and reads the member list (at most "
        "a third of the TTL)",
    )
    listen_url: Secret | None = setting(
        "TRIO_IDLE_LISTEN_URL",
        None,
        parse_postgres_url,
        None,
        "direct PostgreSQL URL (not through a transaction pooler) for LISTEN: with the "
        "trigger of `trio-idle db install-notify` a changed row is applied within a "
        "second; off when unset (polling only)",
        secret=True,
    )
    notify_table: str = setting(
        "TRIO_IDLE_NOTIFY_TABLE",
        "--notify-table",
        parse_table_name,
        '"MailConnection"',
        "the connection table `trio-idle db install-notify` and `remove-notify` put the "
        "trigger on (quoted like in TRIO_IDLE_QUERY)",
    )


@attrs.frozen(kw_only=True)
class Settings:
    """The whole configuration, immutable, one group per concern; a component takes the
    group(s) it uses. Durations are seconds (float), sizes bytes (int).

    ``Settings()`` holds every default (secrets unset); :func:`parse_settings` is the way
    to build one from the environment and flags.
    """

    connections: ConnectionSettings = attrs.field(factory=ConnectionSettings)
    imap: ImapSettings = attrs.field(factory=ImapSettings)
    timers: TimerSettings = attrs.field(factory=TimerSettings)
    backoff: BackoffSettings = attrs.field(factory=BackoffSettings)
    limits: LimitSettings = attrs.field(factory=LimitSettings)
    webhook: WebhookSettings = attrs.field(factory=WebhookSettings)
    store: StateSettings = attrs.field(factory=StateSettings)
    health: HealthSettings = attrs.field(factory=HealthSettings)
    log: LogSettings = attrs.field(factory=LogSettings)
    process: ProcessSettings = attrs.field(factory=ProcessSettings)
    oauth: OAuthSettings = attrs.field(factory=OAuthSettings)
    account_health: AccountHealthSettings = attrs.field(factory=AccountHealthSettings)
    cluster: ClusterSettings = attrs.field(factory=ClusterSettings)


@attrs.frozen
class Option:
    """One setting as the CLI, the docs and :func:`parse_settings` see it: its
    :class:`Declaration`, and where it lives (``settings.<group>.<field>``)."""

    group: str
    field: str
    env: str
    flag: str | None
    parse: Callable[[str], Any]
    default: str | None
    help: str
    secret: bool

    def value_in(self, settings: Settings) -> Any:
        return getattr(getattr(settings, self.group), self.field)


def _groups() -> dict[str, type[Any]]:
    """Each group attribute of :class:`Settings` → its class."""
    attrs.resolve_types(Settings)
    return {group.name: group.type for group in attrs.fields(Settings) if group.type}


#: each group attribute of :class:`Settings` → its class, in declaration order
GROUPS: Final[Mapping[str, type[Any]]] = _groups()


def _derive_options() -> tuple[Option, ...]:
    options: list[Option] = []
    for name, group in GROUPS.items():
        for field in attrs.fields(group):
            declared = field.metadata.get(_DECLARATION)
            if not isinstance(declared, Declaration):
                raise TypeError(f"{name}.{field.name} is not declared with setting()")
            options.append(Option(name, field.name, **attrs.asdict(declared, recurse=False)))
    names = [o.field for o in options]
    if len(set(names)) != len(names):  # the override keys would be ambiguous
        raise TypeError(f"a setting name is used twice: {sorted(names)}")
    return tuple(options)


#: Every setting, group by group in the order of :class:`Settings` (the order
#: docs/configuration.md lists them), derived from the groups' declarations.
OPTIONS: Final[tuple[Option, ...]] = _derive_options()

_BY_FIELD: Final = {o.field: o for o in OPTIONS}
#: the label a problem names (variable or flag) → its field
_BY_ENV_OR_FLAG: Final = {
    **{o.env: o.field for o in OPTIONS},
    **{o.flag: o.field for o in OPTIONS if o.flag},
}
#: what each field holds when nothing sets it (the parsed default, or unset)
_DEFAULTS: Final[Mapping[str, Any]] = {o.field: o.value_in(Settings()) for o in OPTIONS}


def process_secrets(settings: Settings) -> list[str]:
    """Every secret the settings hold, in the forms a log line could show them (for
    :func:`trio_idle.core.logs.protect_secrets`): each secret setting, and of URLs also the
    password part; the backend URL's password too, if it has one."""
    found: list[str] = []
    for option in OPTIONS:
        value = option.value_in(settings)
        if isinstance(value, Secret):
            found += url_secrets(value.reveal()) if "://" in value.reveal() else [value.reveal()]
    found += url_secrets(settings.webhook.backend_url)[1:]
    return [s for s in found if s]


def default_backend_url(node_env: str) -> str:
    """The original daemon's rule: port 3015 in production, 3016 otherwise."""
    return "http://127.0.0.1:3015" if node_env == "production" else "http://127.0.0.1:3016"


def parse_settings(
    env: Mapping[str, str],
    overrides: Mapping[str, str] | None = None,
    *,
    require: tuple[str, ...] = ("admin_secret", "encryption_key"),
    require_source: bool = True,
) -> Settings:
    """Build :class:`Settings` from the environment and CLI overrides (by field name,
    as in :data:`OPTIONS`: ``{"tick_interval": "45s"}``).

    A CLI override wins over the environment, which wins over the default. Empty
    environment values count as unset. ``require`` names fields that must end up set;
    the source-specific requirement (``DATABASE_URL`` or a connections file) is added
    unless ``require_source`` is false (commands that never read the list, e.g. encrypt).
    Raises :class:`ConfigError` naming every problem found (:meth:`ConfigError.lines`).
    """
    overrides = overrides or {}
    values: dict[str, Any] = {}
    labels: dict[str, str] = {}
    problems: list[ConfigError] = []
    for option in OPTIONS:
        if overrides.get(option.field) is not None:
            raw, label = overrides[option.field], option.flag or option.env
        elif env.get(option.env):
            raw, label = env[option.env], option.env
        else:
            if option.default is not None:  # parsed once, when its group was declared
                values[option.field], labels[option.field] = _DEFAULTS[option.field], option.env
            continue
        labels[option.field] = label
        if PLACEHOLDER in raw.lower():
            problems.append(
                ConfigError(
                    label,
                    f"is still the {PLACEHOLDER!r} placeholder of deploy/env.example: "
                    "set the real value (the value is not shown)",
                )
            )
            continue
        try:
            values[option.field] = option.parse(raw)
        except ValueError as exc:
            problems.append(ConfigError(label, str(exc)))
    # A field whose value was bad falls back to its default below, so the checks that
    # follow still run and report their own problems; nothing is built from it.
    merged = {**_DEFAULTS, **values}
    if "backend_url" not in values and "backend_url" not in {p.name for p in problems}:
        values["backend_url"] = merged["backend_url"] = default_backend_url(merged["node_env"])

    needed = list(require)
    if require_source:
        needed.append("database_url" if merged["source"] == "postgres" else "connections_file")
    bad = {_BY_ENV_OR_FLAG.get(p.name) for p in problems}
    for name in needed:
        if name not in values and name not in bad:
            option = _BY_FIELD[name]
            where = option.env + (f" (or {option.flag})" if option.flag else "")
            problems.append(ConfigError(option.env, f"is required: set {where}"))
    if "encryption_key" in values:
        problem = key_problem(values["encryption_key"].reveal(), merged["key_derivation"])
        problems += [ConfigError("ENCRYPTION_KEY", problem)] if problem else []

    def named(field: str) -> str:
        return labels.get(field) or _BY_FIELD[field].env

    problems += [ConfigError(name, message) for name, message in cross_check(merged, named)]
    if problems:
        raise ConfigError.of(problems)
    return _build(values)


def _build(values: Mapping[str, Any]) -> Settings:
    """:class:`Settings` from values by field name; a field not given keeps its default."""
    groups: dict[str, dict[str, Any]] = {name: {} for name in GROUPS}
    for field, value in values.items():
        groups[_BY_FIELD[field].group][field] = value
    return Settings(**{name: group(**groups[name]) for name, group in GROUPS.items()})
