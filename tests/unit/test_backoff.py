"""Retry delays: exact first delay, bounded jitter after, reset after a stable session;
the scan retries' server hint and the refresh loop's plain doubling."""

from __future__ import annotations

import random

import attrs
import pytest

from trio_idle.core.backoff import Backoff, BackoffPolicy
from trio_idle.core.logs import human_duration
from trio_idle.mailbox.scan_worker import SCAN_RETRY_JITTER

POLICY = BackoffPolicy(initial=5.0, cap=300.0, reset_after=120.0)


def bound(attempt: int) -> float:
    return min(POLICY.cap, POLICY.initial * 2.0 ** (attempt - 1))


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


# -- scan retries (jitter 0.5, a server hint) ---------------------------------------

SCAN = BackoffPolicy(initial=1.0, cap=60.0, jitter=SCAN_RETRY_JITTER)


def test_scan_retry_honours_the_servers_hint() -> None:
    rng = random.Random(0)
    assert SCAN.delay(1, rng, hint=7.0) == 7.0
    assert SCAN.delay(9, rng, hint=7.0) == 7.0  # longer or shorter than the schedule
    assert SCAN.delay(2, rng, hint=300.0) == 300.0


def test_a_zero_or_past_hint_is_not_a_hot_loop() -> None:
    assert SCAN.delay(3, random.Random(0), hint=0.0) == 1.0
    assert SCAN.delay(3, random.Random(0), hint=-5.0) == 1.0


def test_scan_retries_wait_in_the_upper_half_of_their_range() -> None:
    for seed in range(30):
        rng = random.Random(seed)
        assert SCAN.delay(1, rng) == 1.0
        for n in range(2, 12):
            b = min(60.0, 2.0 ** (n - 1))
            assert (b + 1.0) / 2 <= SCAN.delay(n, rng) <= b, (seed, n)


def test_scan_retries_reach_but_never_exceed_the_cap() -> None:
    rng = random.Random(5)
    late = [SCAN.delay(50, rng) for _ in range(200)]
    assert max(late) <= 60.0
    assert max(late) > 59.0


# -- refresh retries (jitter 0: plain doubling) ---------------------------------------


class NoRandom(random.Random):
    def random(self) -> float:
        raise AssertionError("a schedule without jitter drew a random number")


def test_without_jitter_the_delay_doubles_up_to_the_cap() -> None:
    refresh = BackoffPolicy(initial=5.0, cap=60.0, jitter=0.0)
    b = Backoff(refresh, NoRandom())
    assert [b.next_delay() for _ in range(7)] == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0, 60.0]
    b.succeeded()
    assert b.next_delay() == 5.0


def test_jitter_outside_zero_to_one_is_refused() -> None:
    with pytest.raises(ValueError, match="jitter"):
        BackoffPolicy(initial=1.0, cap=2.0, jitter=1.5)
    assert attrs.evolve(POLICY, jitter=0.0).jitter == 0.0


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
