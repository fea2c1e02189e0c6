"""The heartbeat loop and its fence in virtual time (a scripted membership table)."""

from __future__ import annotations

import attrs
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from trio_idle.cluster.membership import ERROR_LIMIT, Beat, Member, Membership, MembershipView
from trio_idle.core.scrub import Scrubber, url_secrets
from trio_idle.core.stats import Stats
from trio_idle.ops.metrics import MetricsInput, render_metrics

TTL, POLL = 15.0, 5.0


class ScriptedDb:
    """Answers every beat at once, or hangs (an unreachable database) while ``down``."""

    def __init__(self) -> None:
        self.down = False
        self.beats = 0

    async def beat(self, instance_id: str, ttl: float) -> Beat:
        self.beats += 1
        if self.down:
            await trio.sleep_forever()
        return Beat((Member(instance_id, 0.0), Member("other", 1.0)), 1000.0 + trio.current_time())

    async def leave(self, instance_id: str) -> None:
        pass


async def test_fences_at_half_the_ttl_and_resumes_on_renewal(
    autojump_clock: trio.testing.MockClock,
) -> None:
    db = ScriptedDb()
    changes: list[tuple[float, bool]] = []
    membership: Membership

    changed = trio.Event()

    def on_change() -> None:
        nonlocal changed
        changes.append((trio.current_time(), membership.fenced))
        changed.set()
        changed = trio.Event()

    async def wait_fenced(want: bool) -> None:
        while membership.fenced is not want:
            await changed.wait()

    membership = Membership(db, "me", ttl=TTL, poll_interval=POLL, on_change=on_change)
    assert membership.fenced  # no lease before the first renewal
    async with trio.open_nursery() as nursery:
        await nursery.start(membership.run)
        await trio.sleep(1)
        assert not membership.fenced and membership.generation == 1
        assert [m.instance_id for m in membership.members()] == ["me", "other"]
        db.down = True  # the renewal sent at t=5 hangs; the last good one was sent at t=0
        with trio.fail_after(TTL):
            await wait_fenced(True)
        fenced_at = trio.current_time()
        assert TTL / 2 <= fenced_at <= TTL / 2 + 0.2
        assert "half the TTL" in (membership.fence_reason or "")
        assert changes[-1] == (fenced_at, True)
        db.down = False
        with trio.fail_after(TTL):
            await wait_fenced(False)
        assert membership.generation == 2  # a regained lease: the daemon replans from scratch
        membership.stop()


DSN = "postgresql://idle:db-pw-4f1e2d3c4b5a@db.internal:5432/app"


class FailingDb:
    """Registers, then every renewal fails at once with a driver error quoting the DSN,
    a terminal escape and a line break, and a lot of text."""

    def __init__(self) -> None:
        self.failing = False

    async def beat(self, instance_id: str, ttl: float) -> Beat:
        await trio.lowlevel.checkpoint()
        if self.failing:
            raise OSError(f"cannot reach {DSN}\x1b[2J\nforged line " + "x" * 5000)
        return Beat((Member(instance_id, 0.0),), 1000.0 + trio.current_time())

    async def leave(self, instance_id: str) -> None:
        pass


async def test_the_fence_reason_is_the_last_error_scrubbed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    db = FailingDb()
    membership = Membership(
        db,
        "me",
        ttl=TTL,
        poll_interval=POLL,
        on_change=lambda: None,
        scrub=Scrubber(url_secrets(DSN)),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(membership.run)
        await trio.sleep(1)
        assert not membership.fenced
        db.failing = True
        with trio.fail_after(TTL):
            while not membership.fenced:  # noqa: ASYNC110 - virtual time
                await trio.sleep(0.5)
        membership.stop()
    reason = membership.fence_reason or ""
    # the error that fenced it, not the attempt that had no time left ("within -0.0s")
    assert "OSError: cannot reach postgresql://********@db.internal" in reason
    assert "no answer" not in reason
    assert "db-pw" not in reason and "\x1b" not in reason and "\n" not in reason
    assert "\\x1b[2J\\x0aforged line" in reason
    assert len(reason) <= len("heartbeat not renewed for 7.5s (half the TTL): ") + ERROR_LIMIT


def test_metrics_show_instance_members_and_share() -> None:
    view = MembershipView(
        instance_id="host-1",
        members=(Member("host-1", 0.0), Member("host-2", 2.5)),
        fenced=False,
        fence_reason=None,
        owned=40,
        held=3,
    )
    data = MetricsInput(
        stats=Stats(),
        sessions={},
        connections_in_source=120,
        last_refresh_unix=None,
        started_unix=0.0,
        loop_lag=0.0,
        loop_stalls=0,
        cluster=view,
    )
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(render_metrics(data).decode())
        for s in f.samples
    }
    assert samples[("trio_idle_cluster_instance_info", (("id", "host-1"),))] == 1
    assert samples[("trio_idle_cluster_members", ())] == 2
    assert (
        samples[("trio_idle_cluster_member_heartbeat_age_seconds", (("member", "host-2"),))] == 2.5
    )
    assert samples[("trio_idle_cluster_owned_connections", ())] == 40
    assert samples[("trio_idle_cluster_held_connections", ())] == 3
    assert samples[("trio_idle_cluster_fenced", ())] == 0
    single = render_metrics(attrs.evolve(data, cluster=None)).decode()
    assert "cluster" not in single
