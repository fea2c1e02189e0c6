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

import pytest
import trio

from tests.harness import row, running_daemon
from tests.reliability.rig import Rig
from tests.reliability.scripted_server import Peer, ScriptedServer

A = "alice@rel.test"
BAD = "bad@rel.test"


async def bye_greeting(peer: Peer) -> None:
    await peer.send(b"* BYE Too many connections from your host\r\n")


async def close_during_handshake(peer: Peer) -> None:
    await peer.send(b"* OK scripted server ready\r\n")
    await peer.line()  # CAPABILITY: never answered, the connection is closed


async def close_during_idle(peer: Peer) -> None:
    await peer.login_and_select()
    _tag, name = await peer.command()
    assert name == b"IDLE"
    await peer.send(b"+ idling\r\n")


async def garbage_during_idle(peer: Peer) -> None:
    await peer.login_and_select()
    _tag, name = await peer.command()
    assert name == b"IDLE"
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


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        (bye_greeting, "connect failed: "),
        (close_during_handshake, "connect failed: "),
        (silent_after_greeting, "connect failed: no IMAP greeting from"),
        (unanswered_login, "connect failed: no answer to LOGIN"),
        (close_during_idle, "connection lost: "),
        (garbage_during_idle, "connection lost: "),
    ],
    ids=lambda v: getattr(v, "__name__", ""),
)
async def test_misbehaving_server_costs_a_reconnect_not_the_process(
    rig: Rig, nursery: trio.Nursery, script: object, expected: str
) -> None:
    bad = ScriptedServer(script)  # type: ignore[arg-type]
    await nursery.start(bad.serve)
    source = rig.source(A)
    source.rows.append(row(BAD, BAD, "x", bad.port))
    settings = rig.settings(TRIO_IDLE_CONNECT_TIMEOUT="1s", TRIO_IDLE_COMMAND_TIMEOUT="1s")
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
        line = (await rig.log(f"[idle/{BAD}] "))[0]
        lines = rig.logs.matching(f"[idle/{BAD}] {expected}")
        assert lines, line
        assert daemon.stats.get("internal_errors") == 0
        assert rig.handle(daemon, A).memory.sessions == 1
