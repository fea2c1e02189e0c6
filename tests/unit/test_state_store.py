"""The persisted mailbox state: SQLite round trips, batching, pruning, and failure modes."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

import trio

from tests.harness import capture_logs
from trio_idle.core.stats import Stats
from trio_idle.state.records import Key, ScannedState
from trio_idle.state.sqlite import SqliteBackend
from trio_idle.state.store import StateStore


async def test_record_flush_and_reload(tmp_path: Path) -> None:
    path = tmp_path / "state" / "state.sqlite3"
    store = StateStore(SqliteBackend(path), Stats())
    await store.load()
    assert store.get("c1", "INBOX") is None  # new to the store
    store.record("c1", "INBOX", 7, 42)
    store.record("c2", "INBOX", 9, 3)
    assert await store.flush()

    again = StateStore(SqliteBackend(path), Stats())
    await again.load()
    state = again.get("c1", "INBOX")
    assert state is not None and (state.uidvalidity, state.uidnext) == (7, 42)
    assert again.get("c2", "INBOX") is not None


async def test_uidnext_never_moves_backwards_within_a_uidvalidity(tmp_path: Path) -> None:
    store = StateStore(SqliteBackend(tmp_path / "s.db"), Stats())
    store.record("c", "INBOX", 7, 50)
    store.record("c", "INBOX", 7, 40)  # an older scan answered late
    assert store.get("c", "INBOX").uidnext == 50  # type: ignore[union-attr]
    store.record("c", "INBOX", 8, 2)  # a new UIDVALIDITY starts over
    assert store.get("c", "INBOX").uidnext == 2  # type: ignore[union-attr]


async def test_corrupt_file_starts_empty_and_says_so(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    stats = Stats()
    store = StateStore(SqliteBackend(path), stats)
    with capture_logs() as logs:
        await store.load()
    assert store.get("c", "INBOX") is None
    assert stats.get("state_errors", "load") == 1
    assert logs.matching("[idle/state] cannot load the state")


class ScriptedBackend:
    """A state backend whose writes fail (``fail``) or hang until cancelled (``stall``,
    a slow Postgres round trip that shutdown cancels)."""

    name = "scripted"

    def __init__(self, *, fail: bool = False, stall: bool = False) -> None:
        self.fail = fail
        self.stall = stall
        self.started = trio.Event()
        self.written: list[tuple[Key, ScannedState]] = []

    async def load_all(self) -> dict[Key, ScannedState]:
        return {}

    async def write(
        self, upserts: Sequence[tuple[Key, ScannedState]], deletes: Sequence[Key]
    ) -> None:
        await trio.lowlevel.checkpoint()
        if self.stall:
            self.started.set()
            await trio.sleep_forever()
        if self.fail:
            raise OSError("disk full")
        self.written.extend(upserts)


async def test_failed_write_is_retried_not_lost() -> None:
    backend = ScriptedBackend(fail=True)
    stats = Stats()
    store = StateStore(backend, stats)
    store.record("c", "INBOX", 1, 10)
    with capture_logs() as logs:
        assert not await store.flush()
    assert stats.get("state_errors", "write") == 1
    assert logs.matching("cannot write 1 state entries")
    backend.fail = False
    assert await store.flush()
    assert [k for k, _ in backend.written] == [("c", "INBOX")]


async def test_prune_marks_then_drops_after_grace(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = StateStore(SqliteBackend(path), Stats(), grace=100.0)
    store.record("kept", "INBOX", 1, 5)
    store.record("gone", "INBOX", 1, 5)
    store.prune(["kept"], now=1000.0)
    assert store.get("gone", "INBOX").removed_at == 1000.0  # type: ignore[union-attr]
    store.prune(["kept"], now=1050.0)  # within grace: still there
    assert store.get("gone", "INBOX") is not None
    store.prune(["kept"], now=1100.0)
    assert store.get("gone", "INBOX") is None
    assert await store.flush()
    reloaded = StateStore(SqliteBackend(path), Stats())
    await reloaded.load()
    assert reloaded.get("gone", "INBOX") is None and reloaded.get("kept", "INBOX") is not None


async def test_a_returning_connection_is_unmarked(tmp_path: Path) -> None:
    store = StateStore(SqliteBackend(tmp_path / "s.db"), Stats(), grace=100.0)
    store.record("c", "INBOX", 1, 5)
    store.prune([], now=1000.0)
    store.prune(["c"], now=1200.0)
    state = store.get("c", "INBOX")
    assert state is not None and state.removed_at is None


async def test_flusher_batches_and_flushes_on_cancel(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = StateStore(SqliteBackend(path), Stats(), flush_interval=3600)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.run_flusher)
        store.record("c", "INBOX", 3, 30)
        await trio.lowlevel.checkpoint()
        nursery.cancel_scope.cancel()  # the final, shielded flush writes it
    reloaded = StateStore(SqliteBackend(path), Stats())
    await reloaded.load()
    assert reloaded.get("c", "INBOX") is not None


async def test_disabled_store_records_nothing() -> None:
    store = StateStore(None, Stats())
    await store.load()
    store.record("c", "INBOX", 1, 2)
    assert store.get("c", "INBOX") is None and not store.enabled


def test_startup_decision() -> None:
    from trio_idle.imap.responses import MailboxState
    from trio_idle.state.catch_up import startup_decision

    now = MailboxState(exists=3, uidnext=10, uidvalidity=7)
    assert startup_decision(None, now).scan
    assert not startup_decision(ScannedState(7, 10, 0.0), now).scan
    assert startup_decision(ScannedState(7, 9, 0.0), now).scan
    assert startup_decision(ScannedState(6, 10, 0.0), now).scan
    # UIDNEXT lower after a UIDVALIDITY change is still "changed"
    assert startup_decision(ScannedState(6, 50, 0.0), now).scan
    # TRIO_IDLE_START_FROM=now concerns a mailbox with no stored state only
    assert not startup_decision(None, now, "now").scan
    assert startup_decision(ScannedState(7, 9, 0.0), now, "now").scan
    assert startup_decision(ScannedState(6, 10, 0.0), now, "now").scan


async def test_a_write_cancelled_by_shutdown_is_redone_by_the_final_flush() -> None:
    backend = ScriptedBackend(stall=True)
    store = StateStore(backend, Stats(), flush_interval=0.0)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.run_flusher)
            store.record("c", "INBOX", 3, 30)
            await backend.started.wait()  # the periodic flush took the entry and is writing
            backend.stall = False
            nursery.cancel_scope.cancel()
    assert [(k, s.uidnext) for k, s in backend.written] == [(("c", "INBOX"), 30)]


async def test_a_file_written_before_the_shared_statements_is_still_read_and_written(
    tmp_path: Path,
) -> None:
    # the table as earlier versions created it (SQLite type names of its own)
    path = tmp_path / "state.sqlite3"
    db = sqlite3.connect(path)
    with db:
        db.execute(
            "CREATE TABLE mailbox_state (connection_id TEXT NOT NULL, "
            "mailbox TEXT NOT NULL, uidvalidity INTEGER, uidnext INTEGER, "
            "scanned_at REAL NOT NULL, removed_at REAL, PRIMARY KEY (connection_id, mailbox))"
        )
        db.execute("INSERT INTO mailbox_state VALUES ('old', 'INBOX', 3, 30, 1.5, NULL)")
    db.close()
    store = StateStore(SqliteBackend(path), Stats())
    await store.load()
    assert store.get("old", "INBOX") == ScannedState(3, 30, 1.5)
    store.record("old", "INBOX", 3, 31)
    store.record("new", "INBOX", 4, 2)
    assert await store.flush()
    again = StateStore(SqliteBackend(path), Stats())
    await again.load()
    assert again.get("old", "INBOX").uidnext == 31  # type: ignore[union-attr]
    assert again.get("new", "INBOX").uidvalidity == 4  # type: ignore[union-attr]
