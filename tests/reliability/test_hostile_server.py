"""Seeded fuzz: hostile IMAP servers at every protocol phase cannot take the daemon down.

Nine mailboxes point at hostile servers on 127.0.0.1; three at the healthy ImapTestServer.
Each hostile connection plays one (phase, misbehaviour) pair from a seeded plan that covers
every pair: the phase is where the server stops behaving (instead of the greeting, of the
LOGIN / SELECT answer, of IDLE's ``+`` continuation, during IDLE, instead of the tick's
NOOP answer); the misbehaviour is random bytes, a truncated line and a close, a 4 MiB line
without CRLF, a 2 GiB literal announcement followed by data, an endless stream of lines,
3,000 lines in one write, non-UTF-8, NUL bytes, or a tagged answer with the wrong tag.
After the plan a hostile server behaves, so every mailbox must end up idling.

While they misbehave, mail is delivered to the healthy mailboxes. Asserted: no exception
escaped a session or reached the asyncio loop; the process's peak RSS grew less than
:data:`RSS_BOUND` while the hostile servers pushed far more than that; every healthy
delivery was scanned (0 missed) and no healthy session was lost; every hostile connection
ended with one log line, naming the bound when it exceeded one.

Replay: ``HOSTILE_SEED=<seed>`` (printed; part of every assertion message).
"""

from __future__ import annotations

import functools
import itertools
import os
import random
from pathlib import Path

import attrs
import trio

from tests.harness import row, running_daemon
from tests.reliability.rig import Rig, mailbox_name
from tests.reliability.scripted_server import Peer, ScriptedServer

KiB = 1024
MiB = 1024 * KiB
#: peak RSS growth allowed for the whole run (the hostile servers push several times this)
RSS_BOUND = 64 * MiB
HOSTILE = 9
HEALTHY = 3

PHASES = ("greeting", "login", "select", "idle_continuation", "during_idle", "noop")
MISBEHAVIOURS = (
    "random_bytes",
    "truncated_close",
    "long_line",
    "huge_literal",
    "endless",
    "burst_3000",
    "non_utf8",
    "nul_bytes",
    "wrong_tag",
)
SETTINGS = {
    "TRIO_IDLE_TICK_INTERVAL": "500ms",  # ticks reach the NOOP phase and end quiet IDLEs
    "TRIO_IDLE_COMMAND_TIMEOUT": "1s",
    "TRIO_IDLE_CONNECT_TIMEOUT": "1s",
    "TRIO_IDLE_BACKOFF_INITIAL": "100ms",
    "TRIO_IDLE_BACKOFF_MAX": "300ms",
    "TRIO_IDLE_AUTH_BACKOFF": "300ms",
    "TRIO_IDLE_AUTH_BACKOFF_MAX": "300ms",
    "TRIO_IDLE_LOG_LEVEL": "INFO",
}
#: what the drop line of a connection must contain, where a bound decides it
BOUND_REASONS = {
    "long_line": "server sent a line longer than 1 MiB without CRLF",
    "huge_literal": "server announced a 2 GiB literal (limit 1 MiB)",
}
ENDLESS_ANSWER = {"greeting": "CAPABILITY", "login": "LOGIN", "select": "SELECT", "noop": "NOOP"}


class _Close(Exception):
    """The misbehaviour ends with the server closing the connection."""


@attrs.define
class Hostile:
    """One hostile server: plays ``plan`` (one pair per connection), then behaves."""

    seed: int
    plan: list[tuple[str, str]]
    sent: list[int]  # bytes accepted by the kernel, shared by all servers
    server: ScriptedServer = attrs.field(init=False)
    played: int = 0
    #: set when a connection after the plan has entered IDLE
    behaving: trio.Event = attrs.field(factory=trio.Event)

    def __attrs_post_init__(self) -> None:
        self.server = ScriptedServer(self.script)

    async def script(self, peer: Peer) -> None:
        n, self.played = self.played, self.played + 1
        pair = self.plan[n] if n < len(self.plan) else None
        rng = random.Random(f"{self.seed}/{n}")
        with trio.move_on_after(15):  # bounded whatever the client does
            try:
                await _play(peer, pair, rng, self.sent, self.behaving)
            except _Close:
                return


