"""Account health reports across daemon restarts: the state store keeps what the backend
was last told, so a restart reports only what changed while the daemon was down.

What a backend team would notice: restarting a daemon of 10,000 healthy connections used
to send 10,000 ``ok`` reports; now it sends none, and a connection that started failing
while the daemon was down is still reported. The real daemon in-process, the IMAP test
server, the test backend's status route; the state in a real SQLite file and in a real
PostgreSQL database (tables from what ``trio-idle db migrate`` runs).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from trio_idle_testing import ImapTestServer
from trio_idle_testing.backend import ScanBackend

from tests.harness import ListSource, make_settings, poll_until, row, running_daemon
from tests.restart.conftest import state_settings
from trio_idle.runtime.daemon import Daemon
from trio_idle.state.tables import POSTGRES_MIGRATIONS

PASSWORD = "S3ntinel-pw-health-restart"
HEALTHY = [f"h{i}@health-restart.test" for i in range(5)]
CHANGED = "changed@health-restart.test"


@pytest.fixture(params=["sqlite", "postgres"])
def state_env(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    # every table `trio-idle db migrate` creates
    return state_settings(request, tmp_path, *(statement for _, statement in POSTGRES_MIGRATIONS))


def reported(backend: ScanBackend, conn_id: str) -> list[str]:
    return [r.body["state"] for r in backend.status_for(conn_id, accepted=True)]


async def all_healthy(daemon: Daemon, names: list[str]) -> None:
    """Every session has told its health ``ok`` (the server sees IDLE before the daemon
    has read the server's ``+ idling``: no event on our side to wait for)."""

    def ok() -> bool:
        handles = daemon.reconciler.handles
        return all(
            n in handles
            and (h := handles[n].health.tracker.current) is not None
            and h.state == "ok"
            for n in names
        )

    await poll_until(ok)


async def test_a_restart_reports_only_the_connections_whose_health_changed(
    server: ImapTestServer, backend: ScanBackend, state_env: dict[str, str]
) -> None:
    names = [*HEALTHY, CHANGED]
    for name in names:
        server.add_user(name, PASSWORD)
    settings = make_settings(
        backend.url,
        TRIO_IDLE_IMAP_SECURITY="plain",
        TRIO_IDLE_AUTH_BACKOFF="1h",
        **state_env,
    )
    rows = [row(n, n, PASSWORD, server.port) for n in names]
    async with running_daemon(settings, ListSource(rows)):
        with trio.fail_after(15):
            await backend.wait_for_status(
                lambda: all(reported(backend, n) == ["ok"] for n in names)
            )
    # the shutdown flushed the store; while the daemon is down one account's password
    # stops working
    server.faults(CHANGED).refuse_login = True
    backend.status_reports.clear()

    async with running_daemon(settings, ListSource(rows)) as daemon:
        with trio.fail_after(15):
            await server.wait_for(lambda: server.idle_count() >= len(HEALTHY))
            await all_healthy(daemon, HEALTHY)
            await backend.wait_for_status(lambda: bool(reported(backend, CHANGED)))
            # nothing left to say for the healthy ones: no report due, none will be sent
            now = trio.current_time()
            for name in HEALTHY:
                assert daemon.reconciler.handles[name].health.tracker.due(now) is None
    assert [r.connection_id for r in backend.status_reports] == [CHANGED]
    assert reported(backend, CHANGED) == ["auth_failed"]
    assert backend.status_for(CHANGED)[0].body["reason"] == "invalid_credentials"

    # and the recovery after the next restart is reported too (the store says auth_failed)
    server.faults(CHANGED).refuse_login = False
    backend.status_reports.clear()
    async with running_daemon(settings, ListSource(rows)) as daemon:
        with trio.fail_after(15):
            await backend.wait_for_status(lambda: bool(reported(backend, CHANGED)))
            await all_healthy(daemon, names)
    assert [(r.connection_id, r.body["state"]) for r in backend.status_reports] == [(CHANGED, "ok")]


async def test_without_a_state_store_every_connection_reports_after_a_restart(
    server: ImapTestServer, backend: ScanBackend
) -> None:
    """The control: what the store saves (and today's behaviour with TRIO_IDLE_STATE=none)."""
    for name in HEALTHY:
        server.add_user(name, PASSWORD)
    settings = make_settings(backend.url, TRIO_IDLE_IMAP_SECURITY="plain")
    rows = [row(n, n, PASSWORD, server.port) for n in HEALTHY]
    for _ in range(2):
        async with running_daemon(settings, ListSource(rows)):
            with trio.fail_after(15):
                await backend.wait_for_status(lambda: len(backend.status_reports) == len(HEALTHY))
        backend.status_reports.clear()
