"""The collection after each refresh (``TRIO_IDLE_GC=tuned``, the default): short when
little changed, full once many sessions started or ended, and nothing of a removed
session is kept past that full one."""

from __future__ import annotations

import gc
import weakref

import trio

from tests.harness import running_daemon
from tests.reliability.rig import Rig, mailbox_name
from trio_idle.daemon import Daemon
from trio_idle.gc_policy import FullCollectionPolicy
from trio_idle.imap_client import _Protocol


async def refresh(daemon: Daemon) -> None:
    attempts = daemon.status().refresh_attempts
    daemon.request_refresh()
    with trio.fail_after(10):
        await daemon.wait_refreshed(after=attempts)


def imap_protocols() -> list[weakref.ref[_Protocol]]:
    # gc.get_objects() does not list frozen objects: call it before a collection freezes them
    return [weakref.ref(o) for o in gc.get_objects() if isinstance(o, _Protocol)]


async def test_collections_are_full_only_after_churn_and_free_removed_sessions(
    rig: Rig,
) -> None:
    first = [mailbox_name(i, "gc") for i in range(10)]
    second = [mailbox_name(i, "gc2") for i in range(10)]
    source = rig.source(*first)
    rig.add(*second)
    async with running_daemon(rig.settings(), source) as daemon:
        with trio.fail_after(10):
            await rig.all_idle(first)
        # a full collection once 15 sessions started or ended (the product: 1000 or 25 %)
        daemon.gc_policy = FullCollectionPolicy(min_churn=15, churn_share=0.0)
        removed = imap_protocols()
        assert len(removed) == 10
        stats = daemon.stats
        before = stats.get("gc_collections", "full")

        await refresh(daemon)  # the policy's first: full
        assert stats.get("gc_collections", "full") == before + 1
        await rig.log("[idle/gc] full collection: ")

        await refresh(daemon)  # nothing changed: only what is new since the last one
        assert stats.get("gc_collections", "new") == 1

        source.rows = []  # 10 sessions end: churn 10 < 15, still a short collection
        await refresh(daemon)
        assert stats.get("gc_collections", "new") == 2
        with trio.fail_after(10):
            await rig.server.wait_for(lambda: not rig.server.sessions())
        await refresh(daemon)
        assert stats.get("gc_collections", "new") == 3
        # (their protocols are still there now: cycles among frozen objects; measured)

        source.rows = rig.rows(*second)  # 10 more start: churn 20 → full
        with trio.fail_after(10):
            await refresh(daemon)
            await rig.all_idle(second)
        await refresh(daemon)
        assert stats.get("gc_collections", "full") == before + 2
        # the ten removed sessions' IMAP protocols (frozen while they ran) are gone
        assert [r for r in removed if r() is not None] == []
