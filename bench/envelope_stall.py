"""Loop stall while one session parses an 8 MiB hostile envelope answer (target < 50 ms).

``python -m bench.envelope_stall [--rounds 3]`` starts a hostile IMAP server in a child
process on 127.0.0.1 and, from this process, runs the real
:meth:`~trio_idle.imap.client.ImapConnection.fetch_new` against it: ``UID SEARCH`` finds
eight messages, and ``UID FETCH`` answers with just under
``ImapLimits.max_fetch_answer`` (8 MiB) of one hostile shape, chosen by the mailbox the
client selects:

* ``escapes``: each response a quoted subject of ~1 MiB of ``\\a`` escapes (the review's
  case: 0.67 MiB of them took 1.3 s before the scan was made linear);
* ``strings``: ~350,000 empty quoted strings per response;
* ``nesting``: ``(((())))`` repeated, the nesting limit reached over and over;
* ``literals``: ~33,000 responses of 31 one-byte literals each (the framer's limit is
  32 per response);
* ``fields``: many responses whose subject, name, address and message id are the
  largest field the decoder takes (:data:`~trio_idle.imap.envelope.MAX_RAW_FIELD`),
  full of encoded-word starts and control characters.

While ``fetch_new`` runs (reading the answer, then parsing it), two probes watch the
loop: a trio instrument records the longest single task step (the loop does nothing
else while a step runs: the stall this process causes, the verdict against the target;
beside it the most CPU time one step used, which on a busy machine tells this process's
work from the time slices other processes took in the middle of a step),
and a 1 ms timer records how late it fired (that step plus whatever else the machine ran
meanwhile). Each row: the worst
of ``--rounds`` fetches, the fetch's wall time and this process's CPU for it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import trio

from bench.procs import REPO_ROOT
from trio_idle.accounts.connections import MailConnection
from trio_idle.core.secret import Secret
from trio_idle.imap.client import ImapTimeouts
from trio_idle.imap.connect import connect
from trio_idle.imap.framing import DEFAULT_LIMITS

MiB = 1024 * 1024
UIDS = range(1, 9)
TARGET_MS = 50.0


def hostile_answer(shape: str) -> bytes:
    """The untagged part of the FETCH answer: just under 8 MiB of ``shape``."""
    if shape == "literals":  # the framer allows 32 literals per response: many responses
        one = b"* %%d FETCH (UID %%d ENVELOPE (NIL %s))\r\n" % (b"{1}\r\nx " * 31,)
        count = (DEFAULT_LIMITS.max_fetch_answer - 4096) // (len(one) + 16)
        return b"".join(one % (1 + i % 8, 1 + i % 8) for i in range(count))
    if shape == "fields":
        field = b"=?a?q?x\x01" * 1000
        one = b'* %%d FETCH (UID %%d ENVELOPE (NIL "%s" (("%s" NIL "%s" "x")) NIL NIL NIL ' % (
            field,
            field,
            b"b" * 8000,
        ) + b'NIL NIL NIL NIL "%s"))\r\n' % (b"\x01" * 8000,)
        count = (DEFAULT_LIMITS.max_fetch_answer - 4096) // (len(one) + 16)
        return b"".join(one % (1 + i % 8, 1 + i % 8) for i in range(count))
    body = {
        "escapes": lambda n: b'NIL "' + b"\\a" * (n // 2) + b'"',
        "strings": lambda n: b'NIL NIL ("")' + b' ""' * (n // 3),
        "nesting": lambda n: b"NIL NIL " + b"(((())))" * (n // 8),
    }[shape](MiB - 1024)
    answer = b"".join(b"* %d FETCH (UID %d ENVELOPE (%s))\r\n" % (u, u, body) for u in UIDS)
    assert len(answer) <= DEFAULT_LIMITS.max_fetch_answer - 4096
    return answer


SHAPES = ("escapes", "strings", "nesting", "literals", "fields")


async def _serve_one(stream: trio.SocketStream) -> None:
    buf = bytearray()
    shape = "escapes"
    await stream.send_all(b"* OK [CAPABILITY IMAP4rev1 IDLE] hostile bench server\r\n")
    while True:
        while (end := buf.find(b"\r\n")) < 0:
            data = await stream.receive_some(65536)
            if not data:
                return
            buf += data
        line = bytes(buf[:end])
        del buf[: end + 2]
        tag, _, command = line.partition(b" ")
        verb = command.upper()
        if verb.startswith(b"CAPABILITY"):
            await stream.send_all(b"* CAPABILITY IMAP4rev1 IDLE\r\n" + tag + b" OK done\r\n")
        elif verb.startswith(b"SELECT"):
            shape = command.split()[-1].strip(b'"').decode()
            reply = b"* 8 EXISTS\r\n* OK [UIDVALIDITY 7] ok\r\n* OK [UIDNEXT 9] ok\r\n"
            await stream.send_all(reply + tag + b" OK [READ-WRITE] done\r\n")
        elif verb.startswith(b"UID SEARCH"):
            await stream.send_all(b"* SEARCH 1 2 3 4 5 6 7 8\r\n" + tag + b" OK done\r\n")
        elif verb.startswith(b"UID FETCH"):
            await stream.send_all(hostile_answer(shape) + tag + b" OK done\r\n")
        elif verb.startswith(b"LOGOUT"):
            await stream.send_all(b"* BYE\r\n" + tag + b" OK bye\r\n")
            return
        else:
            await stream.send_all(tag + b" OK done\r\n")


async def _serve() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    print(listeners[0].socket.getsockname()[1], flush=True)
    await trio.serve_listeners(_serve_one, listeners)


class LongestStep(trio.abc.Instrument):
    """The longest task step while :attr:`on` (the loop runs nothing else meanwhile), in
    wall time (:attr:`longest`) and in this thread's CPU time (:attr:`longest_cpu`): on a
    busy machine the kernel preempts the process mid-step, and the wall time of a step
    then includes other processes' time slices, the CPU time only this one's work."""

    def __init__(self) -> None:
        self.on = False
        self.longest = 0.0
        self.longest_cpu = 0.0
        self._started = 0.0
        self._started_cpu = 0.0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._started = time.perf_counter()
        self._started_cpu = time.thread_time()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if self.on:
            self.longest = max(self.longest, time.perf_counter() - self._started)
            self.longest_cpu = max(self.longest_cpu, time.thread_time() - self._started_cpu)


async def _late_timer(period: float, worst: list[float], on: list[bool]) -> None:
    while True:
        expected = trio.current_time() + period
        await trio.sleep_until(expected)
        if on[0]:
            worst[0] = max(worst[0], trio.current_time() - expected)


async def measure(port: int, rounds: int) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    steps = LongestStep()
    trio.lowlevel.add_instrument(steps)
    late, on = [0.0], [False]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_late_timer, 0.001, late, on)
        for shape in SHAPES:
            conn = MailConnection("b", None, "bench", "127.0.0.1", port, "bench", Secret("x"))
            timeouts = ImapTimeouts(connect=10, command=120, keepalive_idle=60)
            imap = await connect(conn, security="plain", context=None, timeouts=timeouts)
            await imap.login("bench", "x")
            await imap.select(shape)
            row = dict.fromkeys(("step_ms", "step_cpu_ms", "late_ms", "wall_ms", "cpu_ms"), 0.0)
            for _ in range(rounds):
                steps.longest, steps.longest_cpu, late[0] = 0.0, 0.0, 0.0
                on[0] = steps.on = True
                started, cpu = time.perf_counter(), time.process_time()
                found = await imap.fetch_new(1, 50)
                await trio.lowlevel.checkpoint()  # the last step ends while measured
                wall, cpu = time.perf_counter() - started, time.process_time() - cpu
                await trio.sleep(0.005)  # a late timer still counts
                on[0] = steps.on = False
                meter = imap.envelope_meter
                assert found.uids == tuple(UIDS) and meter is not None
                row["step_ms"] = max(row["step_ms"], steps.longest * 1000)
                row["step_cpu_ms"] = max(row["step_cpu_ms"], steps.longest_cpu * 1000)
                row["late_ms"] = max(row["late_ms"], late[0] * 1000)
                row["wall_ms"] = max(row["wall_ms"], wall * 1000)
                row["cpu_ms"] = max(row["cpu_ms"], cpu * 1000)
                row["slices"] = meter.slices
                row["listed"] = 0 if found.envelopes is None else len(found.envelopes)
            await imap.logout(1.0)
            results[shape] = row
        nursery.cancel_scope.cancel()
    trio.lowlevel.remove_instrument(steps)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        trio.run(_serve)
        return 0
    child = subprocess.Popen(
        [sys.executable, "-m", "bench.envelope_stall", "--serve"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        results = trio.run(measure, port, args.rounds)
    finally:
        child.terminate()
        child.wait()
    print(f"worst of {args.rounds} fetches of a hostile 8 MiB answer (target: stall < 50 ms)")
    print(f"{'shape':<10} {'longest step':>13} {'step CPU':>10} {'1 ms timer late':>16} "
          f"{'fetch wall':>11} {'CPU':>8} {'slices':>7} {'listed':>7}")  # fmt: skip
    worst = 0.0
    for shape, row in results.items():
        worst = max(worst, row["step_ms"])
        print(
            f"{shape:<10} {row['step_ms']:10.1f} ms {row['step_cpu_ms']:7.1f} ms "
            f"{row['late_ms']:13.1f} ms "
            f"{row['wall_ms']:8.0f} ms {row['cpu_ms']:5.0f} ms {row['slices']:7.0f} "
            f"{row['listed']:7.0f}"
        )
    # the verdict is the longest step: what this process held the loop for (the timer
    # is late by that plus whatever else the machine ran meanwhile)
    print(f"longest step {worst:.1f} ms: {'OK' if worst < TARGET_MS else 'OVER TARGET'}")
    return 0 if worst < TARGET_MS else 1


if __name__ == "__main__":
    sys.exit(main())
