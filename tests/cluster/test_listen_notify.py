"""Instant reconcile: the NOTIFY trigger and the daemon's LISTEN connection, real Postgres.

The refresh interval is one hour in every test here, so a session that starts or ends
within a second or two was started or ended by a notification (or by the listener's
full refresh after a reconnect), not by polling.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest
import trio
from trio_idle_testing import ImapTestServer
from trio_idle_testing.backend import ScanBackend

from tests.cluster.helpers import kill_listener_connection, listening_daemon
from tests.harness import poll_until, row
from tests.servers.postgres import execute_sql, fetch_sql, insert_mail_connections
from trio_idle.cluster.listener import FUNCTION, TRIGGER, NotifyListener, NotifySql
from trio_idle.core.secret import Secret
from trio_idle.imap.asyncio_loop import open_asyncio_loop
from trio_idle.runtime.daemon import Daemon

PASSWORD = "S3ntinel-pw-listen"
#: "within a second" plus room for a loaded 2-core machine (the issue allows 2 s)
INSTANT = 2.0


@pytest.fixture
async def daemon(
    pg_dsn: str, server: ImapTestServer, backend: ScanBackend
) -> AsyncIterator[Daemon]:
    execute_sql(pg_dsn, NotifySql().install)
    async with listening_daemon(pg_dsn, backend, pg_dsn) as d:
        assert d.listener is not None
        with trio.fail_after(10):
            await d.listener.wait_listening(1)
        yield d


def add(server: ImapTestServer, pg_dsn: str, name: str) -> str:
    email = f"{name}@listen.test"
    server.add_user(email, PASSWORD)
    insert_mail_connections(pg_dsn, row(name, email, PASSWORD, server.port))
    return email


async def test_an_inserted_row_is_idle_and_a_deactivated_one_ends_within_a_second(
    daemon: Daemon, server: ImapTestServer, pg_dsn: str
) -> None:
    email = await trio.to_thread.run_sync(add, server, pg_dsn, "new")
    with trio.fail_after(INSTANT):
        await server.wait_for(lambda: server.idle_count(email) == 1)
    await trio.to_thread.run_sync(
        execute_sql, pg_dsn, """UPDATE "MailConnection" SET "isActive" = false WHERE id = 'new'"""
    )
    with trio.fail_after(INSTANT):
        await server.wait_for(lambda: server.connections(email) == 0)
    assert "new" not in daemon.reconciler.handles


async def test_a_killed_listener_reconnects_refreshes_fully_and_listens_again(
    daemon: Daemon, server: ImapTestServer, pg_dsn: str
) -> None:
    listener = daemon.listener
    assert listener is not None
    await kill_listener_connection(pg_dsn)
    with trio.fail_after(5):
        await poll_until(lambda: not listener.listening)
    # nobody listens now: this insert's notification is lost; only the full refresh
    # the listener runs when it is back can start the session
    missed = await trio.to_thread.run_sync(add, server, pg_dsn, "missed")
    with trio.fail_after(10):
        await listener.wait_listening(2)
    with trio.fail_after(INSTANT):
        await server.wait_for(lambda: server.idle_count(missed) == 1)
    # and notifications work again
    later = await trio.to_thread.run_sync(add, server, pg_dsn, "later")
    with trio.fail_after(INSTANT):
        await server.wait_for(lambda: server.idle_count(later) == 1)


def _trigger_objects(dsn: str) -> tuple[int, int]:
    rows = fetch_sql(
        dsn,
        f"SELECT (SELECT count(*) FROM pg_trigger WHERE tgname = '{TRIGGER}'), "
        f"(SELECT count(*) FROM pg_proc WHERE proname = '{FUNCTION}')",
    )
    return int(rows[0][0]), int(rows[0][1])


async def _db(dsn: str, action: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIO_IDLE_")}
    env["DATABASE_URL"] = dsn
    result = await trio.run_process(
        [sys.executable, "-m", "trio_idle.cli", "db", action],
        env=env,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


async def test_install_and_remove_notify_are_idempotent(pg_dsn: str) -> None:
    for _ in range(2):
        out = await _db(pg_dsn, "install-notify")
        assert f'trigger {TRIGGER} on "MailConnection"' in out
        assert await trio.to_thread.run_sync(_trigger_objects, pg_dsn) == (1, 1)
    for _ in range(2):
        await _db(pg_dsn, "remove-notify")
        assert await trio.to_thread.run_sync(_trigger_objects, pg_dsn) == (0, 0)
    # the backend's table is as before: rows still insert without the trigger
    insert_mail_connections(pg_dsn, row("x", "x@listen.test", PASSWORD, 1))


class FreezeProxy:
    """TCP forwarder to Postgres that can freeze: bytes stop flowing both ways, but every
    socket stays open (a half-open link: no FIN, no RST, nothing to notice)."""

    def __init__(self, port: int) -> None:
        self.target, self.port = port, 0
        self._thawed = trio.Event()
        self._thawed.set()

    def freeze(self) -> None:
        self._thawed = trio.Event()

    def thaw(self) -> None:
        self._thawed.set()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        await self._thawed.wait()
        upstream = await trio.open_tcp_stream("127.0.0.1", self.target)
        async with client, upstream, trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, client, upstream, nursery.cancel_scope)
            nursery.start_soon(self._pump, upstream, client, nursery.cancel_scope)

    async def _pump(
        self, src: trio.SocketStream, dst: trio.SocketStream, done: trio.CancelScope
    ) -> None:
        try:
            async for chunk in src:
                await self._thawed.wait()
                await dst.send_all(chunk)
        except trio.BrokenResourceError:
            pass
        done.cancel()


async def test_a_half_open_listener_connection_is_noticed_by_the_heartbeat(
    pg_dsn: str, nursery: trio.Nursery
) -> None:
    port = urlsplit(pg_dsn).port or 5432
    proxy = FreezeProxy(port)
    await nursery.start(proxy.serve)
    dsn = pg_dsn.replace(f":{port}/", f":{proxy.port}/")
    refreshes: list[float] = []
    async with open_asyncio_loop():
        listener = NotifyListener(
            Secret(dsn),
            on_change=lambda: refreshes.append(trio.current_time()),
            connect_timeout=5,
            heartbeat_interval=0.2,
            heartbeat_timeout=0.5,
        )
        async with trio.open_nursery() as inner:
            inner.start_soon(listener.run)
            with trio.fail_after(10):
                await listener.wait_listening(1)
            proxy.freeze()
            frozen_at = trio.current_time()
            with trio.fail_after(5):
                await poll_until(lambda: not listener.listening)
            # what /status and the metrics show: a heartbeat failure, nothing else
            down = listener.view()
            assert down.failures == {"connect": 0, "lost": 0, "heartbeat": 1}
            assert down.last_error == "listener heartbeat unanswered for 0.5s"
            proxy.thaw()
            with trio.fail_after(10):
                await listener.wait_listening(2)
            # the reconnect asked for a full refresh (notifications may have been missed)
            with trio.fail_after(2):
                await poll_until(lambda: any(t > frozen_at for t in refreshes))
            listener.stop()


async def test_install_notify_before_the_table_exists_names_the_real_cause(pg_dsn: str) -> None:
    """Not ``ExceptionGroup: Exceptions from Trio nursery (1 sub-exception)``: the
    operator reads what Postgres said, and at DEBUG where it was raised."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIO_IDLE_")}
    env.update(DATABASE_URL=pg_dsn, TRIO_IDLE_NOTIFY_TABLE='"NotCreatedYet"')
    result = await trio.run_process(
        [sys.executable, "-m", "trio_idle.cli", "db", "install-notify", "--log-level", "DEBUG"],
        env=env,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    err = result.stderr.decode()
    assert result.returncode == 1
    first = err.splitlines()[0]
    assert first == (
        'trio-idle: db install-notify failed: UndefinedTableError: relation "NotCreatedYet" '
        "does not exist"
    ), err
    assert "ExceptionGroup" not in err
    assert "DEBUG   [idle/db] UndefinedTableError at " in err
    password = urlsplit(pg_dsn).password
    assert password and password not in err
