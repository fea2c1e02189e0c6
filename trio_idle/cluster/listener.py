"""Instant reconcile: LISTEN for changes of the connection table, refresh at once.

``trio-idle db install-notify`` adds a statement-level trigger on the connection table
(:class:`NotifySql`, documented in docs/operations.md) that NOTIFYs :data:`CHANNEL` after
every INSERT, UPDATE or DELETE. With ``TRIO_IDLE_LISTEN_URL`` (a *direct* Postgres URL:
LISTEN needs a session, which a transaction pooler does not keep) the daemon holds one
dedicated connection that LISTENs on that channel and asks for a refresh on each
notification, at most one per :data:`DEBOUNCE` seconds, so a new or deactivated row
takes effect within about a second instead of at the next ``TRIO_IDLE_REFRESH_INTERVAL``.

Guarantees:

- Polling is untouched: the refresh loop runs on its interval whether the listener is
  connected, reconnecting or off; the listener only makes refreshes come sooner.
- NOTIFY is not durable (a notification sent while nobody listens is lost), so every
  (re)connection asks for a full refresh once it is listening.
- asyncpg notices a closed socket (``pg_terminate_backend``, a restart) at once, but not
  a half-open one: a ``SELECT 1`` every ``heartbeat_interval`` must answer within
  ``heartbeat_timeout`` or the connection is dropped and made again.
- Reconnects back off (1 s doubling up to 30 s, reset after a connection that worked).
- Errors are logged scrubbed of the URL's secrets; nothing here raises into the daemon.
- What operators see of it (:meth:`NotifyListener.view`, shown in ``/status`` and the
  metrics): whether it listens and since when, connections and failures counted by kind,
  notifications and the time of the last one, and why the last connection ended (our
  words plus the error's text scrubbed of the URL's secrets, cut: never the URL itself).

Cancellation: :meth:`NotifyListener.run` may be cancelled at any point; the connection is
then closed without waiting (``terminate``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final, Literal

import attrs
import trio
import trio_asyncio
from loguru import logger

from trio_idle.core.backoff import Backoff, BackoffPolicy
from trio_idle.core.scrub import Scrubber, url_secrets
from trio_idle.core.secret import Secret
from trio_idle.net.pg_call import pg_call

#: the channel the trigger notifies and the listener LISTENs on
CHANNEL: Final = "trio_idle_connections"
#: the trigger's and its function's names
TRIGGER: Final = "trio_idle_notify"
FUNCTION: Final = "trio_idle_notify_connection"
#: the listener connection's ``application_name``
APPLICATION_NAME: Final = "trio-idle-listen"
#: the connection table, as the default query names it
DEFAULT_TABLE: Final = '"MailConnection"'
#: at most one refresh request per this many seconds (a batch of row changes is one refresh)
DEBOUNCE: Final = 0.5
RECONNECT: Final = BackoffPolicy(1.0, 30.0, reset_after=60.0, jitter=0.5)

#: why a listener connection ended: ``connect`` (no connection or no LISTEN: refused,
#: timed out, authentication failed), ``lost`` (closed by the server or failed while
#: listening), ``heartbeat`` (the ``SELECT 1`` went unanswered: a half-open link)
FailureKind = Literal["connect", "lost", "heartbeat"]
FAILURE_KINDS: Final[tuple[FailureKind, ...]] = ("connect", "lost", "heartbeat")


@attrs.frozen(kw_only=True)
class ListenerView:
    """The listener at one moment, for ``/status`` and the metrics. Times are
    ``trio.current_time()`` values; ``last_error`` is log-safe (scrubbed, cut)."""

    channel: str
    #: LISTENing right now
    connected: bool
    #: when ``connected`` took its current value (the listener's start before the first
    #: connection); ``None`` before :meth:`NotifyListener.run` started
    since: float | None
    #: successful LISTENs so far: the first connection and every reconnect
    connections: int
    #: connections that ended or could not be made, by :data:`FailureKind`
    failures: Mapping[str, int]
    #: notifications received so far, and when the last one came (``None``: none yet)
    notifications: int
    last_notification: float | None
    #: why the last connection ended (``None`` while none has)
    last_error: str | None

    @property
    def reconnects(self) -> int:
        """Connections after the first one."""
        return max(0, self.connections - 1)


@attrs.frozen
class NotifySql:
    """The trigger's SQL. Each script is idempotent (run it twice, same result) and runs
    as one implicit transaction (several statements in one simple query)."""

    table: str = DEFAULT_TABLE

    @property
    def install(self) -> str:
        return (
            f"CREATE OR REPLACE FUNCTION {FUNCTION}() RETURNS trigger LANGUAGE plpgsql AS $$\n"
            f"BEGIN\n  PERFORM pg_notify('{CHANNEL}', TG_OP);\n  RETURN NULL;\nEND\n$$;\n"
            f"DROP TRIGGER IF EXISTS {TRIGGER} ON {self.table};\n"
            f"CREATE TRIGGER {TRIGGER} AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE "
            f"ON {self.table}\n  FOR EACH STATEMENT EXECUTE FUNCTION {FUNCTION}();"
        )

    @property
    def remove(self) -> str:
        return (
            f"DROP TRIGGER IF EXISTS {TRIGGER} ON {self.table};\n"
            f"DROP FUNCTION IF EXISTS {FUNCTION}();"
        )


async def _execute(conn: Any, script: str, seconds: float) -> None:
    await conn.execute(script, timeout=seconds)


async def run_notify_script(dsn: Secret, script: str, seconds: float) -> None:
    """Run an install/remove script (inside a trio-asyncio loop), bounded by ``seconds``."""
    with trio.fail_after(seconds + 5):
        await pg_call(dsn, seconds, _execute, script, seconds)


class Debouncer:
    """Calls ``action`` on the first :meth:`poke` at once, then at most once per
    ``interval``: pokes meanwhile fold into one call at the end of the interval."""

    def __init__(self, action: Callable[[], None], interval: float = DEBOUNCE) -> None:
        self._action = action
        self._interval = interval
        self._poked = trio.Event()

    def poke(self) -> None:
        """Synchronous and safe from asyncpg's callbacks (same thread, no checkpoint)."""
        self._poked.set()

    async def run(self) -> None:
        while True:
            await self._poked.wait()
            self._poked = trio.Event()
            self._action()
            await trio.sleep(self._interval)


