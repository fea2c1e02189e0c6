"""Cancelling an IMAP connection at any moment leaves nothing behind.

Sessions are cancelled all the time (row removed, credentials changed, shutdown), at
whatever await they happen to be in. The daemon runs a trio-asyncio loop (asyncpg runs on
it; aioimaplib's parser is fed from trio, no asyncio per connection), where an
asyncio task garbage-collected while still pending is reported to the loop's exception
handler — and trio-asyncio turns that into a crash of the whole daemon. This fuzzes the
moment of cancellation over a session's whole life (connect, greeting, LOGIN, SELECT,
IDLE, DONE, NOOP) and then forces garbage collection inside the loop.
"""

from __future__ import annotations

import gc
import os
import random

import trio
import trio_asyncio
from trio_idle_testing import ImapTestServer

from tests.fixtures import mail_connection
from trio_idle.accounts.connections import MailConnection
from trio_idle.imap.client import ImapConnection, ImapTimeouts
from trio_idle.imap.connect import connect

A = "alice@rel.test"
PASSWORD = "pw"
ROUNDS = 200


async def whole_session(
    conn: MailConnection, timeouts: ImapTimeouts, opened: list[ImapConnection], steps: list[str]
) -> None:
    """Connect, LOGIN, SELECT, IDLE, DONE, NOOP; ``steps`` says how far it got."""
    steps.append("connect")
    imap = await connect(conn, security="plain", context=None, timeouts=timeouts)
    opened.append(imap)
    steps.append("login")
    await imap.login(A, PASSWORD)
    steps.append("select")
    await imap.select("INBOX")
    steps.append("idle")
    await imap.idle_start()
    steps.append("done")
    await imap.idle_done()
    steps.append("noop")
    await imap.noop()
    steps.append("all")


async def test_cancelling_a_session_at_any_moment_leaves_nothing_behind(
    server: ImapTestServer,
) -> None:
    seed = int(os.environ.get("CHAOS_SEED") or random.randrange(2**32))
    rng = random.Random(seed)
    print(f"CHAOS_SEED={seed}")  # replay: the same cancellation moments (timing permitting)
    server.add_user(A, PASSWORD)
    server.append(A, b"Subject: x\r\n\r\ny\r\n")
    conn = mail_connection("c", user_id=None, email=A, port=server.port, password=PASSWORD)
    timeouts = ImapTimeouts(connect=5, command=5, keepalive_idle=60)
    reached: dict[str, int] = {}
    async with trio_asyncio.open_loop():
        # how long a whole session takes here, to spread the cancellation over all of it
        start = trio.current_time()
        with trio.fail_after(10):
            first: list[ImapConnection] = []
            await whole_session(conn, timeouts, first, [])
            await first[0].logout(1.0)
        span = trio.current_time() - start
        for _ in range(ROUNDS):
            opened: list[ImapConnection] = []
            steps: list[str] = []
            with trio.move_on_after(rng.uniform(0, span)):
                await whole_session(conn, timeouts, opened, steps)
            reached[steps[-1]] = reached.get(steps[-1], 0) + 1
            if opened:  # as run_session does: LOGOUT (shielded, bounded), then close
                with trio.CancelScope(shield=True):
                    await opened[0].logout(0.5)
            if rng.random() < 0.2:
                gc.collect()
        gc.collect()
        for _ in range(10):
            await trio.lowlevel.checkpoint()  # a crash report would surface here
    print(f"cancelled in: {reached}")
    assert len(reached) >= 4, f"cancellation did not spread: {reached} (CHAOS_SEED={seed})"


async def test_an_ended_connection_is_freed_without_a_garbage_collection(
    server: ImapTestServer,
) -> None:
    # Full collections are rare (trio_idle/core/gc_policy.py): what an ended connection held
    # must go with its last reference, not wait for one.
    import weakref

    server.add_user(A, PASSWORD)
    conn = mail_connection("c", user_id=None, email=A, port=server.port, password=PASSWORD)
    timeouts = ImapTimeouts(connect=5, command=5, keepalive_idle=60)
    for end in ("logout", "abort", "server-close"):
        imap = await connect(conn, security="plain", context=None, timeouts=timeouts)
        await imap.login(A, PASSWORD)
        await imap.select("INBOX")
        await imap.idle_start()
        await imap.restart_idle(noop=True)
        protocol = weakref.ref(imap.protocol)
        gc.disable()
        try:
            if end == "logout":
                await imap.logout(2)
            elif end == "abort":
                imap.abort()
            else:
                server.drop(A, "fin")
                with trio.fail_after(5):
                    await imap.wait()
                imap.abort()
            del imap
            assert protocol() is None, f"{end}: the protocol outlived its connection"
        finally:
            gc.enable()
