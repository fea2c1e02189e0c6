"""Per-host login pacing under the global pace: who may start the next connect, and when.

After one provider's outage its thousands of sessions reconnect at once. Two rules keep
that from hurting anyone (:class:`PaceBook`, pure, no I/O, no clock of its own):

* **own rate**: a host key never starts connects faster than its own rate
  (:class:`HostRates`: the operator's ``TRIO_IDLE_HOST_CONNECT_RATES``, else a rate the
  provider publishes; none known: no own limit), so its sessions come back as fast as
  the provider accepts logins and no faster;
* **fair share**: the global pace (``TRIO_IDLE_CONNECT_RATE``) goes round robin to the
  host keys that are waiting and allowed to start (each in turn, the one whose last
  start is oldest first), so a key waiting gets at least ``rate / keys waiting`` starts
  per second, more when another key is held back by its own rate. One host's backlog of
  thousands never queues another host's few sessions behind it.

Starts are strictly spaced, as :class:`~trio_idle.core.limiter.Pacer`'s are: no burst
allowance, two starts of one key at least ``1 / own rate`` apart, two starts of any keys
at least ``1 / global rate`` apart.

A **host key** names what is paced together: a provider preset's name (``gmail``: every
Gmail host name shares it) or ``host:port`` for any other server (host lowercased,
final dot dropped). :mod:`trio_idle.accounts.providers` makes it (``pace_key``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Final

import attrs

#: a key of TRIO_IDLE_HOST_CONNECT_RATES that applies to every host matching no preset
GENERIC_KEY = "generic"


@attrs.frozen
class HostRates:
    """Own connect rates (starts per second) of host keys.

    ``rates`` maps a preset name, a ``host:port`` or a bare ``host`` (any port) to a
    rate; ``generic`` applies to every ``host:port`` key not named otherwise (servers that
    match no preset). A preset key not in ``rates`` has no own rate (``None``).
    """

    rates: Mapping[str, float] = attrs.field(factory=dict)
    generic: float | None = None

    def rate_of(self, key: str) -> float | None:
        """The own rate of ``key``, or ``None`` for no limit beyond the fair share."""
        rate = self.rates.get(key)
        if rate is not None:
            return rate
        host, colon, _ = key.rpartition(":")
        if not colon:  # a preset's name
            return None
        return self.rates.get(host, self.generic)


@attrs.define
class PaceBook:
    """The pacing decisions for starts of many host keys; pure, times are passed in.

    :meth:`choose` says which of the waiting keys starts next and when; the caller starts
    it at that time (or later) and says so with :meth:`started`. Bookkeeping of a key not
    started for :attr:`forget_after` seconds, and allowed to start again, is dropped
    (amortized), so thousands of distinct hosts over time cost nothing once done; such
    a key counts as never started, which is also its place in the round robin.
    """

    global_rate: float
    rates: HostRates = attrs.field(factory=HostRates)
    forget_after: float = 60.0
    _next_global: float = attrs.field(default=-math.inf, init=False)
    _next_host: dict[str, float] = attrs.field(factory=dict, init=False)
    _last_start: dict[str, float] = attrs.field(factory=dict, init=False)
    _prune_at: int = attrs.field(default=1024, init=False)

    def __attrs_post_init__(self) -> None:
        if not self.global_rate > 0:
            raise ValueError(f"global_rate must be positive, got {self.global_rate!r}")

    def host_ready_at(self, key: str) -> float:
        """The earliest time ``key`` may start (its own rate); ``-inf``: at once."""
        return self._next_host.get(key, -math.inf)

    def choose(self, waiting: Sequence[str], now: float) -> tuple[str, float] | None:
        """Which key of ``waiting`` (in arrival order) starts next, and at what time.

        The time is the earliest at which both the global pace and that key's own rate
        allow a start (``now`` at the soonest). Among the keys allowed then, the one whose
        last start is oldest goes first (never started: first of all), ties to the one
        that arrived first. ``None`` when nothing waits.
        """
        if not waiting:
            return None
        at = max(now, self._next_global)
        ready = [key for key in waiting if self.host_ready_at(key) <= at]
        if not ready:  # every waiting key is held back by its own rate
            at = min(self.host_ready_at(key) for key in waiting)
            ready = [key for key in waiting if self.host_ready_at(key) <= at]
        # min() keeps the first of equal ones: arrival order breaks ties
        key = min(ready, key=lambda k: self._last_start.get(k, -math.inf))
        return key, at

    def started(self, key: str, now: float) -> None:
        """``key`` started a connect at ``now``: the next starts are spaced from it."""
        self._next_global = now + 1.0 / self.global_rate
        self._last_start[key] = now
        rate = self.rates.rate_of(key)
        if rate is not None:
            self._next_host[key] = now + 1.0 / rate
        if len(self._last_start) >= self._prune_at:
            self._prune(now)

    @property
    def keys_tracked(self) -> int:
        """Keys whose last start or own-rate time is still remembered."""
        return len(self._last_start.keys() | self._next_host.keys())

    def _prune(self, now: float) -> None:
        old = now - self.forget_after
        for key in [k for k, t in self._last_start.items() if t < old]:
            if self._next_host.get(key, -math.inf) <= now:
                del self._last_start[key]
                self._next_host.pop(key, None)
        # amortized: the next pass when the book has doubled again
        self._prune_at = max(1024, 2 * len(self._last_start))


# -- the setting TRIO_IDLE_HOST_CONNECT_RATES ---------------------------------------

#: the provider presets' names (trio_idle.accounts.providers.PRESETS; a test checks they
#: agree): the names TRIO_IDLE_HOST_CONNECT_RATES accepts besides hosts and ``generic``
PROVIDER_NAMES: Final = ("gmail", "microsoft", "icloud", "yahoo", "gmx", "webde", "tonline")
_RATES_EXPECTED: Final = (
    "expected NAME=RATE entries separated by commas, NAME a provider ("
    + ", ".join(PROVIDER_NAMES)
    + "), generic, or a host with a dot or a port (imap.example.com, 10.0.0.5:993)"
)


def parse_host_rates(text: str) -> tuple[tuple[str, float], ...]:
    """``gmail=10,imap.example.com:993=5,generic=20`` → ``(("gmail", 10.0), ...)``.

    Names are folded to lower case, a final dot dropped. A name without a dot or a colon
    must be a provider's or ``generic`` (so a misspelt provider is refused instead of
    pacing a host nobody has); a port must be 1-65535; a rate a positive number of
    connects per second; no name twice. Empty: no entries.
    """
    out: dict[str, float] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        name, eq, value = part.partition("=")
        name = name.strip().lower().rstrip(".")
        if not eq or not name:
            raise ValueError(f"{_RATES_EXPECTED}; got {part.strip()!r}")
        if "." not in name and ":" not in name and name not in (*PROVIDER_NAMES, "generic"):
            raise ValueError(f"unknown provider {name!r}: {_RATES_EXPECTED}")
        host, colon, port = name.rpartition(":")
        if colon and not host.rstrip("."):
            raise ValueError(f"{_RATES_EXPECTED}; got {part.strip()!r}")
        if colon and not port.isdigit():
            raise ValueError(f"expected host:port with a numeric port, got {name!r}")
        if colon:
            if not 0 < int(port) < 65536:
                raise ValueError(f"port out of range in {name!r}: expected 1-65535")
            name = f"{host.rstrip('.')}:{int(port)}"  # as the host keys spell it
        bad_rate = f"{name}: expected a positive rate per second, got {value.strip()!r}"
        try:
            rate = float(value.strip())
        except ValueError:
            raise ValueError(bad_rate) from None
        if not (rate > 0 and rate != float("inf")):
            raise ValueError(bad_rate)
        if name in out:
            raise ValueError(f"{name!r} is named twice")
        out[name] = rate
    return tuple(out.items())
