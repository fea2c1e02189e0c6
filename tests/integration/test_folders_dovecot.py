"""Against real Dovecot: ``\\Junk`` resolves to the folder Dovecot marks ``\\Junk`` (named
Spamverdacht here, so no provider's fallback name finds it), and mail filed there is
scanned with ``folder``, checked with STATUS on the IDLE connection. Dovecot 2.3
announces NOTIFY, used by default (tests/integration/test_notify_dovecot.py): here it is
switched off (``TRIO_IDLE_NOTIFY=off``), the STATUS path servers without NOTIFY get."""

from __future__ import annotations

import imaplib
from collections.abc import Awaitable, Callable

import pytest
import trio
from trio_idle_testing.backend import ScanBackend

from tests.harness import ListSource, LogCapture, make_settings, row, running_daemon
from tests.servers.dovecot import DovecotServer
from trio_idle.mailbox.session_states import IDLE


def _create(dovecot: DovecotServer, user: str, password: str, folder: str) -> None:
    with imaplib.IMAP4(dovecot.host, dovecot.plain_port, timeout=10) as imap:
        imap.login(user, password)
        typ, _ = imap.create(folder)
        assert typ == "OK"
        imap.logout()


async def test_mail_filed_into_dovecots_junk_is_scanned_with_its_folder(
    dovecot: DovecotServer, backend: ScanBackend, logs: LogCapture
) -> None:
    user = dovecot.new_user("folders")
    _create(dovecot, user.email, user.password, "Spamverdacht")
    await dovecot.aappend(user.email, user.password, b"Subject: old\r\n\r\nold\r\n", "Spamverdacht")
    settings = make_settings(
        backend.url,
        TRIO_IDLE_IMAP_SECURITY="plain",
        TRIO_IDLE_FOLDERS="INBOX,\\Junk",
        TRIO_IDLE_TICK_INTERVAL="1s",
        TRIO_IDLE_NOTIFY="off",
    )
    source = ListSource([row("folders", user.email, user.password, dovecot.plain_port)])
    async with running_daemon(settings, source):
        with trio.fail_after(20):
            await logs.wait_for(f"[idle/{user.email}] connected")
            await dovecot.wait_for_connections(user.email, 1)
            uid = await dovecot.aappend(
                user.email, user.password, b"Subject: spam\r\n\r\nbuy\r\n", "Spamverdacht"
            )
            await backend.wait_for_requests(1, email=user.email, finished=True)
    (scan,) = (r.body for r in backend.requests_for(user.email))
    assert scan["folder"] == "Spamverdacht" and scan["mailbox"] == "Spamverdacht"
    assert scan["reason"] == "tick" and scan["sinceUid"] == uid == 2
    assert logs.matching("not found on the server") == []


