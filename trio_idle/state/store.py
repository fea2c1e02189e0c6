"""Per-mailbox state that survives restarts: what has been scanned, up to which UID.

For each (connection id, mailbox) the store remembers the last ``UIDVALIDITY`` and the
``UIDNEXT`` up to which a scan has *succeeded* (advanced only after the backend answered
2xx), and when. On start a session compares the server's values with the stored ones and
requests a ``startup`` scan only where mail arrived while the daemon was down (or the
mailbox is new to the store).

Guarantees:
- Reads never touch the disk or network after :meth:`StateStore.load`: the whole state is
  held in memory (a few dozen bytes per mailbox).
- Writes never block the IDLE path: :meth:`StateStore.record` only marks the entry dirty;
  :meth:`StateStore.run_flusher` writes dirty entries in batches (SQLite in a worker
  thread, Postgres through trio-asyncio) and keeps them dirty if a write fails.
- The stored ``uidnext`` never moves backwards within one ``uidvalidity``, in memory
  (:meth:`StateStore.record`) and in the table (:attr:`StateSql.upsert`), whichever
  instance's write lands last.
- A missing, unreadable or corrupt store costs one catch-up scan per mailbox, never a
  crash: the failure is logged and counted, and the daemon starts from an empty state.

The same backends also keep the refresh tokens an OAuth2 provider rotated
(:class:`TokenSql`, :class:`TokenBackend`; used by :mod:`trio_idle.auth.token_refresh`): one
more table in the same file or database, written at once rather than batched, since a
rotated token lost in a crash can be a grant lost.

And the account health last reported per connection (:class:`HealthSql`,
:meth:`StateStore.reported_health`; used by :mod:`trio_idle.mailbox.health_reporter`):
a restart reports only the connections whose health changed, not one report per
connection. Batched like the scan state; a write lost in a crash costs one repeated
report. Created like the other tables: by the SQLite backend on first use, by
``trio-idle db migrate`` in Postgres (before it, the health part is off and each start
reports every connection once, as before).
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Protocol, runtime_checkable

import attrs
import trio
import trio_asyncio
from loguru import logger

from trio_idle.core.config import Settings
from trio_idle.core.secret import Secret
from trio_idle.core.stats import Stats
from trio_idle.imap.responses import CatchUp, MailboxState

Key = tuple[str, str]  # (connection id, mailbox)


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
class TokenSql:
    """Statements of the rotated refresh tokens (:mod:`trio_idle.auth.token_refresh`), in the
    style of :class:`StateSql`: one text per statement for both backends.

    One row per connection: the newest refresh token the provider handed out, encrypted
    like the backend's passwords (``iv:tag:ct``), and the fingerprint of the row's own
    refresh token it replaced, so that a new token in the row (the user signed in again)
    wins over it.
    """

    table: str
    mark: str

    def _param(self, n: int) -> str:
        return f"{self.mark}{n}"

    @property
    def create(self) -> str:
        return (
            f"CREATE TABLE IF NOT EXISTS {self.table} ("
            " connection_id text PRIMARY KEY,"
            " encrypted_token text NOT NULL,"
            " replaces text NOT NULL,"
            " updated_at double precision NOT NULL)"
        )

    @property
    def select_all(self) -> str:
        return f"SELECT connection_id, encrypted_token, replaces, updated_at FROM {self.table}"

    @property
    def upsert(self) -> str:
        values = ", ".join(self._param(n) for n in range(1, 5))
        return (
            f"INSERT INTO {self.table} VALUES ({values}) "
            "ON CONFLICT (connection_id) DO UPDATE SET "
            "encrypted_token = excluded.encrypted_token, replaces = excluded.replaces, "
            "updated_at = excluded.updated_at"
        )

    @property
    def delete(self) -> str:
        return f"DELETE FROM {self.table} WHERE connection_id = {self._param(1)}"


SQLITE_TOKEN_SQL: Final = TokenSql("oauth_refresh_token", "?")
POSTGRES_TOKEN_SQL: Final = TokenSql("trio_idle_oauth_refresh_token", "$")
POSTGRES_TOKEN_TABLE: Final = POSTGRES_TOKEN_SQL.table


@attrs.frozen
class HealthSql:
    """Statements of the account health last reported to the backend
    (:mod:`trio_idle.mailbox.health_reporter`), in the style of :class:`StateSql`.

    One row per connection: the ``state`` and ``reason`` the backend last accepted (or
    refused for good), so that a restart reports only what changed meanwhile instead of
    one report per connection.
    """

    table: str
    mark: str

    def _param(self, n: int) -> str:
        return f"{self.mark}{n}"

    @property
    def create(self) -> str:
        return (
            f"CREATE TABLE IF NOT EXISTS {self.table} ("
            " connection_id text PRIMARY KEY,"
            " state text NOT NULL,"
            " reason text,"
            " reported_at double precision NOT NULL)"
        )

    @property
    def select_all(self) -> str:
        return f"SELECT connection_id, state, reason, reported_at FROM {self.table}"

    @property
    def select_connections(self) -> str:
        """Shared mode: the rows of some connections (``$1`` a text array of ids)."""
        return self.select_all + " WHERE connection_id = ANY($1::text[])"

    @property
    def upsert(self) -> str:
        values = ", ".join(self._param(n) for n in range(1, 5))
        return (
            f"INSERT INTO {self.table} VALUES ({values}) "
            "ON CONFLICT (connection_id) DO UPDATE SET "
            "state = excluded.state, reason = excluded.reason, "
            "reported_at = excluded.reported_at"
        )

    @property
    def delete(self) -> str:
        return f"DELETE FROM {self.table} WHERE connection_id = {self._param(1)}"


SQLITE_HEALTH_SQL: Final = HealthSql("account_health", "?")
POSTGRES_HEALTH_SQL: Final = HealthSql("trio_idle_account_health", "$")
POSTGRES_HEALTH_TABLE: Final = POSTGRES_HEALTH_SQL.table
#: every table ``trio-idle db migrate`` creates, with its statement (idempotent)
POSTGRES_MIGRATIONS: Final = (
    (POSTGRES_TABLE, POSTGRES_DDL),
    (POSTGRES_TOKEN_TABLE, POSTGRES_TOKEN_SQL.create),
    (POSTGRES_HEALTH_TABLE, POSTGRES_HEALTH_SQL.create),
)


@attrs.frozen
class ReportedHealth:
    """The account health the backend last accepted for a connection (or refused for
    good): ``state`` and ``reason`` as in the report, ``reported_at`` UNIX time."""

    state: str
    reason: str | None
    reported_at: float


@runtime_checkable
class HealthBackend(Protocol):
    """A state backend that also keeps the account health last reported."""

    name: str

    async def load_health(self) -> dict[str, ReportedHealth]: ...

    async def write_health(
        self, upserts: Sequence[tuple[str, ReportedHealth]], deletes: Sequence[str]
    ) -> None: ...


@attrs.frozen(repr=False)
class StoredRefreshToken:
    """A rotated refresh token as stored: ``encrypted`` is ``iv:tag:ct`` (never the
    plaintext), ``replaces`` the fingerprint of the row's token it supersedes."""

    encrypted: str
    replaces: str
    updated_at: float

    def __repr__(self) -> str:
        return f"StoredRefreshToken(encrypted=********, updated_at={self.updated_at!r})"


