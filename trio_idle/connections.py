"""The connection list: rows from a source turned into validated :class:`MailConnection`.

Building the list is pure (decryption is CPU only), so a bad row is a value, not an
exception: :func:`build_connections` returns the good connections and one
:class:`RowProblem` per unusable row, and the caller logs each problem once.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from trio_idle.crypto import DecryptionError, decrypt_password
from trio_idle.secret import Secret

_HOST_RE = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?$|^\[?[0-9a-fA-F:.]+\]?$"
)


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
    password: Secret

    @property
    def label(self) -> str:
        """The ``<email>`` of the ``[idle/<email>]`` log prefix."""
        return self.email


@attrs.frozen
class RowProblem:
    """Why one row was skipped. ``message`` is safe to log (no secrets)."""

    connection_id: str
    message: str


def _text(row: Mapping[str, Any], column: str) -> str | None:
    value = row.get(column)
    if value is None:
        return None
    return str(value).strip()


def build_connection(row: Mapping[str, Any], key: bytes) -> MailConnection | RowProblem:
    """Validate and decrypt one row with the source's column names (aliases)."""
    conn_id = _text(row, "id") or "<no id>"
    email = _text(row, "email")
    if not email:
        return RowProblem(conn_id, "email is empty")
    host = _text(row, "imapHost")
    if not host or not _HOST_RE.match(host):
        return RowProblem(conn_id, f"imapHost {host!r} is not a usable host name")
    try:
        port = int(row.get("imapPort") or 0)
    except (TypeError, ValueError):
        return RowProblem(conn_id, f"imapPort {row.get('imapPort')!r} is not a number")
    if not 0 < port < 65536:
        return RowProblem(conn_id, f"imapPort {port} is outside 1-65535")
    if row.get("passwordProblem"):
        return RowProblem(conn_id, str(row["passwordProblem"]))
    if "passwordSource" in row:  # file source: the password came from the environment
        password = row.get("password")
        if not password:
            return RowProblem(conn_id, f"{row['passwordSource']} is not set or empty")
    else:
        token = _text(row, "encryptedPassword")
        if not token:
            return RowProblem(conn_id, "encryptedPassword is empty")
        try:
            password = decrypt_password(token, key)
        except DecryptionError as exc:
            return RowProblem(conn_id, f"cannot decrypt encryptedPassword: {exc}")
    login = _text(row, "imapUser") or email
    user_id = _text(row, "userId")
    return MailConnection(
        id=conn_id,
        user_id=user_id or None,
        email=email,
        host=host.strip("[]"),
        port=port,
        login=login,
        password=Secret(password),
    )


def build_connections(
    rows: Iterable[Mapping[str, Any]], key: bytes
) -> tuple[dict[str, MailConnection], list[RowProblem]]:
    """All rows → ``({id: connection}, problems)``. A duplicate id keeps the first row."""
    good: dict[str, MailConnection] = {}
    problems: list[RowProblem] = []
    for row in rows:
        result = build_connection(row, key)
        if isinstance(result, RowProblem):
            problems.append(result)
        elif result.id in good:
            problems.append(RowProblem(result.id, "duplicate id; keeping the first row"))
        else:
            good[result.id] = result
    return good, problems
