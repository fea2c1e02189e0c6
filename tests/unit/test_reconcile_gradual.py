"""A refresh that brings thousands of new connections starts them a step at a time:
between steps the loop serves everything else (the pushes of running sessions), and a
shutdown in the middle starts nothing more. Virtual clock, scripted IMAP."""

from __future__ import annotations

import attrs
import httpx
import trio
import trio.testing

from tests.harness import webhook_client
from tests.unit.test_session_virtual_time import CONN, make_rig
from trio_idle.accounts.connections import MailConnection
from trio_idle.backend.webhook import WebhookClient
from trio_idle.mailbox.reconcile import START_STEP, Reconciler

N = 5 * START_STEP


def wanted(n: int) -> dict[str, MailConnection]:
    conns = (attrs.evolve(CONN, id=f"c{i}", email=f"c{i}@example.test") for i in range(n))
    return {c.id: c for c in conns}


def webhook() -> WebhookClient:
    return webhook_client(
        "http://backend.invalid/scan",
        lambda request: httpx.Response(200, json={}),
        total_timeout=60.0,
    )


async def test_new_connections_start_a_step_at_a_time_and_others_run_between(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rig = make_rig()
    seen: list[int] = []
    applied = trio.Event()
    async with trio.open_nursery() as nursery:
        reconciler = Reconciler(nursery, rig.env, webhook())

        async def other_task() -> None:  # e.g. a session with a push to deliver
            while not applied.is_set():
                seen.append(len(reconciler.handles))
                await trio.lowlevel.checkpoint()

        nursery.start_soon(other_task)
        d = await reconciler.apply_gradually(wanted(N))
        applied.set()
        assert len(d.added) == N and len(reconciler.handles) == N
        with trio.fail_after(5):
            await rig.server.wait_for(lambda: len(rig.server.links) >= 1)  # sessions run
        nursery.cancel_scope.cancel()
    # the other task ran while the connections were being started, not only after
    # (trio's scheduler may run it before or after a step's starts: some steps, not all)
    between = sorted({count for count in seen if 0 < count < N})
    assert len(between) >= 2, seen
    assert all(count % START_STEP == 0 for count in between), between


async def test_shutdown_during_a_gradual_start_starts_nothing_more(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rig = make_rig()
    async with trio.open_nursery() as nursery:
        reconciler = Reconciler(nursery, rig.env, webhook())

        async def shutdown_after_first_step() -> None:
            while len(reconciler.handles) < START_STEP:
                await trio.lowlevel.checkpoint()
            reconciler.stop_all()

        nursery.start_soon(shutdown_after_first_step)
        await reconciler.apply_gradually(wanted(N))
        assert reconciler.handles == {}
        nursery.cancel_scope.cancel()
    assert len(rig.server.links) <= START_STEP


async def test_a_change_between_steps_counts_for_the_connections_not_started_yet(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The share starter's case: while a failover's share starts, the share shrinks (a
    membership change, a fence) or a row changes; what has not started yet follows."""
    rig = make_rig()
    conns = wanted(N)
    share = dict(conns)
    ids = sorted(conns)
    later = ids[N // 2 :]  # not reached before the change: that takes at most two steps
    dropped, changed = later[::2], later[1]
    async with trio.open_nursery() as nursery:
        reconciler = Reconciler(nursery, rig.env, webhook())

        async def change_after_first_step() -> None:
            while len(reconciler.handles) < START_STEP:
                await trio.lowlevel.checkpoint()
            for conn_id in dropped:
                del share[conn_id]
            share[changed] = attrs.evolve(conns[changed], port=1143)

        nursery.start_soon(change_after_first_step)
        started = await reconciler.start_gradually(ids, share.get)
        assert sorted(started) == sorted(share)
        # none of the dropped ones runs, the changed one runs as it is now
        assert reconciler.running == share
        nursery.cancel_scope.cancel()


async def test_a_connection_running_already_is_not_started_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rig = make_rig()
    conns = wanted(2 * START_STEP)
    ids = sorted(conns)
    async with trio.open_nursery() as nursery:
        reconciler = Reconciler(nursery, rig.env, webhook())
        reconciler.apply({i: conns[i] for i in ids[::3]})
        before = dict(reconciler.handles)
        started = await reconciler.start_gradually(ids, conns.get)
        assert sorted(started) == sorted(set(ids) - set(before))
        # the same subtrees: a second one would be a second IMAP connection to the mailbox
        # (and the first one, no longer in the reconciler's hands, would never be stopped)
        assert all(reconciler.handles[i] is handle for i, handle in before.items())
        nursery.cancel_scope.cancel()
