"""A session ended while a command is in flight still says LOGOUT, and leaves nothing behind.

Sessions end when their row is removed, their credentials change or the daemon stops; the
cancellation can land while IDLE is being entered or during the tick's NOOP. aioimaplib
queues LOGOUT behind such an unfinished command, so without care the LOGOUT is never sent
and the session costs the whole logout timeout. Afterwards garbage collection must not find
a pending asyncio task (trio-asyncio would turn that into a crash of the daemon), which the
re-added mailbox proves by getting its mail scanned.
"""

from __future__ import annotations

import gc

import pytest
import trio

from tests.harness import poll_until, running_daemon
from tests.reliability.rig import Rig

A = "alice@rel.test"


@pytest.mark.parametrize("command", ["IDLE", "DONE", "NOOP", "NOOP-unanswered"])
async def test_removed_during_a_command(rig: Rig, command: str) -> None:
    server = rig.server
    source = rig.source(A)
    rows = list(source.rows)
    settings = rig.settings(TRIO_IDLE_TICK_INTERVAL="1s", TRIO_IDLE_LOGOUT_TIMEOUT="1500ms")
    async with running_daemon(settings, source) as daemon:
        with trio.fail_after(10):
            first = await rig.idle(A)
        handle = rig.handle(daemon, A)
        name = command.split("-")[0]
        seen = server.stats.commands.copy()
        server.faults(A).response_delay = 0.25  # every answer now takes a while
        with trio.fail_after(10):
            # The tick: DONE, NOOP, then IDLE again. A command is counted when it arrives,
            # but the server only signals state changes once a command has been answered:
            # ask (poll_until) to catch the moment its answer is still pending.
            if command == "NOOP-unanswered":
                await poll_until(lambda: server.stats.commands["DONE"] > seen["DONE"], 0.005)
                server.faults(A).response_delay = 60  # the NOOP will not be answered in time
            await poll_until(lambda: server.stats.commands[name] > seen[name], 0.005)
            source.rows = []  # the command is at the server, its answer pending: remove
            daemon.request_refresh()
            await handle.finished.wait()
        server.faults(A).response_delay = 0
        if command != "NOOP-unanswered":
            with trio.fail_after(5):
                await server.wait_for(lambda: server.connections(A) == 0)
        # One DONE per IDLE: the LOGOUT write ends an IDLE only if no DONE was sent for it
        # yet. The tick writes DONE, NOOP and its new IDLE at once: a DONE for the IDLE
        # before the tick, and one more for the tick's IDLE if the server read it (one
        # stuck on the NOOP reads neither it nor the LOGOUT write).
        ticks_idle = server.stats.commands["IDLE"] - seen["IDLE"]
        assert ticks_idle == (0 if command == "NOOP-unanswered" else 1)
        assert server.stats.commands["DONE"] - seen["DONE"] == 1 + ticks_idle
        assert server.stats.bad == 0
        if command == "NOOP-unanswered":
            assert server.stats.logouts == 0  # a courtesy that could not be paid
        else:
            with trio.fail_after(5):
                await server.wait_for(lambda: server.connections(A) == 0)
            events = [e.event for e in server.log if e.user == A]
            assert events[-3:] == ["DONE", "LOGOUT", "DISCONNECT"]
            assert server.stats.logouts == 1
        gc.collect()  # a leftover pending asyncio task dies now: the stray-error guard counts it
        source.rows = rows
        daemon.request_refresh()
        with trio.fail_after(10):
            await rig.idle(A, after=first)
            rig.ledger.append(A, "after the session was re-added")
            await rig.ledger.settle(10)


async def test_shutdown_says_logout_on_every_session(rig: Rig) -> None:
    # Sessions in IDLE and sessions in their tick: every one gets DONE (if idling) and
    # LOGOUT written before its socket closes, and no line the server could not use.
    users = [f"u{i:03d}@rel.test" for i in range(150)]
    settings = rig.settings(TRIO_IDLE_TICK_INTERVAL="300ms", TRIO_IDLE_CONNECT_RATE="10000")
    server = rig.server
    async with running_daemon(settings, rig.source(*users)) as daemon:
        with trio.fail_after(20):
            await rig.all_idle(users)
        daemon.shutdown("test")
        with trio.fail_after(settings.process.shutdown_timeout + 2):
            await daemon.wait_stopped()
    with trio.fail_after(5):
        await server.wait_for(lambda: server.stats.connections_open == 0)
    assert server.stats.logouts == len(users)
    assert server.stats.bad == 0
