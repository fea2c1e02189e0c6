"""``ImapConnection.notify_set`` and ``check_folders`` under NOTIFY, byte for byte, on an
in-memory wire that answers each command line as a server would."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import cast

import trio

from trio_idle.imap.aioimap import SELECTED, ImapProtocol
from trio_idle.imap.client import ImapConnection, ImapTimeouts
from trio_idle.imap.framing import DEFAULT_LIMITS
from trio_idle.imap.push_monitor import PushMonitor
from trio_idle.imap.responses import MailboxState
from trio_idle.net.transport import ImapTransport

NOTIFY_LINE = (
    b"NOTIFY SET (selected (MessageNew MessageExpunge)) "
    b'(mailboxes ("Junk" "[Gmail]/Spam") (MessageNew MessageExpunge))'
)


class AnsweringWire:
    """The socket in memory: each command line written is answered by ``answer(tag,
    rest)`` (the bytes the server sends back, read by the next read). The reader waits
    on :attr:`socket`, one end of a socket pair that is always readable."""

    unsent = False

    def __init__(self, answer: Callable[[bytes, bytes], bytes]) -> None:
        self.answer = answer
        self.lines: list[bytes] = []
        self.incoming: list[bytes] = []
        self.closed = False
        self.socket, self._peer = socket.socketpair()
        self._peer.send(b"x")  # never read: every wait for the socket returns at once

    def write(self, data: bytes) -> None:
        for line in data.split(b"\r\n"):
            if line:
                self.lines.append(line)
                tag, _, rest = line.partition(b" ")
                self.incoming.append(self.answer(tag, rest))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            trio.lowlevel.notify_closing(self.socket)
            self.socket.close()
            self._peer.close()

    def is_closing(self) -> bool:
        return self.closed

    def receive_nowait(self) -> bytes:
        return self.incoming.pop(0) if self.incoming else b""


def selected(wire: AnsweringWire, *capabilities: str) -> ImapConnection:
    monitor = PushMonitor()
    protocol = ImapProtocol(monitor, DEFAULT_LIMITS)
    protocol.connection_made(wire)
    protocol.data_received(b"* OK ready\r\n")
    protocol.state = SELECTED
    protocol.add_capabilities({"IMAP4rev1", "IDLE", *capabilities})
    monitor.exists = 0
    timeouts = ImapTimeouts(connect=5, command=30, keepalive_idle=60)
    return ImapConnection(protocol, monitor, timeouts, cast(ImapTransport, wire))


async def test_notify_set_sends_the_rfc_5465_line_and_watches_the_folders() -> None:
    wire = AnsweringWire(lambda tag, rest: tag + b" OK NOTIFY completed\r\n")
    imap = selected(wire, "NOTIFY")
    with trio.fail_after(5):
        answer = await imap.notify_set(["Junk", "[Gmail]/Spam"])
    assert answer.in_effect and not answer.refused
    (line,) = wire.lines
    assert line.partition(b" ")[2] == NOTIFY_LINE
    assert imap.monitor.notify is not None
    assert imap.monitor.notify.folders == {"Junk", "[Gmail]/Spam"}


async def test_a_refused_notify_says_why_and_watches_nothing() -> None:
    wire = AnsweringWire(lambda tag, rest: tag + b" NO [BADEVENT] (MessageNew)\r\n")
    imap = selected(wire, "NOTIFY")
    with trio.fail_after(5):
        answer = await imap.notify_set(["Junk"])
    assert not answer.in_effect and answer.refused
    assert answer.why == "refused: NO [BADEVENT] (MessageNew)"
    assert imap.monitor.notify is None


async def test_nothing_is_sent_without_the_capability_or_with_a_name_that_cannot_be_quoted() -> (
    None
):
    wire = AnsweringWire(lambda tag, rest: tag + b" OK\r\n")
    with trio.fail_after(5):
        assert (await selected(wire).notify_set(["Junk"])).why == "not announced"
        imap = selected(wire, "NOTIFY")
        answer = await imap.notify_set(["Junk", "x\r\nA1 DELETE INBOX"])
    assert not answer.in_effect and not answer.refused
    assert wire.lines == [] and imap.monitor.notify is None


async def test_a_push_inside_a_status_answer_is_not_taken_for_the_folder_asked_about() -> None:
    def answer(tag: bytes, rest: bytes) -> bytes:
        if rest.startswith(b"NOTIFY"):
            return tag + b" OK\r\n"
        assert rest == b'STATUS "Archive" (UIDNEXT UIDVALIDITY)'
        # Junk's push comes first, inside the answer to STATUS Archive
        return (
            b"* STATUS Junk (MESSAGES 4 UIDNEXT 40 UNSEEN 1)\r\n"
            b"* STATUS Archive (UIDNEXT 5 UIDVALIDITY 2)\r\n" + tag + b" OK\r\n"
        )

    wire = AnsweringWire(answer)
    imap = selected(wire, "NOTIFY")
    with trio.fail_after(5):
        await imap.notify_set(["Junk", "Archive"])
        found = await imap.check_folders(["Archive"])
    assert found == {"Archive": MailboxState(None, 5, 2)}
    assert imap.monitor.notify is not None
    assert imap.monitor.notify.take() == {
        "Junk": MailboxState(4, 40),
        "Archive": MailboxState(None, 5, 2),  # the answer itself: same state, harmless
    }
