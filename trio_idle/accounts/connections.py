"""The connection list: rows from a source turned into validated :class:`MailConnection`.

Building the list is pure (decryption is CPU only), so a bad row is a value, not an
exception: :func:`build_connections` returns the good connections and one
:class:`RowProblem` per unusable row, and the caller logs each problem once.
"""

from __future__ import annotations

import decimal
import hashlib
import ipaddress
import json
import math
import re
import secrets
from collections.abc import Iterable, Mapping
from typing import Any, Final

import attrs

from trio_idle.accounts.providers import GENERIC, SECURITIES, preset_for
from trio_idle.core.crypto import DecryptionError, decrypt_password
from trio_idle.core.folders import FOLDER_WATCH_MODES, FOLDER_WATCH_STATUS, parse_folders
from trio_idle.core.scrub import PLAIN, escape_controls
from trio_idle.core.secret import Secret

AUTH_PASSWORD: Final = "password"
AUTH_OAUTH2: Final = "oauth2"
AUTH_TYPES: Final = (AUTH_PASSWORD, AUTH_OAUTH2)

#: one DNS label: letters, digits, '-' inside, '_' tolerated (some providers' aliases)
_LABEL_RE = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")
MAX_HOST_CHARS: Final = 253
MAX_EMAIL_CHARS: Final = 320
MAX_LOGIN_CHARS: Final = 320
MAX_ID_CHARS: Final = 200
#: an iv:tag:ciphertext token for a password of a few KiB; more is not a password
MAX_TOKEN_CHARS: Final = 16 * 1024
#: Google's and Microsoft's refresh tokens are well under 2 KiB
MAX_REFRESH_TOKEN_CHARS: Final = 8 * 1024
#: how much of a bad value a problem message quotes
SHOWN_CHARS: Final = 60


def _shown(value: object) -> str:
    """A bad value as a problem message quotes it: repr'd, printable, short."""
    try:
        text = repr(value)
    except Exception:  # a hostile __repr__ must not end the caller
        text = f"<{type(value).__name__}>"
    return PLAIN.scrub(text, limit=SHOWN_CHARS)


def parse_host(value: object) -> str:
    """A host name or an IP literal (IPv6 with or without brackets) → the host to connect to.

    Raises ``ValueError`` (log-safe) for anything else: control characters, spaces, a
    scheme or path, empty labels, labels over 63 or names over 253 characters.
    """
    if not isinstance(value, str):
        raise ValueError(f"expected a host name or IP address, got {_shown(value)}")
    host = value.strip()
    literal = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return str(ipaddress.ip_address(literal))
    except ValueError:
        pass
    name = host[:-1] if host.endswith(".") else host
    if (
        not name
        or len(name) > MAX_HOST_CHARS
        or not all(_LABEL_RE.match(label) for label in name.split("."))
        or name.replace(".", "").isdigit()  # "999.1.1.1" is a broken address, not a name
    ):
        raise ValueError(f"expected a host name or IP address, got {_shown(value)}")
    return name.lower()


def parse_port(value: object) -> int:
    """An integer 1-65535, given as a number or as digits. No rounding, no infinities."""
    port: int | None = None
    if isinstance(value, bool):
        port = None
    elif isinstance(value, int):
        port = value
    elif isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        port = int(value.strip()) if len(value.strip()) <= 5 else None
    elif isinstance(value, float | decimal.Decimal):
        try:
            if (
                value == value.to_integral_value()
                if isinstance(value, decimal.Decimal)
                else (math.isfinite(value) and value.is_integer())
            ):
                port = int(value)
        except (ArithmeticError, ValueError):  # NaN, signalling NaN, infinities
            port = None
    if port is None or not 0 < port < 65536:
        raise ValueError(f"expected an integer 1-65535, got {_shown(value)}")
    return port


def _plain_text(value: object, what: str, limit: int) -> str:
    """A single-line text field: a string without control characters, at most ``limit``."""
    if not isinstance(value, str | int):
        raise ValueError(f"{what} must be text, got {type(value).__name__}")
    text = str(value).strip()
    if escape_controls(text) != text:
        raise ValueError(f"{what} {_shown(text)} contains control characters")
    if len(text) > limit:
        raise ValueError(f"{what} is {len(text)} characters long (at most {limit})")
    return text


