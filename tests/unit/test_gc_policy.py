"""When the after-refresh collection must be a full one (pure), and what a collection does."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from trio_idle.core.gc_policy import CollectionPolicy, Kind, collect_and_freeze

YOUNG, FULL = Kind.YOUNG, Kind.FULL


def collect(policy: CollectionPolicy, t: float, attempts: int, sessions: int, blocks: int) -> Kind:
    """One after-refresh collection as the daemon runs it (blocks unchanged by it)."""
    kind = policy.kind_due(attempts=attempts, sessions=sessions, blocks=blocks, now=t)
    policy.done(kind, attempts=attempts, sessions=sessions, blocks=blocks, now=t)
    return kind


def after_ramp(policy: CollectionPolicy, sessions: int = 10_000, blocks: int = 3_000_000) -> None:
    """The first (full) collection of an empty daemon, then the one after the ramp."""
    assert collect(policy, 0.0, attempts=0, sessions=0, blocks=200_000) is FULL
    # a ramp makes connections and ends none: their memory is not garbage
    assert collect(policy, 300.0, attempts=sessions, sessions=sessions, blocks=blocks) is YOUNG


def test_the_first_collection_is_full() -> None:
    assert CollectionPolicy().kind_due(attempts=0, sessions=0, blocks=0, now=0.0) is FULL


def test_a_slow_ramp_is_not_growth() -> None:
    policy = CollectionPolicy()
    assert collect(policy, 0.0, attempts=0, sessions=0, blocks=200_000) is FULL
    # sessions wanted, none connected yet; then 6,000 connected (280 blocks each); then all
    assert collect(policy, 60.0, attempts=0, sessions=10_000, blocks=210_000) is YOUNG
    assert collect(policy, 120.0, attempts=6_000, sessions=10_000, blocks=1_880_000) is YOUNG
    assert collect(policy, 180.0, attempts=10_000, sessions=10_000, blocks=3_000_000) is YOUNG


def test_a_steady_daemon_only_ever_gets_young_collections() -> None:
    policy = CollectionPolicy()
    after_ramp(policy)
    for i in range(2, 70):  # 5-minute refreshes for almost 6 hours, a few reconnects
        attempts = 10_000 + i * 10
        assert collect(policy, i * 300.0, attempts, sessions=10_000, blocks=3_100_000) is YOUNG


def test_ended_connections_make_the_collection_after_the_one_that_saw_them_full() -> None:
    policy = CollectionPolicy()  # 1000 or a quarter of the sessions
    after_ramp(policy)
    assert collect(policy, 600.0, attempts=12_499, sessions=10_000, blocks=3_000_000) is YOUNG
    assert collect(policy, 900.0, attempts=12_499, sessions=10_000, blocks=3_000_000) is YOUNG
    # 2,500 ended: this collection may still find them logging out; the next one is full
    assert collect(policy, 1200.0, attempts=12_500, sessions=10_000, blocks=3_000_000) is YOUNG
    assert collect(policy, 1500.0, attempts=12_600, sessions=10_000, blocks=3_000_000) is FULL
    # the 100 that ended just before that full one count towards the next one
    assert collect(policy, 1800.0, attempts=15_099, sessions=10_000, blocks=3_000_000) is YOUNG
    assert collect(policy, 2100.0, attempts=15_099, sessions=10_000, blocks=3_000_000) is FULL
    # removed sessions end connections too
    assert collect(policy, 2400.0, attempts=15_099, sessions=7_000, blocks=3_000_000) is YOUNG
    assert collect(policy, 2700.0, attempts=15_099, sessions=7_000, blocks=3_000_000) is FULL

    small = CollectionPolicy()
    after_ramp(small, sessions=100, blocks=400_000)
    assert collect(small, 600.0, attempts=1_099, sessions=100, blocks=400_000) is YOUNG
    assert collect(small, 900.0, attempts=1_100, sessions=100, blocks=400_000) is YOUNG
    assert collect(small, 1200.0, attempts=1_100, sessions=100, blocks=400_000) is FULL


def test_memory_growth_no_new_connection_explains_seen_twice_makes_a_full() -> None:
    policy = CollectionPolicy(growth_share=0.10)
    after_ramp(policy, blocks=3_000_000)
    assert collect(policy, 600.0, attempts=10_000, sessions=10_000, blocks=3_299_999) is YOUNG
    # work in flight for a moment: grown at one collection only
    assert collect(policy, 900.0, attempts=10_000, sessions=10_000, blocks=3_300_000) is YOUNG
    assert collect(policy, 1200.0, attempts=10_000, sessions=10_000, blocks=3_100_000) is YOUNG
    assert collect(policy, 1500.0, attempts=10_000, sessions=10_000, blocks=3_300_000) is YOUNG
    # still there at the next one (the growth counts from the baseline, not the last one)
    assert policy.kind_due(attempts=10_000, sessions=10_000, blocks=3_300_000, now=1800.0) is FULL
    # the count after the full collection is the new baseline
    policy.done(FULL, attempts=10_000, sessions=10_000, blocks=3_100_000, now=1800.0)
    assert collect(policy, 2100.0, attempts=10_000, sessions=10_000, blocks=3_400_000) is YOUNG
    assert collect(policy, 2400.0, attempts=10_000, sessions=10_000, blocks=3_400_000) is YOUNG


def test_new_sessions_and_reconnects_bring_memory_that_is_not_growth() -> None:
    policy = CollectionPolicy(growth_share=0.10)
    after_ramp(policy, sessions=10_000, blocks=3_000_000)  # 280 blocks per connection
    # 2,000 more sessions: young, and the baseline moves up with them
    assert collect(policy, 600.0, attempts=12_000, sessions=12_000, blocks=3_560_000) is YOUNG
    assert collect(policy, 900.0, attempts=12_000, sessions=12_000, blocks=3_915_999) is YOUNG
    assert collect(policy, 1200.0, attempts=12_000, sessions=12_000, blocks=3_916_000) is YOUNG
    assert policy.kind_due(attempts=12_000, sessions=12_000, blocks=3_916_000, now=1500.0) is FULL

    storm = CollectionPolicy(growth_share=0.10)
    after_ramp(storm, sessions=10_000, blocks=3_000_000)
    # 2,000 reconnects (fewer than a quarter): new connections, the old ones kept as garbage
    assert collect(storm, 600.0, attempts=12_000, sessions=10_000, blocks=3_560_000) is YOUNG
    assert collect(storm, 900.0, attempts=12_000, sessions=10_000, blocks=3_560_000) is YOUNG
    assert collect(storm, 1200.0, attempts=12_000, sessions=10_000, blocks=3_560_000) is YOUNG


def test_a_full_collection_at_least_every_max_interval() -> None:
    policy = CollectionPolicy(max_interval=3600.0)
    policy.done(FULL, attempts=5, sessions=10_000, blocks=3_000_000, now=100.0)
    assert policy.kind_due(attempts=5, sessions=10_000, blocks=3_000_000, now=3699.0) is YOUNG
    assert policy.kind_due(attempts=5, sessions=10_000, blocks=3_000_000, now=3700.0) is FULL


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


@pytest.fixture
def unfrozen() -> Iterator[None]:
    yield
    gc.unfreeze()  # leave the test process as it was


def test_frozen_cyclic_garbage_waits_for_a_full_collection(unfrozen: None) -> None:
    a, b = Node(), Node()
    a.other, b.other = b, a
    frozen_pair = weakref.ref(a)
    collect_and_freeze(FULL)  # the pair survives and is frozen
    del a, b  # ... then becomes cyclic garbage
    c, d = Node(), Node()
    c.other, d.other = d, c
    new_pair = weakref.ref(c)
    del c, d  # cyclic garbage that was never frozen

    young = collect_and_freeze(YOUNG)
    assert young.kind is YOUNG and young.collected >= 2
    assert new_pair() is None  # young cyclic garbage: found by the young collection
    assert frozen_pair() is not None  # kept: frozen objects are not walked

    full = collect_and_freeze(FULL)
    assert full.kind is FULL and full.collected >= 2
    assert frozen_pair() is None


def test_a_young_collection_freezes_what_it_did_not_walk(unfrozen: None) -> None:
    gc.collect()
    a, b = Node(), Node()
    a.other, b.other = b, a
    old_pair = weakref.ref(a)
    gc.collect(1)  # the pair is promoted to the oldest generation, unfrozen
    del a, b  # ... and becomes cyclic garbage there
    collect_and_freeze(YOUNG)
    assert old_pair() is not None  # not walked: frozen as it was, garbage included
    assert gc.get_freeze_count() > 0
    collect_and_freeze(FULL)
    assert old_pair() is None


async def _replace_steadily(seconds: float, live: list[list[int]]) -> int:
    """What a ticking daemon does to the collector: each step frees as many old
    containers as it makes new, long-lived ones. Returns the young generations' size."""
    import trio

    steps = int(seconds * 10)
    for step in range(steps):
        for i in range(200):
            live[(step * 200 + i) % len(live)] = [step, i]  # one dies, one is born
        await trio.sleep(0.1)
    return len(gc.get_objects(0)) + len(gc.get_objects(1))


async def test_paced_young_collections_keep_the_young_generations_small(
    autojump_clock: object,
) -> None:
    # CPython collects generation 0 when allocations minus deallocations pass 700: a
    # steady daemon never gets there, and its young generation grows with every tick's
    # survivors until one slow collection walks them all (docs/performance.md).
    import trio

    from trio_idle.core.gc_policy import pace_young_collections

    live: list[list[int]] = [[i] for i in range(100_000)]
    gc.collect()
    unpaced = await _replace_steadily(30, live)
    gc.collect()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pace_young_collections)
        paced = await _replace_steadily(30, live)
        nursery.cancel_scope.cancel()
    assert unpaced > 40_000  # the problem: 30 s of survivors, all young
    assert paced < 1_500  # about a quarter second's worth (2,000 survivors a second)
