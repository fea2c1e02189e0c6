"""The state store in PostgreSQL: tables shared by every host of a deployment, created by
``trio-idle db migrate`` (:data:`~trio_idle.state.tables.POSTGRES_MIGRATIONS`).

Pooler-safe: a short connection per call (asyncpg, no statement cache), run through
trio-asyncio, so every method must be called inside the daemon's trio-asyncio loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from loguru import logger

from trio_idle.core.secret import Secret
from trio_idle.net.pg_call import pg_call
from trio_idle.state import tables
from trio_idle.state.records import Key, ReportedHealth, ScannedState, StoredRefreshToken
from trio_idle.state.tables import (
    POSTGRES_HEALTH_SQL,
    POSTGRES_MIGRATIONS,
    POSTGRES_SELECT_CONNECTIONS,
    POSTGRES_SQL,
    POSTGRES_TOKEN_SQL,
    POSTGRES_TOKEN_TABLE,
    ConnectionRowSql,
    StateSql,
)

#: seconds a connect may take (a call as a whole is bounded by its caller's deadline)
CONNECT_TIMEOUT = 30.0


async def _fetch(conn: Any, statement: str, *args: Any) -> list[Any]:
    return list(await conn.fetch(statement, *args))


async def _execute(conn: Any, statement: str, *args: Any) -> None:
    await conn.execute(statement, *args)


async def _write(
    conn: Any,
    sql: StateSql | ConnectionRowSql,
    upserts: list[tuple[Any, ...]],
    deletes: list[tuple[str, ...]],
) -> None:
    async with conn.transaction():
        if upserts:
            await conn.executemany(sql.upsert, upserts)
        if deletes:
            await conn.executemany(sql.delete, deletes)


async def _migrate(conn: Any) -> None:
    for _table, statement in POSTGRES_MIGRATIONS:
        await conn.execute(statement)


class PostgresBackend:
    """Tables (created by ``trio-idle db migrate``) shared by every host of a deployment:
    the mailbox state and the rotated refresh tokens.

    Pooler-safe like the source: a short connection per batch, no statement cache. Must be
    called inside a trio-asyncio loop (the daemon's).
    """

    name = "postgres"

    def __init__(self, dsn: Secret) -> None:
        self._dsn = dsn

    async def _call(self, fn: Any, *args: Any) -> Any:
        return await pg_call(self._dsn, CONNECT_TIMEOUT, fn, *args)

    async def migrate(self) -> None:
        await self._call(_migrate)

    async def load_all(self) -> dict[Key, ScannedState]:
        return tables.states_of(await self._call(_fetch, POSTGRES_SQL.select_all))

    async def write(
        self, upserts: Sequence[tuple[Key, ScannedState]], deletes: Sequence[Key]
    ) -> None:
        await self._call(_write, POSTGRES_SQL, tables.state_rows(upserts), list(deletes))

    async def load_tokens(self) -> dict[str, StoredRefreshToken]:
        """The stored rotations; none while the table does not exist yet (a daemon
        upgraded without ``trio-idle db migrate`` cannot have stored any)."""
        import asyncpg

        try:
            rows = await self._call(_fetch, POSTGRES_TOKEN_SQL.select_all)
        except asyncpg.UndefinedTableError:
            logger.warning(
                f"[idle/state] table {POSTGRES_TOKEN_TABLE} does not exist: rotated OAuth2 "
                "refresh tokens cannot be kept across restarts until `trio-idle db migrate` "
                "has run"
            )
            return {}
        return tables.tokens_of(rows)

    async def save_token(self, conn_id: str, stored: StoredRefreshToken) -> None:
        await self._call(_execute, POSTGRES_TOKEN_SQL.upsert, *tables.token_row(conn_id, stored))

    async def load_health(self, conn_ids: Sequence[str] | None = None) -> dict[str, ReportedHealth]:
        """The health last reported per connection (``conn_ids``: of these only).
        Raises ``asyncpg.UndefinedTableError`` before ``trio-idle db migrate`` has run."""
        if conn_ids is None:
            return tables.healths_of(await self._call(_fetch, POSTGRES_HEALTH_SQL.select_all))
        return tables.healths_of(
            await self._call(_fetch, POSTGRES_HEALTH_SQL.select_connections, list(conn_ids))
        )

    async def write_health(
        self, upserts: Sequence[tuple[str, ReportedHealth]], deletes: Sequence[str]
    ) -> None:
        await self._call(
            _write, POSTGRES_HEALTH_SQL, tables.health_rows(upserts), [(i,) for i in deletes]
        )

    async def load_connections(self, conn_ids: Sequence[str]) -> dict[Key, ScannedState]:
        """The stored state of these connections only (shared mode: a mailbox that moved
        here catches up from where its previous owner left it)."""
        return tables.states_of(
            await self._call(_fetch, POSTGRES_SELECT_CONNECTIONS, list(conn_ids))
        )
