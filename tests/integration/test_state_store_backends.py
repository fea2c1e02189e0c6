"""The stored "scanned up to" never moves backwards, on a real SQLite file and a real
Postgres table, whatever order the writes land in.

Two :class:`StateStore` s on one backend are two instances of a shared-mode cluster (or
two processes pointed at one file): each keeps its own memory monotonic, but only the
upsert can stop the instance that *lost* a mailbox from writing its older scan over the
newer one its successor wrote (a handover that beat the old owner's batched write, or an
instance fenced while Postgres was unreachable whose kept-dirty write lands on its return).
What a user would notice is the next start: a lower stored UIDNEXT rescans mail the
backend was already given.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trio

from tests.servers.postgres import execute_sql
from trio_idle.core.secret import Secret
from trio_idle.core.stats import Stats
from trio_idle.imap.asyncio_loop import open_asyncio_loop
from trio_idle.imap.responses import MailboxState
from trio_idle.state.store import (
    POSTGRES_DDL,
    PostgresBackend,
    SqliteBackend,
    StateBackend,
    StateStore,
    startup_decision,
)

NewBackend = Callable[[], StateBackend]


@pytest.fixture(params=["sqlite", "postgres"])
async def new_backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[NewBackend]:
    """Makes backends on one shared store: a SQLite file, or a fresh Postgres database
    with the table ``trio-idle db migrate`` creates (inside a trio-asyncio loop)."""
    if request.param == "sqlite":
        path = tmp_path / "state.sqlite3"
        yield lambda: SqliteBackend(path)
        return
    dsn: str = request.getfixturevalue("pg_dsn")
    await trio.to_thread.run_sync(execute_sql, dsn, POSTGRES_DDL)
    async with open_asyncio_loop():
        yield lambda: PostgresBackend(Secret(dsn))


async def loaded(new_backend: NewBackend) -> StateStore:
    store = StateStore(new_backend(), Stats())
    await store.load()
    return store


async def test_an_older_scan_written_after_a_newer_one_keeps_the_newer(
    new_backend: NewBackend,
) -> None:
    old_owner, new_owner = await loaded(new_backend), await loaded(new_backend)
    old_owner.record("c", "INBOX", 7, 50)  # scanned, not flushed yet when it lost the mailbox
    new_owner.record("c", "INBOX", 7, 60)
    newer = new_owner.get("c", "INBOX")
    assert await new_owner.flush()
    old_owner.prune([])  # and the old owner saw the row go: removed_at follows the write
    assert await old_owner.flush()  # its late write lands last

    restart = await loaded(new_backend)
    stored = restart.get("c", "INBOX")
    assert stored is not None and newer is not None
    assert (stored.uidvalidity, stored.uidnext) == (7, 60)
    assert stored.scanned_at == newer.scanned_at  # the scan that reached 60
    assert stored.removed_at is not None
    # what the operator sees: no rescan at the next start, the server is still at 60
    server = MailboxState(exists=59, uidnext=60, uidvalidity=7)
    assert not startup_decision(stored, server).scan


async def test_a_new_uidvalidity_or_unknown_uidnext_replaces_the_row(
    new_backend: NewBackend,
) -> None:
    first, second = await loaded(new_backend), await loaded(new_backend)
    first.record("c", "INBOX", 7, 60)
    assert await first.flush()
    second.record("c", "INBOX", 8, 3)  # the mailbox was rebuilt: UIDs start over
    assert await second.flush()
    stored = (await loaded(new_backend)).get("c", "INBOX")
    assert stored is not None and (stored.uidvalidity, stored.uidnext) == (8, 3)

    # within one UIDVALIDITY a greater UIDNEXT still advances it
    first.record("c", "INBOX", 8, 9)
    assert await first.flush()
    stored = (await loaded(new_backend)).get("c", "INBOX")
    assert stored is not None and stored.uidnext == 9

    # a scan of a server that gave no UIDNEXT is stored as such (as in memory)
    second.record("c", "INBOX", 8, None)
    assert await second.flush()
    stored = (await loaded(new_backend)).get("c", "INBOX")
    assert stored is not None and (stored.uidvalidity, stored.uidnext) == (8, None)
