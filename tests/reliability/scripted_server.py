"""A raw TCP "IMAP server" that plays a script, for misbehaviour ImapTestServer cannot show
(a BYE greeting, a close in the middle of the handshake, protocol garbage)."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable

import trio

Script = Callable[["Peer"], Awaitable[None]]


class Peer:
    """One client connection as seen by a script: read lines, send bytes."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._buf = bytearray()

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def line(self) -> bytes:
        """The next line without CRLF; raises EOFError when the client closed."""
        while (end := self._buf.find(b"\r\n")) < 0:
            data = await self.stream.receive_some(4096)
            if not data:
                raise EOFError
            self._buf += data
        line = bytes(self._buf[:end])
        del self._buf[: end + 2]
        return line

    async def command(self) -> tuple[bytes, bytes]:
        """The next command as (tag, upper-cased name)."""
        parts = (await self.line()).split(b" ", 2)
        return parts[0], (parts[1].upper() if len(parts) > 1 else b"")

    async def login_and_select(self) -> None:
        """Greet, then answer CAPABILITY, LOGIN and SELECT like a tiny healthy server."""
        await self.send(b"* OK [CAPABILITY IMAP4rev1 IDLE] scripted server ready\r\n")
        while True:
            tag, name = await self.command()
            if name == b"CAPABILITY":
                await self.send(b"* CAPABILITY IMAP4rev1 IDLE\r\n" + tag + b" OK done\r\n")
            elif name == b"LOGIN":
                await self.send(tag + b" OK LOGIN completed\r\n")
            elif name == b"SELECT":
                await self.send(
                    b"* 0 EXISTS\r\n* OK [UIDVALIDITY 7] ok\r\n* OK [UIDNEXT 1] ok\r\n"
                    + tag
                    + b" OK [READ-WRITE] SELECT completed\r\n"
                )
                return
            else:
                await self.send(tag + b" BAD unexpected\r\n")

    async def expect_idle(self) -> bytes:
        """The tag of the next command, which must be IDLE. A LOGOUT instead (the daemon
        shut down before this session reached IDLE: a test ending while the mailbox
        reconnects) is answered and ends the script, as a hang-up would."""
        tag, name = await self.command()
        if name == b"LOGOUT":
            await self.send(b"* BYE bye\r\n" + tag + b" OK LOGOUT completed\r\n")
            raise EOFError
        assert name == b"IDLE", name
        return tag


class ScriptedServer:
    """Listens on 127.0.0.1; every connection runs ``script(peer)``, then is closed."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.port = 0
        self.connections = 0
        self._changed = trio.Event()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        self._changed.set()
        self._changed = trio.Event()
        async with stream:
            with contextlib.suppress(EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
                await self.script(Peer(stream))

    async def wait_connections(self, n: int) -> None:
        while self.connections < n:
            await self._changed.wait()
