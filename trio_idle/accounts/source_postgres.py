"""The connection list from PostgreSQL (asyncpg, run inside trio through trio-asyncio).

Pooler-safe by construction: one short-lived connection per refresh, no prepared
statement cache (``statement_cache_size=0``), no session state, so it works through a
transaction-mode pooler (PgBouncer, Supabase). A refresh every few minutes makes a
long-lived connection (and its half-open failure modes) not worth having.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import trio

from trio_idle.core.errors import SourceError
from trio_idle.core.scrub import MASK, Scrubber, url_secrets
from trio_idle.core.secret import Secret
from trio_idle.net.pg_call import pg_call


async def _fetch_dicts(conn: Any, query: str, seconds: float) -> list[dict[str, Any]]:
    return [dict(r) for r in await conn.fetch(query, timeout=seconds)]


class PostgresSource:
    """Runs the connection query. ``name`` is used in logs (never the DSN: it has a password)."""

    name = "db"

    def __init__(self, dsn: Secret, query: str, timeout: float) -> None:
        self._dsn = dsn
        self._query = query
        self._timeout = timeout
        # asyncpg quotes the DSN (and with it the password) in some errors
        self._scrub = Scrubber(url_secrets(dsn.reveal()), limit=300)

    async def fetch(self) -> list[dict[str, Any]]:
        try:
            with trio.fail_after(self._timeout + 5):
                return await pg_call(
                    self._dsn, self._timeout, _fetch_dicts, self._query, self._timeout
                )
        except trio.TooSlowError:
            raise SourceError(f"database did not answer within {self._timeout:g}s") from None
        except asyncpg.PostgresError as exc:
            raise SourceError(f"query failed: {type(exc).__name__}: {self._scrub(exc)}") from None
        except (OSError, TimeoutError, asyncpg.InterfaceError) as exc:
            raise SourceError(
                f"cannot reach the database: {type(exc).__name__}: {self._scrub(exc)}"
            ) from None

    def __repr__(self) -> str:
        return f"PostgresSource(dsn={MASK})"
