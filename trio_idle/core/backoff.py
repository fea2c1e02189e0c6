"""Retry delays: exponential backoff with jitter, as a pure schedule.

One schedule serves every retry in the daemon: IMAP reconnects (:mod:`trio_idle.mailbox.session`),
scan POSTs the backend did not accept (:mod:`trio_idle.mailbox.scan_worker`) and connection-list
refreshes that failed (:mod:`trio_idle.runtime.daemon`).

Retry ``n`` (1-based) waits ``bound(n) = min(cap, initial·2^(n-1))``, less a random part:
the delay is drawn uniformly from ``[bound − jitter·(bound − initial), bound]``. So the
first retry after a healthy period waits exactly ``initial`` (the original daemon's
"reconnecting in 5s"); ``jitter=1`` ("full jitter" above a floor) spreads thousands of
sessions that failed together over the whole range, ``jitter=0`` is plain doubling. A
server's hint (``Retry-After``) replaces the schedule but never goes below ``initial``:
"Retry-After: 0" must not become a hot loop. A session that stayed up for
``reset_after`` seconds starts over.
"""

from __future__ import annotations

import math
import random

import attrs


@attrs.frozen
class BackoffPolicy:
    """Parameters of one schedule (reconnects, authentication failures, scans, refreshes)."""

    initial: float
    cap: float
    reset_after: float = math.inf
    #: share of ``[initial, bound]`` the delay is drawn from, counted down from the bound
    jitter: float = attrs.field(
        default=1.0,
        validator=attrs.validators.and_(attrs.validators.ge(0.0), attrs.validators.le(1.0)),
    )

    def bound(self, attempt: int) -> float:
        """The longest delay before retry ``attempt`` (1-based)."""
        if attempt <= 1:
            return self.initial
        return min(self.cap, self.initial * 2.0 ** (attempt - 1))

    def delay(self, attempt: int, rng: random.Random, hint: float | None = None) -> float:
        """Delay before retry ``attempt`` (1-based: attempt 1 is the first retry).

        ``hint`` is a server's own wait (seconds, e.g. from ``Retry-After``): it wins over
        the schedule, raised to ``initial``. ``rng`` is drawn from once per call when the
        schedule has a random part, never otherwise.
        """
        if hint is not None:
            return max(hint, self.initial)
        bound = self.bound(attempt)
        low = bound - self.jitter * (bound - self.initial)
        if attempt <= 1 or low >= bound:
            return bound
        return low + (bound - low) * rng.random()


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

    def succeeded(self) -> None:
        """The retried operation worked: the next failure starts over at ``initial``."""
        self.attempt = 0