async def _send(peer: Peer, sent: list[int], data: bytes) -> None:
    await peer.send(data)
    sent[0] += len(data)


async def _misbehave(peer: Peer, what: str, rng: random.Random, sent: list[int]) -> None:
    """Do ``what``; then say nothing more (so a client waiting for an answer times out)."""
    send = functools.partial(_send, peer, sent)
    if what == "random_bytes":
        await send(rng.randbytes(rng.randint(1, 64 * KiB)))
    elif what == "truncated_close":
        await send(b"* 1 FETCH (FLAGS (\\Se")
        raise _Close
    elif what == "long_line":
        await send(b"* OK ")
        for _ in range(64):  # 4 MiB without CRLF
            await send(b"x" * (64 * KiB))
    elif what == "huge_literal":
        await send(b"* 1 FETCH (BODY[] {2147483648}\r\n")
        for _ in range(128):  # 8 MiB of its "data"
            await send(rng.randbytes(64 * KiB))
    elif what == "endless":
        line = b"* OK " + b"e" * (16 * KiB) + b"\r\n"
        for _ in range(2048):  # 32 MiB of well-formed lines, or until the client leaves
            await send(line)
    elif what == "burst_3000":
        await send(b"* 1 FETCH (FLAGS (\\Seen))\r\n" * 2000 + b"* OK still here\r\n" * 1000)
    elif what == "non_utf8":
        await send(b"* \xff\xfe OK \xc3\x28 caf\xe9\r\n\xff1 OK \xa0\r\n* 1 \xed\xa0\x80\r\n")
    elif what == "nul_bytes":
        await send(b"* OK \x00\x00 nul\x00\r\n" + b"\x00" * 1000 + b"\r\n* \x00 EXISTS\r\n")
    elif what == "wrong_tag":
        await send(b"ZZ99 OK a tagged answer to nothing\r\n")
    else:
        raise AssertionError(what)
    while True:
        await peer.line()  # read on until the client gives up


async def _play(
    peer: Peer,
    pair: tuple[str, str] | None,
    rng: random.Random,
    sent: list[int],
    behaving: trio.Event,
) -> None:
    phase, what = pair if pair is not None else ("", "")
    caps = b"* CAPABILITY IMAP4rev1 IDLE\r\n"
    if phase == "greeting":
        await _misbehave(peer, what, rng, sent)
    await peer.send(b"* OK [CAPABILITY IMAP4rev1 IDLE] hostile server ready\r\n")
    idle_tag = b""
    while True:
        tag, name = await peer.command()
        if name == b"CAPABILITY":
            await peer.send(caps + tag + b" OK done\r\n")
        elif name == b"LOGIN":
            if phase == "login":
                await _misbehave(peer, what, rng, sent)
            await peer.send(tag + b" OK LOGIN completed\r\n")
        elif name == b"SELECT":
            if phase == "select":
                await _misbehave(peer, what, rng, sent)
            await peer.send(
                b"* 0 EXISTS\r\n* OK [UIDVALIDITY 7] ok\r\n* OK [UIDNEXT 1] ok\r\n"
                + tag
                + b" OK [READ-WRITE] SELECT completed\r\n"
            )
        elif name == b"IDLE":
            if phase == "idle_continuation":
                await _misbehave(peer, what, rng, sent)
            idle_tag = tag
            await peer.send(b"+ idling\r\n")
            if pair is None:
                behaving.set()
            if phase == "during_idle":
                await _misbehave(peer, what, rng, sent)
        elif tag == b"DONE":
            await peer.send(idle_tag + b" OK IDLE terminated\r\n")
        elif name == b"NOOP":
            if phase == "noop":
                await _misbehave(peer, what, rng, sent)
            await peer.send(tag + b" OK NOOP completed\r\n")
        elif name == b"LOGOUT":
            await peer.send(b"* BYE bye\r\n" + tag + b" OK LOGOUT completed\r\n")
            raise _Close
        else:
            await peer.send(tag + b" BAD unexpected\r\n")


def _peak_rss_reset() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False if not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")


async def _sample_rss(peak: list[int]) -> None:
    """Fallback where VmHWM cannot be reset: sample VmRSS (misses spikes between samples)."""
    while True:
        peak[0] = max(peak[0], _status_kib("VmRSS") * KiB)
        await trio.sleep(0.01)


