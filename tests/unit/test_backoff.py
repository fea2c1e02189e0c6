"""Reconnect backoff: exact first delay, bounded jitter after, reset after a stable session."""

from __future__ import annotations

import random

import pytest

from trio_idle.backoff import Backoff, BackoffPolicy
from trio_idle.logs import human_duration

POLICY = BackoffPolicy(initial=5.0, cap=300.0, reset_after=120.0)


def bound(attempt: int) -> float:
    return min(POLICY.cap, POLICY.initial * 2 ** (attempt - 1))


def test_first_delay_is_exactly_initial() -> None:
    for seed in range(20):
        assert Backoff(POLICY, random.Random(seed)).next_delay() == 5.0


def test_later_delays_stay_between_initial_and_the_exponential_bound() -> None:
    for seed in range(50):
        b = Backoff(POLICY, random.Random(seed))
        for attempt in range(1, 16):
            delay = b.next_delay()
            assert b.attempt == attempt
            assert POLICY.initial <= delay <= bound(attempt), (seed, attempt, delay)
            assert delay <= POLICY.cap


def test_delays_grow_with_attempts() -> None:
    """The range really widens: attempt 5 often waits longer than attempt 2 ever can."""
    rng = random.Random(7)
    fifth = [POLICY.delay(5, rng) for _ in range(200)]
    assert max(fifth) > bound(2)
    assert max(fifth) <= bound(5) == 80.0


def test_delays_reach_but_never_exceed_the_cap() -> None:
    rng = random.Random(3)
    late = [POLICY.delay(20, rng) for _ in range(500)]
    assert max(late) <= 300.0
    assert max(late) > 250.0  # the cap is the bound, not some smaller value


def test_jitter_spreads_sessions_that_failed_together() -> None:
    delays = {POLICY.delay(4, random.Random(seed)) for seed in range(100)}
    assert len(delays) > 90


def test_seeded_rng_is_deterministic() -> None:
    a = Backoff(POLICY, random.Random(42))
    b = Backoff(POLICY, random.Random(42))
    assert [a.next_delay() for _ in range(10)] == [b.next_delay() for _ in range(10)]


def test_stable_session_resets_to_initial() -> None:
    b = Backoff(POLICY, random.Random(1))
    for _ in range(6):
        b.next_delay()
    b.session_ended(uptime=120.0)
    assert b.attempt == 0
    assert b.next_delay() == 5.0


def test_short_session_does_not_reset() -> None:
    b = Backoff(POLICY, random.Random(1))
    for _ in range(6):
        b.next_delay()
    b.session_ended(uptime=119.9)
    assert b.attempt == 6
    b.next_delay()
    assert b.attempt == 7


def test_auth_policy_shape() -> None:
    auth = BackoffPolicy(initial=900.0, cap=7200.0, reset_after=120.0)
    rng = random.Random(0)
    assert auth.delay(1, rng) == 900.0
    assert all(900.0 <= auth.delay(n, rng) <= 7200.0 for n in range(2, 30))


# human_duration is how these delays reach the log ("reconnecting in 5s")
@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (5, "5s"),
        (5.0, "5s"),
        (90, "90s"),
        (120, "2min"),
        (1500, "25min"),
        (0.5, "0.5s"),
        (7.34, "7.3s"),
        (900, "15min"),
    ],
)
def test_human_duration(seconds: float, text: str) -> None:
    assert human_duration(seconds) == text
