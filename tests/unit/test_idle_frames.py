"""What an idle session keeps while it sleeps: its coroutine frames (issue 27).

Every frame of ours on an idle session's stack is held by every idle session, for as long
as it idles (10,000 sessions: 10,000 of each), and every one of them is resumed on each
keepalive line. The read path sleeps in :meth:`ImapConnection.wait` itself (on the socket,
``trio.lowlevel.wait_readable``), and the session in ``run_session`` → ``_watch``. Real
sockets (a socket pair) for the connection; the session on the scripted server of the
virtual-clock rig.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import trio
import trio.testing
from trio_idle_testing.fake_imap import FakeImapServer

from tests.unit.session_rig import Rig, connected_session, make_rig
from trio_idle.imap.aioimap import SELECTED, ImapProtocol
from trio_idle.imap.client import ImapConnection, ImapTimeouts
from trio_idle.imap.framing import DEFAULT_LIMITS
from trio_idle.imap.push_monitor import PushMonitor
from trio_idle.net.transport import ImapTransport


def our_frames(task: trio.lowlevel.Task, package: str = "/trio_idle/") -> list[str]:
    """The names of the coroutine frames of ``package`` on ``task``'s stack, outermost
    first (while it sleeps)."""

    def chain() -> Iterator[Any]:
        coro: Any = task.coro
        while coro is not None:
            yield coro
            coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)

    return [
        c.cr_code.co_name if hasattr(c, "cr_code") else c.gi_code.co_name
        for c in chain()
        if package in (c.cr_code if hasattr(c, "cr_code") else c.gi_code).co_filename
    ]


async def idling(server: socket.socket, client: socket.socket) -> ImapConnection:
    """A connection over ``client``, selected and idling (the server end: ``server``)."""
    monitor = PushMonitor()
    protocol = ImapProtocol(monitor, DEFAULT_LIMITS)
    transport = ImapTransport(client)
    protocol.connection_made(transport)
    protocol.data_received(b"* OK ready\r\n")
    protocol.state = SELECTED
    protocol.add_capabilities({"IDLE"})
    monitor.exists = 3
    imap = ImapConnection(protocol, monitor, ImapTimeouts(5, 30, 60), transport)
    server.send(b"+ idling\r\n")
    with trio.fail_after(5):
        await imap.idle_start()
    assert server.recv(100).endswith(b" IDLE\r\n")
    return imap


async def test_an_idle_connection_sleeps_on_its_socket_in_one_frame_of_ours() -> None:
    server, client = socket.socketpair()
    with server:
        imap = await idling(server, client)
        woken: list[int] = []
        task: trio.lowlevel.Task | None = None

        async def session() -> None:
            nonlocal task
            task = trio.lowlevel.current_task()
            await imap.wait()
            woken.append(imap.monitor.new_mail)

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(session)
                await trio.testing.wait_all_tasks_blocked()
                assert task is not None
                assert our_frames(task) == ["wait"]
                # a keepalive is read and parsed, and the session sleeps on: same frames
                parsed = trio.Event()
                imap.protocol.after_parse = parsed.set
                server.send(b"* OK Still here\r\n")
                await parsed.wait()
                await trio.testing.wait_all_tasks_blocked()
                assert not woken and our_frames(task) == ["wait"]
                server.send(b"* 4 EXISTS\r\n")
        assert woken == [1]
        imap.abort()


async def test_a_cancelled_wait_loses_no_byte_and_a_close_wakes_it() -> None:
    server, client = socket.socketpair()
    with server:
        imap = await idling(server, client)
        with trio.move_on_after(0.01):
            await imap.wait()  # nothing came: cancelled in the wait, nothing read
        server.send(b"* 4 EXISTS\r\n")
        with trio.fail_after(5):
            await imap.wait()
        assert imap.monitor.take_new_mail() == 1
        async with trio.open_nursery() as nursery:
            nursery.start_soon(imap.wait)
            await trio.testing.wait_all_tasks_blocked()
            imap.transport.close()  # what the ticker's check_restart does on a timeout
        assert imap.monitor.lost == "closed by server"


async def test_an_idle_session_sleeps_in_run_session_and_watch(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rig: Rig = make_rig()
    server: FakeImapServer = rig.server
    async with connected_session(rig):
        assert server.link.idling
        root = trio.lowlevel.current_root_task()
        assert root is not None
        (task,) = [t for t in _all_tasks(root) if t.coro.cr_code.co_name == "run_session"]
        assert our_frames(task, "/trio_idle/mailbox/") == ["run_session", "_watch"]


def _all_tasks(task: trio.lowlevel.Task) -> Iterator[trio.lowlevel.Task]:
    yield task
    for nursery in task.child_nurseries:
        for child in nursery.child_tasks:
            yield from _all_tasks(child)
