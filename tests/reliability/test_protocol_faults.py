"""A misbehaving IMAP server costs its own mailbox a reconnect — never the daemon process.

aioimaplib runs on the asyncio loop that trio-asyncio provides, and trio-asyncio turns
anything reported to that loop's exception handler (an asyncio task garbage-collected while
still pending, a task exception never retrieved, an exception escaping a protocol callback)
into an exception in the daemon's root nursery: the whole process would stop. Each case here
plays one misbehaviour on every connection of one mailbox, forces garbage collection, and
checks that another mailbox on a healthy server keeps getting its mail scanned.
"""

from __future__ import annotations

import gc
import re

import pytest
import trio

from tests.harness import row, running_daemon
from tests.reliability.rig import Rig
from tests.reliability.scripted_server import Peer, Script, ScriptedServer

A = "alice@rel.test"
BAD = "bad@rel.test"


async def bye_greeting(peer: Peer) -> None:
    await peer.send(b"* BYE Too many connections from your host\r\n")


async def close_during_handshake(peer: Peer) -> None:
    await peer.send(b"* OK scripted server ready\r\n")
    await peer.line()  # CAPABILITY: never answered, the connection is closed


async def close_during_idle(peer: Peer) -> None:
    await peer.login_and_select()
    await peer.expect_idle()
    await peer.send(b"+ idling\r\n")


async def garbage_during_idle(peer: Peer) -> None:
    await peer.login_and_select()
    await peer.expect_idle()
    await peer.send(b"+ idling\r\n* 1 EXISTS\r\nZZ99 OK a tagged answer to nothing\r\n")
    while True:
        await peer.line()  # keep the socket open: only the client may end it


async def silent_after_greeting(peer: Peer) -> None:
    await peer.send(b"* OK scripted server ready\r\n")
    while True:
        await peer.line()  # CAPABILITY is never answered


async def unanswered_login(peer: Peer) -> None:
    await peer.send(b"* OK scripted server ready\r\n")
    tag, name = await peer.command()
    assert name == b"CAPABILITY"
    await peer.send(b"* CAPABILITY IMAP4rev1 IDLE\r\n" + tag + b" OK done\r\n")
    while True:
        await peer.line()  # LOGIN is never answered


#: each fault's line as docs/reliability.md lists it (``{port}``: the bad server's port);
#: the whole line must match, so a different reason fails the test
REASONS = {
    "bye_greeting": (
        r"connect failed: 127\.0\.0\.1:{port} failed the IMAP greeting: "
        r"Error: \* BYE Too many connections from your host"
    ),
    "close_during_handshake": (
        r"connect failed: 127\.0\.0\.1:{port}: connection lost \(closed by server\)"
    ),
    "silent_after_greeting": r"connect failed: no IMAP greeting from 127\.0\.0\.1:{port} within 1s",
    "unanswered_login": r"connect failed: no answer to LOGIN within 1s",
    # "IDLE: " when the close lands while IDLE's continuation is being read
    "close_during_idle": r"connection lost: (IDLE: )?connection lost \(closed by server\)",
    "garbage_during_idle": (
        r"connection lost: (IDLE: )?connection lost \(protocol error: Abort: unexpected tagged "
        r"response with pending sync command \(\w+ IDLE\) response: "
        r"b'OK a tagged answer to nothing'\)"
    ),
}
#: the bad mailbox's lines that are not a fault: the retry schedule, each connect and the
#: account health reports to the backend (their own tests are test_account_health_reports)
ROUTINE = re.compile(
    r"reconnecting in .* \(attempt \d+\)|connected \(127\.0\.0\.1:\d+\)"
    r"|account health report.*"
)


@pytest.mark.parametrize(
    "script",
    [
        bye_greeting,
        close_during_handshake,
        silent_after_greeting,
        unanswered_login,
        close_during_idle,
        garbage_during_idle,
    ],
    ids=lambda v: v.__name__,
)
async def test_misbehaving_server_costs_a_reconnect_not_the_process(
    rig: Rig, nursery: trio.Nursery, script: Script
) -> None:
    bad = ScriptedServer(script)
    await nursery.start(bad.serve)
    source = rig.source(A)
    source.rows.append(row(BAD, BAD, "x", bad.port))
    settings = rig.settings(TRIO_IDLE_CONNECT_TIMEOUT="1s", TRIO_IDLE_COMMAND_TIMEOUT="1s")
    reason = re.compile(REASONS[script.__name__].format(port=bad.port))
    async with running_daemon(settings, source) as daemon:
        with trio.fail_after(10):
            await rig.idle(A)
        for attempt in range(2, 4):
            with trio.fail_after(10):
                await bad.wait_connections(attempt)  # the bad mailbox keeps retrying
            gc.collect()  # free the dead connections now, not at some random later moment
            rig.ledger.append(A, f"after {attempt - 1} bad connections")
            with trio.fail_after(5):
                await rig.ledger.wait_covered()
        with trio.fail_after(5):
            await rig.log(f"[idle/{BAD}] reconnecting in", count=2)  # two faults logged
        prefix = f"[idle/{BAD}] "
        faults = [
            line.removeprefix(prefix)
            for line in rig.logs.matching(prefix)
            if not ROUTINE.fullmatch(line.removeprefix(prefix))
        ]
        assert len(faults) >= 2, faults
        assert all(reason.fullmatch(line) for line in faults), (reason.pattern, faults)
        assert daemon.stats.get("internal_errors") == 0
        assert rig.handle(daemon, A).memory.sessions == 1