class TokenBackend(Protocol):
    """Where rotated refresh tokens live (the state store's SQLite file or database)."""

    name: str

    async def load_tokens(self) -> dict[str, StoredRefreshToken]: ...

    async def save_token(self, conn_id: str, stored: StoredRefreshToken) -> None: ...


@attrs.frozen
class ScannedState:
    """The mailbox as of the last successful scan. ``scanned_at`` is UNIX time."""

    uidvalidity: int | None
    uidnext: int | None
    scanned_at: float
    removed_at: float | None = None


#: ``TRIO_IDLE_START_FROM=now``: the reason a mailbox new to the store is not scanned
STARTED_FROM_NOW: Final = "mailbox new to the state store; starting from now"


def startup_decision(
    stored: ScannedState | None, current: MailboxState, start_from: str = "full"
) -> CatchUp:
    """First session of a connection in this process: did mail arrive while we were down?

    Pure. New to the store → scan (we cannot know), unless ``start_from`` is ``"now"``
    (the mail there counts as handled: the caller stores the server's UIDNEXT instead);
    UIDVALIDITY changed → scan; the server's UIDNEXT above the one the last successful
    scan covered → scan; otherwise no. ``start_from`` only ever concerns a mailbox with no
    stored state.
    """
    if stored is None:
        if start_from == "now":
            return CatchUp(False, STARTED_FROM_NOW)
        return CatchUp(True, "mailbox new to the state store")
    if (
        stored.uidvalidity is not None
        and current.uidvalidity is not None
        and stored.uidvalidity != current.uidvalidity
    ):
        return CatchUp(True, "uidvalidity changed while down")
    if stored.uidnext is None or current.uidnext is None:
        return CatchUp(True, "no UIDNEXT to compare")
    if current.uidnext > stored.uidnext:
        return CatchUp(
            True, f"mail arrived while down (uidnext {stored.uidnext}→{current.uidnext})"
        )
    return CatchUp(False, "nothing new since the last scan")


