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
``BENCH_GC_SLOW_MS=<ms>`` (default 20) is what counts as slow; ``BENCH_GC_INSPECT=1``
adds ``young=<n>`` to slow generation-0 and -1 lines: the objects walked;
``=2`` also ``big=<type>:<len>,…``, the young containers with the most items, and
``kinds=<type>:<n>,…``, the commonest types walked.
Daemons A and B of the published figures run plain ``python -m trio_idle.cli serve``;
the hooks cost a Python call per collection (the automatic ones are young and few) and
change nothing the daemon does. With ``BENCH_TRACEMALLOC_DIR`` alone (``--tracemalloc``),
SIGUSR1 starts tracing and then dumps one snapshot per signal.

For soaks and stall measurements (all off unless set):

* ``BENCH_TICK_INTERVAL=10s`` sets ``TRIO_IDLE_TICK_INTERVAL`` (the soak daemon otherwise
  runs the product default) to accelerate a soak.
* ``BENCH_TRACEMALLOC=<frames>`` traces allocations from the start; every
  ``BENCH_TRACEMALLOC_EVERY`` seconds (default 300) a thread dumps a snapshot to
  ``BENCH_TRACEMALLOC_DIR`` (default the working directory) and writes
  ``GCPROBE <t> memory rss_kib=.. blocks=.. traced_kib=.. frozen=.. tracked=..``
  (pymalloc's allocated blocks, tracemalloc's traced total, frozen and unfrozen
  GC-tracked objects), followed by ``sys._debugmallocstats()`` (arena use, for
  fragmentation). The thread holds the GIL while it counts: not for stall figures.
* ``BENCH_MEMORY_EVERY=<seconds>`` without ``BENCH_TRACEMALLOC``: the same line every so
  often with ``rss_kib``, ``blocks`` and glibc's heap (``malloc_in_use_kib``,
  ``malloc_free_kib`` from ``mallinfo2``) only — cheap enough for a soak's RSS figures —
  followed by ``sys._debugmallocstats()``.
* ``BENCH_STALLS=1`` adds a trio instrument that measures every stretch the loop spent
  between two waits for I/O (the time no socket was looked at) and writes
  ``GCPROBE <t> stall ms=..`` for those over 20 ms and ``GCPROBE <t> stall-max ms=..``
  every 10 s (the longest of those 10 s).
* ``BENCH_GC_AB=1``: the daemon's after-refresh collections alternate between its policy
  and the previous one (collect every unfrozen object, then freeze; ``kind=unfrozen``):
  both start from what the previous collection froze, so the pauses compare within one
  run.

Every after-refresh collection of the daemon writes
``GCPROBE <t> refresh kind=<young|full|unfrozen> ms=.. collected=..``.
"""

from __future__ import annotations

import collections
import gc
import os
import signal
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import trio

from trio_idle.core.gc_policy import Collection, Kind, collect_and_freeze

_started: list[float] = [0.0]
_young: list[int] = [0]
_INSPECT = os.environ.get("BENCH_GC_INSPECT") in ("1", "2")
#: ``2``: also the biggest young containers of a slow generation-1 pass (what it walked)
_INSPECT_BIG = os.environ.get("BENCH_GC_INSPECT") == "2"
_big: list[str] = [""]
#: collections slower than this are logged (``BENCH_GC_SLOW_MS``, default 20)
_SLOW = float(os.environ.get("BENCH_GC_SLOW_MS", "20")) / 1000


def _callback(phase: str, info: dict[str, Any]) -> None:
    generation = info.get("generation", -1)
    if phase == "start":
        if _INSPECT and generation in (0, 1):  # how many objects this collection walks
            walked = gc.get_objects(0) + (gc.get_objects(1) if generation == 1 else [])
            _young[0] = len(walked)
            if _INSPECT_BIG:
                _big[0] = _biggest(walked) + _kinds(walked)
        _started[0] = time.perf_counter()
        return
    elapsed = time.perf_counter() - _started[0]
    if generation == 2 or elapsed > _SLOW:
        young = f" young={_young[0]}{_big[0]}" if _INSPECT and generation in (0, 1) else ""
        sys.stderr.write(
            f"GCPROBE {time.time():.3f} gen={generation} ms={elapsed * 1000:.1f} "
            f"collected={info.get('collected', 0)}{young}\n"
        )


def _biggest(objects: list[Any]) -> str:
    """`` big=<type>:<len>,...``: the five young containers with the most references."""
    sized = []
    for obj in objects:
        try:
            size = len(obj)
        except TypeError:
            continue
        if size > 1000:
            sized.append((size, type(obj).__qualname__))
    sized.sort(reverse=True)
    return " big=" + ",".join(f"{name}:{size}" for size, name in sized[:5]) if sized else ""


def _kinds(objects: list[Any]) -> str:
    """`` kinds=<type>:<n>,...``: the eight most common types among the walked objects."""
    counts = collections.Counter(type(o).__qualname__ for o in objects)
    return " kinds=" + ",".join(f"{name}:{n}" for name, n in counts.most_common(8))


def _freeze(_signum: int, _frame: Any) -> None:
    gc.collect()
    gc.freeze()
    sys.stderr.write(f"GCPROBE {time.time():.3f} freeze frozen={gc.get_freeze_count()}\n")


def _forced_full(_signum: int, _frame: Any) -> None:
    # What the daemon's own full collection would free now: everything frozen since its
    # last one that has become cyclic garbage (logged as a gen=2 pass by the callback).
    done = collect_and_freeze(Kind.FULL)
    sys.stderr.write(
        f"GCPROBE {time.time():.3f} forced-full ms={done.seconds * 1000:.1f} "
        f"collected={done.collected}\n"
    )


def _rss_kib() -> int:
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1])
    return 0


def _memory_sampler(every: float, directory: Path) -> None:
    import tracemalloc

    started = time.time()
    while True:
        time.sleep(every)
        frozen = gc.get_freeze_count()
        tracked = len(gc.get_objects())
        traced, _peak = tracemalloc.get_traced_memory()
        snapshot = tracemalloc.take_snapshot()
        snapshot.dump(str(directory / f"tracemalloc-{time.time() - started:06.0f}.snap"))
        sys.stderr.write(
            f"GCPROBE {time.time():.3f} memory rss_kib={_rss_kib()} "
            f"blocks={sys.getallocatedblocks()} traced_kib={traced // 1024} "
            f"frozen={frozen} tracked={tracked}\n"
        )
        sys._debugmallocstats()


def _mallinfo_kib() -> tuple[int, int]:
    """glibc's (bytes in use, bytes free inside the heap) in KiB; (0, 0) elsewhere."""
    from bench.mallinfo import malloc_info

    info = malloc_info()
    if info is None:
        return 0, 0
    return info["in_use"] // 1024, info["free"] // 1024


