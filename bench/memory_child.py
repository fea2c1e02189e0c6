"""The daemon side of :mod:`bench.memory_probe`: ``python -m bench.memory_child serve``.

Runs :func:`trio_idle.cli.main` unchanged, after (before ``trio_idle`` is imported, so
nothing here imports it at module level) putting ``BENCH_PROBE_TREE`` first on
``sys.path`` (another source tree's ``trio_idle``) and, with ``BENCH_PROBE_TRACE=1``,
starting :mod:`tracemalloc` (``BENCH_PROBE_FRAMES`` frames, default 12). SIGUSR1
unfreezes and collects garbage, then writes ``$BENCH_PROBE_OUT.<k>.json`` (gc-tracked
object counts by type, the ``trio_idle`` package used) and, traced,
``$BENCH_PROBE_OUT.<k>.tracemalloc`` (the snapshot), ``k`` counting the dumps from 0.
"""

from __future__ import annotations

import collections
import gc
import json
import os
import signal
import sys
import tracemalloc
from pathlib import Path
from typing import Any

from bench.mallinfo import malloc_info

_dumps = [0]


def _dump(_signum: int, _frame: Any) -> None:
    base = os.environ["BENCH_PROBE_OUT"]
    k = _dumps[0]
    _dumps[0] += 1
    gc.unfreeze()  # the daemon freezes its survivors: get_objects() skips frozen ones
    gc.collect()
    counts = collections.Counter(
        f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.get_objects()
    )
    if tracemalloc.is_tracing():
        tracemalloc.take_snapshot().dump(f"{base}.{k}.tracemalloc")
    package = sys.modules["trio_idle"]
    info = {"counts": dict(counts), "trio_idle": package.__file__, "malloc": malloc_info()}
    Path(f"{base}.{k}.json.tmp").write_text(json.dumps(info))
    os.replace(f"{base}.{k}.json.tmp", f"{base}.{k}.json")


def main() -> int:
    tree = os.environ.get("BENCH_PROBE_TREE")
    if tree:
        sys.path.insert(0, tree)
    if os.environ.get("BENCH_PROBE_TRACE") == "1":
        tracemalloc.start(int(os.environ.get("BENCH_PROBE_FRAMES", "12")))
    signal.signal(signal.SIGUSR1, _dump)
    from trio_idle.cli import main as cli_main

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