class StateBackend(Protocol):
    """Where the state lives. Methods may block (SQLite) or be trio-async (Postgres)."""

    name: str

    async def load_all(self) -> dict[Key, ScannedState]: ...

    async def write(
        self, upserts: Sequence[tuple[Key, ScannedState]], deletes: Sequence[Key]
    ) -> None: ...


class SqliteBackend:
    """A local SQLite file (default ``$STATE_DIRECTORY/state.sqlite3``). Blocking calls run
    in a worker thread; one connection per call keeps threads independent."""

    name = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path

    def _connect(self, create: str = SQLITE_SQL.create) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=10)
        db.execute(create)
        return db

    def _load(self) -> dict[Key, ScannedState]:
        db = self._connect()
        try:
            rows = db.execute(SQLITE_SQL.select_all).fetchall()
        finally:
            db.close()
        return {(r[0], r[1]): ScannedState(r[2], r[3], r[4], r[5]) for r in rows}

    def _write(self, upserts: Sequence[tuple[Key, ScannedState]], deletes: Sequence[Key]) -> None:
        db = self._connect()
        try:
            with db:
                db.executemany(
                    SQLITE_SQL.upsert,
                    [
                        (k[0], k[1], s.uidvalidity, s.uidnext, s.scanned_at, s.removed_at)
                        for k, s in upserts
                    ],
                )
                db.executemany(SQLITE_SQL.delete, deletes)
        finally:
            db.close()

    async def load_all(self) -> dict[Key, ScannedState]:
        return await trio.to_thread.run_sync(self._load)

    async def write(
        self, upserts: Sequence[tuple[Key, ScannedState]], deletes: Sequence[Key]
    ) -> None:
        await trio.to_thread.run_sync(self._write, upserts, deletes)

    def _load_tokens(self) -> dict[str, StoredRefreshToken]:
        db = self._connect(SQLITE_TOKEN_SQL.create)
        try:
            rows = db.execute(SQLITE_TOKEN_SQL.select_all).fetchall()
        finally:
            db.close()
        return {r[0]: StoredRefreshToken(r[1], r[2], r[3]) for r in rows}

    def _save_token(self, conn_id: str, stored: StoredRefreshToken) -> None:
        db = self._connect(SQLITE_TOKEN_SQL.create)
        try:
            with db:
                db.execute(
                    SQLITE_TOKEN_SQL.upsert,
                    (conn_id, stored.encrypted, stored.replaces, stored.updated_at),
                )
        finally:
            db.close()

    async def load_tokens(self) -> dict[str, StoredRefreshToken]:
        return await trio.to_thread.run_sync(self._load_tokens)

    async def save_token(self, conn_id: str, stored: StoredRefreshToken) -> None:
        await trio.to_thread.run_sync(self._save_token, conn_id, stored)

    def _load_health(self) -> dict[str, ReportedHealth]:
        db = self._connect(SQLITE_HEALTH_SQL.create)
        try:
            rows = db.execute(SQLITE_HEALTH_SQL.select_all).fetchall()
        finally:
            db.close()
        return {r[0]: ReportedHealth(r[1], r[2], r[3]) for r in rows}

    def _write_health(
        self, upserts: Sequence[tuple[str, ReportedHealth]], deletes: Sequence[str]
    ) -> None:
        db = self._connect(SQLITE_HEALTH_SQL.create)
        try:
            with db:
                db.executemany(
                    SQLITE_HEALTH_SQL.upsert,
                    [(i, h.state, h.reason, h.reported_at) for i, h in upserts],
                )
                db.executemany(SQLITE_HEALTH_SQL.delete, [(i,) for i in deletes])
        finally:
            db.close()

    async def load_health(self) -> dict[str, ReportedHealth]:
        return await trio.to_thread.run_sync(self._load_health)

    async def write_health(
        self, upserts: Sequence[tuple[str, ReportedHealth]], deletes: Sequence[str]
    ) -> None:
        await trio.to_thread.run_sync(self._write_health, upserts, deletes)


