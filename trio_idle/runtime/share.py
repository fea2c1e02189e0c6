"""Shared mode (``TRIO_IDLE_CLUSTER=shared``): which of the list's connections this
instance runs, and starting the ones that moved here.

:class:`ShareCoordinator` owns the instance's :class:`~trio_idle.cluster.membership.Membership`
and decides with :func:`~trio_idle.cluster.assignment.plan_share`. Guarantees: a membership
change or a fence stops what is no longer ours at once (synchronously, in the heartbeat's
callback, before anything else runs); connections that moved here start only after their
state was read again from the shared store and once their previous owner's lease has
certainly expired; a (re)gained lease starts nothing new before the next renewal (an
instance registering at the same moment is missing from the first member list).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import trio
from loguru import logger

from trio_idle.accounts.connections import MailConnection
from trio_idle.cluster.assignment import SharePlan, plan_share
from trio_idle.cluster.membership import Membership, MembershipDb, MembershipView
from trio_idle.core.scrub import PLAIN, Scrubs
from trio_idle.mailbox.reconcile import Reconciler


class ShareCoordinator:
    """This instance's share of the connection list.

    ``on_change()`` is told after every decision (the daemon's status readers wake up);
    ``removed(n)`` counts sessions stopped because they left the share; ``scrub`` makes
    the membership's database errors safe to show. Only
    :meth:`reshare` (synchronous) and the task running :meth:`run` act on the reconciler.
    """

    def __init__(
        self,
        db: MembershipDb,
        instance_id: str,
        *,
        ttl: float,
        poll_interval: float,
        reconciler: Reconciler,
        reload_timeout: float,
        on_change: Callable[[], None],
        removed: Callable[[int], None],
        scrub: Scrubs = PLAIN,
    ) -> None:
        self.membership = Membership(
            db,
            instance_id,
            ttl=ttl,
            poll_interval=poll_interval,
            on_change=self.reshare,
            scrub=scrub,
        )
        self._reconciler = reconciler
        self._reload_timeout = reload_timeout
        self._on_change = on_change
        self._removed = removed
        self._stopped = False
        # the whole list of the last good refresh, and the share decision
        self._wanted: Mapping[str, MailConnection] = {}
        self._wanted_known = False
        self._plan = SharePlan(frozenset(), {})
        self._previous: frozenset[str] = frozenset()
        self._generation_seen = 0
        #: database time before which a (re)gained lease starts nothing new (see reshare)
        self._fresh_until = 0.0
        self._wake = trio.Event()

    def view(self) -> MembershipView:
        """The cluster as ``/status`` and metrics show it."""
        m = self.membership
        return MembershipView(
            instance_id=m.instance_id,
            members=m.members(),
            fenced=m.fenced,
            fence_reason=m.fence_reason,
            owned=self._plan.owned,
            held=len(self._plan.holds),
        )

    @property
    def held(self) -> int:
        return len(self._plan.holds)

    def set_wanted(self, wanted: Mapping[str, MailConnection]) -> None:
        """A good refresh's whole list: decide the share again. Synchronous."""
        self._wanted = wanted
        self._wanted_known = True
        self.reshare()

    def stop(self) -> None:
        """Shutdown: leave the membership loop, plan nothing more, end :meth:`run`."""
        self._stopped = True
        self.membership.stop()
        self._wake.set()

    def reshare(self) -> None:
        """Recompute this instance's share and stop at once what is not in it any more;
        :meth:`run` starts what is new. Synchronous (the membership's callback), so a
        fence stops every session before anything else runs."""
        m = self.membership
        if m.fenced or m.beat is None or self._stopped:
            self._plan = SharePlan(frozenset(), {})
        else:
            current = m.beat.ids
            fresh = self._generation_seen != m.generation
            if fresh:
                # a lease (re)gained: the others may have taken over meanwhile
                self._previous, holds = current - {m.instance_id}, {}
                self._generation_seen = m.generation
            else:
                holds = dict(self._plan.holds)
            running = self._reconciler.handles.keys()
            plan = plan_share(
                self._wanted.keys(),
                m.instance_id,
                current,
                self._previous,
                running,
                holds,
                m.beat.db_now,
                m.ttl,
            )
            if fresh:
                # An instance registering at the same moment is missing from this first
                # list (each heartbeat's snapshot misses the other's uncommitted row), and
                # it would miss us too: both would start the same mailboxes. Start nothing
                # before the next renewal, which shows every member registered by now.
                self._fresh_until = m.beat.db_now + m.poll_interval / 2
            if m.beat.db_now < self._fresh_until:
                new = {i: self._fresh_until for i in plan.run if i not in running}
                plan = SharePlan(plan.run - new.keys(), {**plan.holds, **new})
            self._plan = plan
            if self._wanted_known:
                # before the first refresh nothing was planned: the connections are still
                # to be judged against the list the lease was gained with
                self._previous = current
        handles = self._reconciler.handles
        keep = {i: h.conn for i, h in handles.items() if i in self._plan.run}
        self._removed(len(self._reconciler.apply(keep).removed))
        self._wake.set()
        self._on_change()

    async def run(self) -> None:
        """Start the connections of the share that do not run yet, each after its state
        was read again from the shared store (its previous owner scanned it last). Returns
        after :meth:`stop`."""
        reconciler = self._reconciler
        store = reconciler.store
        while not self._stopped:
            await self._wake.wait()
            self._wake = trio.Event()
            reloaded: set[str] = set()
            while not self._stopped:
                new = sorted(
                    i
                    for i in self._plan.run
                    if i not in reconciler.handles and i not in reloaded and i in self._wanted
                )
                if not new:
                    break
                if store is not None:
                    with trio.move_on_after(self._reload_timeout):
                        await store.reload(new)
                reloaded.update(new)
            if self._stopped:
                break
            # the plan as it is now: a fence during the reload leaves nothing to start;
            # what runs and changed restarts at once (like apply), only new ones wait
            share = {i: self._wanted[i] for i in self._plan.run if i in self._wanted}
            handles = reconciler.handles
            d = reconciler.apply({i: c for i, c in share.items() if i in handles})
            self._removed(len(d.removed))
            # A step at a time, as the refresh loop does: thousands moving here at once
            # (a failover) would stop the loop. Every one was reloaded above; between two
            # steps the share may shrink (a membership change, a fence, a refresh, a
            # shutdown), so each is judged by the plan as it is when its turn comes.
            started = await reconciler.start_gradually(
                sorted(share.keys() - handles.keys()), self._startable
            )
            if started:
                logger.info(
                    f"[idle/cluster] started {len(started)} connections of this instance's "
                    f"share ({len(reconciler.handles)} running, "
                    f"{len(self._plan.holds)} waiting for a previous owner's lease)"
                )
            self._on_change()

    def _startable(self, conn_id: str) -> MailConnection | None:
        """The connection the share starter may start now, or None: still in this
        instance's share (not moved away, not held for a previous owner's lease, not
        fenced) and still in the list, while the daemon runs."""
        if self._stopped or conn_id not in self._plan.run:
            return None
        return self._wanted.get(conn_id)
