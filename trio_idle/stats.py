"""Process-wide counters: every fault is logged *and* counted here.

Plain integers keyed by name (and an optional label such as a status code), cheap to
bump from any task. The health/metrics endpoint exports them; tests read them.
"""

from __future__ import annotations

from collections import Counter


class Stats:
    """Monotonic counters. Names are fixed strings; labels are low-cardinality values."""

    def __init__(self) -> None:
        self._counts: Counter[tuple[str, str]] = Counter()

    def inc(self, name: str, label: str = "", by: int = 1) -> None:
        self._counts[(name, label)] += by

    def get(self, name: str, label: str | None = None) -> int:
        if label is not None:
            return self._counts[(name, label)]
        return sum(v for (n, _), v in self._counts.items() if n == name)

    def snapshot(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for (name, label), value in sorted(self._counts.items()):
            out.setdefault(name, {})[label] = value
        return out
