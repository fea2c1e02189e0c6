"""The envelope fetch against a hostile server: an answer of the largest size allowed
(``ImapLimits.max_fetch_answer``, 8 MiB) costs the mailbox that sent it, not the loop.

A real :class:`~trio_idle.imap.client.ImapConnection` on a scripted server; a trio
instrument counts the work done in each task step — the envelope parser's
(:class:`~trio_idle.imap.envelope.ParseMeter`) and the read path's (lines and literals
handed to aioimaplib, ``ImapProtocol.parsed_parts``) — so the bounds are checked without
a clock.
"""

from __future__ import annotations

import trio

from tests.fixtures import mail_connection
from tests.reliability.scripted_server import Peer, ScriptedServer
from trio_idle.accounts.connections import MailConnection
from trio_idle.core.secret import Secret
from trio_idle.imap.aioimap import STEP_PARTS
from trio_idle.imap.client import ImapConnection, ImapTimeouts
from trio_idle.imap.connect import connect
from trio_idle.imap.envelope import (
    DECODE_WORK,
    MAX_ANSWER_WORK,
    MAX_RAW_FIELD,
    SLICE_WORK,
    TOKEN_WORK,
    WINDOW,
)
from trio_idle.imap.framing import DEFAULT_LIMITS, MAX_LITERALS

A = "alice@rel.test"
MiB = 1024 * 1024
UIDS = range(1, 9)


def hostile_answer() -> bytes:
    """Eight FETCH responses, each a quoted subject of ~1 MiB of escapes (the line limit),
    just under the answer limit together."""
    responses = [
        b'* %d FETCH (UID %d ENVELOPE (NIL "%s"))\r\n' % (uid, uid, b"\\a" * (MiB // 2 - 64))
        for uid in UIDS
    ]
    answer = b"".join(responses)
    assert 7 * MiB < len(answer) <= DEFAULT_LIMITS.max_fetch_answer
    return answer


def tiny_literals_answer(size: int) -> bytes:
    """``size`` bytes of FETCH responses of 31 one-byte literals each (the framer takes
    32 per response): thousands of lines and literals in every 16 KiB read."""
    one = b"* %%d FETCH (UID %%d ENVELOPE (NIL %s))\r\n" % (b"{1}\r\nx " * 31,)
    return b"".join(one % (uid, uid) for uid in UIDS) * (size // (len(one) * len(UIDS)))


async def hostile_fetch(peer: Peer, answer: bytes | None = None) -> None:
    await peer.login_and_select()
    while True:
        tag, _, command = (await peer.line()).partition(b" ")
        verb = command.upper()
        if verb.startswith(b"UID SEARCH"):
            uids = b" ".join(b"%d" % uid for uid in UIDS)
            await peer.send(b"* SEARCH " + uids + b"\r\n" + tag + b" OK done\r\n")
        elif verb.startswith(b"UID FETCH"):
            await peer.send((answer or hostile_answer()) + tag + b" OK done\r\n")
        else:
            await peer.send(tag + b" OK done\r\n")


class StepWork(trio.abc.Instrument):
    """The most parser work done in one task step (between two checkpoints)."""

    def __init__(self, imap: ImapConnection) -> None:
        self.imap = imap
        self.most = 0
        self._before = 0

    def _work(self) -> int:
        meter = self.imap.envelope_meter
        return 0 if meter is None else meter.work

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._before = self._work()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        self.most = max(self.most, self._work() - self._before)


async def test_an_answer_of_the_largest_size_is_parsed_between_checkpoints(
    nursery: trio.Nursery,
) -> None:
    server = ScriptedServer(hostile_fetch)
    await nursery.start(server.serve)
    conn = mail_connection("c", user_id=None, email=A, port=server.port, password="x")
    timeouts = ImapTimeouts(connect=5, command=20, keepalive_idle=60)
    imap = await connect(conn, security="plain", context=None, timeouts=timeouts)
    steps = StepWork(imap)
    try:
        with trio.fail_after(30):
            await imap.login(A, "x")
            await imap.select("INBOX")
            trio.lowlevel.add_instrument(steps)
            try:
                found = await imap.fetch_new(1, 50)
                await trio.lowlevel.checkpoint()  # the last step ends while instrumented
            finally:
                trio.lowlevel.remove_instrument(steps)
            # the session goes on: the connection still answers
            await imap.noop()
    finally:
        imap.abort()
    meter = imap.envelope_meter
    assert meter is not None
    # more than the answer's budget: the scan goes out with the range only
    assert found.uids == tuple(UIDS) and found.envelopes is None and meter.over_budget
    # ... and the parse ran in slices, the loop free between them
    largest_step = DECODE_WORK * MAX_RAW_FIELD + 2 * WINDOW + TOKEN_WORK
    assert meter.slices >= MAX_ANSWER_WORK // (SLICE_WORK + largest_step)
    assert steps.most <= SLICE_WORK + largest_step


class StepParts(trio.abc.Instrument):
    """The most lines and literals the read path handed to aioimaplib in one task step,
    and the most lines the FETCH being answered kept as objects meanwhile."""

    def __init__(self, imap: ImapConnection) -> None:
        self.imap = imap
        self.most = 0
        self.most_kept = 0
        self._before = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._before = self.imap.protocol.parsed_parts

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        protocol = self.imap.protocol
        self.most = max(self.most, protocol.parsed_parts - self._before)
        if (fetch := protocol.pending_async_commands.get("FETCH")) is not None:
            self.most_kept = max(self.most_kept, len(fetch.lines))


async def test_an_answer_of_thousands_of_tiny_literals_is_read_between_checkpoints(
    nursery: trio.Nursery,
) -> None:
    """Issue 23's read path: one 16 KiB read of one-byte literals is ~2,000 of them, and
    parsing a read whole held the loop 35-78 ms; now at most one batch per step."""
    answer = tiny_literals_answer(MiB)
    server = ScriptedServer(lambda peer: hostile_fetch(peer, answer))
    await nursery.start(server.serve)
    conn = MailConnection("c", None, A, "127.0.0.1", server.port, A, Secret("x"))
    timeouts = ImapTimeouts(connect=5, command=40, keepalive_idle=60)
    imap = await connect(conn, security="plain", context=None, timeouts=timeouts)
    steps = StepParts(imap)
    try:
        with trio.fail_after(50):
            await imap.login(A, "x")
            await imap.select("INBOX")
            before = imap.protocol.parsed_parts
            trio.lowlevel.add_instrument(steps)
            try:
                found = await imap.fetch_new(1, 50)
                await trio.lowlevel.checkpoint()  # the last step ends while instrumented
            finally:
                trio.lowlevel.remove_instrument(steps)
            await imap.noop()  # the session goes on: the connection still answers
    finally:
        imap.abort()
    assert found.uids == tuple(UIDS)
    parsed = imap.protocol.parsed_parts - before
    assert parsed > 100 * STEP_PARTS  # the answer was the hostile one, parsed
    # a batch stops at STEP_PARTS, finishing the response that crosses it
    assert steps.most <= STEP_PARTS + MAX_LITERALS
    # the answer is read from the raw responses: aioimaplib's object per line and literal
    # (2 million for 8 MiB, hundreds of MiB, freed in one step) is not kept
    assert steps.most_kept == 0
