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

from tests.harness import capture_logs
from tests.servers.postgres import execute_sql
from trio_idle.core.secret import Secret
from trio_idle.core.stats import Stats
from trio_idle.imap.asyncio_loop import open_asyncio_loop
from trio_idle.imap.responses import MailboxState
from trio_idle.state.catch_up import startup_decision
from trio_idle.state.postgres import PostgresBackend
from trio_idle.state.records import StateBackend
from trio_idle.state.sqlite import SqliteBackend
from trio_idle.state.store import StateStore
from trio_idle.state.tables import POSTGRES_DDL, POSTGRES_MIGRATIONS

NewBackend = Callable[[], StateBackend]


@pytest.fixture(params=["sqlite", "postgres"])
async def new_backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[NewBackend]:
    """Makes backends on one shared store: a SQLite file, or a fresh Postgres database
    with the tables ``trio-idle db migrate`` creates (inside a trio-asyncio loop)."""
    if request.param == "sqlite":
        path = tmp_path / "state.sqlite3"
        yield lambda: SqliteBackend(path)
        return
    dsn: str = request.getfixturevalue("pg_dsn")
    for _table, statement in POSTGRES_MIGRATIONS:
        await trio.to_thread.run_sync(execute_sql, dsn, statement)
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


async def test_the_health_reported_is_kept_across_restarts_and_dropped_with_its_connection(
    new_backend: NewBackend,
) -> None:
    first = await loaded(new_backend)
    first.record_health("c", "auth_failed", "invalid_credentials")
    first.record_health("d", "ok", None)
    assert await first.flush()
    restart = await loaded(new_backend)
    c, d = restart.reported_health("c"), restart.reported_health("d")
    assert c is not None and (c.state, c.reason) == ("auth_failed", "invalid_credentials")
    assert d is not None and (d.state, d.reason) == ("ok", None)
    restart.record_health("c", "ok", None)  # the recovery, reported
    restart.prune(["c"])  # d left the connection list
    assert await restart.flush()
    again = await loaded(new_backend)
    c = again.reported_health("c")
    assert c is not None and c.state == "ok"
    assert again.reported_health("d") is None


async def test_a_connection_that_moved_here_gets_the_health_its_previous_owner_reported(
    new_backend: NewBackend,
) -> None:
    """Shared mode: the new owner must not take its own old view for what the backend
    was told last (it would stay silent about a failure the backend thinks is over)."""
    mine, previous_owner = await loaded(new_backend), await loaded(new_backend)
    mine.record_health("c", "auth_failed", "invalid_credentials")
    assert await mine.flush()
    previous_owner.record_health("c", "ok", None)  # later, on the instance that had it
    assert await previous_owner.flush()
    await mine.reload(["c"])
    c = mine.reported_health("c")
    if isinstance(mine.backend, PostgresBackend):
        assert c is not None and c.state == "ok"
    else:  # one SQLite file per process: there is no other owner to read
        assert c is not None and c.state == "auth_failed"


@pytest.mark.postgres
async def test_without_the_postgres_health_table_reports_are_not_kept_and_nothing_fails(
    pg_dsn: str,
) -> None:
    """A daemon upgraded without `trio-idle db migrate`: one warning, the scan state
    still works, health is reported as before (every connection once per start)."""
    await trio.to_thread.run_sync(execute_sql, pg_dsn, POSTGRES_DDL)
    stats = Stats()
    async with open_asyncio_loop():
        store = StateStore(PostgresBackend(Secret(pg_dsn)), stats)
        with capture_logs() as logs:
            await store.load()
        assert logs.matching("trio_idle_account_health does not exist")
        store.record_health("c", "ok", None)
        store.record("c", "INBOX", 7, 60)
        assert await store.flush()
        assert store.reported_health("c") is None
        restart = StateStore(PostgresBackend(Secret(pg_dsn)), stats)
        await restart.load()
        assert restart.get("c", "INBOX") is not None
    assert stats.get("state_errors") == 0
