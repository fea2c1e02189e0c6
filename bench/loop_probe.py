"""Loop-stall probe: ``python -m bench.loop_probe serve`` = the daemon plus a short timer.

A stall is measured the same way in both programs of ``--compare`` (the Node baseline
runs the same probe, ``bench/node_baseline/index.js``): a timer of ``period`` ms is armed
again and again, and how late each one fires is its lateness; a loop busy with callbacks,
a collection or a synchronous call fires it late by about the length of the stall (less
at most one period). Every lateness above ``log_above`` ms is written to stderr as::

    STALL <wall time> ms=<lateness>

and the harness takes the maximum per phase from the log (:func:`stalls_in`). SIGWINCH
switches the period to ``COARSE_MS`` and back (logged as ``STALLPROBE <wall time>
period_ms=<p>``): the harness does it around the idle-CPU window, where the fine timer's
own wake-ups would be a good part of what is measured. The probe
is one extra trio task next to the daemon's own tasks, started by wrapping
:func:`trio_idle.cli._run_trio` (the daemon code is unchanged). It costs one wake-up per
period, which both programs pay: 50 a second (20 ms) cost 1.1 % (Node) to 1.4 % (trio) of
a core on the 2-core benchmark VM, with nothing else to do.

Environment: ``BENCH_STALL_PERIOD_MS`` (20), ``BENCH_STALL_LOG_MS`` (5). Cancellation:
the probe task is cancelled when the daemon's main function returns or raises.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Final

import trio

DEFAULT_PERIOD_MS: Final = 20.0
DEFAULT_LOG_MS: Final = 5.0
#: the period while the harness measures idle CPU (see :class:`StallProbe`)
COARSE_MS: Final = 250.0
#: switches the period between fine and coarse, in both programs
TOGGLE_SIGNAL: Final = signal.SIGWINCH
_LINE = re.compile(rb"^STALL (\d+(?:\.\d+)?) ms=(\d+(?:\.\d+)?)\s*$")


def probe_settings(environ: Mapping[str, str] | None = None) -> tuple[float, float]:
    """``(period ms, log threshold ms)`` from the environment."""
    environ = os.environ if environ is None else environ
    period = float(environ.get("BENCH_STALL_PERIOD_MS", DEFAULT_PERIOD_MS))
    log_above = float(environ.get("BENCH_STALL_LOG_MS", DEFAULT_LOG_MS))
    return period, log_above


class StallProbe:
    """The timer and its period; ``TOGGLE_SIGNAL`` switches between ``period_ms`` and
    ``coarse_ms`` (the harness's idle-CPU window, where 50 wake-ups a second would cost
    more than a percent of a core on the benchmark machine)."""

    def __init__(self, period_ms: float, log_above_ms: float, coarse_ms: float) -> None:
        self.fine = period_ms / 1000
        self.coarse = coarse_ms / 1000
        self.period = self.fine
        self.log_above_ms = log_above_ms
        self._rearm: trio.CancelScope | None = None

    async def run(self) -> None:
        """Arm the timer forever; log each lateness above ``log_above_ms``. Ends only
        when cancelled; a period switch re-arms the pending timer (nothing logged)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._listen)
            while True:
                expected = trio.current_time() + self.period
                with trio.CancelScope() as self._rearm:
                    await trio.sleep_until(expected)
                if self._rearm.cancelled_caught:
                    continue
                late_ms = (trio.current_time() - expected) * 1000
                if late_ms > self.log_above_ms:
                    # stderr is the daemon's log file: a blocking write of one short line
                    sys.stderr.write(f"STALL {time.time():.3f} ms={late_ms:.1f}\n")

    async def _listen(self) -> None:
        with trio.open_signal_receiver(TOGGLE_SIGNAL) as signals:
            async for _ in signals:
                self.period = self.coarse if self.period == self.fine else self.fine
                sys.stderr.write(f"STALLPROBE {time.time():.3f} period_ms={self.period * 1000:g}\n")
                if self._rearm is not None:
                    self._rearm.cancel()


def with_probe(
    fn: Callable[[], Any], period_ms: float, log_above_ms: float, coarse_ms: float = COARSE_MS
) -> Callable[[], Any]:
    """``fn`` (the daemon's async main) with the probe running beside it."""

    async def probed() -> Any:
        async with trio.open_nursery() as nursery:
            stall_probe = StallProbe(period_ms, log_above_ms, coarse_ms)
            nursery.start_soon(stall_probe.run, name="bench-stall-probe")
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

    def run_with_probe(fn: Callable[[], Any], command: str = "serve") -> Any:
        return original(with_probe(fn, period, log_above), command)

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
