"""The state store in a local SQLite file: scan state, rotated refresh tokens, account
health, one table each (:mod:`trio_idle.state.tables`), created on first use.

Blocking calls run in a worker thread (``trio.to_thread``); each call opens its own
connection, so threads never share one. A cancelled call abandons its thread, whose
transaction commits or rolls back on its own.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import trio

from trio_idle.state import tables
from trio_idle.state.records import Key, ReportedHealth, ScannedState, StoredRefreshToken
from trio_idle.state.tables import (
    SQLITE_HEALTH_SQL,
    SQLITE_SQL,
    SQLITE_TOKEN_SQL,
    ConnectionRowSql,
    StateSql,
)

_T = TypeVar("_T")


class SqliteBackend:
    """A local SQLite file (default ``$STATE_DIRECTORY/state.sqlite3``). Blocking calls run
    in a worker thread; one connection per call keeps threads independent."""

    name = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path

    def _connect(self, create: str) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=10)
        db.execute(create)
        return db

    def _read(self, sql: StateSql | ConnectionRowSql, of: Callable[[list[Any]], _T]) -> _T:
        """``of`` every row of ``sql``'s table (blocking: run in a worker thread)."""
        db = self._connect(sql.create)
        try:
            rows = db.execute(sql.select_all).fetchall()
        finally:
            db.close()
        return of(rows)

    def _write(
        self,
        sql: StateSql | ConnectionRowSql,
        upserts: Sequence[Sequence[Any]],
        deletes: Sequence[Sequence[Any]],
    ) -> None:
        """Upsert and delete these rows of ``sql``'s table in one transaction (blocking)."""
        db = self._connect(sql.create)
        try:
            with db:
                db.executemany(sql.upsert, upserts)
                db.executemany(sql.delete, deletes)
        finally:
            db.close()

    async def load_all(self) -> dict[Key, ScannedState]:
        return await trio.to_thread.run_sync(self._read, SQLITE_SQL, tables.states_of)

    async def write(
        self, upserts: Sequence[tuple[Key, ScannedState]], deletes: Sequence[Key]
    ) -> None:
        await trio.to_thread.run_sync(self._write, SQLITE_SQL, tables.state_rows(upserts), deletes)

    async def load_tokens(self) -> dict[str, StoredRefreshToken]:
        return await trio.to_thread.run_sync(self._read, SQLITE_TOKEN_SQL, tables.tokens_of)

    async def save_token(self, conn_id: str, stored: StoredRefreshToken) -> None:
        row = tables.token_row(conn_id, stored)
        await trio.to_thread.run_sync(self._write, SQLITE_TOKEN_SQL, [row], [])

    async def load_health(self) -> dict[str, ReportedHealth]:
        return await trio.to_thread.run_sync(self._read, SQLITE_HEALTH_SQL, tables.healths_of)

    async def write_health(
        self, upserts: Sequence[tuple[str, ReportedHealth]], deletes: Sequence[str]
    ) -> None:
        rows, keys = tables.health_rows(upserts), [(i,) for i in deletes]
        await trio.to_thread.run_sync(self._write, SQLITE_HEALTH_SQL, rows, keys)


def default_state_path(env: Mapping[str, str]) -> Path:
    """``$STATE_DIRECTORY`` (systemd ``StateDirectory=``) or ``~/.local/state/trio-idle``."""
    base = env.get("STATE_DIRECTORY") or os.path.join(
        env.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"), "trio-idle"
    )
    return Path(base.split(":")[0]) / "state.sqlite3"
