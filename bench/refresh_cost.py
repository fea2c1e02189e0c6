"""What a refresh of N file rows costs, step by step, single-threaded.

``python -m bench.refresh_cost [--n 10000]`` writes a connection file like the benchmark's
(one password variable, two ports), then times reading and parsing it, building the
connections from scratch and with :class:`~trio_idle.accounts.connections.ConnectionListBuilder`
(first build, unchanged rows, ``rows=None``), the reconciler's diff of equal and of
identical connections, and :meth:`~trio_idle.accounts.source_file.FileSource.fetch_changed` on the
unchanged file. One run of each step: an order of magnitude, not a benchmark figure.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import trio

from bench.procs import PASSWORD_ENV, connections_toml
from trio_idle.accounts.connections import ConnectionListBuilder, build_connections
from trio_idle.accounts.source_file import FileSource
from trio_idle.mailbox.reconcile import diff

_T = TypeVar("_T")


def timed(label: str, step: Callable[[], _T]) -> _T:
    started = time.perf_counter()
    result = step()
    print(f"{label:<44} {(time.perf_counter() - started) * 1000:8.1f} ms")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=10_000)
    args = parser.parse_args()
    os.environ[PASSWORD_ENV] = "bench-password"
    key = b"k" * 32
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "connections.toml"
        path.write_text(
            connections_toml([(f"u{i}@bench.test", 10_000 + i % 2) for i in range(args.n)])
        )
        source = FileSource(str(path))
        print(f"{args.n} rows, {path.stat().st_size / 1e6:.1f} MB")
        answer = timed("read + parse (FileSource)", lambda: source._read())
        assert answer is not None
        version, rows = answer
        first, _ = timed("build_connections", lambda: build_connections(rows, key))
        again, _ = timed("build_connections, same rows again", lambda: build_connections(rows, key))
        timed("diff of equal connections", lambda: diff(first, again))
        builder = ConnectionListBuilder(key)
        built, _ = timed("ConnectionListBuilder, first build", lambda: builder.build(rows))
        fresh = [dict(row) for row in rows]  # the same rows, read again
        same, _ = timed("ConnectionListBuilder, unchanged rows", lambda: builder.build(fresh))
        timed("ConnectionListBuilder, rows=None", lambda: builder.build(None))
        timed("diff of identical connections", lambda: diff(built, same))

        async def unchanged() -> None:
            started = time.perf_counter()
            answer = await source.fetch_changed(version)
            took = (time.perf_counter() - started) * 1000
            print(f"{'fetch_changed, unchanged file':<44} {took:8.1f} ms ({answer is None=})")

        trio.run(unchanged)


if __name__ == "__main__":
    main()
