"""The refresh loop: the connection list read every ``refresh_interval``, or at once when
asked (SIGHUP, the LISTEN/NOTIFY listener), and handed on as validated connections.

Guarantees: a source outage keeps the last good list (nothing is handed on) and is retried
with backoff (:mod:`trio_idle.core.backoff`, no jitter: 5 s doubling up to
``refresh_interval``); every row problem is logged and counted once, again only after the
row was fixed and broke again; validation and decryption run in a worker thread, so the
loop keeps serving IMAP meanwhile. :meth:`Refresher.run` returns once :meth:`Refresher.stop`
was called (at its next wake-up: the stop wakes it); cancelled, it stops at once and the
last good list stays where it was delivered.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Final, Protocol, runtime_checkable

import attrs
import trio
from loguru import logger

from trio_idle.accounts.connections import ConnectionListBuilder, MailConnection, RowProblem
from trio_idle.accounts.outcome_text import weak_password_ids
from trio_idle.core.backoff import Backoff, BackoffPolicy
from trio_idle.core.errors import SourceError
from trio_idle.core.scrub import PLAIN, WEAK_BELOW
from trio_idle.core.stats import Stats

#: the first retry of a failed refresh waits this long (or ``refresh_interval`` if
#: shorter), doubling up to ``refresh_interval``: a database that was down for a moment is
#: read again soon, one that stays down is not hammered
REFRESH_RETRY_INITIAL: Final = 5.0


class ConnectionSource(Protocol):
    """Anything that returns rows with the ``"MailConnection"`` column names."""

    name: str

    async def fetch(self) -> Sequence[dict[str, Any]]: ...


@runtime_checkable
class ChangeAwareSource(ConnectionSource, Protocol):
    """A source that can tell its rows did not change (the file source)."""

    async def fetch_changed(
        self, version: bytes | None
    ) -> tuple[bytes, Sequence[dict[str, Any]]] | None:
        """``(version, rows)``, or None when ``version`` (from an earlier answer) is
        still current. Raises :class:`SourceError` like ``fetch``."""
        ...


#: receives each good list (every connection of the source, keyed by id)
Deliver = Callable[[Mapping[str, MailConnection]], Awaitable[None]]


@attrs.define(eq=False, repr=False)
class Refresher:
    """Reads ``source`` and hands each good list to ``deliver``.

    ``sessions()`` counts the running sessions for the refresh log line;
    ``after_refresh()`` runs after each successful refresh (the tuned garbage collection),
    ``after_attempt()`` after every attempt, good or failed (the daemon's status readers
    wake up). The public fields after those are what the daemon's status reports.
    """

    source: ConnectionSource
    _builder: ConnectionListBuilder
    _stats: Stats
    _interval: float = attrs.field(kw_only=True)
    _deliver: Deliver = attrs.field(kw_only=True)
    _sessions: Callable[[], int] = attrs.field(kw_only=True)
    _after_refresh: Callable[[], None] = attrs.field(kw_only=True)
    _after_attempt: Callable[[], None] = attrs.field(kw_only=True)
    _version: bytes | None = attrs.field(default=None, init=False)
    _now: trio.Event = attrs.field(factory=trio.Event, init=False)
    _stopped: bool = attrs.field(default=False, init=False)
    _logged_problems: set[tuple[str, str]] = attrs.field(factory=set, init=False)
    #: row values already warned about (replaced by a default; the row still runs)
    _logged_warnings: set[tuple[str, str]] = attrs.field(factory=set, init=False)
    #: connections already warned about a password too short to mask safely
    _weak_warned: set[str] = attrs.field(factory=set, init=False)
    #: refreshes that have ended so far, successful or not
    attempts: int = attrs.field(default=0, init=False)
    #: ``trio.current_time()`` of the last successful refresh
    last_ok: float | None = attrs.field(default=None, init=False)
    #: why the last refresh failed (scrubbed); None after a successful one
    last_error: str | None = attrs.field(default=None, init=False)
    #: rows the last successful refresh read, skipped ones included
    connections_in_source: int = attrs.field(default=0, init=False)
    #: rows of the last successful refresh that were skipped, and why
    row_problems: tuple[RowProblem, ...] = attrs.field(default=(), init=False)

    def request(self) -> None:
        """Refresh now instead of at the next interval. Never blocks."""
        self._now.set()

    def stop(self) -> None:
        """No more refreshes: :meth:`run` returns at its next wake-up (woken now), and a
        list read after this is not delivered."""
        self._stopped = True
        self._now.set()

    async def run(self) -> None:
        """Refresh until :meth:`stop`; see the module's guarantees."""
        interval = self._interval
        retry = Backoff(BackoffPolicy(min(REFRESH_RETRY_INITIAL, interval), interval, jitter=0.0))
        while not self._stopped:
            ok = await self.refresh_once()
            if ok:
                self._after_refresh()
            self.attempts += 1
            self._after_attempt()
            if ok:
                retry.succeeded()
                delay = interval
            else:
                delay = retry.next_delay()
            with trio.move_on_after(delay):
                await self._now.wait()
            self._now = trio.Event()

    async def _fetch(self) -> tuple[Sequence[dict[str, Any]] | None, bytes | None]:
        """``(rows, version)``; rows None: unchanged since the last build's version."""
        if isinstance(self.source, ChangeAwareSource):
            answer = await self.source.fetch_changed(self._version)
            if answer is None:
                return None, self._version
            version, rows = answer
            return rows, version
        return await self.source.fetch(), None

    def _warn_row_values(self, conns: Iterable[MailConnection]) -> None:
        """One line (and one count) per bad optional value a running row holds
        (:attr:`MailConnection.warnings`: replaced by a default, the row still runs);
        again only after it was fixed and broke again."""
        current = {(c.id, w) for c in conns for w in c.warnings}
        for conn_id, warning in sorted(current - self._logged_warnings):
            self._stats.inc("row_values_ignored")
            logger.warning(
                f"[idle/{self.source.name}] connection {PLAIN.scrub(conn_id, 80)}: "
                f"{PLAIN.scrub(warning)}"
            )
        self._logged_warnings = current

    def _warn_weak_passwords(self, conns: Iterable[MailConnection]) -> None:
        """One line per process for the connections whose password is too short to be
        masked safely in server text (:func:`trio_idle.core.scrub.weakly_masked`)."""
        weak = [i for i in weak_password_ids(conns) if i not in self._weak_warned]
        if not weak:
            return
        self._weak_warned.update(weak)
        shown = ", ".join(PLAIN.scrub(i, 80) for i in weak[:5])
        more = f" and {len(weak) - 5} more" if len(weak) > 5 else ""
        logger.warning(
            f"[idle/{self.source.name}] {len(weak)} connection(s) have a password shorter "
            f"than {WEAK_BELOW} characters ({shown}{more}): server text can only mask it "
            "where it stands alone as a word (docs/security.md)"
        )

    async def refresh_once(self) -> bool:
        """Read the source and deliver the list. Returns False if the source failed."""
        try:
            rows, version = await self._fetch()
        except SourceError as exc:
            self._stats.inc("refresh_failures")
            self.last_error = str(exc)
            logger.warning(
                f"[idle/{self.source.name}] refresh failed: {exc}; keeping "
                f"{self._sessions()} sessions on the last good list"
            )
            return False
        # Validating and decrypting thousands of rows takes a few hundred milliseconds:
        # in a worker thread the loop keeps serving IMAP meanwhile (it gets the GIL back
        # every few milliseconds) instead of stalling for all of it.
        # (rows=None: the source's rows did not change; the builder answers from memory)
        wanted, problems = await trio.to_thread.run_sync(self._builder.build, rows)
        self._version = version
        current = {(p.connection_id, p.message) for p in problems}
        for conn_id, message in sorted(current - self._logged_problems):
            self._stats.inc("rows_skipped")
            # both come from the row: escaped and cut (a row must not forge log lines)
            logger.error(
                f"[idle/{self.source.name}] connection {PLAIN.scrub(conn_id, 80)} "
                f"skipped: {PLAIN.scrub(message)}"
            )
        self._logged_problems = current  # a row that is fixed and breaks again logs again
        self._warn_row_values(wanted.values())
        self._warn_weak_passwords(wanted.values())
        if self._stopped:
            return True
        await self._deliver(wanted)
        self.row_problems = tuple(problems)
        self.connections_in_source = self._builder.rows
        self.last_ok = trio.current_time()
        self.last_error = None
        self._stats.inc("refreshes")
        logger.info(
            f"[idle/{self.source.name}] refreshed — {self._builder.rows} active connections, "
            f"{self._sessions()} sessions"
        )
        return True
