"""The collection after each refresh (``TRIO_IDLE_GC=tuned``, the default): young (no walk
of long-lived objects) while sessions run steadily, full once enough connections ended,
and nothing of a removed or reconnected session is kept past that full one."""

from __future__ import annotations

import gc
import weakref

import trio
import trio.testing

from tests.harness import running_daemon
from tests.reliability.rig import Rig, mailbox_name
from trio_idle.core.gc_policy import CollectionPolicy
from trio_idle.imap.aioimap import ImapProtocol
from trio_idle.runtime.daemon import Daemon


async def refresh(daemon: Daemon) -> None:
    attempts = daemon.status().refresh_attempts
    daemon.request_refresh()
    with trio.fail_after(10):
        await daemon.wait_refreshed(after=attempts)


def imap_protocols() -> list[weakref.ref[ImapProtocol]]:
    # gc.get_objects() does not list frozen objects: call it before a collection freezes them
    return [weakref.ref(o) for o in gc.get_objects() if isinstance(o, ImapProtocol)]


def alive(refs: list[weakref.ref[ImapProtocol]]) -> int:
    return sum(r() is not None for r in refs)


# no growth rule here: the test process's own allocations are not the daemon's
NO_GROWTH_RULE = 1e9


async def test_removed_sessions_are_freed_by_the_full_collection_after_churn(rig: Rig) -> None:
    names = [mailbox_name(i, "gc") for i in range(10)]
    source = rig.source(*names)
    async with running_daemon(rig.settings(), source) as daemon:
        with trio.fail_after(10):
            await rig.all_idle(names)
        # a full collection once 8 connections ended (the product: 1000 or 25 %)
        daemon.gc_policy = CollectionPolicy(
            min_ended=8, ended_share=0.0, growth_share=NO_GROWTH_RULE
        )
        removed = imap_protocols()
        assert len(removed) == 10
        handles = [rig.handle(daemon, name) for name in names]
        stats = daemon.stats
        full = stats.get("gc_collections", "full")

        await refresh(daemon)  # the policy's first: full
        assert stats.get("gc_collections", "full") == full + 1
        await rig.log("[idle/gc] full collection: ")
        await refresh(daemon)  # nothing ended: young
        assert stats.get("gc_collections", "young") == 1

        source.rows = rig.rows(*names[5:])  # 5 sessions end: 5 < 8, young collections
        await refresh(daemon)
        with trio.fail_after(10):
            for handle in handles[:5]:
                await handle.finished.wait()
        await refresh(daemon)
        assert stats.get("gc_collections", "young") == 3
        assert stats.get("gc_collections", "full") == full + 1

        source.rows = []  # 5 more: 10 ended
        await refresh(daemon)  # they may still be logging out: young
        assert stats.get("gc_collections", "young") == 4
        with trio.fail_after(10):
            for handle in handles:
                await handle.finished.wait()  # logged out, every task of theirs ended
            # ... and the asyncio callbacks their transports scheduled on the way out ran
            await trio.testing.wait_all_tasks_blocked()
        await refresh(daemon)  # the one after: full
        assert stats.get("gc_collections", "full") == full + 2
        # the ten removed sessions' IMAP protocols (frozen while they ran) are gone
        assert alive(removed) == 0


async def test_reconnected_connections_are_freed_by_the_full_collection(rig: Rig) -> None:
    names = [mailbox_name(i, "gcr") for i in range(8)]
    async with running_daemon(rig.settings(), rig.source(*names)) as daemon:
        with trio.fail_after(10):
            await rig.all_idle(names)
        daemon.gc_policy = CollectionPolicy(
            min_ended=8, ended_share=0.0, growth_share=NO_GROWTH_RULE
        )
        first = imap_protocols()
        assert len(first) == 8
        await refresh(daemon)  # full: every running connection frozen
        ids = {name: rig.server.sessions(name)[0].id for name in names}

        rig.server.drop_all()  # every connection ends; the sessions reconnect
        with trio.fail_after(20):
            for name in names:
                await rig.idle(name, after=ids[name])
        await refresh(daemon)  # saw 8 ended: young
        assert daemon.stats.get("gc_collections", "young") == 1
        await refresh(daemon)  # the one after: full
        assert daemon.stats.get("gc_collections", "full") >= 2
        assert alive(first) == 0
        with trio.fail_after(10):
            await rig.all_idle(names)  # the new connections still run
