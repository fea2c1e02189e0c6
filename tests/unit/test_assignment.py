"""Rendezvous assignment and the handover rule (pure; trio_idle.cluster.assignment)."""

from __future__ import annotations

import pytest

from trio_idle.cluster.assignment import owner, plan_share, shares, weight
from trio_idle.core.config import ConfigError, parse_settings

IDS = [f"conn-{i}" for i in range(10_000)]
TTL = 15.0


def test_weights_are_stable_across_processes() -> None:
    # a fixed value: every instance, on any host or Python, must compute the same owner
    assert weight("a", "conn-1") == weight("a", "conn-1")
    assert weight("a", "conn-1") != weight("b", "conn-1")
    assert owner("conn-1", ["host-1", "host-2", "host-3"]) == owner(
        "conn-1", ["host-3", "host-1", "host-2"]
    )


def test_no_members_own_nothing() -> None:
    assert owner("x", []) is None
    assert shares(["x"], []) == {}


@pytest.mark.parametrize("n", [2, 3, 5])
def test_shares_are_balanced_at_10000_connections(n: int) -> None:
    members = [f"host-{i}" for i in range(n)]
    split = shares(IDS, members)
    assert sum(len(s) for s in split.values()) == len(IDS)
    biggest = max(len(s) for s in split.values()) / len(IDS)
    assert biggest <= 1 / n + 0.02, f"largest share {biggest:.3f} for {n} members"


def test_a_fourth_member_takes_about_a_quarter_and_nothing_else_moves() -> None:
    three = ["a", "b", "c"]
    before = {c: owner(c, three) for c in IDS}
    after = {c: owner(c, [*three, "d"]) for c in IDS}
    moved = [c for c in IDS if before[c] != after[c]]
    assert all(after[c] == "d" for c in moved), "a join only moves connections to the joiner"
    assert 0.22 <= len(moved) / len(IDS) <= 0.28


def test_a_member_leaving_moves_only_its_own_connections() -> None:
    four = ["a", "b", "c", "d"]
    before = {c: owner(c, four) for c in IDS}
    after = {c: owner(c, ["a", "b", "c"]) for c in IDS}
    assert {c for c in IDS if before[c] != after[c]} == {c for c in IDS if before[c] == "d"}


def mine(me: str, members: frozenset[str], n: int = 200) -> list[str]:
    return [c for c in IDS[:n] if owner(c, members) == me]


def test_connections_of_a_dead_member_start_at_once() -> None:
    before, after = frozenset({"a", "b"}), frozenset({"a"})
    plan = plan_share(IDS[:200], "a", after, before, mine("a", before), {}, 1000.0, TTL)
    assert plan.run == frozenset(IDS[:200]) and not plan.holds


def test_connections_taken_from_a_live_member_wait_one_lease() -> None:
    # "b" joined; what it takes from "a" may still be watched by "a" until "a" sees "b"
    before, after = frozenset({"a"}), frozenset({"a", "b"})
    taken = mine("b", after)
    plan = plan_share(IDS[:200], "b", after, before, [], {}, 1000.0, TTL)
    assert plan.run == frozenset() and set(plan.holds) == set(taken)
    assert set(plan.holds.values()) == {1000.0 + TTL}
    # the next polls: still held before the lease ends, started from then on
    later = plan_share(IDS[:200], "b", after, after, [], plan.holds, 1000.0 + TTL - 0.1, TTL)
    assert later.run == frozenset() and later.holds == plan.holds
    done = plan_share(IDS[:200], "b", after, after, [], later.holds, 1000.0 + TTL, TTL)
    assert done.run == frozenset(taken) and not done.holds
    assert done.owned == len(taken)


def test_the_previous_owner_stops_what_it_lost_and_keeps_the_rest() -> None:
    before, after = frozenset({"a"}), frozenset({"a", "b"})
    plan = plan_share(IDS[:200], "a", after, before, IDS[:200], {}, 1000.0, TTL)
    assert plan.run == frozenset(mine("a", after))


def test_new_rows_of_an_unchanged_membership_start_at_once() -> None:
    members = frozenset({"a", "b"})
    plan = plan_share(IDS[:200], "a", members, members, [], {}, 1000.0, TTL)
    assert plan.run == frozenset(mine("a", members)) and not plan.holds


