"""The envelope fetch against a hostile server: an answer of the largest size allowed
(``ImapLimits.max_fetch_answer``, 8 MiB) costs the mailbox that sent it, not the loop.

A real :class:`~trio_idle.imap.client.ImapConnection` on a scripted server; a trio
instrument counts the parser's work (:class:`~trio_idle.imap.envelope.ParseMeter`) done
in each task step, so the bound is checked without a clock.
"""

from __future__ import annotations

import trio

from tests.reliability.scripted_server import Peer, ScriptedServer
from trio_idle.accounts.connections import MailConnection
from trio_idle.core.secret import Secret
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
from trio_idle.imap.framing import DEFAULT_LIMITS

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


async def hostile_fetch(peer: Peer) -> None:
    await peer.login_and_select()
    while True:
        tag, _, command = (await peer.line()).partition(b" ")
        verb = command.upper()
        if verb.startswith(b"UID SEARCH"):
            uids = b" ".join(b"%d" % uid for uid in UIDS)
            await peer.send(b"* SEARCH " + uids + b"\r\n" + tag + b" OK done\r\n")
        elif verb.startswith(b"UID FETCH"):
            await peer.send(hostile_answer() + tag + b" OK done\r\n")
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
    conn = MailConnection("c", None, A, "127.0.0.1", server.port, A, Secret("x"))
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