def _light_memory_sampler(every: float) -> None:
    while True:
        time.sleep(every)
        used, free = _mallinfo_kib()
        sys.stderr.write(
            f"GCPROBE {time.time():.3f} memory rss_kib={_rss_kib()} "
            f"blocks={sys.getallocatedblocks()} malloc_in_use_kib={used} "
            f"malloc_free_kib={free}\n"
        )
        sys._debugmallocstats()


class _StallInstrument(trio.abc.Instrument):
    """Longest stretch between two I/O waits: how long the loop looked at no socket."""

    def __init__(self) -> None:
        self._busy_since: float | None = None
        self._max = 0.0
        self._reported = time.perf_counter()

    def after_io_wait(self, timeout: float) -> None:
        self._busy_since = time.perf_counter()

    def before_io_wait(self, timeout: float) -> None:
        now = time.perf_counter()
        if self._busy_since is not None:
            busy = now - self._busy_since
            self._max = max(self._max, busy)
            if busy > 0.02:
                sys.stderr.write(f"GCPROBE {time.time():.3f} stall ms={busy * 1000:.1f}\n")
        if now - self._reported >= 10.0:
            sys.stderr.write(f"GCPROBE {time.time():.3f} stall-max ms={self._max * 1000:.1f}\n")
            self._max = 0.0
            self._reported = now


def _install_stall_instrument() -> None:
    original = trio.run

    def run(*args: Any, **kwargs: Any) -> Any:
        kwargs["instruments"] = (*kwargs.get("instruments", ()), _StallInstrument())
        return original(*args, **kwargs)

    trio.run = run  # type: ignore[assignment]


def _install_refresh_log(alternate: bool) -> None:
    from trio_idle.runtime import daemon

    turn = [0]

    def collect(kind: Kind) -> Collection:
        turn[0] += 1
        label = kind.value
        if alternate and kind is Kind.YOUNG and turn[0] % 2 == 0:
            # the policy before 2026-12: walk every unfrozen object (counted as young)
            label = "unfrozen"
            started = time.perf_counter()
            collected = gc.collect()
            gc.freeze()
            done = Collection(kind, collected, time.perf_counter() - started)
        else:
            done = collect_and_freeze(kind)
        sys.stderr.write(
            f"GCPROBE {time.time():.3f} refresh kind={label} "
            f"ms={done.seconds * 1000:.1f} collected={done.collected}\n"
        )
        return done

    daemon.collect_and_freeze = collect  # type: ignore[attr-defined]


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
    tick = os.environ.get("BENCH_TICK_INTERVAL")
    if tick:
        os.environ["TRIO_IDLE_TICK_INTERVAL"] = tick
    if os.environ.get("BENCH_STALL_PERIOD_MS"):
        from bench import loop_probe

        loop_probe.install()
    traced_frames = os.environ.get("BENCH_TRACEMALLOC")
    snapshots = os.environ.get("BENCH_TRACEMALLOC_DIR")
    if snapshots and not traced_frames:  # --tracemalloc: SIGUSR1 starts, then snapshots
        if os.environ.get("TRIO_IDLE_BENCH_GC_FREEZE") == "1":
            raise SystemExit("BENCH_TRACEMALLOC_DIR and TRIO_IDLE_BENCH_GC_FREEZE share SIGUSR1")
        frames = int(os.environ.get("BENCH_TRACEMALLOC_FRAMES", "1"))
        signal.signal(signal.SIGUSR1, _tracemalloc_signal(Path(snapshots), frames))
    if traced_frames:  # traced from the start, a snapshot every BENCH_TRACEMALLOC_EVERY s
        tracemalloc.start(int(traced_frames))
        every = float(os.environ.get("BENCH_TRACEMALLOC_EVERY", "300"))
        directory = Path(snapshots or ".")
        directory.mkdir(parents=True, exist_ok=True)
        threading.Thread(target=_memory_sampler, args=(every, directory), daemon=True).start()
    elif os.environ.get("BENCH_MEMORY_EVERY"):
        every = float(os.environ["BENCH_MEMORY_EVERY"])
        threading.Thread(target=_light_memory_sampler, args=(every,), daemon=True).start()
    if os.environ.get("BENCH_STALLS") == "1":
        _install_stall_instrument()
    _install_refresh_log(alternate=os.environ.get("BENCH_GC_AB") == "1")
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
