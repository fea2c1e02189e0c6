"""One short PostgreSQL connection per call: asyncpg, run inside trio through trio-asyncio.

Every PostgreSQL user of the daemon (the connection source, the state store, the membership
heartbeat, the NOTIFY scripts) runs its statements this way: a connection opened for the call
and closed after it, no prepared-statement cache (``statement_cache_size=0``), no session
state. Nothing a transaction-mode pooler (PgBouncer, Supabase) could break, and no
long-lived connection whose half-open failures would need handling.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio_asyncio

from trio_idle.core.secret import Secret

_T = TypeVar("_T")


async def pg_call(
    dsn: Secret, connect_timeout: float, fn: Callable[..., Awaitable[_T]], *args: Any
) -> _T:
    """``await fn(conn, *args)`` on a new connection to ``dsn``, closed afterwards (its
    close waits at most 5 s). Must be called inside a trio-asyncio loop (the daemon's).
    ``connect_timeout`` bounds the connect only; a caller bounds the whole call with its
    own trio deadline. Cancelled, the asyncio side is cancelled too; its ``finally``
    closes the connection."""
    result: _T = await trio_asyncio.aio_as_trio(_call)(dsn.reveal(), connect_timeout, fn, *args)
    return result


async def _call(
    dsn: str, connect_timeout: float, fn: Callable[..., Awaitable[_T]], *args: Any
) -> _T:
    import asyncpg  # not at import: commands that never touch PostgreSQL do not load it

    conn = await asyncpg.connect(dsn, statement_cache_size=0, timeout=connect_timeout)
    try:
        return await fn(conn, *args)
    finally:
        await conn.close(timeout=5)
