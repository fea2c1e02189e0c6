"""When the after-refresh collection must be a full one (pure), and what a collection does."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from trio_idle.gc_policy import FullCollectionPolicy, collect_and_freeze


def test_the_first_collection_is_full() -> None:
    assert FullCollectionPolicy().full_due(churn=0, sessions=0, now=0.0)


def test_churn_of_a_quarter_of_the_sessions_or_1000_makes_the_next_full() -> None:
    policy = FullCollectionPolicy()
    policy.full_done(churn=10_000, now=0.0)  # after the ramp of 10,000 sessions
    assert not policy.full_due(churn=12_499, sessions=10_000, now=300.0)
    assert policy.full_due(churn=12_500, sessions=10_000, now=300.0)
    policy.full_done(churn=200, now=0.0)
    assert not policy.full_due(churn=1_199, sessions=100, now=300.0)  # small: 1000 floor
    assert policy.full_due(churn=1_200, sessions=100, now=300.0)


def test_a_full_collection_at_least_every_max_interval() -> None:
    policy = FullCollectionPolicy(max_interval=3600.0)
    policy.full_done(churn=5, now=100.0)
    assert not policy.full_due(churn=5, sessions=10_000, now=3699.0)
    assert policy.full_due(churn=5, sessions=10_000, now=3700.0)


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
    collect_and_freeze(full=True)  # the pair survives and is frozen
    del a, b  # ... then becomes cyclic garbage
    c, d = Node(), Node()
    c.other, d.other = d, c
    new_pair = weakref.ref(c)
    del c, d  # cyclic garbage that was never frozen

    light = collect_and_freeze(full=False)
    assert not light.full and light.collected >= 2
    assert new_pair() is None  # found without a full collection
    assert frozen_pair() is not None  # kept: frozen objects are not walked

    full = collect_and_freeze(full=True)
    assert full.full and full.collected >= 2
    assert frozen_pair() is None
