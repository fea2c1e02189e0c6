"""The daemon's read API: a frozen status, waits on refreshes and on the stop phases."""

from __future__ import annotations

import attrs
import pytest
import trio
import trio.testing
from trio_idle_testing.backend import ScanBackend

from tests.harness import ListSource, make_settings, row, running_daemon
from tests.ops.conftest import closed_port
from trio_idle.runtime.daemon_status import Phase

OTHER_KEY = "another-key-than-the-daemons-0123456789"


async def test_status_follows_refreshes_and_outages(backend: ScanBackend) -> None:
    port = closed_port()  # the session keeps backing off: that is all this test needs
    source = ListSource(
        [
            row("good", "good@example.test", "pw-good", port),
            row("bad", "bad@example.test", "pw-bad", port, key=OTHER_KEY),
        ]
    )
    settings = make_settings(backend.url, TRIO_IDLE_IMAP_SECURITY="plain")
    async with running_daemon(settings, source) as daemon:
        with trio.fail_after(10):
            first = await daemon.wait_refreshed(after=0)
        assert first.phase is Phase.RUNNING and not first.stopping
        assert first.refresh_attempts == 1
        assert first.last_refresh_ok is not None and first.last_refresh_error is None
        assert first.connections_in_source == 2
        assert sum(first.sessions.values()) == 1
        assert [p.connection_id for p in first.row_problems] == ["bad"]
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            first.refresh_attempts = 5  # type: ignore[misc]

        source.fail = True
        daemon.request_refresh()
        with trio.fail_after(10):
            failed = await daemon.wait_refreshed(after=first.refresh_attempts)
        assert failed.refresh_attempts == 2
        assert failed.last_refresh_error == "simulated outage"
        # the last good list stays: its time, its counts, its sessions
        assert failed.last_refresh_ok == first.last_refresh_ok
        assert failed.connections_in_source == 2 and sum(failed.sessions.values()) == 1
        assert first.last_refresh_error is None  # a snapshot does not change afterwards

        source.fail = False
        source.rows = source.rows[:1]
        daemon.request_refresh()
        with trio.fail_after(10):
            again = await daemon.wait_refreshed(after=failed.refresh_attempts)
        assert again.last_refresh_error is None and again.row_problems == ()
        assert again.last_refresh_ok is not None and again.last_refresh_ok > first.last_refresh_ok


async def test_waits_that_are_already_satisfied_still_checkpoint(backend: ScanBackend) -> None:
    async with running_daemon(make_settings(backend.url), ListSource()) as daemon:
        with trio.fail_after(10):
            await daemon.wait_refreshed(after=0)
        with trio.CancelScope() as scope:
            scope.cancel()
            await daemon.wait_refreshed(after=0)  # already true: cancelled here all the same
        assert scope.cancelled_caught


async def test_one_stop_state_moves_from_running_to_stopping_to_stopped(
    backend: ScanBackend,
) -> None:
    port = closed_port()
    source = ListSource([row("c", "c@example.test", "pw-c", port)])
    settings = make_settings(backend.url, TRIO_IDLE_IMAP_SECURITY="plain")
    async with running_daemon(settings, source) as daemon:
        with trio.fail_after(10):
            before = await daemon.wait_refreshed(after=0)
        async with trio.open_nursery() as nursery:
            stopping = trio.Event()

            async def note_stopping() -> None:
                await daemon.wait_stopping()
                stopping.set()

            nursery.start_soon(note_stopping)
            await trio.testing.wait_all_tasks_blocked()
            assert not stopping.is_set()
            daemon.shutdown("test: stop now")
            daemon.shutdown("test: a second call changes nothing")
            assert daemon.status().phase is Phase.STOPPING and daemon.status().stopping
            with trio.fail_after(10):
                await stopping.wait()
                await daemon.wait_stopped()
        assert daemon.status().phase is Phase.STOPPED
        assert before.phase is Phase.RUNNING
        with trio.fail_after(1):
            await daemon.wait_stopping()  # over already: returns at once