@attrs.frozen
class MailConnection:
    """One mailbox to watch. Equality covers everything a session depends on, so a
    change in host, port, login or password makes the reconciler restart it."""

    id: str
    user_id: str | None
    email: str
    host: str
    port: int
    login: str
    #: the IMAP password (``auth == "password"``); empty for OAuth2 connections
    password: Secret
    #: how the session signs in: :data:`AUTH_PASSWORD` (LOGIN) or :data:`AUTH_OAUTH2`
    #: (SASL XOAUTH2 / OAUTHBEARER with an access token from a token source)
    auth: str = "password"
    #: a refresh token the daemon itself may use (rows with ``encryptedRefreshToken``)
    refresh_token: Secret | None = None
    #: the row's own security mode (``imapSecurity``), overriding the global setting
    security: str | None = None
    #: the provider preset this connection matched (``trio_idle.accounts.providers``), if any
    provider: str | None = None
    #: the row's own folders to watch (``imapFolders``), overriding ``TRIO_IDLE_FOLDERS``
    folders: tuple[str, ...] | None = None
    #: the row's own way of watching those folders (``imapFolderWatch``: ``status`` or
    #: ``idle``), overriding ``TRIO_IDLE_FOLDER_WATCH``; None: the global setting
    folder_watch: str | None = None
    #: what was wrong with optional row values that were replaced by a default instead
    #: of skipping the row (safe to log; logged and counted once by the refresher)
    warnings: tuple[str, ...] = attrs.field(default=(), eq=False)

    @property
    def label(self) -> str:
        """The ``<email>`` of the ``[idle/<email>]`` log prefix."""
        return self.email


@attrs.frozen
class RowProblem:
    """Why one row was skipped. ``message`` is safe to log (no secrets)."""

    connection_id: str
    message: str


def _text(row: Mapping[str, Any], column: str, limit: int) -> str | None:
    value = row.get(column)
    if value is None:
        return None
    return _plain_text(value, column, limit)


def build_connection(row: Mapping[str, Any], key: bytes) -> MailConnection | RowProblem:
    """Validate and decrypt one row with the source's column names (aliases).

    Never raises, whatever the row holds: every problem, including one this code did
    not foresee, is a :class:`RowProblem` whose message is safe to log.
    """
    raw_id = row.get("id") if isinstance(row, Mapping) else None
    try:
        conn_id = _text(row, "id", MAX_ID_CHARS) or "<no id>"
    except ValueError:
        conn_id = f"<bad id {_shown(raw_id)}>"
    try:
        return _build(row, key, conn_id)
    except ValueError as exc:
        return RowProblem(conn_id, str(exc))
    except Exception as exc:  # a value of a type no rule expected: skip the row, not the process
        return RowProblem(conn_id, f"unusable row ({type(exc).__name__})")


def _choice(row: Mapping[str, Any], column: str, choices: tuple[str, ...]) -> str | None:
    """An optional one-word column: absent, NULL or empty → ``None``; otherwise one of
    ``choices`` (case-insensitive), or ``ValueError`` naming the column."""
    text = _text(row, column, 20)
    if not text:
        return None
    if text.lower() not in choices:
        raise ValueError(f"{column}: expected one of {', '.join(choices)}, got {_shown(text)}")
    return text.lower()


def _folders(row: Mapping[str, Any]) -> tuple[str, ...] | None:
    """The optional ``imapFolders`` column: absent, NULL or empty → ``None`` (the global
    ``TRIO_IDLE_FOLDERS``); a comma-separated text, a list of names, or a JSON array as
    text (a PostgreSQL ``text[]`` read through ``to_jsonb``), parsed like the setting;
    ``ValueError`` naming the column otherwise."""
    value = row.get("imapFolders")
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except ValueError:
            raise ValueError("imapFolders: not a JSON array of folder names") from None
    if isinstance(value, (list, tuple)):
        if not all(isinstance(v, str) and "," not in v for v in value):
            raise ValueError("imapFolders: expected folder names without commas")
        value = ",".join(value)
    if not isinstance(value, str):
        raise ValueError(f"imapFolders: expected text or a list, got {type(value).__name__}")
    try:
        return parse_folders(value)
    except ValueError as exc:
        raise ValueError(f"imapFolders: {exc}") from None


