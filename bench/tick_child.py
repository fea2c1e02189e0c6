"""The daemon side of :mod:`bench.tick_probe`: ``python -m bench.tick_child serve``.

Runs :func:`trio_idle.cli.main` unchanged, after putting ``BENCH_PROBE_TREE`` first on
``sys.path`` (another source tree's ``trio_idle``; nothing here imports it at module
level), with one :class:`WakeCounter` (a trio instrument) in its run: how many steps each
task (by name) has begun, and how many times the loop came back from waiting for I/O
(an ``epoll`` wait that returned, with events or at a deadline). SIGUSR2 writes the
counters so far to ``$BENCH_PROBE_OUT.<k>.json``, ``k`` counting the dumps from 0. The
counting is the bench's, not the daemon's: the daemon runs nothing of it otherwise.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio


class WakeCounter(trio.abc.Instrument):
    """Task steps by task name, and returns from the loop's I/O wait."""

    def __init__(self) -> None:
        self.steps: collections.Counter[str] = collections.Counter()
        self.io_waits = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps[task.name] += 1

    def after_io_wait(self, timeout: float) -> None:
        self.io_waits += 1


COUNTER = WakeCounter()
_dumps = [0]


def _dump(_signum: int, _frame: Any) -> None:
    base = os.environ["BENCH_PROBE_OUT"]
    k = _dumps[0]
    _dumps[0] += 1
    info = {
        "time": time.monotonic(),
        "steps": dict(COUNTER.steps),
        "io_waits": COUNTER.io_waits,
        "trio_idle": sys.modules["trio_idle"].__file__,
    }
    Path(f"{base}.{k}.json.tmp").write_text(json.dumps(info))
    os.replace(f"{base}.{k}.json.tmp", f"{base}.{k}.json")


def main() -> int:
    tree = os.environ.get("BENCH_PROBE_TREE")
    if tree:
        sys.path.insert(0, tree)
    signal.signal(signal.SIGUSR2, _dump)
    from trio_idle import cli

    original = cli._run_trio

    def counted(fn: Callable[[], Any], command: str = "serve") -> Any:
        async def with_counter() -> Any:
            trio.lowlevel.add_instrument(COUNTER)
            return await fn()

        return original(with_counter, command)

    cli._run_trio = counted
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
