"""URLs in settings: the backend's and providers' HTTP endpoints, PostgreSQL URLs, paths.

Each parser takes what an operator wrote and gives it back checked, or raises
:class:`ValueError` with a one-line message (the configuration prefixes the variable's
name). A URL that may carry a password or a token is never echoed, not even in part:
such values come back wrapped in :class:`~trio_idle.core.secret.Secret`. Pure.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from trio_idle.core.secret import Secret


def parse_http_url(text: str) -> str:
    """An ``http://`` or ``https://`` URL with a host (and a numeric port, if any),
    without its trailing ``/``. Shown in errors only when it holds no credentials."""
    parts = urlsplit(text.strip())
    shown = repr(text) if "@" not in text else "a URL with credentials (not shown)"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http:// or https:// URL with a host, got {shown}")
    try:
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise ValueError(f"expected a URL with a numeric port, got {shown}") from None
    return text.strip().rstrip("/")


def parse_secret_http_url(text: str) -> Secret:
    """An HTTP URL that embeds its token (push monitoring): checked like
    :func:`parse_http_url`, never echoed."""
    try:
        return Secret(parse_http_url(text))
    except ValueError:
        raise ValueError(
            "expected an http:// or https:// URL with a host (value not shown)"
        ) from None


def parse_postgres_url(text: str) -> Secret:
    """A ``postgresql://`` URL (several ``host:port`` allowed, as asyncpg takes them);
    never echoed, it usually carries a password."""
    expected = "expected a postgresql://user:password@host:port/db URL"
    try:
        parts = urlsplit(text.strip())
    except ValueError:
        raise ValueError(f"{expected} (value not shown)") from None
    if parts.scheme not in ("postgres", "postgresql"):
        raise ValueError(expected)
    # asyncpg takes "host1:5432,host2:5433"; every port must be a number, or the first
    # connect dies deep inside asyncpg instead of here, as a configuration error.
    hosts = parts.netloc.rpartition("@")[2]
    for host in hosts.split(","):
        name, sep, port = host.rpartition(":") if not host.endswith("]") else (host, "", "")
        if sep and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(f"{expected}: a port is not a number 1-65535 (value not shown)")
        if sep and name.startswith("[") and not name.endswith("]"):
            raise ValueError(f"{expected}: malformed host (value not shown)")
    return Secret(text.strip())


def parse_url_path(text: str) -> str:
    """The path part of a URL (appended to a base URL): must start with ``/``."""
    if not text.startswith("/"):
        raise ValueError(f"expected a path starting with '/', got {text!r}")
    return text


def parse_token_url(text: str) -> str:
    """An OAuth2 token endpoint, which may hold a ``{tenant}`` placeholder (filled in
    later with :func:`parse_tenant`'s value)."""
    # Check the URL with a stand-in where the tenant goes.
    checked = parse_http_url(text.replace("{tenant}", "common"))
    return checked if "{tenant}" not in text else text.strip().rstrip("/")


def parse_tenant(text: str) -> str:
    """A Microsoft tenant: a GUID, a domain, ``common``, ``organizations``, ``consumers``."""
    # It becomes a path segment of the token URL: nothing that could leave the segment.
    value = text.strip()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]{0,99}", value):
        raise ValueError(
            "expected a tenant id, a domain, common, organizations or consumers "
            f"(letters, digits, '.', '-'), got {value[:60]!r}"
        )
    return value
