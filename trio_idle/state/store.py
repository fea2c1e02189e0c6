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
  (:meth:`StateStore.record`) and in the table
  (:attr:`~trio_idle.state.tables.StateSql.upsert`), whichever instance's write lands last.
- A missing, unreadable or corrupt store costs one catch-up scan per mailbox, never a
  crash: the failure is logged and counted, and the daemon starts from an empty state.

The same backends also keep the refresh tokens an OAuth2 provider rotated
(:data:`~trio_idle.state.tables.TOKEN_COLUMNS`, :class:`~trio_idle.state.records.TokenBackend`;
used by :mod:`trio_idle.auth.token_refresh`): one more table in the same file or database,
written at once rather than batched, since a rotated token lost in a crash can be a grant
lost.

And the account health last reported per connection (:data:`~trio_idle.state.tables.HEALTH_COLUMNS`,
:meth:`StateStore.reported_health`; used by :mod:`trio_idle.mailbox.health_reporter`):
a restart reports only the connections whose health changed, not one report per
connection. Batched like the scan state; a write lost in a crash costs one repeated
report. Created like the other tables: by the SQLite backend on first use, by
``trio-idle db migrate`` in Postgres (before it, the health part is off and each start
reports every connection once, as before).

This module is the in-memory view and its batching writer; the records and backend
protocols are in :mod:`~trio_idle.state.records`, the SQL in :mod:`~trio_idle.state.tables`,
the backends in :mod:`~trio_idle.state.sqlite` and :mod:`~trio_idle.state.postgres` (which
one: :mod:`~trio_idle.state.backends`), the restart decision in
:mod:`~trio_idle.state.catch_up`.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TypeVar

import attrs
import trio
from loguru import logger

from trio_idle.core.stats import Stats
from trio_idle.state.postgres import PostgresBackend
from trio_idle.state.records import HealthBackend, Key, ReportedHealth, ScannedState, StateBackend
from trio_idle.state.tables import POSTGRES_HEALTH_TABLE

_K = TypeVar("_K")
_V = TypeVar("_V")


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
        written = await self._write(
            self._state, self._dirty, self._deleted, self.backend.write, "state", self.backend.name
        )
        return written and health_ok

    async def _flush_health(self) -> bool:
        """:meth:`flush` for the health reported (same guarantees)."""
        backend = self._health_backend
        if backend is None or not (self._health_dirty or self._health_deleted):
            return True
        return await self._write(
            self._health,
            self._health_dirty,
            self._health_deleted,
            backend.write_health,
            "account health",
            backend.name,
        )

    async def _write(
        self,
        entries: Mapping[_K, _V],
        dirty: set[_K],
        deleted: set[_K],
        write: Callable[[Sequence[tuple[_K, _V]], Sequence[_K]], Awaitable[None]],
        what: str,
        backend_name: str,
    ) -> bool:
        """Write the ``dirty`` and ``deleted`` keys of ``entries`` (emptying both sets);
        on failure, or cancellation, the keys go back into them for the next flush and a
        failure is logged and counted (False). ``what`` names the entries in the log line."""
        upserts = [(k, entries[k]) for k in dirty if k in entries]
        deletes = list(deleted)
        dirty.clear()
        deleted.clear()
        try:
            await write(upserts, deletes)
        except BaseException as exc:
            # Keep them for the next try: a failed write, and also one cancelled in flight
            # (shutdown), which the final flush must redo or the restart rescans them.
            dirty.update(k for k, _ in upserts if k in entries)
            deleted.update(k for k in deletes if k not in entries)
            if not isinstance(exc, Exception):
                raise
            self._stats.inc("state_errors", "write")
            logger.warning(
                f"[idle/state] cannot write {len(upserts) + len(deletes)} {what} "
                f"entries ({backend_name}): {type(exc).__name__}: {exc}; will retry"
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
        backend = self.backend
        fresh = await self._read_moved(
            lambda: backend.load_connections(conn_ids), "shared state", len(conn_ids)
        )
        if fresh is None:
            return
        for key, state in fresh.items():
            if key not in self._dirty:
                self._state[key] = state
        if self._health_backend is None:
            return
        health = await self._read_moved(
            lambda: backend.load_health(conn_ids), "account health reported", len(conn_ids)
        )
        if health is None:
            return
        for conn_id in conn_ids:
            if conn_id in self._health_dirty:
                continue  # written here, not yet flushed: the newer one
            if conn_id in health:
                self._health[conn_id] = health[conn_id]
            else:
                self._health.pop(conn_id, None)

    async def _read_moved(
        self, read: Callable[[], Awaitable[_V]], what: str, count: int
    ) -> _V | None:
        """:meth:`reload`'s reads: ``read()``, or ``None`` after a failure, logged and
        counted (``what`` names what was read of ``count`` connections)."""
        try:
            return await read()
        except Exception as exc:
            self._stats.inc("state_errors", "load")
            logger.warning(
                f"[idle/state] cannot read the {what} of {count} connections that moved "
                f"here: {type(exc).__name__}: {exc}; using what was loaded before"
            )
            return None
