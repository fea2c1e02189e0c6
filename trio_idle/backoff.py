"""Reconnect delays: exponential backoff with full jitter, as a pure schedule.

The first retry after a healthy period waits exactly ``initial`` (the original daemon's
"reconnecting in 5s"); later ones draw uniformly from ``[initial, min(cap, initial·2^n)]``
("full jitter" above a floor), so thousands of sessions that failed together do not
retry together. A session that stayed up for ``reset_after`` seconds starts over.
"""

from __future__ import annotations

import random

import attrs


@attrs.frozen
class BackoffPolicy:
    """Parameters of one schedule (normal reconnects, or authentication failures)."""

    initial: float
    cap: float
    reset_after: float

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Delay before reconnect ``attempt`` (1-based: attempt 1 is the first retry)."""
        if attempt <= 1:
            return self.initial
        bound = min(self.cap, self.initial * 2.0 ** (attempt - 1))
        return rng.uniform(self.initial, bound)


@attrs.define
class Backoff:
    """Attempt counter for one session; no I/O, the caller sleeps."""

    policy: BackoffPolicy
    rng: random.Random = attrs.field(factory=random.Random)
    attempt: int = 0

    def next_delay(self) -> float:
        self.attempt += 1
        return self.policy.delay(self.attempt, self.rng)

    def session_ended(self, uptime: float) -> None:
        """Report how long the last session was up; a stable one resets the count."""
        if uptime >= self.policy.reset_after:
            self.attempt = 0
