"""A connection whose row changed is restarted: the new session connects only once the
old one has ended, so one mailbox never holds two IMAP connections (Gmail allows 15 per
account). Virtual clock, scripted IMAP; the reconciler as the daemon runs it."""

from __future__ import annotations

from typing import Any

import attrs
import trio
import trio.testing

from tests.fixtures import mock_webhook
from tests.unit.session_rig import CONN, DEADLINE, connected, make_rig, settled
from trio_idle.core.config import AccountHealthSettings, WebhookSettings
from trio_idle.mailbox.coalescer import ScanCoalescer
from trio_idle.mailbox.health_reporter import AccountHealth
from trio_idle.mailbox.reconcile import Handle, Reconciler
from trio_idle.mailbox.session import ConnectionMemory

CHANGED = attrs.evolve(CONN, user_id="user-2")


def groups() -> dict[str, Any]:
    return {"webhook_settings": WebhookSettings(), "account_health": AccountHealthSettings()}


async def test_the_new_session_connects_only_after_the_old_one_hung_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rig = make_rig(logout_timeout=5.0)
    server = rig.server
    async with trio.open_nursery() as nursery:
        reconciler = Reconciler(nursery, rig.env, mock_webhook(total_timeout=60.0), **groups())
        with trio.fail_after(DEADLINE):
            reconciler.apply({CONN.id: CONN})
            await connected(rig)
            old = reconciler.handles[CONN.id]
            server.go_silent()  # the old session's LOGOUT waits its whole timeout
            reconciler.apply({CONN.id: CHANGED})
            await connected(rig, link=2)
        assert old.finished.is_set()
        assert server.links[1].closed
        # LOGOUT written, the silent server waited for, then (only then) the new connect
        assert server.times("connect", 2)[0] >= server.times("LOGOUT", 1)[0] + 5.0
        assert reconciler.handles[CONN.id].conn is CHANGED
        nursery.cancel_scope.cancel()


async def test_a_restart_while_backing_off_connects_again_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # the old session ends at once (nothing to log out): its task may be gone before the
    # new one first asks for it, and the new one must not wait for an end already past
    rig = make_rig()
    server = rig.server
    server.reject_logins = 1
    async with trio.open_nursery() as nursery:
        reconciler = Reconciler(nursery, rig.env, mock_webhook(total_timeout=60.0), **groups())
        with trio.fail_after(DEADLINE):
            reconciler.apply({CONN.id: CONN})
            await settled(rig, lambda: 1 in server.links and server.links[1].closed)
            restarted_at = trio.current_time()
            reconciler.apply({CONN.id: CHANGED})
            await connected(rig, link=2)
        # not after the authentication backoff (15 min): the new row is tried at once (the
        # connect limiter's pace aside)
        assert server.times("connect", 2)[0] < restarted_at + 1.0
        nursery.cancel_scope.cancel()


def _handle() -> Handle:
    return Handle(
        CONN,
        ConnectionMemory(),
        ScanCoalescer(),
        AccountHealth(CONN, 60.0),
    )


async def test_finished_is_set_for_whoever_waits_before_or_after_the_end() -> None:
    early = _handle()
    waiting = early.finished  # a successor waiting while the task still runs
    assert not waiting.is_set()
    early.ended()
    assert waiting.is_set() and early.finished is waiting

    late = _handle()
    late.ended()
    with trio.fail_after(1):  # first asked after the end: already set
        await late.finished.wait()


async def test_a_connection_removed_before_its_task_ran_never_connects(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # its scope is the nursery the task has not opened yet: the removal must still count
    rig = make_rig()
    server = rig.server
    async with trio.open_nursery() as nursery:
        reconciler = Reconciler(nursery, rig.env, mock_webhook(total_timeout=60.0), **groups())
        reconciler.apply({CONN.id: CONN})
        handle = reconciler.handles[CONN.id]
        reconciler.apply({})  # in the same step: the connection task has not run yet
        with trio.fail_after(DEADLINE):
            await handle.finished.wait()
        await trio.sleep(60.0)  # anything it would still do, it would have done by now
        assert server.links == {}
        assert rig.env.stats.get("connect_attempts") == 0
        assert reconciler.handles == {}
        nursery.cancel_scope.cancel()


async def test_stop_all_before_the_tasks_ran_starts_no_session(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rig = make_rig()
    async with trio.open_nursery() as nursery:
        reconciler = Reconciler(nursery, rig.env, mock_webhook(total_timeout=60.0), **groups())
        reconciler.apply({CONN.id: CONN})
        handle = reconciler.handles[CONN.id]
        reconciler.stop_all()
        with trio.fail_after(DEADLINE):
            await handle.finished.wait()
        await trio.sleep(60.0)
        assert rig.server.links == {}
        nursery.cancel_scope.cancel()


async def test_a_restart_removed_while_waiting_for_its_predecessor_never_connects(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rig = make_rig(logout_timeout=5.0)
    server = rig.server
    async with trio.open_nursery() as nursery:
        reconciler = Reconciler(nursery, rig.env, mock_webhook(total_timeout=60.0), **groups())
        with trio.fail_after(DEADLINE):
            reconciler.apply({CONN.id: CONN})
            await connected(rig)
            old = reconciler.handles[CONN.id]
            server.go_silent()  # the old session's LOGOUT waits its whole timeout
            reconciler.apply({CONN.id: CHANGED})
            new = reconciler.handles[CONN.id]
            await settled(rig, lambda: server.times("LOGOUT", 1) != [])
            assert not old.finished.is_set()  # the new one waits for it now
            reconciler.apply({})
            await new.finished.wait()
            # it stopped waiting at once: the old one still waits for its LOGOUT's answer
            assert not old.finished.is_set()
            await old.finished.wait()
        await trio.sleep(60.0)
        assert list(server.links) == [1], "the removed restart connected after all"
        assert server.links[1].closed
        nursery.cancel_scope.cancel()
