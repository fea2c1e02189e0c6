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

Cancellation: :meth:`NotifyListener.run` may be cancelled at any point; the connection is
then closed without waiting (``terminate``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import attrs
import trio
import trio_asyncio
from loguru import logger

from trio_idle.backoff import Backoff, BackoffPolicy
from trio_idle.scrub import Scrubber, url_secrets
from trio_idle.secret import Secret

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


async def _pg_script(dsn: str, script: str, seconds: float) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn, statement_cache_size=0, timeout=seconds)
    try:
        await conn.execute(script, timeout=seconds)
    finally:
        await conn.close(timeout=5)


async def run_notify_script(dsn: Secret, script: str, seconds: float) -> None:
    """Run an install/remove script (inside a trio-asyncio loop), bounded by ``seconds``."""
    with trio.fail_after(seconds + 5):
        await trio_asyncio.aio_as_trio(_pg_script)(dsn.reveal(), script, seconds)


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
            await self._run()

    async def _run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._debouncer.run, name="listen-debounce")
            while True:
                started = trio.current_time()
                reason = await self._one_connection()
                self.listening = False
                self._backoff.session_ended(trio.current_time() - started)
                delay = self._backoff.next_delay()
                logger.warning(
                    f"[idle/listen] {reason}; polling continues, reconnecting in {delay:.1f}s"
                )
                await trio.sleep(delay)

    async def _one_connection(self) -> str:
        """Connect, LISTEN, heartbeat; returns why the connection ended."""
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
                    self._channel, lambda *_args: self._debouncer.poke()
                )
            self.listening = True
            self.connections += 1
            self._connected_event.set()
            self._connected_event = trio.Event()
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
                    return "listener connection closed by the server"
                try:
                    with trio.fail_after(self._heartbeat_timeout):
                        await trio_asyncio.aio_as_trio(conn.fetchval)("SELECT 1")
                except trio.TooSlowError:
                    return f"listener heartbeat unanswered for {self._heartbeat_timeout:g}s"
        except trio.TooSlowError:
            return f"cannot connect the listener within {self._connect_timeout:g}s"
        except Exception as exc:  # asyncpg, OS and protocol errors alike: retry
            return f"listener connection failed: {type(exc).__name__}: {self._scrub(exc)}"
        finally:
            if conn is not None:
                # no waiting for a polite close: the connection may be half-open
                conn.terminate()
