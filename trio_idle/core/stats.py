"""Process-wide counters: every fault is logged *and* counted here.

Plain integers keyed by name (and an optional label such as a status code), cheap to
bump from any task. The health/metrics endpoint exports them; tests read them.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterable
from typing import Final

#: Upper bounds (seconds) of the latency histogram buckets: 5 ms … 2 min.
LATENCY_BUCKETS: Final = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)


class Histogram:
    """Cumulative-bucket histogram (Prometheus style), O(log buckets) per observation."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # last slot: +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1


class Stats:
    """Monotonic counters. Names are fixed strings; labels are low-cardinality values."""

    def __init__(self) -> None:
        self._counts: Counter[tuple[str, str]] = Counter()
        #: time from new mail noticed (EXISTS/tick/reconnect) to the backend's 2xx answer
        self.scan_latency = Histogram()

    def inc(self, name: str, label: str = "", by: int = 1) -> None:
        self._counts[(name, label)] += by

    def get(self, name: str, label: str | None = None) -> int:
        if label is not None:
            return self._counts[(name, label)]
        return sum(v for (n, _), v in self._counts.items() if n == name)

    def by_label(self, name: str, known: Iterable[str] = ()) -> dict[str, int]:
        """``name``'s counts by label, sorted: every ``known`` label (0 until counted, so a
        rate over it exists before the first event) and every label counted so far."""
        counts = dict.fromkeys(known, 0)
        for (n, label), value in self._counts.items():
            if n == name:
                counts[label] = value
        return dict(sorted(counts.items()))

    def snapshot(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for (name, label), value in sorted(self._counts.items()):
            out.setdefault(name, {})[label] = value
        return out