class _HoldingRelay:
    """A TCP relay to Dovecot that, when :attr:`hold` is set, runs it before forwarding
    the client's first command after an ``EXAMINE``: the test changes INBOX at a known
    point of the visit (Junk selected, the SELECT back not sent yet)."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.port = 0
        self.hold: Callable[[], Awaitable[object]] | None = None
        self.examines = 0

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listener.socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._relay, [listener])

    async def _relay(self, client: trio.SocketStream) -> None:
        server = await trio.open_tcp_stream("127.0.0.1", self.target)
        async with client, server, trio.open_nursery() as nursery:
            nursery.start_soon(self._copy, server, client)
            await self._commands(client, server)
            nursery.cancel_scope.cancel()

    async def _copy(self, source: trio.SocketStream, sink: trio.SocketStream) -> None:
        while data := await source.receive_some(65536):
            await sink.send_all(data)

    async def _commands(self, client: trio.SocketStream, server: trio.SocketStream) -> None:
        buffer, after_examine = b"", False
        while data := await client.receive_some(65536):
            buffer += data
            while b"\r\n" in buffer:
                line, buffer = buffer.split(b"\r\n", 1)
                if after_examine and self.hold is not None:
                    hold, self.hold = self.hold, None
                    await hold()
                after_examine = b" EXAMINE " in line.upper()
                self.examines += after_examine
                await server.send_all(line + b"\r\n")


@pytest.mark.parametrize(("notify", "junk_reason"), [("off", "tick"), ("auto", "exists")])
async def test_a_junk_scan_lists_dovecots_envelopes_and_inbox_mail_meanwhile_is_scanned(
    dovecot: DovecotServer,
    backend: ScanBackend,
    logs: LogCapture,
    nursery: trio.Nursery,
    notify: str,
    junk_reason: str,
) -> None:
    """The visit (EXAMINE Junk, UID FETCH, SELECT back) on both paths that find Junk's
    mail: the STATUS check on the tick, and Dovecot's NOTIFY push (reason ``exists``)."""
    user = dovecot.new_user("folderenv")
    _create(dovecot, user.email, user.password, "Spamverdacht")
    for _ in range(2):  # Junk holds more than INBOX: its EXISTS would look like new mail
        await dovecot.aappend(
            user.email, user.password, b"Subject: old\r\n\r\nx\r\n", "Spamverdacht"
        )
    relay = _HoldingRelay(dovecot.plain_port)
    await nursery.start(relay.serve)
    settings = make_settings(
        backend.url,
        TRIO_IDLE_IMAP_SECURITY="plain",
        TRIO_IDLE_FOLDERS="INBOX,\\Junk",
        TRIO_IDLE_TICK_INTERVAL="1s",
        TRIO_IDLE_SCAN_ENVELOPES="true",
        TRIO_IDLE_NOTIFY=notify,
    )
    source = ListSource([row("folderenv", user.email, user.password, relay.port)])

    async def inbox_mail() -> None:
        mail = b"From: Ann <ann@example.net>\r\nSubject: hello\r\n\r\nhi\r\n"
        await dovecot.aappend(user.email, user.password, mail)

    async with running_daemon(settings, source):
        with trio.fail_after(30):
            await logs.wait_for(f"[idle/{user.email}] connected")
            await dovecot.wait_for_connections(user.email, 1)
            # Junk mail with an INBOX message: Junk's "* 2 EXISTS" is not INBOX mail
            await dovecot.aappend(user.email, user.password, b"Subject: old\r\n\r\nx\r\n")
            await logs.wait_for(f"[idle/{user.email}] exists-event received (new mail)")
            await backend.wait_for_requests(1, email=user.email, finished=True)
            relay.hold = inbox_mail
            spam = b"From: Casino <win@casino.example>\r\nSubject: Free spins!\r\n\r\nbet\r\n"
            uid = await dovecot.aappend(user.email, user.password, spam, "Spamverdacht")
            await backend.wait_for_requests(3, email=user.email, finished=True)
            assert relay.examines == 1 and relay.hold is None  # INBOX mail came meanwhile
            # INBOX's count and range are right after the visit: the next mail is UID 3
            await dovecot.aappend(user.email, user.password, b"Subject: later\r\n\r\nx\r\n")
            await backend.wait_for_requests(4, email=user.email, finished=True)
    bodies = [r.body for r in backend.requests_for(user.email)]
    (junk,) = [b for b in bodies if b.get("folder") == "Spamverdacht"]
    assert junk["reason"] == junk_reason and junk["sinceUid"] == uid == 3
    ((listed),) = junk["messages"]
    assert listed["uid"] == uid and listed["subject"] == "Free spins!"
    assert listed["from"] == {"name": "Casino", "address": "win@casino.example"}
    first, second, third = [b for b in bodies if "folder" not in b]
    assert first["sinceUid"] == 1
    assert second["reason"] == "exists" and second["sinceUid"] == 2
    assert [m["subject"] for m in second["messages"]] == ["hello"]
    assert third["sinceUid"] == 3 and [m["subject"] for m in third["messages"]] == ["later"]
    assert logs.matching("connection lost") == []


async def test_with_folder_watch_idle_dovecots_junk_is_pushed_on_its_own_connection(
    dovecot: DovecotServer, backend: ScanBackend, logs: LogCapture
) -> None:
    """``TRIO_IDLE_FOLDER_WATCH=idle``: Spamverdacht gets an IDLE connection of its own
    (EXAMINE), and mail delivered into it is scanned at once, with no tick (1 h)."""
    user = dovecot.new_user("folderidle")
    _create(dovecot, user.email, user.password, "Spamverdacht")
    await dovecot.aappend(user.email, user.password, b"Subject: old\r\n\r\nold\r\n", "Spamverdacht")
    settings = make_settings(
        backend.url,
        TRIO_IDLE_IMAP_SECURITY="plain",
        TRIO_IDLE_FOLDERS="INBOX,\\Junk",
        TRIO_IDLE_FOLDER_WATCH="idle",
        TRIO_IDLE_TICK_INTERVAL="1h",
        TRIO_IDLE_SCAN_ENVELOPES="true",
    )
    source = ListSource([row("folderidle", user.email, user.password, dovecot.plain_port)])
    async with running_daemon(settings, source) as daemon:
        with trio.fail_after(20):
            await logs.wait_for(f"[idle/{user.email}] folder Spamverdacht: connected")
            await dovecot.wait_for_connections(user.email, 2)
            folders = daemon.reconciler.handles["folderidle"].memory.folders
            # Dovecot confirmed the folder's IDLE (its state is set on "+ idling"); only
            # polled: the session says nothing when it enters IDLE
            while (f := folders.by_name.get("Spamverdacht")) is None or f.state != IDLE:  # noqa: ASYNC110
                await trio.sleep(0.02)
            uid = await dovecot.aappend(
                user.email, user.password, b"Subject: spam\r\n\r\nbuy\r\n", "Spamverdacht"
            )
            await backend.wait_for_requests(1, email=user.email, finished=True)
            await logs.wait_for(f"[idle/{user.email}] folder Spamverdacht: exists-event received")
    (scan,) = (r.body for r in backend.requests_for(user.email))
    assert scan["folder"] == "Spamverdacht" and scan["mailbox"] == "Spamverdacht"
    assert scan["reason"] == "exists" and scan["sinceUid"] == uid == 2
    assert [m["subject"] for m in scan["messages"]] == ["spam"]
    assert logs.matching("not found on the server") == []