def _drop_lines(rig: Rig, user: str) -> list[str]:
    prefix = f"[idle/{user}] "
    ends = ("connect failed: ", "connection lost: ", "authentication failed: ")
    return [
        line
        for line in rig.logs.lines
        if line.startswith(prefix) and line[len(prefix) :].startswith(ends)
    ]


async def test_hostile_servers_cannot_take_the_daemon_down(rig: Rig, nursery: trio.Nursery) -> None:
    seed = int(os.environ.get("HOSTILE_SEED") or 20261201)
    print(f"HOSTILE_SEED={seed}")
    context = f"[replay with HOSTILE_SEED={seed}]"
    rng = random.Random(seed)
    pairs = list(itertools.product(PHASES, MISBEHAVIOURS))
    rng.shuffle(pairs)
    sent = [0]
    hostile = [Hostile(seed * 100 + i, pairs[i::HOSTILE], sent) for i in range(HOSTILE)]
    for h in hostile:
        await nursery.start(h.server.serve)
    healthy = [mailbox_name(n, "healthy") for n in range(HEALTHY)]
    bad = [mailbox_name(n, "hostile") for n in range(HOSTILE)]
    source = rig.source(*healthy)
    source.rows += [row(u, u, "x", h.server.port) for u, h in zip(bad, hostile, strict=True)]

    def all_played() -> bool:
        return all(
            len(_drop_lines(rig, u)) >= len(h.plan) for u, h in zip(bad, hostile, strict=True)
        )

    exact_peak = _peak_rss_reset()
    rss_before = _status_kib("VmRSS") * KiB
    peak = [rss_before]
    async with running_daemon(rig.settings(**SETTINGS), source) as daemon:
        with trio.fail_after(10):
            await rig.all_idle(healthy)
        async with trio.open_nursery() as sampling:
            if not exact_peak:
                sampling.start_soon(_sample_rss, peak)
            with trio.fail_after(25):
                deliveries = itertools.cycle(healthy)
                while not all_played():
                    rig.ledger.append(next(deliveries), "while hostile servers misbehave")
                    with trio.move_on_after(0.1):  # the pace of deliveries
                        await rig.logs.wait_until(all_played)
                await rig.ledger.settle(5, context=context)
            sampling.cancel_scope.cancel()
        peak_rss = _status_kib("VmHWM") * KiB if exact_peak else peak[0]

        growth = peak_rss - rss_before
        report = [
            context,
            f"hostile servers sent {sent[0] / MiB:.0f} MiB; peak RSS grew {growth / MiB:.1f} MiB"
            f" ({'VmHWM' if exact_peak else 'sampled VmRSS'})",
        ]
        for user, h in zip(bad, hostile, strict=True):
            lines = _drop_lines(rig, user)
            for (phase, what), line in zip(h.plan, lines, strict=False):
                report.append(f"  {phase}/{what}: {line}")
        text = "\n".join(report)
        print(text)

        assert growth < RSS_BOUND, text
        # kept, what the daemon was sent would have broken the bound: the bound was tested
        assert sent[0] > RSS_BOUND, text
        assert daemon.stats.get("internal_errors") == 0, text
        assert daemon.stats.get("asyncio_errors") == 0, text
        assert not rig.logs.matching("internal error"), text
        for user in healthy:
            assert rig.handle(daemon, user).memory.sessions == 1, f"{user} reconnected\n{text}"
        for user, h in zip(bad, hostile, strict=True):
            lines = _drop_lines(rig, user)
            assert len(lines) >= len(h.plan), text
            for (phase, what), line in zip(h.plan, lines, strict=False):
                assert "\n" not in line and len(line) < 400, line
                if what in BOUND_REASONS:
                    assert BOUND_REASONS[what] in line, f"{phase}/{what}: {line}\n{text}"
                elif what == "endless" and phase in ENDLESS_ANSWER:
                    assert f"in answer to {ENDLESS_ANSWER[phase]})" in line, f"{line}\n{text}"
        # after its plan a hostile server behaves: every mailbox is watched again
        with trio.fail_after(10):
            for h in hostile:
                await h.behaving.wait()
