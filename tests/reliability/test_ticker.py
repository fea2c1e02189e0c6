"""The process ticker writes every session's tick (DONE, NOOP, IDLE in one write) and the
session's reads take the answers: each way the server can answer ends the same as when
the session ran the tick itself — a refusal or silence names the command and costs one
reconnect, a server that will not take a pipelined IDLE keeps its session, mail found by
the NOOP is the tick's.

Each daemon test plays one server on a scripted socket (loopback) next to a healthy
mailbox on the IMAP test server; the ticker's own counter (``idle_restarts{by}``) shows
which path ran. The connection-level tests at the end drive one connection both ways (the
ticker's :meth:`begin_restart`, the session's :meth:`restart_idle`) against the same
script: the same answers end the same way.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import pytest
import trio

from tests.fixtures import mail_connection
from tests.harness import ListSource, row, running_daemon
from tests.reliability.rig import Rig
from tests.reliability.scripted_server import Peer, ScriptedServer
from trio_idle.core.config import Settings
from trio_idle.core.errors import ConnectionLost, ImapError
from trio_idle.imap.client import ImapConnection, ImapTimeouts
from trio_idle.imap.connect import connect

A = "alice@rel.test"
T = "ticked@rel.test"


@attrs.define
class TickServer:
    """A scripted server that idles, answers the client's ticks, and records them."""

    #: refuse (BAD) an IDLE that arrived in the same read as the DONE before it
    refuse_pipelined_idle: bool = False
    #: the tagged answer to every NOOP ("OK" or e.g. "NO")
    noop_answer: bytes = b"OK"
    #: answer the n-th DONE (1-based) never: a half-open server during a tick
    silent_at_done: int | None = None
    #: answer the n-th NOOP (1-based) never
    silent_at_noop: int | None = None
    #: untagged lines to send with the next NOOP's answer
    noop_untagged: list[bytes] = attrs.Factory(list)
    dones: int = 0
    noops: int = 0
    pipelined_idles: int = 0
    refused_idles: int = 0
    idles_alone: int = 0
    #: a line to push during IDLE, sent by the script's pusher
    push: trio.MemorySendChannel[bytes] | None = None
    _changed: trio.Event = attrs.Factory(trio.Event)

    def _note(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._changed.wait()

    async def script(self, peer: Peer) -> None:
        await peer.login_and_select()
        idle_tag = await peer.expect_idle()
        await peer.send(b"+ idling\r\n")
        pipelined = False
        send, receive = trio.open_memory_channel[bytes](10)
        self.push = send
        async with trio.open_nursery() as nursery:

            async def pusher() -> None:
                async for line in receive:
                    await peer.send(line)

            nursery.start_soon(pusher)
            while True:
                try:
                    line = await peer.line()
                except EOFError:  # the client hung up (LOGOUT, or its next session)
                    nursery.cancel_scope.cancel()
                    return
                if line == b"DONE":
                    self.dones += 1
                    if self.silent_at_done == self.dones:
                        await trio.sleep_forever()
                    pipelined = b"IDLE" in bytes(peer._buf)
                    await peer.send(idle_tag + b" OK IDLE terminated\r\n")
                    continue
                tag, _, rest = line.partition(b" ")
                name = rest.split(b" ", 1)[0].upper()
                if name == b"NOOP":
                    self.noops += 1
                    if self.silent_at_noop == self.noops:
                        await trio.sleep_forever()
                    untagged = b"".join(u + b"\r\n" for u in self.noop_untagged)
                    self.noop_untagged.clear()
                    await peer.send(untagged + tag + b" " + self.noop_answer + b" NOOP done\r\n")
                elif name == b"IDLE":
                    if pipelined:
                        self.pipelined_idles += 1
                    else:
                        self.idles_alone += 1
                    if pipelined and self.refuse_pipelined_idle:
                        self.refused_idles += 1
                        await peer.send(tag + b" BAD IDLE must come alone\r\n")
                        pipelined = False
                        continue
                    idle_tag = tag
                    pipelined = False
                    await peer.send(b"+ idling\r\n")
                    self._note()
                else:
                    await peer.send(tag + b" BAD unexpected\r\n")


async def _start(
    rig: Rig, nursery: trio.Nursery, server: TickServer, **env: str
) -> tuple[ScriptedServer, ListSource, Settings]:
    """The scripted server for mailbox T beside the healthy A; ticks every second."""
    scripted = ScriptedServer(server.script)
    await nursery.start(scripted.serve)
    source = rig.source(A)
    source.rows.append(row(T, T, "x", scripted.port))
    return scripted, source, rig.settings(TRIO_IDLE_TICK_INTERVAL="1s", **env)


async def test_pipelined_idle_refused_is_sent_alone_and_the_session_keeps_idling(
    rig: Rig, nursery: trio.Nursery
) -> None:
    tick = TickServer(refuse_pipelined_idle=True)
    scripted, source, settings = await _start(rig, nursery, tick, TRIO_IDLE_COMMAND_TIMEOUT="2s")
    async with running_daemon(settings, source) as daemon:
        with trio.fail_after(15):
            await rig.idle(A)
            # refused once, then every tick without pipelining
            await tick.wait_until(lambda: tick.idles_alone >= 3)
        assert tick.refused_idles == 1 and tick.pipelined_idles == 1
        assert scripted.connections == 1  # no reconnect: the refusal cost nothing
        assert daemon.stats.get("idle_restarts", "ticker") >= 1
        assert daemon.stats.get("idle_restarts", "session") >= 1  # pipelining is off now
        assert tick.push is not None
        await tick.push.send(b"* 1 EXISTS\r\n")
        with trio.fail_after(10):
            await rig.log(f"[idle/{T}] exists-event received (new mail)")
        assert not rig.logs.matching(f"[idle/{T}] connection lost")
        assert daemon.stats.get("internal_errors") == 0


async def test_noop_refused_during_a_tick_names_it_and_reconnects(
    rig: Rig, nursery: trio.Nursery
) -> None:
    tick = TickServer(noop_answer=b"NO")
    scripted, source, settings = await _start(rig, nursery, tick, TRIO_IDLE_COMMAND_TIMEOUT="2s")
    async with running_daemon(settings, source) as daemon:
        with trio.fail_after(15):
            line = (await rig.log(f"[idle/{T}] connection lost"))[0]
            await scripted.wait_connections(2)
        assert line.endswith("connection lost: NOOP failed: NO")
        assert daemon.stats.get("idle_restarts", "ticker") >= 1
        assert daemon.stats.get("internal_errors") == 0


async def test_done_unanswered_during_a_tick_is_a_dead_connection(
    rig: Rig, nursery: trio.Nursery
) -> None:
    tick = TickServer(silent_at_done=1)
    scripted, source, settings = await _start(rig, nursery, tick, TRIO_IDLE_COMMAND_TIMEOUT="1s")
    async with running_daemon(settings, source) as daemon:
        with trio.fail_after(15):
            line = (await rig.log(f"[idle/{T}] connection lost"))[0]
            await scripted.wait_connections(2)  # the next session starts
        assert line.endswith("connection lost: no answer to DONE within 1s")
        assert daemon.stats.get("idle_restarts", "ticker") >= 1
        assert daemon.stats.get("disconnects") >= 1
        # the healthy mailbox never noticed
        assert rig.handle(daemon, A).memory.sessions == 1


async def test_mail_in_the_noop_answer_is_the_ticks(rig: Rig, nursery: trio.Nursery) -> None:
    tick = TickServer(noop_untagged=[b"* 1 EXISTS"])
    scripted, source, settings = await _start(rig, nursery, tick)
    async with running_daemon(settings, source) as daemon:
        with trio.fail_after(15):
            await rig.log(f"[idle/{T}] tick: 1 new message(s) found")
        assert daemon.stats.get("exists_events", "tick") == 1
        assert daemon.stats.get("exists_events", "exists") == 0
        assert daemon.stats.get("idle_restarts", "ticker") >= 1
        assert scripted.connections == 1


# -- one connection, both ways: the ticker's restart and the session's -------------------


async def _idling(
    nursery: trio.Nursery, server: TickServer, command_timeout: float = 5
) -> ImapConnection:
    """A real connection to ``server``'s script, logged in, selected and idling."""
    scripted = ScriptedServer(server.script)
    await nursery.start(scripted.serve)
    conn = mail_connection("t", user_id=None, email=T, port=scripted.port, password="x")
    timeouts = ImapTimeouts(connect=5, command=command_timeout, keepalive_idle=60)
    imap = await connect(conn, security="plain", context=None, timeouts=timeouts)
    await imap.login(T, "x")
    await imap.select("INBOX")
    await imap.idle_start()
    return imap


async def test_a_restart_the_session_runs_resends_a_refused_pipelined_idle_alone(
    nursery: trio.Nursery,
) -> None:
    tick = TickServer(refuse_pipelined_idle=True)
    imap = await _idling(nursery, tick)
    try:
        with trio.fail_after(10):
            await imap.restart_idle(noop=True)  # refused with DONE and NOOP: sent alone
            assert (tick.pipelined_idles, tick.refused_idles, tick.idles_alone) == (1, 1, 1)
            # pipelining is off for this connection: the ticker hands its restarts back,
            # and the session writes IDLE once NOOP is answered
            assert imap.begin_restart(noop=True) is None
            await imap.restart_idle(noop=True)
            assert (tick.pipelined_idles, tick.refused_idles, tick.idles_alone) == (1, 1, 2)
            await imap.restart_idle(noop=False)  # a renewal: DONE, then IDLE alone
            assert (tick.dones, tick.noops, tick.idles_alone) == (3, 2, 3)
    finally:
        imap.abort()


@pytest.mark.parametrize("by", ["ticker", "session"])
async def test_a_refused_noop_is_the_same_error_whoever_wrote_the_tick(
    nursery: trio.Nursery, by: str
) -> None:
    imap = await _idling(nursery, TickServer(noop_answer=b"NO"))
    try:
        with trio.fail_after(10):
            if by == "session":
                with pytest.raises(ImapError) as caught:
                    await imap.restart_idle(noop=True)
                error: ImapError | None = caught.value
            else:
                assert imap.begin_restart(noop=True) is not None
                await imap.wait()  # the session's read takes the answers; woken by the NO
                error = imap.monitor.failure
        assert type(error) is ImapError and str(error) == "NOOP failed: NO"
    finally:
        imap.abort()


async def test_the_session_follows_the_tickers_restart_first_and_raises_its_failure(
    nursery: trio.Nursery,
) -> None:
    # the ticker wrote a tick, then handed the next restart back before the answers came
    imap = await _idling(nursery, TickServer(noop_answer=b"NO"))
    try:
        assert imap.begin_restart(noop=True) is not None
        with trio.fail_after(10), pytest.raises(ImapError, match=r"^NOOP failed: NO$"):
            await imap.restart_idle(noop=False)
    finally:
        imap.abort()


@pytest.mark.parametrize(
    ("by", "unanswered"), [("ticker", "DONE"), ("session", "DONE"), ("session", "NOOP")]
)
async def test_an_unanswered_tick_names_the_command_whoever_wrote_it(
    nursery: trio.Nursery, by: str, unanswered: str
) -> None:
    silent = TickServer(silent_at_done=1) if unanswered == "DONE" else TickServer(silent_at_noop=1)
    imap = await _idling(nursery, silent, command_timeout=0.5)
    try:
        with trio.fail_after(10):
            if by == "session":
                with pytest.raises(ConnectionLost) as caught:
                    await imap.restart_idle(noop=True)
                error: ImapError | None = caught.value
            else:
                number = imap.begin_restart(noop=True)
                assert number is not None
                imap.check_restart(number)  # the ticker's check, when the answers are due
                await imap.wait()
                error = imap.monitor.failure
        assert str(error) == f"no answer to {unanswered} within 0.5s"
    finally:
        imap.abort()
