"""Loop-stall probe: ``python -m bench.loop_probe serve`` = the daemon plus a short timer.

A stall is measured the same way in both programs of ``--compare`` (the Node baseline
runs the same probe, ``bench/node_baseline/index.js``): a timer of ``period`` ms is armed
again and again, and how late each one fires is its lateness; a loop busy with callbacks,
a collection or a synchronous call fires it late by about the length of the stall (less
at most one period). Every lateness above ``log_above`` ms is written to stderr as::

    STALL <wall time> ms=<lateness>

and the harness takes the maximum per phase from the log (:func:`stalls_in`). The probe
is one extra trio task next to the daemon's own tasks, started by wrapping
:func:`trio_idle.cli._run_trio` (the daemon code is unchanged); it costs one wake-up per
period (50 a second at the default 20 ms), which both programs pay.

Environment: ``BENCH_STALL_PERIOD_MS`` (20), ``BENCH_STALL_LOG_MS`` (5). Cancellation:
the probe task is cancelled when the daemon's main function returns or raises.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Final

import trio

DEFAULT_PERIOD_MS: Final = 20.0
DEFAULT_LOG_MS: Final = 5.0
_LINE = re.compile(rb"^STALL (\d+(?:\.\d+)?) ms=(\d+(?:\.\d+)?)\s*$")


def probe_settings(environ: Mapping[str, str] | None = None) -> tuple[float, float]:
    """``(period ms, log threshold ms)`` from the environment."""
    environ = os.environ if environ is None else environ
    period = float(environ.get("BENCH_STALL_PERIOD_MS", DEFAULT_PERIOD_MS))
    log_above = float(environ.get("BENCH_STALL_LOG_MS", DEFAULT_LOG_MS))
    return period, log_above


async def probe(period_ms: float, log_above_ms: float) -> None:
    """Arm a ``period_ms`` timer forever; log each lateness above ``log_above_ms``.
    Ends only when cancelled."""
    period = period_ms / 1000
    while True:
        expected = trio.current_time() + period
        await trio.sleep_until(expected)
        late_ms = (trio.current_time() - expected) * 1000
        if late_ms > log_above_ms:
            # stderr is the daemon's log file: a blocking write of one short line
            sys.stderr.write(f"STALL {time.time():.3f} ms={late_ms:.1f}\n")


def with_probe(fn: Callable[[], Any], period_ms: float, log_above_ms: float) -> Callable[[], Any]:
    """``fn`` (the daemon's async main) with the probe running beside it."""

    async def probed() -> Any:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(probe, period_ms, log_above_ms, name="bench-stall-probe")
            try:
                return await fn()
            finally:
                nursery.cancel_scope.cancel()

    return probed


def install() -> None:
    """Make :func:`trio_idle.cli.main` run its daemon with the probe beside it."""
    from trio_idle import cli

    period, log_above = probe_settings()
    original = cli._run_trio

    def run_with_probe(fn: Callable[[], Any]) -> Any:
        return original(with_probe(fn, period, log_above))

    cli._run_trio = run_with_probe


def parse_stalls(lines: Iterable[bytes]) -> list[tuple[float, float]]:
    """``(wall time, lateness ms)`` of every ``STALL`` line (other lines ignored)."""
    out: list[tuple[float, float]] = []
    for line in lines:
        match = _LINE.match(line)
        if match:
            out.append((float(match.group(1)), float(match.group(2))))
    return out


def read_stalls(log: Path) -> list[tuple[float, float]]:
    """The ``STALL`` lines of a process's log (empty if it cannot be read)."""
    try:
        with log.open("rb") as f:
            return parse_stalls(f)
    except OSError:
        return []


def stalls_in(
    stalls: Iterable[tuple[float, float]], start: float, end: float, log_above_ms: float
) -> dict[str, Any]:
    """The longest stall between wall times ``start`` and ``end``, and how many were
    logged; ``max_ms`` is None when none exceeded ``log_above_ms`` (so it was below)."""
    chosen = [ms for t, ms in stalls if start <= t <= end]
    top = max(chosen, default=None)
    at = next((t for t, ms in stalls if start <= t <= end and ms == top), None)
    return {
        "max_ms": top,
        "at": at,
        "logged": len(chosen),
        "over_50ms": sum(1 for ms in chosen if ms > 50),
        "below_ms": None if chosen else log_above_ms,
    }


def main() -> int:
    """Install the probe and run the daemon's CLI."""
    install()
    from trio_idle.cli import main as cli_main

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
