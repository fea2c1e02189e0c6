"""The state store in PostgreSQL: tables shared by every host of a deployment, created by
``trio-idle db migrate`` (:data:`~trio_idle.state.tables.POSTGRES_MIGRATIONS`).

Pooler-safe: a short connection per call (asyncpg, no statement cache), run through
trio-asyncio, so every method must be called inside the daemon's trio-asyncio loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import trio_asyncio
from loguru import logger

from trio_idle.core.secret import Secret
from trio_idle.state.records import Key, ReportedHealth, ScannedState, StoredRefreshToken
from trio_idle.state.tables import (
    POSTGRES_HEALTH_SQL,
    POSTGRES_MIGRATIONS,
    POSTGRES_SELECT_CONNECTIONS,
    POSTGRES_SQL,
    POSTGRES_TOKEN_SQL,
    POSTGRES_TOKEN_TABLE,
)


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
