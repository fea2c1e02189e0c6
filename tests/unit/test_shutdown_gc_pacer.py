"""Shutdown does not wait for the young-collection pacer (it never ends by itself)."""

from __future__ import annotations

import trio

from tests.harness import ListSource, make_settings, running_daemon


async def test_an_idle_daemon_stops_long_before_its_shutdown_deadline() -> None:
    # nothing to log out: stopping must not take the whole TRIO_IDLE_SHUTDOWN_TIMEOUT
    settings = make_settings("http://127.0.0.1:9", TRIO_IDLE_SHUTDOWN_TIMEOUT="60s")
    async with running_daemon(settings, ListSource([])) as daemon:
        with trio.fail_after(10):
            await daemon.wait_refreshed(after=0)
        daemon.shutdown("test")
        with trio.fail_after(10):
            await daemon.wait_stopped()