def test_after_a_fence_everything_is_treated_as_taken_from_the_others() -> None:
    # the daemon passes current-minus-me as the previous list after (re)gaining a lease
    members = frozenset({"a", "b", "c"})
    plan = plan_share(IDS[:200], "a", members, members - {"a"}, [], {}, 1000.0, TTL)
    assert plan.run == frozenset() and set(plan.holds) == set(mine("a", members))
    alone = frozenset({"a"})
    assert plan_share(IDS[:50], "a", alone, frozenset(), [], {}, 1000.0, TTL).run == frozenset(
        IDS[:50]
    )


def test_a_hold_is_dropped_when_the_connection_moves_on() -> None:
    before, after = frozenset({"a"}), frozenset({"a", "b"})
    plan = plan_share(IDS[:200], "b", after, before, [], {}, 1000.0, TTL)
    gone = plan_share(IDS[:200], "b", frozenset({"a"}), after, [], plan.holds, 1001.0, TTL)
    assert gone.run == frozenset() and not gone.holds


BASE = {
    "ADMIN_SECRET": "s",
    "ENCRYPTION_KEY": "k" * 32,
    "DATABASE_URL": "postgresql://u@127.0.0.1:1/d",
}


def test_shared_mode_needs_the_postgres_state_store() -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings({**BASE, "TRIO_IDLE_CLUSTER": "shared", "TRIO_IDLE_STATE": "sqlite"})
    assert "TRIO_IDLE_CLUSTER" in str(info.value) and "TRIO_IDLE_STATE=postgres" in str(info.value)


def test_shared_mode_checks_the_lease_against_poll_and_logout() -> None:
    env = {**BASE, "TRIO_IDLE_CLUSTER": "shared", "TRIO_IDLE_STATE": "postgres"}
    ok = parse_settings({**env, "TRIO_IDLE_INSTANCE_ID": "host-1.a"})
    assert ok.cluster.cluster == "shared" and ok.cluster.cluster_ttl == 15.0
    assert ok.cluster.instance_id == "host-1.a"
    with pytest.raises(ConfigError, match="TRIO_IDLE_CLUSTER_POLL"):
        parse_settings({**env, "TRIO_IDLE_CLUSTER_POLL": "6s"})
    with pytest.raises(ConfigError, match=r"TRIO_IDLE_CLUSTER_TTL.*TRIO_IDLE_LOGOUT_TIMEOUT"):
        parse_settings({**env, "TRIO_IDLE_CLUSTER_TTL": "3s", "TRIO_IDLE_CLUSTER_POLL": "1s"})
    with pytest.raises(ConfigError, match="TRIO_IDLE_INSTANCE_ID"):
        parse_settings({**env, "TRIO_IDLE_INSTANCE_ID": "bad id"})


@pytest.mark.parametrize(
    "hostile",
    [
        "a'; DROP TABLE trio_idle_instance; --",
        'a"b',
        "a\nb",
        "a\x1b[2Jb",
        "-leading-dash",
        "x" * 129,
        "caf\u00e9",
    ],
)
def test_a_hostile_instance_id_is_refused_without_echoing_control_characters(hostile: str) -> None:
    env = {**BASE, "TRIO_IDLE_CLUSTER": "shared", "TRIO_IDLE_STATE": "postgres"}
    with pytest.raises(ConfigError, match="TRIO_IDLE_INSTANCE_ID") as info:
        parse_settings({**env, "TRIO_IDLE_INSTANCE_ID": hostile})
    assert "\n" not in str(info.value).split("TRIO_IDLE_INSTANCE_ID", 1)[1]
    assert "\x1b" not in str(info.value)
    # the longest and the widest accepted
    assert parse_settings({**env, "TRIO_IDLE_INSTANCE_ID": "a" * 128}).cluster.instance_id
    assert parse_settings({**env, "TRIO_IDLE_INSTANCE_ID": "pod-7.ns:web@eu-1_a"}).cluster


def test_single_mode_is_the_default() -> None:
    assert parse_settings(BASE).cluster.cluster == "single"
