"""One provider down and back: when each host's sessions are all in IDLE again, mail missed.

``python -m bench.provider_outage [--big 5000] [--small 1000] [--downtime 10]
[--big-rate 20]`` runs ``trio-idle serve`` (default limits: 50 connects/s, 20 at once, a
quarter per host) against two benchmark IMAP server processes on 127.0.0.1, two host keys
(``host:port``):

* **big** (``--big`` mailboxes) is the provider that goes down: it resets every
  connection and refuses new ones for ``--downtime`` seconds while mail arrives for a
  tenth of its mailboxes. It accepts at most ``--big-rate`` connections per second (more
  are greeted with ``* BYE [UNAVAILABLE]``, as a provider refusing a login burst), and the
  daemon is told so (``TRIO_IDLE_HOST_CONNECT_RATES=127.0.0.1:<port>=<rate>``).
* **small** (``--small`` mailboxes) drops every session once, when big comes back (so both
  backlogs compete), with mail for a tenth of its mailboxes around that moment.

The same scenario runs twice: per-host pacing off (``TRIO_IDLE_HOST_PACING=false``: one
first-come-first-served pace for every host, the behaviour before it) and on. Reported per
host: seconds from when it could take connections again (big: listening again; small: the
drop) until every one of its mailboxes was in IDLE again, connections big refused as over
its rate, and mail missed (an appended message with no scan request after it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from bench import phases
from bench.procinfo import machine_info, raise_nofile_limit
from bench.procs import ADMIN_SECRET, DaemonProc, ServerPool, ServerProc

DEFAULT_OUT = "docs/perf/provider-outage.json"
MAIL_SHARE = 10  # one mailbox in ten gets a message


async def _all_idle(pool: ServerPool, users: list[str], limit: float) -> float | None:
    """The wall time the last of ``users`` entered IDLE since the marks were reset;
    ``None`` if not all did within ``limit`` seconds."""
    with trio.move_on_after(limit):
        while True:
            await trio.sleep(0.2)  # another process's state: no event to wait on
            count, latest = await pool.idle_marks(users)
            if count >= len(users):
                return latest
    return None


async def _missed(
    sink: phases.Sink, records: list[list[Any]], limit: float
) -> tuple[int, float | None]:
    """How many appended messages never got a scan request after them (waiting up to
    ``limit`` s), and the slowest append → scan delay."""
    deadline = trio.current_time() + limit
    while True:
        missing = [r for r in records if sink.first_post_after(r[0], r[1]) is None]
        if not missing or trio.current_time() > deadline:
            break
        await trio.sleep(0.2)
    delays = [
        post - r[1] for r in records if (post := sink.first_post_after(r[0], r[1])) is not None
    ]
    return len(missing), max(delays, default=None)


async def _append_records(server: ServerProc) -> list[list[Any]]:
    while True:
        answer = await server.call("append_results")
        if answer["done"]:
            return list(answer["records"])
        await trio.sleep(0.2)


async def one_run(
    pacing: bool, args: argparse.Namespace, workdir: Path, sink: phases.Sink
) -> dict[str, Any]:
    """The scenario once, with per-host pacing ``pacing``; one result record."""
    big_users = [f"b{i:05d}@big.test" for i in range(args.big)]
    small_users = [f"s{i:05d}@small.test" for i in range(args.small)]
    big = ServerProc(0, big_users)
    small = ServerProc(1, small_users)
    pool = ServerPool([big, small])
    name = "on" if pacing else "off"
    try:
        await big.start(workdir, 120.0, None, {"login_rate": args.big_rate})
        await small.start(workdir, 120.0, None)
        env = {
            "BACKEND_URL": sink.backend.url,
            "TRIO_IDLE_IMAP_SECURITY": "plain",
            "TRIO_IDLE_LOG_LEVEL": "WARNING",
            "TRIO_IDLE_TICK_INTERVAL": "24h",
            "TRIO_IDLE_HOST_PACING": "true" if pacing else "false",
            "TRIO_IDLE_HOST_CONNECT_RATES": f"127.0.0.1:{big.port}={args.big_rate:g}",
        }
        daemon = DaemonProc(workdir, f"daemon-{name}", env)
        await daemon.start()
        try:
            rows = [(u, big.port) for u in big_users] + [(u, small.port) for u in small_users]
            await pool.call_all("reset_marks")
            started = daemon.set_rows(rows)
            first = await _all_idle(pool, big_users + small_users, args.limit)
            if first is None:
                raise RuntimeError(f"{name}: not every session reached IDLE at the start")
            print(f"[{name}] all {len(rows)} in IDLE after {first - started:.1f}s", flush=True)
            await trio.sleep(2.0)  # the startup catch-up scans settle
            before = {s.index: await s.call("stats") for s in pool.servers}

            # the outage: big resets everything and is down; mail arrives meanwhile
            await big.call("reset_marks")
            t0 = time.time()
            await big.call("restart", downtime=args.downtime)
            mailed_big = big_users[::MAIL_SHARE]
            span = max(args.downtime - 1.0, 0.5)
            await big.call(
                "appends",
                users=mailed_big,
                offsets=[0.5 + span * i / len(mailed_big) for i in range(len(mailed_big))],
                start_at=t0,
            )
            # big listens again: small drops every session once, with mail around then
            while (up_at := (await big.call("stats"))["up_at"]) is None:  # noqa: ASYNC110 - another process
                await trio.sleep(0.05)
            await small.call("reset_marks")
            t_drop = time.time()
            await small.call("drop_all")
            mailed_small = small_users[::MAIL_SHARE]
            await small.call(
                "appends",
                users=mailed_small,
                offsets=[-1.0 + 6.0 * i / len(mailed_small) for i in range(len(mailed_small))],
                start_at=t_drop,
            )
            async with trio.open_nursery() as nursery:
                done: dict[str, float | None] = {}

                async def wait(key: str, users: list[str]) -> None:
                    done[key] = await _all_idle(pool, users, args.limit)

                nursery.start_soon(wait, "big", big_users)
                nursery.start_soon(wait, "small", small_users)
            records = await _append_records(big) + await _append_records(small)
            missed, slowest = await _missed(sink, records, 60.0)
            after = {s.index: await s.call("stats") for s in pool.servers}
            big_done, small_done = done["big"], done["small"]
            result = {
                "host_pacing": pacing,
                "big_back_s": None if big_done is None else round(big_done - up_at, 1),
                "small_back_s": None if small_done is None else round(small_done - t_drop, 1),
                "big_refused_over_rate": after[0]["throttled"] - before[0]["throttled"],
                "big_logins": after[0]["logins"] - before[0]["logins"],
                "small_logins": after[1]["logins"] - before[1]["logins"],
                "mail_appended": len(records),
                "mail_missed": missed,
                "slowest_append_to_scan_s": None if slowest is None else round(slowest, 1),
                "down_s": round(up_at - t0, 1),
                "log_lines": daemon.log_counts(),
            }
            print(f"[{name}] {json.dumps(result)}", flush=True)
            return result
        finally:
            with trio.CancelScope(shield=True):
                await daemon.terminate(30.0)
    finally:
        with trio.CancelScope(shield=True):
            await pool.stop()


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    sink = phases.Sink(ADMIN_SECRET)
    runs = []
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.backend.serve)
        for pacing in (False, True):
            runs.append(await one_run(pacing, args, workdir, sink))
        nursery.cancel_scope.cancel()
    return {
        "command": "python -m bench.provider_outage " + " ".join(sys.argv[1:]),
        "started_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "big": args.big,
        "small": args.small,
        "big_rate": args.big_rate,
        "downtime_s": args.downtime,
        "connect_rate": 50,
        "runs": runs,
    }


def table(data: dict[str, Any]) -> str:
    lines = [
        "| per-host pacing | big: all in IDLE after | small: all in IDLE after | "
        "big: refused over its rate | mail appended | mail missed |",
        "|---|---|---|---|---|---|",
    ]
    for r in data["runs"]:
        lines.append(
            f"| {'on' if r['host_pacing'] else 'off (global pace only)'} | {r['big_back_s']} s | "
            f"{r['small_back_s']} s | {r['big_refused_over_rate']} | {r['mail_appended']} | "
            f"{r['mail_missed']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument(
        "--big", type=int, default=5000, help="mailboxes on the host that goes down"
    )
    parser.add_argument("--small", type=int, default=1000, help="mailboxes on the other host")
    parser.add_argument("--downtime", type=float, default=10.0, help="seconds big is down")
    parser.add_argument(
        "--big-rate", type=float, default=20.0, help="connections/s big accepts (and is told)"
    )
    parser.add_argument("--limit", type=float, default=900.0, help="give up waiting after (s)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"results JSON ({DEFAULT_OUT})")
    args = parser.parse_args(argv)
    raise_nofile_limit()
    with tempfile.TemporaryDirectory(prefix="trio-idle-outage-") as tmp:
        data = trio.run(run, args, Path(tmp))
    Path(args.out).write_text(json.dumps(data, indent=2) + "\n")
    print()
    print(table(data))
    print(f"\nresults: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
