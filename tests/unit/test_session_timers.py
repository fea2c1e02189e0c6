"""Ticks and renewals of sessions that connect together are spread out (pure timer choice)."""

from __future__ import annotations

import collections
import random

from trio_idle.mailbox.session import first_timers

TICK, RENEW = 120.0, 25 * 60.0


def _busiest_second(times: list[float]) -> int:
    return max(collections.Counter(int(t) for t in times).values())


def test_ten_thousand_sessions_started_together_never_tick_or_renew_in_one_burst() -> None:
    rng = random.Random(6)
    timers = [first_timers(1000.0, TICK, RENEW, rng) for _ in range(10_000)]
    ticks = [t for t, _ in timers]
    renewals = [r for _, r in timers]
    # spread over 60 s (mean 167 per second) and 300 s (mean 33 per second)
    assert _busiest_second(ticks) < 250
    assert _busiest_second(renewals) < 70
    assert min(ticks) >= 1000.0 + TICK / 2 and max(ticks) <= 1000.0 + TICK
    # renewal is never late: always within the configured interval (servers cut at 29 min)
    assert max(renewals) <= 1000.0 + RENEW
    assert min(renewals) >= 1000.0 + 0.8 * RENEW


def test_timers_come_from_the_sessions_random_source() -> None:
    a = first_timers(0.0, TICK, RENEW, random.Random(1))
    assert a == first_timers(0.0, TICK, RENEW, random.Random(1))
    assert a != first_timers(0.0, TICK, RENEW, random.Random(2))
