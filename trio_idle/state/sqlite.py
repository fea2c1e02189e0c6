"""The state store in a local SQLite file: scan state, rotated refresh tokens, account
health, one table each (:mod:`trio_idle.state.tables`), created on first use.

Blocking calls run in a worker thread (``trio.to_thread``); each call opens its own
connection, so threads never share one. A cancelled call abandons its thread, whose
transaction commits or rolls back on its own.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Mapping, Sequence
from pathlib import Path

import trio

from trio_idle.state.records import Key, ReportedHealth, ScannedState, StoredRefreshToken
from trio_idle.state.tables import SQLITE_HEALTH_SQL, SQLITE_SQL, SQLITE_TOKEN_SQL


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


def default_state_path(env: Mapping[str, str]) -> Path:
    """``$STATE_DIRECTORY`` (systemd ``StateDirectory=``) or ``~/.local/state/trio-idle``."""
    base = env.get("STATE_DIRECTORY") or os.path.join(
        env.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"), "trio-idle"
    )
    return Path(base.split(":")[0]) / "state.sqlite3"