class NotifyListener:
    """One LISTEN connection and its reconnects; see the module docstring."""

    def __init__(
        self,
        dsn: Secret,
        *,
        on_change: Callable[[], None],
        connect_timeout: float,
        heartbeat_interval: float = 10.0,
        heartbeat_timeout: float = 5.0,
        channel: str = CHANNEL,
    ) -> None:
        self._dsn = dsn
        self._connect_timeout = connect_timeout
        self._heartbeat_interval = heartbeat_interval
        self._heartbeat_timeout = heartbeat_timeout
        self._channel = channel
        self._debouncer = Debouncer(on_change)
        self._scrub = Scrubber(url_secrets(dsn.reveal()), limit=300)
        self._backoff = Backoff(RECONNECT)
        #: listening right now (for status and tests)
        self.listening = False
        #: successful LISTENs so far (a reconnect counts one more)
        self.connections = 0
        self._connected_event = trio.Event()
        self._stop = trio.CancelScope()
        # what view() reports; every change is followed by _changed_now()
        self._since: float | None = None
        self._failures: dict[str, int] = dict.fromkeys(FAILURE_KINDS, 0)
        self._notifications = 0
        self._last_notification: float | None = None
        self._last_error: str | None = None
        self._changed = trio.Event()

    def view(self) -> ListenerView:
        """The listener now (no checkpoint: every field is of the same moment)."""
        return ListenerView(
            channel=self._channel,
            connected=self.listening,
            since=self._since,
            connections=self.connections,
            failures=dict(self._failures),
            notifications=self._notifications,
            last_notification=self._last_notification,
            last_error=self._last_error,
        )

    async def wait_view(self, done: Callable[[ListenerView], bool]) -> ListenerView:
        """Return the view once ``done`` holds for it (a checkpoint, also if it already
        does). Waits until cancelled if it never does: bound it with a cancel scope."""
        await trio.lowlevel.checkpoint()
        while not done(view := self.view()):
            await self._changed.wait()
        return view

    def _changed_now(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _notified(self) -> None:
        """asyncpg's notification callback (in the loop's thread, no checkpoint)."""
        self._notifications += 1
        self._last_notification = trio.current_time()
        self._changed_now()
        self._debouncer.poke()

    def stop(self) -> None:
        """End :meth:`run` (graceful shutdown): the connection is closed at once."""
        self._stop.cancel()

    async def wait_listening(self, count: int) -> None:
        """Return once ``count`` connections have been LISTENing (a checkpoint)."""
        await trio.lowlevel.checkpoint()
        while self.connections < count:
            await self._connected_event.wait()

    async def run(self) -> None:
        """LISTEN until :meth:`stop` or cancelled, reconnecting with backoff. Never
        raises (but Cancelled)."""
        with self._stop:
            try:
                await self._run()
            finally:
                # stopped (shutdown): not listening any more, whatever it was doing
                if self.listening:
                    self.listening = False
                    self._since = trio.current_time()
                self._changed_now()

    async def _run(self) -> None:
        self._since = trio.current_time()
        self._changed_now()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._debouncer.run, name="listen-debounce")
            while True:
                started = trio.current_time()
                kind, reason = await self._one_connection()
                if self.listening:
                    self._since = trio.current_time()
                self.listening = False
                # counted here and logged below: every fault is both
                self._failures[kind] += 1
                self._last_error = reason
                self._changed_now()
                self._backoff.session_ended(trio.current_time() - started)
                delay = self._backoff.next_delay()
                logger.warning(
                    f"[idle/listen] {reason}; polling continues, reconnecting in {delay:.1f}s"
                )
                await trio.sleep(delay)

    async def _one_connection(self) -> tuple[FailureKind, str]:
        """Connect, LISTEN, heartbeat; returns how and why the connection ended."""
        import asyncpg  # only with TRIO_IDLE_LISTEN_URL

        lost = trio.Event()
        conn: Any = None
        try:
            with trio.fail_after(self._connect_timeout):
                conn = await trio_asyncio.aio_as_trio(asyncpg.connect)(
                    self._dsn.reveal(),
                    statement_cache_size=0,
                    timeout=self._connect_timeout,
                    # operators (and tests) find it in pg_stat_activity by this name
                    server_settings={"application_name": APPLICATION_NAME},
                )
                conn.add_termination_listener(lambda _conn: lost.set())
                await trio_asyncio.aio_as_trio(conn.add_listener)(
                    self._channel, lambda *_args: self._notified()
                )
            self.listening = True
            self._since = trio.current_time()
            self.connections += 1
            self._connected_event.set()
            self._connected_event = trio.Event()
            self._changed_now()
            logger.info(
                f"[idle/listen] listening on {self._channel}"
                + (" again; full refresh (missed notifications)" if self.connections > 1 else "")
            )
            # notifications sent while nobody listened are gone: read everything once
            self._debouncer.poke()
            while True:
                with trio.move_on_after(self._heartbeat_interval):
                    await lost.wait()
                if lost.is_set():
                    return "lost", "listener connection closed by the server"
                try:
                    with trio.fail_after(self._heartbeat_timeout):
                        await trio_asyncio.aio_as_trio(conn.fetchval)("SELECT 1")
                except trio.TooSlowError:
                    return (
                        "heartbeat",
                        f"listener heartbeat unanswered for {self._heartbeat_timeout:g}s",
                    )
        except trio.TooSlowError:
            return "connect", f"cannot connect the listener within {self._connect_timeout:g}s"
        except Exception as exc:  # asyncpg, OS and protocol errors alike: retry
            kind: FailureKind = "lost" if self.listening else "connect"
            return (
                kind,
                f"listener connection failed: {type(exc).__name__}: {self._scrub(exc)}",
            )
        finally:
            if conn is not None:
                # no waiting for a polite close: the connection may be half-open
                conn.terminate()
