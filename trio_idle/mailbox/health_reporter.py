"""Account health reports to the backend: a reporter task per connection while a report
is due (or debounced), none otherwise.

Contract (docs/backend-contract.md): ``POST {BACKEND_URL}{status_path}`` with the same
headers as a scan (secret header, ``user-agent``, optional ``x-signature``) and the JSON
body of :func:`report_body`. A 2xx ends a report; 5xx, 429 (``Retry-After`` honoured),
timeouts and refused connections are retried with the scans' backoff; any other answer
is logged as an error and the report is not sent again (a backend without the endpoint
answers 404: the daemon keeps working, the log says why).

Guarantees:
- never more than one report in flight per connection (one task sends them in turn);
- the newest state wins: a change that arrives while a report waits for its retry
  replaces it, and the next attempt carries the newest state; an older state is never
  sent after a newer one;
- the session is never slowed: it hands outcomes to :meth:`AccountHealth.observe`, which
  is synchronous and never blocks; only this task waits for the backend;
- cancellation (the connection is removed or restarted, shutdown) abandons the report in
  flight; a restarted connection keeps its :class:`AccountHealth`, so what was already
  reported is not reported again;
- across a daemon restart, with a state store: what the backend last accepted is kept
  there (``on_delivered``) and seeds the new process's tracker (``reported``), so a
  restart of 10,000 healthy connections sends no report, and a connection whose health
  changed while the daemon was down sends one.

Task tree: the reporter runs in the connection's nursery next to the session
(:mod:`trio_idle.mailbox.reconcile`), started by :meth:`AccountHealth.observe` through the starter
the connection attached (:meth:`AccountHealth.attach`) when an outcome makes a report due
or debounced, and ending (:func:`run_health_reports`) when nothing is left to report.
"""

from __future__ import annotations

import datetime
import json
import math
import random
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import attrs
import trio

from trio_idle.accounts.connections import AUTH_OAUTH2, MailConnection
from trio_idle.accounts.outcome_text import Failure
from trio_idle.accounts.providers import Preset, connection_preset
from trio_idle.backend.webhook import Verdict, WebhookClient
from trio_idle.core.backoff import BackoffPolicy
from trio_idle.core.logs import Logger, human_duration, prefix
from trio_idle.core.stats import Stats
from trio_idle.mailbox.account_health import Connected, Health, HealthTracker, Report, classify
from trio_idle.mailbox.scan_worker import SCAN_RETRY_JITTER

T = TypeVar("T")


class LatestValue(Generic[T]):
    """A trio-friendly cell holding only the newest value: :meth:`set` never blocks and
    overwrites; a reader waits for a value newer than the version it has seen.

    Cancellation of :meth:`wait_newer` loses nothing: the value stays in the cell."""

    __slots__ = ("_changed", "_value", "version")

    def __init__(self, value: T) -> None:
        self._value = value
        self.version = 0
        # made by the first waiter (a reporter), so an idle connection holds no Event
        self._changed: trio.Event | None = None

    def get(self) -> T:
        return self._value

    def set(self, value: T) -> None:
        self._value = value
        self.version += 1
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def wait_newer(self, seen: int, deadline: float = math.inf) -> int:
        """Wait until :attr:`version` exceeds ``seen`` or ``deadline`` (trio time) passes;
        return the version then."""
        with trio.move_on_at(deadline):
            while self.version <= seen:
                if self._changed is None:
                    self._changed = trio.Event()
                await self._changed.wait()
        return self.version


