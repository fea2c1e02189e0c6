"""What a soak's figures say: RSS growth per hour after the warm-up, and what grew
(a :mod:`tracemalloc` diff by file:line between two snapshots the daemon dumped)."""

from __future__ import annotations

import re
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: site-packages/…, or the repository's own folders: enough of a path to recognise it
_SHORT = re.compile(r".*/(site-packages|lib/python3\.\d+|trio_idle|bench)/")


def rss_growth(samples: Sequence[Sequence[float]], warmup: float) -> dict[str, Any]:
    """Least-squares slope of RSS against time over the samples taken at or after
    ``warmup`` seconds (``[t, rss KiB, ...]`` rows); as KiB per hour and as a share of the
    RSS at the first of them, per hour. ``None`` figures with fewer than 3 such samples."""
    chosen = [(float(s[0]), float(s[1])) for s in samples if s[0] >= warmup]
    out: dict[str, Any] = {
        "warmup_s": warmup,
        "samples": len(chosen),
        "kib_per_hour": None,
        "pct_per_hour": None,
        "rss_at_warmup_kib": chosen[0][1] if chosen else None,
    }
    if len(chosen) < 3:
        return out
    n = len(chosen)
    mean_t = sum(t for t, _ in chosen) / n
    mean_r = sum(r for _, r in chosen) / n
    var = sum((t - mean_t) ** 2 for t, _ in chosen)
    if var <= 0:
        return out
    slope = sum((t - mean_t) * (r - mean_r) for t, r in chosen) / var  # KiB per second
    out["kib_per_hour"] = round(slope * 3600, 1)
    out["pct_per_hour"] = round(slope * 3600 / chosen[0][1] * 100, 3)
    return out


def short_path(filename: str) -> str:
    """``/…/site-packages/aioimaplib/x.py`` → ``aioimaplib/x.py``."""
    match = _SHORT.match(filename)
    if match is None:
        return filename
    folder = match.group(1)
    rest = filename[match.end() :]
    return f"{folder}/{rest}" if folder in ("trio_idle", "bench") else rest


def tracemalloc_diff(first: Path, last: Path, top: int = 15) -> list[dict[str, Any]]:
    """The ``top`` lines whose live allocations grew most from ``first`` to ``last``."""
    old = tracemalloc.Snapshot.load(str(first))
    new = tracemalloc.Snapshot.load(str(last))
    rows: list[dict[str, Any]] = []
    for stat in new.compare_to(old, "lineno")[:top]:
        frame = stat.traceback[0]
        rows.append(
            {
                "where": f"{short_path(frame.filename)}:{frame.lineno}",
                "size_diff_kib": round(stat.size_diff / 1024, 1),
                "count_diff": stat.count_diff,
                "size_kib": round(stat.size / 1024, 1),
            }
        )
    return rows


def format_diff(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One line per row of :func:`tracemalloc_diff`, for the human report."""
    return [
        f"    {r['size_diff_kib']:+10.1f} KiB {r['count_diff']:+8d} blocks  {r['where']}"
        for r in rows
    ]
