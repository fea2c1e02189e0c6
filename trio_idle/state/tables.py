"""The state store's tables, as SQL: one text per statement for SQLite and PostgreSQL.

Three tables, each kept by both backends: the scan state per mailbox (:class:`StateSql`),
the refresh tokens an OAuth2 provider rotated (:data:`TOKEN_COLUMNS`) and the account
health last reported per connection (:data:`HEALTH_COLUMNS`), the last two one row per
connection (:class:`ConnectionRowSql`). SQLite creates them on first use;
PostgreSQL by ``trio-idle db migrate`` (:data:`POSTGRES_MIGRATIONS`). Their rows, in
the tables' column order, to and from the records (:mod:`trio_idle.state.records`) are
here too, for both backends. Pure.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Final

import attrs

from trio_idle.state.records import Key, ReportedHealth, ScannedState, StoredRefreshToken


@attrs.frozen
class StateSql:
    """The store's statements, one text per statement for both backends.

    Only the table name and the parameter style differ: SQLite takes ``?1``, asyncpg
    ``$1``. The column types are Postgres names that SQLite maps to the same storage
    (``bigint`` → INTEGER, ``double precision`` → REAL), so one ``CREATE TABLE`` serves both.
    """

    table: str
    #: the parameter mark before the 1-based number: ``"?"`` (SQLite) or ``"$"`` (asyncpg)
    mark: str

    def _param(self, n: int) -> str:
        return f"{self.mark}{n}"

    @property
    def create(self) -> str:
        return (
            f"CREATE TABLE IF NOT EXISTS {self.table} ("
            " connection_id text NOT NULL,"
            " mailbox text NOT NULL,"
            " uidvalidity bigint,"
            " uidnext bigint,"
            " scanned_at double precision NOT NULL,"
            " removed_at double precision,"
            " PRIMARY KEY (connection_id, mailbox))"
        )

    @property
    def select_all(self) -> str:
        return (
            "SELECT connection_id, mailbox, uidvalidity, uidnext, scanned_at, removed_at "
            f"FROM {self.table}"
        )

    @property
    def upsert(self) -> str:
        """Insert or update one mailbox's row, never moving ``uidnext`` backwards.

        The stored row may be newer than the one written: in shared mode an instance that
        lost a mailbox (handover, or fenced while Postgres was unreachable, its write kept
        dirty and retried) can write its older scan after the new owner wrote a later one.
        So within the same UIDVALIDITY the greater ``uidnext`` is kept, with the
        ``scanned_at`` of the scan that reached it; a different (or unknown) UIDVALIDITY, or
        an unknown ``uidnext``, replaces the row as before. ``removed_at`` always follows
        the write (it describes the connection list, not the scan). The same text runs on
        SQLite (>= 3.24) and Postgres: both read the stored row by the table's name and
        the written one as ``excluded``, and a comparison with NULL is never true.
        """
        values = ", ".join(self._param(n) for n in range(1, 7))
        t = self.table
        stale = f"{t}.uidvalidity = excluded.uidvalidity AND {t}.uidnext > excluded.uidnext"
        return (
            f"INSERT INTO {t} VALUES ({values}) "
            "ON CONFLICT (connection_id, mailbox) DO UPDATE SET "
            "uidvalidity = excluded.uidvalidity, "
            f"uidnext = CASE WHEN {stale} THEN {t}.uidnext ELSE excluded.uidnext END, "
            f"scanned_at = CASE WHEN {stale} THEN {t}.scanned_at ELSE excluded.scanned_at END, "
            "removed_at = excluded.removed_at"
        )

    @property
    def delete(self) -> str:
        return (
            f"DELETE FROM {self.table} "
            f"WHERE connection_id = {self._param(1)} AND mailbox = {self._param(2)}"
        )


SQLITE_SQL: Final = StateSql("mailbox_state", "?")
POSTGRES_SQL: Final = StateSql("trio_idle_mailbox_state", "$")
POSTGRES_TABLE: Final = POSTGRES_SQL.table
#: shared mode: the stored state of some connections (``$1`` a text array of ids)
POSTGRES_SELECT_CONNECTIONS: Final = (
    POSTGRES_SQL.select_all + " WHERE connection_id = ANY($1::text[])"
)
#: what ``trio-idle db migrate`` runs (idempotent)
POSTGRES_DDL: Final = POSTGRES_SQL.create


@attrs.frozen
class ConnectionRowSql:
    """Statements of a table with one row per connection (``connection_id`` its key), in
    the style of :class:`StateSql`: one text per statement for both backends.

    Writing a row replaces every column of the connection's row; :attr:`columns` are the
    columns after ``connection_id``, in their order in the table, each with its SQL type.
    """

    table: str
    mark: str
    #: ``(name, type)`` of each column after ``connection_id``
    columns: tuple[tuple[str, str], ...]

    def _param(self, n: int) -> str:
        return f"{self.mark}{n}"

    @property
    def create(self) -> str:
        declared = [("connection_id", "text PRIMARY KEY"), *self.columns]
        return (
            f"CREATE TABLE IF NOT EXISTS {self.table} ("
            + ",".join(f" {name} {type_}" for name, type_ in declared)
            + ")"
        )

    @property
    def select_all(self) -> str:
        names = ", ".join(["connection_id", *(name for name, _ in self.columns)])
        return f"SELECT {names} FROM {self.table}"

    @property
    def select_connections(self) -> str:
        """Shared mode: the rows of some connections (``$1`` a text array of ids)."""
        return self.select_all + " WHERE connection_id = ANY($1::text[])"

    @property
    def upsert(self) -> str:
        values = ", ".join(self._param(n) for n in range(1, len(self.columns) + 2))
        updates = ", ".join(f"{name} = excluded.{name}" for name, _ in self.columns)
        return (
            f"INSERT INTO {self.table} VALUES ({values}) "
            f"ON CONFLICT (connection_id) DO UPDATE SET {updates}"
        )

    @property
    def delete(self) -> str:
        return f"DELETE FROM {self.table} WHERE connection_id = {self._param(1)}"


#: The rotated refresh tokens (:mod:`trio_idle.auth.token_refresh`). One row per
#: connection: the newest refresh token the provider handed out, encrypted like the
#: backend's passwords (``iv:tag:ct``), and the fingerprint of the row's own refresh token
#: it replaced, so that a new token in the row (the user signed in again) wins over it.
TOKEN_COLUMNS: Final = (
    ("encrypted_token", "text NOT NULL"),
    ("replaces", "text NOT NULL"),
    ("updated_at", "double precision NOT NULL"),
)
SQLITE_TOKEN_SQL: Final = ConnectionRowSql("oauth_refresh_token", "?", TOKEN_COLUMNS)
POSTGRES_TOKEN_SQL: Final = ConnectionRowSql("trio_idle_oauth_refresh_token", "$", TOKEN_COLUMNS)
POSTGRES_TOKEN_TABLE: Final = POSTGRES_TOKEN_SQL.table

#: The account health last reported to the backend
#: (:mod:`trio_idle.mailbox.health_reporter`). One row per connection: the ``state`` and
#: ``reason`` the backend last accepted (or refused for good), so that a restart reports
#: only what changed meanwhile instead of one report per connection.
HEALTH_COLUMNS: Final = (
    ("state", "text NOT NULL"),
    ("reason", "text"),
    ("reported_at", "double precision NOT NULL"),
)
SQLITE_HEALTH_SQL: Final = ConnectionRowSql("account_health", "?", HEALTH_COLUMNS)
POSTGRES_HEALTH_SQL: Final = ConnectionRowSql("trio_idle_account_health", "$", HEALTH_COLUMNS)
POSTGRES_HEALTH_TABLE: Final = POSTGRES_HEALTH_SQL.table
#: every table ``trio-idle db migrate`` creates, with its statement (idempotent)
POSTGRES_MIGRATIONS: Final = (
    (POSTGRES_TABLE, POSTGRES_DDL),
    (POSTGRES_TOKEN_TABLE, POSTGRES_TOKEN_SQL.create),
    (POSTGRES_HEALTH_TABLE, POSTGRES_HEALTH_SQL.create),
)


# -- rows <-> records, in the tables' column order (both backends) ------------------------


def state_rows(entries: Iterable[tuple[Key, ScannedState]]) -> list[tuple[Any, ...]]:
    """The scan-state rows to write, one per ``(key, state)``."""
    return [(k[0], k[1], s.uidvalidity, s.uidnext, s.scanned_at, s.removed_at) for k, s in entries]


def states_of(rows: Iterable[Sequence[Any]]) -> dict[Key, ScannedState]:
    """The scan states in ``rows`` (as :attr:`StateSql.select_all` reads them), by key."""
    return {(r[0], r[1]): ScannedState(r[2], r[3], r[4], r[5]) for r in rows}


def token_row(conn_id: str, stored: StoredRefreshToken) -> tuple[Any, ...]:
    """The rotated-token row to write for ``conn_id``."""
    return (conn_id, stored.encrypted, stored.replaces, stored.updated_at)


def tokens_of(rows: Iterable[Sequence[Any]]) -> dict[str, StoredRefreshToken]:
    """The stored rotated tokens in ``rows``, by connection id."""
    return {r[0]: StoredRefreshToken(r[1], r[2], r[3]) for r in rows}


def health_rows(entries: Iterable[tuple[str, ReportedHealth]]) -> list[tuple[Any, ...]]:
    """The health-reported rows to write, one per ``(connection id, health)``."""
    return [(i, h.state, h.reason, h.reported_at) for i, h in entries]


def healths_of(rows: Iterable[Sequence[Any]]) -> dict[str, ReportedHealth]:
    """The health reported in ``rows``, by connection id."""
    return {r[0]: ReportedHealth(r[1], r[2], r[3]) for r in rows}