async def _pg_call(dsn: str, fn: Any, *args: Any) -> Any:
    import asyncpg

    conn = await asyncpg.connect(dsn, statement_cache_size=0, timeout=30)
    try:
        return await fn(conn, *args)
    finally:
        await conn.close(timeout=5)


async def _pg_load(conn: Any) -> list[Any]:
    return list(await conn.fetch(POSTGRES_SQL.select_all))


async def _pg_write(
    conn: Any, upserts: list[tuple[Any, ...]], deletes: list[tuple[str, str]]
) -> None:
    async with conn.transaction():
        if upserts:
            await conn.executemany(POSTGRES_SQL.upsert, upserts)
        if deletes:
            await conn.executemany(POSTGRES_SQL.delete, deletes)


async def _pg_load_connections(conn: Any, conn_ids: list[str]) -> list[Any]:
    return list(await conn.fetch(POSTGRES_SELECT_CONNECTIONS, conn_ids))


async def _pg_migrate(conn: Any) -> None:
    for _table, statement in POSTGRES_MIGRATIONS:
        await conn.execute(statement)


async def _pg_load_tokens(conn: Any) -> list[Any]:
    return list(await conn.fetch(POSTGRES_TOKEN_SQL.select_all))


async def _pg_save_token(conn: Any, row: tuple[Any, ...]) -> None:
    await conn.execute(POSTGRES_TOKEN_SQL.upsert, *row)


async def _pg_load_health(conn: Any, conn_ids: list[str] | None) -> list[Any]:
    if conn_ids is None:
        return list(await conn.fetch(POSTGRES_HEALTH_SQL.select_all))
    return list(await conn.fetch(POSTGRES_HEALTH_SQL.select_connections, conn_ids))


async def _pg_write_health(
    conn: Any, upserts: list[tuple[Any, ...]], deletes: list[tuple[str]]
) -> None:
    async with conn.transaction():
        if upserts:
            await conn.executemany(POSTGRES_HEALTH_SQL.upsert, upserts)
        if deletes:
            await conn.executemany(POSTGRES_HEALTH_SQL.delete, deletes)