def _folder_watch(row: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """The optional ``imapFolderWatch`` column: ``(mode, warning)``. Absent, NULL or
    empty: ``(None, None)`` (the global ``TRIO_IDLE_FOLDER_WATCH``). A value that is not
    a mode does not cost the mailbox its watch: it falls back to ``status`` (today's
    behaviour, no extra connections) with a warning naming the column."""
    value = row.get("imapFolderWatch")
    if value is None or (isinstance(value, str) and not value.strip()):
        return None, None
    if isinstance(value, str) and value.strip().lower() in FOLDER_WATCH_MODES:
        return value.strip().lower(), None
    return FOLDER_WATCH_STATUS, (
        f"imapFolderWatch: expected one of {', '.join(FOLDER_WATCH_MODES)}, got "
        f"{_shown(value)}; watching its folders with {FOLDER_WATCH_STATUS}"
    )


def _refresh_token(row: Mapping[str, Any], key: bytes) -> Secret | None:
    """The decrypted ``encryptedRefreshToken``, if the row has one."""
    token = _text(row, "encryptedRefreshToken", MAX_TOKEN_CHARS)
    if not token:
        return None
    try:
        refresh = decrypt_password(token, key)
    except DecryptionError as exc:
        raise ValueError(f"cannot decrypt encryptedRefreshToken: {exc}") from None
    if not refresh or any(ch.isspace() or not ch.isprintable() for ch in refresh):
        # OAuth2 tokens are printable ASCII (RFC 6749 A.17); anything else is a bad key
        # or a bad row, and would be sent to a token endpoint as is
        raise ValueError("encryptedRefreshToken decrypts to an empty or unprintable token")
    if len(refresh) > MAX_REFRESH_TOKEN_CHARS:
        raise ValueError(
            f"the refresh token is {len(refresh)} characters long "
            f"(at most {MAX_REFRESH_TOKEN_CHARS})"
        )
    return Secret(refresh)


def _server(
    row: Mapping[str, Any], email: str, security: str | None
) -> tuple[str, int, str | None, str | None]:
    """``(host, port, security, provider)`` of a row; a row without a host takes them
    from the preset of its email domain (row values that are set still win)."""
    raw_host = row.get("imapHost")
    if raw_host is None or (isinstance(raw_host, str) and not raw_host.strip()):
        preset = preset_for(email, None)
        if preset.host is None:
            raise ValueError(
                "imapHost: empty, and the email domain has no provider preset to take it from"
            )
        port = preset.port if row.get("imapPort") is None else _port(row)
        if security is None and port == preset.port:
            security = preset.security
        return preset.host, port, security, preset.name
    try:
        host = parse_host(raw_host)
    except ValueError as exc:
        raise ValueError(f"imapHost: {exc}") from None
    preset = preset_for(email, host)
    return host, _port(row), security, None if preset.name == GENERIC else preset.name


def _port(row: Mapping[str, Any]) -> int:
    try:
        return parse_port(row.get("imapPort"))
    except ValueError as exc:
        raise ValueError(f"imapPort: {exc}") from None


def _password(row: Mapping[str, Any], key: bytes) -> str:
    if row.get("passwordProblem"):
        raise ValueError(PLAIN.scrub(str(row["passwordProblem"])))
    if "passwordSource" in row:  # file source: the password came from the environment
        password = row.get("password")
        if not password or not isinstance(password, str):
            raise ValueError(f"{PLAIN.scrub(row['passwordSource'])} is not set or empty")
    else:
        token = _text(row, "encryptedPassword", MAX_TOKEN_CHARS)
        if not token:
            raise ValueError("encryptedPassword is empty")
        try:
            password = decrypt_password(token, key)
        except DecryptionError as exc:
            raise ValueError(f"cannot decrypt encryptedPassword: {exc}") from None
    if any(ch in password for ch in "\r\n\0"):
        # IMAP cannot carry these in a quoted LOGIN argument; say so once, not on every retry
        raise ValueError("the password contains CR, LF or NUL, which LOGIN cannot send")
    return password


def _build(row: Mapping[str, Any], key: bytes, conn_id: str) -> MailConnection | RowProblem:
    if conn_id.startswith("<bad id"):
        return RowProblem(conn_id, "id must be text without control characters")
    email = _text(row, "email", MAX_EMAIL_CHARS)
    if not email:
        return RowProblem(conn_id, "email is empty")
    if any(ch.isspace() for ch in email):
        return RowProblem(conn_id, f"email {_shown(email)} contains spaces")
    auth = _choice(row, "authType", AUTH_TYPES) or AUTH_PASSWORD
    security = _choice(row, "imapSecurity", SECURITIES)
    host, port, security, provider = _server(row, email, security)
    if auth == AUTH_PASSWORD:
        # a password row's refresh token column is not used, so it cannot make it fail
        password, refresh = _password(row, key), None
    else:
        # OAuth2 signs in with an access token; a stored password is not used
        password, refresh = "", _refresh_token(row, key)
    login = _text(row, "imapUser", MAX_LOGIN_CHARS) or email
    user_id = _text(row, "userId", MAX_ID_CHARS)
    folder_watch, watch_warning = _folder_watch(row)
    return MailConnection(
        id=conn_id,
        user_id=user_id or None,
        email=email,
        host=host,
        port=port,
        login=login,
        password=Secret(password),
        auth=auth,
        refresh_token=refresh,
        security=security,
        provider=provider,
        folders=_folders(row),
        folder_watch=folder_watch,
        warnings=() if watch_warning is None else (watch_warning,),
    )


def _one(row: object, key: bytes) -> MailConnection | RowProblem:
    if not isinstance(row, Mapping):
        return RowProblem("<no id>", f"not a row: {type(row).__name__}")
    return build_connection(row, key)


def _gather(
    results: Iterable[MailConnection | RowProblem],
) -> tuple[dict[str, MailConnection], list[RowProblem]]:
    good: dict[str, MailConnection] = {}
    problems: list[RowProblem] = []
    for result in results:
        if isinstance(result, RowProblem):
            problems.append(result)
        elif result.id in good:
            problems.append(RowProblem(result.id, "duplicate id; keeping the first row"))
        else:
            good[result.id] = result
    return good, problems


def build_connections(
    rows: Iterable[Mapping[str, Any]], key: bytes
) -> tuple[dict[str, MailConnection], list[RowProblem]]:
    """All rows → ``({id: connection}, problems)``. A duplicate id keeps the first row."""
    return _gather(_one(row, key) for row in rows)


#: bytes of a row's keyed digest (128 bits: no two different rows share one by chance,
#: and without the process's random key nobody can make them share one on purpose)
ROW_DIGEST_BYTES: Final = 16


class ConnectionListBuilder:
    """:func:`build_connections` that remembers its last build.

    A row whose contents are the same as in the last build gives the very same
    :class:`MailConnection` object: it is not validated or decrypted again and no new
    objects are made for it, so a refresh that changes nothing costs one keyed hash per
    row, and the reconciler's diff sees identical objects. A changed row (any column) is
    built anew. Only a keyed digest of each row is kept (no copy of the rows: memory per
    session stays small; the key is random per process, so the digests of rows holding
    secrets are of no use outside it).

    Not thread-safe: one build at a time (the refresh loop runs one refresh at a time, in
    a worker thread). A build is all or nothing for the memory: the last build is the one
    that returned.
    """

    def __init__(self, key: bytes) -> None:
        self._key = key
        self._salt = secrets.token_bytes(16)
        self._known: dict[bytes, MailConnection | RowProblem] = {}
        self._results: list[MailConnection | RowProblem] = []

    @property
    def rows(self) -> int:
        """How many rows the last build had."""
        return len(self._results)

    def build(
        self, rows: Iterable[Mapping[str, Any]] | None
    ) -> tuple[dict[str, MailConnection], list[RowProblem]]:
        """Like :func:`build_connections`; ``rows=None``: the same rows as the last build
        (a source that knows its rows did not change)."""
        if rows is None:
            return _gather(self._results)
        known: dict[bytes, MailConnection | RowProblem] = {}
        results: list[MailConnection | RowProblem] = []
        for row in rows:
            digest = self._digest(row)
            if digest is None:
                results.append(_one(row, self._key))
                continue
            result = known.get(digest) or self._known.get(digest) or _one(row, self._key)
            known[digest] = result
            results.append(result)
        self._known, self._results = known, results
        return _gather(results)

    def _digest(self, row: object) -> bytes | None:
        if not isinstance(row, Mapping):
            return None
        try:
            # the source gives the same columns in the same order each time; another
            # order only costs a rebuild of the row
            text = repr(tuple(row.items()))
        except Exception:  # a value with a hostile __repr__: built every time, as before
            return None
        return hashlib.blake2b(
            text.encode("utf-8", "surrogatepass"), digest_size=ROW_DIGEST_BYTES, key=self._salt
        ).digest()
