"""The objects a session holds cannot grow back (issue 27): counted, not timed.

Runs the real daemon process (``bench.memory_child``: ``trio-idle serve`` unchanged, the
file source, a new SQLite state file, plaintext, ticks through the process ticker)
against a benchmark IMAP server process and the scan sink on 127.0.0.1, hands it
:data:`FIRST` mailboxes, then :data:`SESSIONS`; once the server saw each new one enter
IDLE and the sink got its startup scan, the daemon counts its gc-tracked objects by type
(after a full collection). The difference between the two counts, over the mailboxes
added, is what one more idle session costs — the fixed costs (the first session's
caches, the loop, the modules) cancel out — and it is compared with ceilings.

The ceilings are today's counts plus a small margin (docs/performance.md, "Issue 27, the
ticker ...", "Objects per session under a test"; ``python -m bench.memory_probe --n 2000
--trace`` prints the same table per type at 2,000 sessions). Lower them when a change
takes objects away; a change that adds one to every session fails here and has to say
why in docs/performance.md.
"""

from __future__ import annotations

import json
import math
import signal
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import pytest
import trio

from bench.phases import Sink
from bench.procs import ADMIN_SECRET, DaemonProc, ServerPool, ServerProc

#: mailboxes before the first count, and in all at the second
FIRST: Final = 100
SESSIONS: Final = 200

#: gc-tracked objects per idle plaintext session, every type (docs/performance.md,
#: "Objects per session under a test"): 105.9-107.0 when this test was written (109.9
#: before the ticker's entries became plain data), 72.9 once the connection's scope was
#: its nursery's own and run_session's frame stopped keeping its backoffs, catch-up
#: decision and secrets, 67.8 with the read path's flat frames too (all of issue 27's
#: first round); issue 27 aimed at about half of the first figure
OBJECTS_PER_SESSION_MAX: Final = 70.0
#: coroutine objects per session: the session's frames, waiting (13 when written; 8
#: since the read is one frame, ImapConnection.wait, and the IDLE path one function:
#: _run, run_session, _watch, wait and trio's four)
COROUTINES_PER_SESSION_MAX: Final = 8.0
#: sets per session (12 when written; 5 now: the cancel statuses of two scopes, the
#: connection's child nursery's and the session's wake scope, two sets each, and one
#: more)
SETS_PER_SESSION_MAX: Final = 5.5
#: trio CancelStatus objects per session (3 until the connection's scope became its
#: child nursery's own cancel scope: the nursery's and the session's wake scope now)
CANCEL_STATUSES_PER_SESSION_MAX: Final = 2.0
#: two counts in a row that differ by at most this many objects are the steady state
#: (the state store's flush, a log line: a few objects come and go)
STEADY: Final = 10


async def _counts(daemon: DaemonProc, out: Path, k: int) -> Counter[str]:
    """The daemon's gc-tracked objects by type, after a full collection (SIGUSR1:
    ``bench.memory_child`` writes ``<out>.<k>.json``)."""
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGUSR1)
    path = trio.Path(f"{out}.{k}.json")
    while True:
        if await path.exists():
            break
        await trio.sleep(0.02)  # another process writes it: no event to wait on
    info: dict[str, Any] = json.loads(await path.read_text())
    return Counter(info["counts"])


async def _steady_counts(daemon: DaemonProc, out: Path, k: int) -> tuple[Counter[str], int]:
    """Counts once two in a row agree within :data:`STEADY` (returns them and the next
    dump number): what is left of the startup scans and reports is gone by then."""
    previous = await _counts(daemon, out, k)
    while True:
        k += 1
        await trio.sleep(0.3)  # the daemon settles on its own: nothing to wait on here
        current = await _counts(daemon, out, k)
        if abs(current.total() - previous.total()) <= STEADY:
            return current, k + 1
        previous = current


async def _add_and_wait(
    pool: ServerPool, sink: Sink, daemon: DaemonProc, rows: Sequence[tuple[str, int]], new: int
) -> None:
    """Hand the daemon ``rows`` (its last ``new`` are new) and wait until each new one is
    in IDLE and its startup scan arrived."""
    added = [user for user, _ in rows[-new:]]
    await pool.call_all("reset_marks")
    scans = sink.reasons.get("startup", 0)
    daemon.set_rows(rows)
    while True:
        if (await pool.idle_marks(added))[0] >= new:
            break
        await trio.sleep(0.05)  # another process: polled over its control port
    await sink.wait_for_reason("startup", scans + new)


def per_session(before: Counter[str], after: Counter[str]) -> dict[str, float]:
    n = SESSIONS - FIRST
    out = {name: (after[name] - before[name]) / n for name in after.keys() | before.keys()}
    out["(all)"] = (after.total() - before.total()) / n
    return out


@pytest.mark.timeout(60)
async def test_objects_per_idle_session_stay_under_their_ceilings(tmp_path: Path) -> None:
    users = [f"u{i:04d}@objects.test" for i in range(SESSIONS)]
    server = ServerProc(0, users)
    pool = ServerPool([server])
    sink = Sink(ADMIN_SECRET)
    out = tmp_path / "counts"
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.backend.serve)  # its URL is known from here on
        env = {
            "BACKEND_URL": sink.backend.url,
            "TRIO_IDLE_IMAP_SECURITY": "plain",
            "TRIO_IDLE_LOG_LEVEL": "WARNING",
            "TRIO_IDLE_CONNECT_CONCURRENCY": "200",
            "TRIO_IDLE_CONNECT_RATE": "2000",
            "TRIO_IDLE_CATCHUP_RATE": "2000",
            "BENCH_PROBE_OUT": str(out),
            "BENCH_PROBE_TRACE": "0",
        }
        daemon = DaemonProc(tmp_path, "daemon", env, module="bench.memory_child")
        try:
            with trio.fail_after(45):
                await server.start(tmp_path, 3600.0, None)
                rows = [(user, server.port) for user in users]
                await daemon.start()
                await _add_and_wait(pool, sink, daemon, rows[:FIRST], FIRST)
                before, k = await _steady_counts(daemon, out, 0)
                await _add_and_wait(pool, sink, daemon, rows, SESSIONS - FIRST)
                after, _ = await _steady_counts(daemon, out, k)
        finally:
            with trio.CancelScope(shield=True):
                if daemon.process is not None:
                    await daemon.terminate(10)
                await pool.stop()
            nursery.cancel_scope.cancel()
    cost = per_session(before, after)
    table = "\n".join(
        f"{v:7.2f}  {name}"
        for name, v in sorted(cost.items(), key=lambda kv: -abs(kv[1]))
        if not math.isclose(v, 0.0, abs_tol=0.05)
    )
    assert cost["builtins.coroutine"] <= COROUTINES_PER_SESSION_MAX, table
    assert cost["builtins.set"] <= SETS_PER_SESSION_MAX, table
    assert cost["trio._core._run.CancelStatus"] <= CANCEL_STATUSES_PER_SESSION_MAX, table
    assert cost["(all)"] <= OBJECTS_PER_SESSION_MAX, table
    print(table)