class PostgresBackend:
    """Tables (created by ``trio-idle db migrate``) shared by every host of a deployment:
    the mailbox state and the rotated refresh tokens.

    Pooler-safe like the source: a short connection per batch, no statement cache. Must be
    called inside a trio-asyncio loop (the daemon's).
    """

    name = "postgres"

    def __init__(self, dsn: Secret) -> None:
        self._dsn = dsn

    async def migrate(self) -> None:
        await trio_asyncio.aio_as_trio(_pg_call)(self._dsn.reveal(), _pg_migrate)

    async def load_all(self) -> dict[Key, ScannedState]:
        rows = await trio_asyncio.aio_as_trio(_pg_call)(self._dsn.reveal(), _pg_load)
        return {(r[0], r[1]): ScannedState(r[2], r[3], r[4], r[5]) for r in rows}

    async def write(
        self, upserts: Sequence[tuple[Key, ScannedState]], deletes: Sequence[Key]
    ) -> None:
        rows = [
            (k[0], k[1], s.uidvalidity, s.uidnext, s.scanned_at, s.removed_at) for k, s in upserts
        ]
        await trio_asyncio.aio_as_trio(_pg_call)(self._dsn.reveal(), _pg_write, rows, list(deletes))

    async def load_tokens(self) -> dict[str, StoredRefreshToken]:
        """The stored rotations; none while the table does not exist yet (a daemon
        upgraded without ``trio-idle db migrate`` cannot have stored any)."""
        import asyncpg

        try:
            rows = await trio_asyncio.aio_as_trio(_pg_call)(self._dsn.reveal(), _pg_load_tokens)
        except asyncpg.UndefinedTableError:
            logger.warning(
                f"[idle/state] table {POSTGRES_TOKEN_TABLE} does not exist: rotated OAuth2 "
                "refresh tokens cannot be kept across restarts until `trio-idle db migrate` "
                "has run"
            )
            return {}
        return {r[0]: StoredRefreshToken(r[1], r[2], r[3]) for r in rows}

    async def save_token(self, conn_id: str, stored: StoredRefreshToken) -> None:
        row = (conn_id, stored.encrypted, stored.replaces, stored.updated_at)
        await trio_asyncio.aio_as_trio(_pg_call)(self._dsn.reveal(), _pg_save_token, row)

    async def load_health(self, conn_ids: Sequence[str] | None = None) -> dict[str, ReportedHealth]:
        """The health last reported per connection (``conn_ids``: of these only).
        Raises ``asyncpg.UndefinedTableError`` before ``trio-idle db migrate`` has run."""
        rows = await trio_asyncio.aio_as_trio(_pg_call)(
            self._dsn.reveal(), _pg_load_health, None if conn_ids is None else list(conn_ids)
        )
        return {r[0]: ReportedHealth(r[1], r[2], r[3]) for r in rows}

    async def write_health(
        self, upserts: Sequence[tuple[str, ReportedHealth]], deletes: Sequence[str]
    ) -> None:
        rows = [(i, h.state, h.reason, h.reported_at) for i, h in upserts]
        await trio_asyncio.aio_as_trio(_pg_call)(
            self._dsn.reveal(), _pg_write_health, rows, [(i,) for i in deletes]
        )

    async def load_connections(self, conn_ids: Sequence[str]) -> dict[Key, ScannedState]:
        """The stored state of these connections only (shared mode: a mailbox that moved
        here catches up from where its previous owner left it)."""
        rows = await trio_asyncio.aio_as_trio(_pg_call)(
            self._dsn.reveal(), _pg_load_connections, list(conn_ids)
        )
        return {(r[0], r[1]): ScannedState(r[2], r[3], r[4], r[5]) for r in rows}


