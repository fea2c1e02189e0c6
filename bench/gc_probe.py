"""Diagnosis wrapper: ``python -m bench.gc_probe serve`` = the daemon plus GC timing.

Runs :func:`trio_idle.cli.main` unchanged, after installing a :data:`gc.callbacks` hook
that writes one line to stderr for every generation-2 collection and every collection
slower than 20 ms::

    GCPROBE <wall time> gen=<0|1|2> ms=<duration> collected=<n>

With ``TRIO_IDLE_BENCH_GC_FREEZE=1``, SIGUSR1 makes the process call :func:`gc.freeze`
(what a daemon-side fix would do once its sessions are up); the environment variable
``BENCH_GC_THRESHOLDS=a,b,c`` calls :func:`gc.set_threshold` first. Used by ``--gc-probe`` /
``--gc-freeze``, the soak (daemon C) and ``--compare`` (what a stall was). SIGUSR2 runs
one full collection of everything, frozen objects included (the soak ends with one: what
the daemon's frozen generation held as garbage).
``BENCH_GC_INSPECT=1`` adds ``young=<n>`` to slow generation-1 lines: the objects walked.
``BENCH_SSL_MAX_SIZE=n`` sets asyncio's ``SSLProtocol.max_size`` (the
per-connection TLS read buffer) to try a smaller one. Daemons A and B of the published
figures run plain ``python -m trio_idle.cli serve``; the hooks cost a Python call per
collection (the automatic ones are young and few) and change nothing the daemon does.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

from trio_idle.gc_policy import collect_and_freeze

_started: list[float] = [0.0]
_young: list[int] = [0]
_INSPECT = os.environ.get("BENCH_GC_INSPECT") == "1"


def _callback(phase: str, info: dict[str, Any]) -> None:
    generation = info.get("generation", -1)
    if phase == "start":
        if _INSPECT and generation == 1:  # how many objects this collection walks
            _young[0] = len(gc.get_objects(0)) + len(gc.get_objects(1))
        _started[0] = time.perf_counter()
        return
    elapsed = time.perf_counter() - _started[0]
    if generation == 2 or elapsed > 0.02:
        young = f" young={_young[0]}" if _INSPECT and generation == 1 else ""
        sys.stderr.write(
            f"GCPROBE {time.time():.3f} gen={generation} ms={elapsed * 1000:.1f} "
            f"collected={info.get('collected', 0)}{young}\n"
        )


def _freeze(_signum: int, _frame: Any) -> None:
    collect_and_freeze(full=False)
    sys.stderr.write(f"GCPROBE {time.time():.3f} freeze frozen={gc.get_freeze_count()}\n")


def _forced_full(_signum: int, _frame: Any) -> None:
    # What the daemon's own full collection would free now: everything frozen since its
    # last one that has become cyclic garbage (logged as a gen=2 pass by the callback).
    done = collect_and_freeze(full=True)
    sys.stderr.write(
        f"GCPROBE {time.time():.3f} forced-full ms={done.seconds * 1000:.1f} "
        f"collected={done.collected}\n"
    )


def _tracemalloc_signal(directory: Path, frames: int) -> Any:
    def handler(_signum: int, _frame: Any) -> None:
        if not tracemalloc.is_tracing():
            tracemalloc.start(frames)
            sys.stderr.write(f"GCPROBE {time.time():.3f} tracemalloc started frames={frames}\n")
            return
        t0 = time.perf_counter()
        snapshot = tracemalloc.take_snapshot().filter_traces(
            (
                tracemalloc.Filter(False, tracemalloc.__file__),
                tracemalloc.Filter(False, "<frozen importlib._bootstrap*>"),
            )
        )
        path = directory / f"snapshot-{round(time.time() * 1000)}.tmsnap"
        snapshot.dump(str(path))
        traced = tracemalloc.get_traced_memory()[0] // 1024
        sys.stderr.write(
            f"GCPROBE {time.time():.3f} tracemalloc path={path} "
            f"ms={(time.perf_counter() - t0) * 1000:.0f} traced_kib={traced}\n"
        )

    return handler


def main() -> int:
    """Install the hooks and run the daemon's CLI."""
    gc.callbacks.append(_callback)
    if os.environ.get("BENCH_STALL_PERIOD_MS"):
        from bench import loop_probe

        loop_probe.install()
    snapshots = os.environ.get("BENCH_TRACEMALLOC_DIR")
    if snapshots:
        if os.environ.get("TRIO_IDLE_BENCH_GC_FREEZE") == "1":
            raise SystemExit("BENCH_TRACEMALLOC_DIR and TRIO_IDLE_BENCH_GC_FREEZE share SIGUSR1")
        frames = int(os.environ.get("BENCH_TRACEMALLOC_FRAMES", "1"))
        signal.signal(signal.SIGUSR1, _tracemalloc_signal(Path(snapshots), frames))
    ssl_buffer = os.environ.get("BENCH_SSL_MAX_SIZE")
    if ssl_buffer:  # asyncio's per-TLS-connection read buffer (256 KiB by default)
        from trio_idle import imap_client

        imap_client.TLS_READ_BUFFER = int(ssl_buffer)  # what run_daemon applies
    thresholds = os.environ.get("BENCH_GC_THRESHOLDS")
    if thresholds:  # e.g. "700,10,1000000": keeps automatic full collections away
        gc.set_threshold(*(int(x) for x in thresholds.split(",")))
    if os.environ.get("TRIO_IDLE_BENCH_GC_FREEZE") == "1":
        signal.signal(signal.SIGUSR1, _freeze)
    signal.signal(signal.SIGUSR2, _forced_full)
    from trio_idle.cli import main as cli_main

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