class AccountHealth:
    """One connection's health: the classifier and state machine behind the session's
    hook (:meth:`observe`), the cell its reporter waits on, and the starter of that
    reporter (:meth:`attach`)."""

    __slots__ = ("_cell", "_on_delivered", "_running", "_start", "conn", "preset", "tracker")

    def __init__(
        self,
        conn: MailConnection,
        unreachable_after: float,
        *,
        reported: Health | None = None,
        on_delivered: Callable[[str, Health], None] | None = None,
    ) -> None:
        """``reported``: what the backend was told before this process started (the
        state store's, :meth:`~trio_idle.state.store.StateStore.reported_health`): a
        first classification equal to it is not reported again. ``on_delivered`` is told
        the connection id and each health the backend accepted (or refused for good); it
        must never block (one callable serves every connection)."""
        self.tracker = HealthTracker(unreachable_after, reported=reported)
        self._cell: LatestValue[Health | None] | None = None
        self.conn = conn
        self.preset: Preset = connection_preset(conn.provider, conn.email, conn.host)
        self._start: Callable[[], None] | None = None
        self._running = False
        self._on_delivered = on_delivered

    @property
    def cell(self) -> LatestValue[Health | None]:
        """The newest classification, for the reporter to wait on: made by the reporter
        (its versions count from then), kept while one runs, so a connection without a
        reporter holds none."""
        if self._cell is None:
            self._cell = LatestValue(self.tracker.current)
        return self._cell

    def delivered(self, report: Report) -> None:
        """The backend has ``report`` (or refused it for good): not sent again, in this
        process and (through ``on_delivered``) after a restart."""
        self.tracker.delivered(report)
        if self._on_delivered is not None:
            self._on_delivered(self.conn.id, report.health)

    def attach(self, start: Callable[[], None]) -> None:
        """From now on an outcome that leaves a report due or debounced, with no reporter
        running, calls ``start()``, which must start (never await) a task running
        :func:`run_health_reports`. Called at once if a report waits already (one a
        cancelled reporter did not get delivered)."""
        self._start = start
        self._kick()

    def detach(self) -> None:
        """No more reporters are started (the connection's nursery is closing)."""
        self._start = None

    def wanted(self) -> bool:
        """A report is due now or waits for its debounce (pure)."""
        t = self.tracker
        return t.due(trio.current_time()) is not None or t.next_due() is not None

    def reporter_ended(self) -> None:
        """The started reporter ended (nothing left, or cancelled); its cell goes with it
        (the next reporter counts versions from its own start)."""
        self._running = False
        self._cell = None

    def _kick(self) -> None:
        if self._start is not None and not self._running and self.wanted():
            self._running = True
            self._start()

    def rebind(self, conn: MailConnection) -> None:
        """The connection's row changed (credentials, host): classify with the new one."""
        self.conn = conn
        self.preset = connection_preset(conn.provider, conn.email, conn.host)

    def observe(self, outcome: Connected | Failure) -> None:
        """A session outcome (see :func:`trio_idle.mailbox.account_health.classify`): a failure
        arrives as text the session's :class:`~trio_idle.accounts.outcome_text.ConnectionSecrets`
        made, so the message holds no secret of the connection. Never blocks, never
        raises for an outcome it cannot judge."""
        health = classify(outcome, self.preset, oauth=self.conn.auth == AUTH_OAUTH2)
        if health is None:
            return
        self.tracker.observe(health, trio.current_time(), time.time())
        if self._cell is not None:  # a reporter runs: wake it
            self._cell.set(health)
        self._kick()

    #: the health is the session's outcome hook itself
    #: (:attr:`~trio_idle.mailbox.session.ConnectionMemory.on_outcome`): a reference to it
    #: costs nothing, a bound ``observe`` would be one more object per connection
    __call__ = observe

    def snapshot(self) -> dict[str, Any] | None:
        """For ``/status``: the current classification, since when, and what the backend
        was last told (``None`` before the first outcome)."""
        t = self.tracker
        if t.current is None:
            return None
        return {
            "state": t.current.state,
            "reason": t.current.reason,
            "message": t.current.message,
            "since": iso_time(t.since_wall),
            "attempts": t.attempts,
            "reported": None if t.reported is None else t.reported.state,
        }


def iso_time(unix: float) -> str:
    """``2026-12-01T22:06:25.123Z``."""
    when = datetime.datetime.fromtimestamp(unix, datetime.UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def report_body(conn: MailConnection, report: Report) -> bytes:
    """The JSON body of one report (pure)."""
    h = report.health
    return json.dumps(
        {
            "connectionId": conn.id,
            "userId": conn.user_id,
            "email": conn.email,
            "state": h.state,
            "reason": h.reason,
            "message": h.message,
            "since": iso_time(report.since),
            "attempts": report.attempts,
        },
        separators=(",", ":"),
    ).encode()


@attrs.frozen
class StatusPolicy:
    url: str
    retry_initial: float
    retry_max: float


async def run_health_reports(
    health: AccountHealth,
    webhook: WebhookClient,
    policy: StatusPolicy,
    stats: Stats,
    log: Logger,
    rng: random.Random,
) -> None:
    """The reporter :meth:`AccountHealth.attach`'s starter starts: report ``health``'s
    changes (see the module docstring) while a report is due or debounced, then return
    (and call :meth:`AccountHealth.reporter_ended` however it ends). Cancellation ends it
    at any point; an undelivered report stays due for the next one."""
    try:
        retry = BackoffPolicy(policy.retry_initial, policy.retry_max, jitter=SCAN_RETRY_JITTER)
        tracker, cell = health.tracker, health.cell
        seen = cell.version
        failures = 0
        while True:
            report = tracker.due(trio.current_time())
            if report is None:
                wake = tracker.next_due()
                if wake is None:
                    return  # no checkpoint since the check: a new outcome starts a new one
                seen = await cell.wait_newer(seen, wake)
                continue
            seen = cell.version  # the report reflects every observation up to here
            conn = health.conn
            where = prefix(conn.email)
            what = f"{report.health.state}/{report.health.reason or '-'}"
            body = report_body(conn, report)
            reply = await webhook.post(policy.url, body, webhook.signed_headers(body))
            if reply.verdict is Verdict.OK:
                failures = 0
                health.delivered(report)
                stats.inc("health_reports", "ok")
                log.info(f"{where} account health reported: {what}")
                continue
            label = str(reply.status) if reply.status is not None else "network"
            if reply.verdict is Verdict.REJECT:
                failures = 0
                health.delivered(report)  # not sent again: retrying would not help
                stats.inc("health_reports", label)
                log.error(f"{where} account health report ({what}) rejected: {reply.detail}")
                continue
            failures += 1
            stats.inc("health_reports", "retried")
            delay = retry.delay(failures, rng, hint=reply.retry_after)
            log.warning(
                f"{where} account health report ({what}) failed: {reply.detail}; retrying in "
                f"{human_duration(delay)} unless the state changes first"
            )
            # A change of state meanwhile ends the wait: the next attempt carries the newest
            # state. More outcomes of the same state (reconnects failing) do not: they would
            # hammer a backend that is failing already.
            deadline = trio.current_time() + delay
            while trio.current_time() < deadline:
                seen = await cell.wait_newer(seen, deadline)
                newer = tracker.due(trio.current_time())
                if newer is None or newer.health.key != report.health.key:
                    break
    finally:
        health.reporter_ended()