class StateStore:
    """In-memory view of the persisted state plus a batching writer.

    ``None`` from :meth:`get` means "this mailbox is new to the store".
    """

    def __init__(
        self,
        backend: StateBackend | None,
        stats: Stats,
        *,
        flush_interval: float = 1.0,
        grace: float = 7 * 86400.0,
    ) -> None:
        self.backend = backend
        self._stats = stats
        self._state: dict[Key, ScannedState] = {}
        self._dirty: set[Key] = set()
        self._deleted: set[Key] = set()
        self._wakeup = trio.Event()
        self.flush_interval = flush_interval
        self.grace = grace
        #: the account health last reported, per connection id (health reports)
        self._health_backend = backend if isinstance(backend, HealthBackend) else None
        self._health: dict[str, ReportedHealth] = {}
        self._health_dirty: set[str] = set()
        self._health_deleted: set[str] = set()

    @property
    def enabled(self) -> bool:
        return self.backend is not None

    async def load(self) -> None:
        """Read everything once. A failure is logged and counted; we start empty."""
        if self.backend is None:
            return
        try:
            self._state = await self.backend.load_all()
            logger.info(
                f"[idle/state] loaded {len(self._state)} mailbox states ({self.backend.name})"
            )
        except Exception as exc:
            self._stats.inc("state_errors", "load")
            logger.error(
                f"[idle/state] cannot load the state ({self.backend.name}): "
                f"{type(exc).__name__}: {exc}; starting empty, every mailbox gets "
                "one catch-up scan"
            )
            self._state = {}
            return  # the health reported lives in the same file or database: no second line
        await self._load_health()

    async def _load_health(self) -> None:
        """Read the health last reported. A failure is logged and counted; we start
        empty (every connection reports its first health once, as without a store). A
        Postgres table that does not exist yet switches the health part off until
        ``trio-idle db migrate`` has run (and the daemon restarted)."""
        backend = self._health_backend
        if backend is None:
            return
        try:
            self._health = await backend.load_health()
        except Exception as exc:
            self._health = {}
            if type(exc).__name__ == "UndefinedTableError":  # asyncpg's, not imported here
                self._health_backend = None
                logger.warning(
                    f"[idle/state] table {POSTGRES_HEALTH_TABLE} does not exist: the "
                    "account health reported is not kept across restarts (every connection "
                    "reports once after each start) until `trio-idle db migrate` has run"
                )
                return
            self._stats.inc("state_errors", "load")
            logger.error(
                f"[idle/state] cannot load the account health reported ({backend.name}): "
                f"{type(exc).__name__}: {exc}; every connection reports its health once"
            )

    def get(self, conn_id: str, mailbox: str) -> ScannedState | None:
        state = self._state.get((conn_id, mailbox))
        return state

    def record(
        self, conn_id: str, mailbox: str, uidvalidity: int | None, uidnext: int | None
    ) -> None:
        """A scan covering mail below ``uidnext`` succeeded. Never blocks."""
        if self.backend is None:
            return
        key = (conn_id, mailbox)
        old = self._state.get(key)
        if (
            old is not None
            and old.uidvalidity == uidvalidity
            and old.uidnext is not None
            and uidnext is not None
            and uidnext < old.uidnext
        ):
            uidnext = old.uidnext  # never move backwards within one UIDVALIDITY
        self._state[key] = ScannedState(uidvalidity, uidnext, time.time())
        self._deleted.discard(key)
        self._dirty.add(key)
        if len(self._dirty) >= 500:
            self._wakeup.set()

    def reported_health(self, conn_id: str) -> ReportedHealth | None:
        """The account health the backend last accepted for ``conn_id`` (``None``:
        nothing known, the first classification is reported)."""
        return self._health.get(conn_id)

    def record_health(self, conn_id: str, state: str, reason: str | None) -> None:
        """The backend accepted (or refused for good) a report of ``state``/``reason``.
        Never blocks; written by the flusher."""
        if self._health_backend is None:
            return
        self._health[conn_id] = ReportedHealth(state, reason, time.time())
        self._health_deleted.discard(conn_id)
        self._health_dirty.add(conn_id)

    def prune(self, present_ids: Iterable[str], now: float | None = None) -> None:
        """After a successful refresh: mark vanished connections, drop them after ``grace``.
        The health reported of a vanished connection is dropped at once (should it come
        back, it reports its health once more: one report, no rescan)."""
        if self.backend is None:
            return
        now = time.time() if now is None else now
        present = set(present_ids)
        for conn_id in [i for i in self._health if i not in present]:
            del self._health[conn_id]
            self._health_dirty.discard(conn_id)
            self._health_deleted.add(conn_id)
        for key, state in list(self._state.items()):
            if key[0] in present:
                if state.removed_at is not None:
                    self._state[key] = attrs.evolve(state, removed_at=None)
                    self._dirty.add(key)
            elif state.removed_at is None:
                self._state[key] = attrs.evolve(state, removed_at=now)
                self._dirty.add(key)
            elif now - state.removed_at >= self.grace:
                del self._state[key]
                self._dirty.discard(key)
                self._deleted.add(key)

    async def flush(self) -> bool:
        """Write what is dirty now. Returns False (and keeps it dirty) on failure.

        Cancellation also keeps it dirty: whether or not the backend committed before the
        cancel landed, the entries are written again by the next flush (upserts are
        idempotent)."""
        if self.backend is None:
            return True
        health_ok = await self._flush_health()
        if not (self._dirty or self._deleted):
            return health_ok
        upserts = [(k, self._state[k]) for k in self._dirty if k in self._state]
        deletes = list(self._deleted)
        self._dirty, self._deleted = set(), set()
        try:
            await self.backend.write(upserts, deletes)
        except BaseException as exc:
            # Keep them for the next try: a failed write, and also one cancelled in flight
            # (shutdown), which the final flush must redo or the restart rescans them.
            self._dirty.update(k for k, _ in upserts if k in self._state)
            self._deleted.update(k for k in deletes if k not in self._state)
            if not isinstance(exc, Exception):
                raise
            self._stats.inc("state_errors", "write")
            logger.warning(
                f"[idle/state] cannot write {len(upserts) + len(deletes)} state "
                f"entries ({self.backend.name}): {type(exc).__name__}: {exc}; "
                "will retry"
            )
            return False
        self._stats.inc("state_writes", by=len(upserts) + len(deletes))
        return health_ok

    async def _flush_health(self) -> bool:
        """:meth:`flush` for the health reported (same guarantees)."""
        backend = self._health_backend
        if backend is None or not (self._health_dirty or self._health_deleted):
            return True
        upserts = [(i, self._health[i]) for i in self._health_dirty if i in self._health]
        deletes = list(self._health_deleted)
        self._health_dirty, self._health_deleted = set(), set()
        try:
            await backend.write_health(upserts, deletes)
        except BaseException as exc:
            self._health_dirty.update(i for i, _ in upserts if i in self._health)
            self._health_deleted.update(i for i in deletes if i not in self._health)
            if not isinstance(exc, Exception):
                raise
            self._stats.inc("state_errors", "write")
            logger.warning(
                f"[idle/state] cannot write {len(upserts) + len(deletes)} account health "
                f"entries ({backend.name}): {type(exc).__name__}: {exc}; will retry"
            )
            return False
        self._stats.inc("state_writes", by=len(upserts) + len(deletes))
        return True

    async def run_flusher(self) -> None:
        """Flush every ``flush_interval`` (sooner when many entries are dirty), and a last
        time, shielded and bounded, when cancelled."""
        if self.backend is None:
            return
        try:
            while True:
                with trio.move_on_after(self.flush_interval):
                    await self._wakeup.wait()
                self._wakeup = trio.Event()
                await self.flush()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await self.flush()

    async def reload(self, conn_ids: Sequence[str]) -> None:
        """Shared mode: read these connections' state again from the shared store, since
        another instance may have scanned them since :meth:`load`. An entry this process
        has not written yet (dirty) stays as it is: it is the newer one. A failure is
        logged and counted; the entries in memory stay (at worst one extra scan)."""
        if not isinstance(self.backend, PostgresBackend) or not conn_ids:
            return
        try:
            fresh = await self.backend.load_connections(conn_ids)
        except Exception as exc:
            self._stats.inc("state_errors", "load")
            logger.warning(
                f"[idle/state] cannot read the shared state of {len(conn_ids)} connections "
                f"that moved here: {type(exc).__name__}: {exc}; using what was loaded before"
            )
            return
        for key, state in fresh.items():
            if key not in self._dirty:
                self._state[key] = state
        if self._health_backend is None:
            return
        try:
            health = await self.backend.load_health(conn_ids)
        except Exception as exc:
            self._stats.inc("state_errors", "load")
            logger.warning(
                f"[idle/state] cannot read the account health reported of {len(conn_ids)} "
                f"connections that moved here: {type(exc).__name__}: {exc}; using what was "
                "loaded before"
            )
            return
        for conn_id in conn_ids:
            if conn_id in self._health_dirty:
                continue  # written here, not yet flushed: the newer one
            if conn_id in health:
                self._health[conn_id] = health[conn_id]
            else:
                self._health.pop(conn_id, None)


def make_state_backend(settings: Settings, env: Mapping[str, str]) -> StateBackend | None:
    """The backend the settings ask for (``None`` for ``state = none``)."""
    if settings.store.state == "none":
        return None
    if settings.store.state == "postgres":
        assert settings.connections.database_url is not None  # enforced by config parsing
        return PostgresBackend(settings.connections.database_url)
    path = Path(settings.store.state_path) if settings.store.state_path else default_state_path(env)
    return SqliteBackend(path)


def make_token_backend(settings: Settings, env: Mapping[str, str]) -> TokenBackend | None:
    """Where rotated refresh tokens are kept: the state store's file or database
    (``None`` for ``state = none``: rotations then live only as long as the process)."""
    backend = make_state_backend(settings, env)
    return backend if isinstance(backend, SqliteBackend | PostgresBackend) else None


def default_state_path(env: Mapping[str, str]) -> Path:
    """``$STATE_DIRECTORY`` (systemd ``StateDirectory=``) or ``~/.local/state/trio-idle``."""
    base = env.get("STATE_DIRECTORY") or os.path.join(
        env.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"), "trio-idle"
    )
    return Path(base.split(":")[0]) / "state.sqlite3"
