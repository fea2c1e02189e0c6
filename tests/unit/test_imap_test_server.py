"""Tests of the in-process IMAP test server (trio_idle_testing), over real sockets.

Clients are python's ``imaplib`` (in a worker thread), ``aioimaplib`` (asyncio in a worker
thread) and raw trio streams. Every wait is bounded by ``trio.fail_after``; the few places
that prove *absence* of output (silent peers) wait a short bounded window on purpose.
"""

from __future__ import annotations

import asyncio
import base64
import imaplib
import resource
import ssl
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import aioimaplib
import pytest
import trio
import trustme
from trio_idle_testing import ImapTestServer, ParseError, parse_command
from trio_idle_testing.imap_parser import (
    CommandFramer,
    CommandLine,
    NeedContinuation,
    parse_sequence_set,
)

from tests.conftest import unavailable

USER = "a@x.test"
PASSWORD = "pw"
GREETING_TEXT = b"trio-idle test server ready"
MSG = b"Subject: hi\r\nFrom: x@y.test\r\n\r\nbody\r\n"
T = TypeVar("T")


# ---------------------------------------------------------------------------------------
# helpers


class RawClient:
    """Minimal line-oriented IMAP client on a trio stream."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buf = bytearray()
        self.tag_no = 0

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def readline(self) -> bytes:
        while True:
            end = self.buf.find(b"\r\n")
            if end >= 0:
                line = bytes(self.buf[:end])
                del self.buf[: end + 2]
                return line
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError(bytes(self.buf))
            self.buf += data

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def command(self, text: str) -> tuple[list[bytes], bytes]:
        """Send a tagged command; return (untagged lines, tagged line)."""
        self.tag_no += 1
        tag = f"t{self.tag_no}".encode()
        await self.send(tag + b" " + text.encode() + b"\r\n")
        untagged: list[bytes] = []
        while True:
            line = await self.readline()
            if line.startswith(tag + b" "):
                return untagged, line
            untagged.append(line)

    async def login_select(self, user: str = USER, password: str = PASSWORD) -> None:
        greeting = await self.readline()
        assert greeting.startswith(b"* OK")
        _, tagged = await self.command(f'LOGIN {user} "{password}"')
        assert b" OK " in tagged, tagged
        _, tagged = await self.command("SELECT INBOX")
        assert b" OK " in tagged, tagged

    async def idle(self) -> bytes:
        self.tag_no += 1
        tag = f"t{self.tag_no}".encode()
        await self.send(tag + b" IDLE\r\n")
        assert await self.readline() == b"+ idling"
        return tag

    async def done(self, tag: bytes) -> list[bytes]:
        await self.send(b"DONE\r\n")
        lines: list[bytes] = []
        while True:
            line = await self.readline()
            if line.startswith(tag + b" "):
                assert line == tag + b" OK IDLE terminated"
                return lines
            lines.append(line)

    async def aclose(self) -> None:
        await self.stream.aclose()


async def in_thread(fn: Callable[[], T]) -> T:
    return await trio.to_thread.run_sync(fn, abandon_on_cancel=True)


@pytest.fixture
async def server(nursery: trio.Nursery) -> AsyncIterator[ImapTestServer]:
    srv = ImapTestServer(keepalive_interval=None, uidvalidity=1000)
    srv.add_user(USER, PASSWORD)
    srv.add_user("b@x.test", "pw2")
    await nursery.start(srv.serve)
    yield srv


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def server_ssl_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
    return ctx


def client_ssl_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


# ---------------------------------------------------------------------------------------
# pure parser


def test_framer_sync_and_nonsync_literals_fed_bytewise() -> None:
    stream = b'a1 APPEND INBOX (\\Seen) {5}\r\nhello\r\na2 LOGIN {1+}\r\nu "p w"\r\nDONE\n'
    framer = CommandFramer()
    events: list[object] = []
    for byte in stream:
        framer.feed(bytes([byte]))
        while (event := framer.next_event()) is not None:
            events.append(event)
    assert events == [
        NeedContinuation(5),
        CommandLine(b"a1 APPEND INBOX (\\Seen) {5}\r\nhello"),
        CommandLine(b'a2 LOGIN {1+}\r\nu "p w"'),
        CommandLine(b"DONE"),
    ]
    assert framer.buffered == 0


def test_framer_limits() -> None:
    framer = CommandFramer(max_line=16, max_literal=4)
    framer.feed(b"x" * 17)
    with pytest.raises(ParseError) as info:
        framer.next_event()
    assert info.value.fatal
    framer = CommandFramer(max_line=16, max_literal=4)
    framer.feed(b"a APPEND X {5}\r\n")
    with pytest.raises(ParseError):
        framer.next_event()


def test_framer_literal_may_contain_crlf_and_braces() -> None:
    framer = CommandFramer()
    framer.feed(b"a APPEND X {9+}\r\n{3}\r\nab\r\n\r\n")
    event = framer.next_event()
    assert event == CommandLine(b"a APPEND X {9+}\r\n{3}\r\nab\r\n")
    assert framer.next_event() is None


def test_parse_command_shapes() -> None:
    cmd = parse_command(b'A001 login "a\\"b" {3}\r\npw\\')
    assert (cmd.tag, cmd.name, cmd.args) == ("A001", "LOGIN", ('a"b', b"pw\\"))
    cmd = parse_command(b"t2 uid fetch 1:* (UID BODY.PEEK[HEADER.FIELDS (SUBJECT FROM)])")
    assert cmd.name == "UID"
    assert cmd.args == ("fetch", "1:*", ("UID", "BODY.PEEK[HEADER.FIELDS (SUBJECT FROM)]"))
    cmd = parse_command(b"t3 STATUS INBOX (MESSAGES (NESTED x) UIDNEXT)")
    assert cmd.args == ("INBOX", ("MESSAGES", ("NESTED", "x"), "UIDNEXT"))
    assert parse_command(b"t4 NOOP").args == ()


@pytest.mark.parametrize(
    ("raw", "tag"),
    [
        (b"", None),
        (b"+bad NOOP", None),
        (b"t1", "t1"),
        (b't1 LOGIN "unterminated', "t1"),
        (b"t1 LOGIN (a b", "t1"),
        (b"t1 LOGIN a)", "t1"),
        (b"t1 APPEND X {10}\r\nshort", "t1"),
    ],
)
def test_parse_command_errors(raw: bytes, tag: str | None) -> None:
    with pytest.raises(ParseError) as info:
        parse_command(raw)
    assert info.value.tag == tag


def test_sequence_sets() -> None:
    assert parse_sequence_set("1:3,5,7:*", 8) == {1, 2, 3, 5, 7, 8}
    assert parse_sequence_set("4:2", 9) == {2, 3, 4}
    assert parse_sequence_set("*", 0) == set()
    with pytest.raises(ValueError):
        parse_sequence_set("0", 3)
    with pytest.raises(ValueError):
        parse_sequence_set("1,,2", 3)


# ---------------------------------------------------------------------------------------
# protocol basics


async def test_greeting_capability_and_unknown_command(server: ImapTestServer) -> None:
    with trio.fail_after(5):
        client = await RawClient.connect(server.port)
        greeting = await client.readline()
        assert greeting == b"* OK [CAPABILITY IMAP4rev1 IDLE AUTH=PLAIN] " + GREETING_TEXT
        untagged, tagged = await client.command("CAPABILITY")
        assert untagged == [b"* CAPABILITY IMAP4rev1 IDLE AUTH=PLAIN"]
        assert tagged == b"t1 OK CAPABILITY completed"
        _, tagged = await client.command("FROBNICATE")
        assert tagged.startswith(b"t2 BAD")
        _, tagged = await client.command("SELECT INBOX")  # not authenticated yet
        assert tagged.startswith(b"t3 BAD")
        await client.send(b"+ NOOP\r\n")
        assert (await client.readline()).startswith(b"* BAD")
        untagged, tagged = await client.command("LOGOUT")
        assert untagged == [b"* BYE Logging out"] and tagged == b"t4 OK LOGOUT completed"
        assert await client.stream.receive_some(10) == b""
        await server.wait_for(lambda: server.stats.connections_open == 0)
    assert server.stats.commands["FROBNICATE"] == 1
    assert server.stats.logouts == 0  # only authenticated LOGOUTs count


async def test_idle_capability_can_be_disabled(nursery: trio.Nursery) -> None:
    srv = ImapTestServer(idle_capability=False)
    srv.add_user(USER, PASSWORD)
    await nursery.start(srv.serve)
    with trio.fail_after(5):
        client = await RawClient.connect(srv.port)
        await client.login_select()
        untagged, _ = await client.command("CAPABILITY")
        assert untagged == [b"* CAPABILITY IMAP4rev1 AUTH=PLAIN"]
        _, tagged = await client.command("IDLE")
        assert tagged.startswith(b"t4 BAD")


async def test_coalesced_replies_to_pipelined_commands_go_out_in_one_write(
    nursery: trio.Nursery,
) -> None:
    srv = ImapTestServer(keepalive_interval=None, coalesce_replies=True)
    srv.add_user(USER, PASSWORD)
    await nursery.start(srv.serve)
    with trio.fail_after(5):
        client = await RawClient.connect(srv.port)
        await client.login_select()  # one command at a time: answered at once, as always
        tag = await client.idle()
        await srv.wait_for(lambda: srv.idle_count(USER) == 1)
        # a client's tick: DONE, NOOP, IDLE in one write; the answers in one write too
        await client.send(b"DONE\r\nn1 NOOP\r\ni2 IDLE\r\n")
        data = await client.stream.receive_some(65536)
        assert data == tag + b" OK IDLE terminated\r\nn1 OK NOOP completed\r\n+ idling\r\n"
        await srv.wait_for(lambda: srv.idle_count(USER) == 1)
        srv.append(USER, MSG)  # a push in IDLE is not held back
        assert await client.readline() == b"* 1 EXISTS"


async def test_login_ok_and_refused(server: ImapTestServer) -> None:
    def session() -> tuple[str, list[bytes]]:
        with imaplib.IMAP4("127.0.0.1", server.port, timeout=5) as imap:
            typ, data = imap.login(USER, PASSWORD)
            imap.logout()
            return typ, data

    def refused(password: str) -> str:
        imap = imaplib.IMAP4("127.0.0.1", server.port, timeout=5)
        try:
            with pytest.raises(imaplib.IMAP4.error) as info:
                imap.login(USER, password)
            return str(info.value)
        finally:
            imap.shutdown()

    with trio.fail_after(10):
        assert await in_thread(session) == ("OK", [b"LOGIN completed"])
        assert "AUTHENTICATIONFAILED" in await in_thread(lambda: refused("wrong"))
        server.faults(USER).refuse_login = True
        assert "AUTHENTICATIONFAILED" in await in_thread(lambda: refused(PASSWORD))
        server.faults(USER).refuse_login = False
        server.global_faults.refuse_login = True
        assert "AUTHENTICATIONFAILED" in await in_thread(lambda: refused(PASSWORD))
        server.global_faults.refuse_login = False
        assert (await in_thread(session))[0] == "OK"
        await server.wait_for(lambda: server.stats.connections_open == 0)
    assert server.stats.logins == 2
    assert server.stats.login_failures == 3
    assert server.stats.logouts == 2
    events = [(e.user, e.event) for e in server.log]
    assert events.count((USER, "LOGIN_FAILED")) == 3
    assert events.count((USER, "LOGOUT")) == 2


async def test_command_lines_are_recorded_from_login_on_without_credentials(
    server: ImapTestServer,
) -> None:
    with trio.fail_after(10):
        client = await RawClient.connect(server.port)
        try:
            await client.login_select()
            await client.command("UID FETCH 1:* (UID ENVELOPE)")
        finally:
            await client.aclose()
    assert list(server.command_lines) == [
        (USER, b"t2 SELECT INBOX"),
        (USER, b"t3 UID FETCH 1:* (UID ENVELOPE)"),
    ]


async def test_authenticate_plain(server: ImapTestServer) -> None:
    token = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
    with trio.fail_after(5):
        client = await RawClient.connect(server.port)
        await client.readline()
        await client.send(b"a1 AUTHENTICATE PLAIN\r\n")
        assert await client.readline() == b"+ "
        await client.send(token.encode() + b"\r\n")
        assert await client.readline() == b"a1 OK LOGIN completed"
        await server.wait_for(lambda: server.connections(USER) == 1)


TOKEN = "S3ntinel-test-server-token"


def xoauth2(user: str = USER, token: str = TOKEN, trailer: str = "\x01\x01") -> str:
    return base64.b64encode(f"user={user}\x01auth=Bearer {token}{trailer}".encode()).decode()


def oauthbearer(user: str = USER, token: str = TOKEN, trailer: str = "\x01\x01") -> str:
    text = f"n,a={user},\x01host=127.0.0.1\x01port=143\x01auth=Bearer {token}{trailer}"
    return base64.b64encode(text.encode()).decode()


def with_oauth2(server: ImapTestServer, *, sasl_ir: bool) -> None:
    server.oauth2_check = lambda user, token: token == TOKEN
    server.sasl_ir = sasl_ir


async def greeted(server: ImapTestServer) -> tuple[RawClient, bytes]:
    client = await RawClient.connect(server.port)
    return client, await client.readline()


async def test_an_initial_response_needs_sasl_ir_advertised(server: ImapTestServer) -> None:
    """RFC 4959: the response may ride on the AUTHENTICATE line only where the server
    announced SASL-IR; without it Gmail and Dovecot answer BAD, and so does this one."""
    with trio.fail_after(5):
        with_oauth2(server, sasl_ir=False)
        client, greeting = await greeted(server)
        assert b"AUTH=XOAUTH2" in greeting and b"SASL-IR" not in greeting
        _, tagged = await client.command(f"AUTHENTICATE XOAUTH2 {xoauth2()}")
        assert tagged == b"t1 BAD Initial response without SASL-IR"
        _, tagged = await client.command(f"AUTHENTICATE PLAIN {base64.b64encode(b'x').decode()}")
        assert tagged.startswith(b"t2 BAD")
        with_oauth2(server, sasl_ir=True)
        client, greeting = await greeted(server)
        assert b"SASL-IR" in greeting
        _, tagged = await client.command(f"AUTHENTICATE XOAUTH2 {xoauth2()}")
        assert tagged == b"t1 OK LOGIN completed"
    assert server.stats.logins == 1 and server.oauth2_attempts == ["XOAUTH2"]


@pytest.mark.parametrize(
    ("mechanism", "message"),
    [
        ("XOAUTH2", xoauth2(trailer="")),
        ("XOAUTH2", xoauth2(trailer="\x01")),
        ("XOAUTH2", base64.b64encode(f"user={USER}\x01\x01".encode()).decode()),
        ("XOAUTH2", base64.b64encode(f"auth=Bearer {TOKEN}\x01\x01".encode()).decode()),
        ("OAUTHBEARER", oauthbearer(trailer="")),
        ("OAUTHBEARER", oauthbearer(trailer="\x01")),
        ("OAUTHBEARER", xoauth2()),  # no GS2 header
    ],
)
async def test_a_malformed_oauth2_response_is_refused(
    server: ImapTestServer, mechanism: str, message: str
) -> None:
    """The ``^A^A`` trailer and the fields are checked, on the command line and after a
    continuation: a client that gets them wrong fails here as it would at Gmail."""
    with_oauth2(server, sasl_ir=True)
    with trio.fail_after(5):
        client, _ = await greeted(server)
        _, tagged = await client.command(f"AUTHENTICATE {mechanism} {message}")
        assert tagged == f"t1 BAD Invalid SASL {mechanism} response".encode()
        await client.send(f"t2 AUTHENTICATE {mechanism}\r\n".encode())
        assert await client.readline() == b"+ "
        await client.send(message.encode() + b"\r\n")
        assert await client.readline() == f"t2 BAD Invalid SASL {mechanism} response".encode()
    assert server.oauth2_attempts == [] and server.stats.logins == 0


@pytest.mark.parametrize(
    ("mechanism", "message", "ack"),
    [("XOAUTH2", xoauth2(token="expired"), b""), ("OAUTHBEARER", oauthbearer(token="x"), b"AQ==")],
)
async def test_a_refused_token_needs_the_right_acknowledgement(
    server: ImapTestServer, mechanism: str, message: str, ack: bytes
) -> None:
    """A refused token gets a ``+ <base64 JSON>`` challenge; the tagged NO follows only
    the acknowledgement the mechanism prescribes (XOAUTH2: an empty line; OAUTHBEARER:
    ``AQ==``, a lone ^A). Any other answer is a client bug: BAD."""
    with_oauth2(server, sasl_ir=True)
    wrong = b"AQ==" if ack == b"" else b""
    with trio.fail_after(5):
        for answer, reply in [
            (ack, b"t1 NO [AUTHENTICATIONFAILED] Invalid credentials"),
            (wrong, b"t1 BAD Invalid SASL error acknowledgement"),
            (b"dGhpcyBpcyBub3QgYW4gYWNr", b"t1 BAD Invalid SASL error acknowledgement"),
        ]:
            client, _ = await greeted(server)
            await client.send(f"t1 AUTHENTICATE {mechanism} {message}\r\n".encode())
            challenge = await client.readline()
            assert challenge.startswith(b"+ ")
            assert b'"status":"401"' in base64.b64decode(challenge[2:])
            await client.send(answer + b"\r\n")
            assert await client.readline() == reply
            await client.aclose()
    assert server.stats.bad == 2 and server.stats.login_failures == 3


async def test_select_examine_status(server: ImapTestServer) -> None:
    server.append(USER, MSG)
    server.append(USER, MSG, flags=["\\Seen"])
    mailbox = server.mailbox(USER)
    assert (mailbox.uidvalidity, mailbox.uidnext, mailbox.exists) == (1000, 3, 2)

    def client() -> tuple[object, ...]:
        with imaplib.IMAP4("127.0.0.1", server.port, timeout=5) as imap:
            imap.login(USER, PASSWORD)
            status = imap.status("INBOX", "(MESSAGES UIDNEXT UIDVALIDITY UNSEEN RECENT)")
            examine = imap.select("INBOX", readonly=True)
            select = imap.select("inbox")
            responses = {k: v for k, v in imap.untagged_responses.items()}
            missing = imap.select("Nope")
            imap.logout()
            return status, examine, select, responses, missing

    with trio.fail_after(10):
        status, examine, select, responses, missing = await in_thread(client)
    assert status == (
        "OK",
        [b'"INBOX" (MESSAGES 2 UIDNEXT 3 UIDVALIDITY 1000 UNSEEN 1 RECENT 0)'],
    )
    assert examine == ("OK", [b"2"])
    assert select == ("OK", [b"2"])
    assert isinstance(responses, dict)
    assert responses["UIDVALIDITY"] == [b"1000"]
    assert responses["UIDNEXT"] == [b"3"]
    assert responses["RECENT"] == [b"0"]
    assert responses["READ-WRITE"] == [b""]
    assert isinstance(missing, tuple) and missing[0] == "NO"


async def test_raw_select_reply_lines(server: ImapTestServer) -> None:
    server.append(USER, MSG)
    with trio.fail_after(5):
        client = await RawClient.connect(server.port)
        await client.readline()
        await client.command(f"LOGIN {USER} {PASSWORD}")
        untagged, tagged = await client.command("SELECT INBOX")
    assert b"* 1 EXISTS" in untagged
    assert b"* 0 RECENT" in untagged
    assert b"* OK [UIDVALIDITY 1000] UIDs valid" in untagged
    assert b"* OK [UIDNEXT 2] Predicted next UID" in untagged
    assert any(line.startswith(b"* FLAGS (") for line in untagged)
    assert tagged == b"t2 OK [READ-WRITE] SELECT completed"


async def test_uidnext_faults_leave_it_out_of_select_or_status(server: ImapTestServer) -> None:
    server.append(USER, MSG)
    server.faults(USER).no_select_uidnext = True  # Courier-IMAP 5
    with trio.fail_after(5):
        client = await RawClient.connect(server.port)
        await client.login_select()
        untagged, tagged = await client.command("SELECT INBOX")
        assert tagged == b"t3 OK [READ-WRITE] SELECT completed"
        assert b"* 1 EXISTS" in untagged and b"* OK [UIDVALIDITY 1000] UIDs valid" in untagged
        assert not any(b"UIDNEXT" in line for line in untagged)
        untagged, _ = await client.command("STATUS INBOX (UIDNEXT UIDVALIDITY MESSAGES)")
        assert untagged == [b'* STATUS "INBOX" (UIDNEXT 2 UIDVALIDITY 1000 MESSAGES 1)']
        server.faults(USER).no_status_uidnext = True
        untagged, _ = await client.command("STATUS INBOX (UIDNEXT UIDVALIDITY MESSAGES)")
        assert untagged == [b'* STATUS "INBOX" (UIDVALIDITY 1000 MESSAGES 1)']
        server.faults(USER).reset()
        untagged, _ = await client.command("SELECT INBOX")
        assert b"* OK [UIDNEXT 2] Predicted next UID" in untagged


async def test_append_via_imaplib_and_nonsync_literal(server: ImapTestServer) -> None:
    def client() -> tuple[object, ...]:
        with imaplib.IMAP4("127.0.0.1", server.port, timeout=5) as imap:
            imap.login(USER, PASSWORD)
            appended = imap.append("INBOX", "(\\Seen)", None, MSG)
            imap.select("INBOX")
            fetched = imap.uid("FETCH", "1", "(FLAGS BODY.PEEK[])")
            searched = imap.uid("SEARCH", "ALL")
            imap.logout()
            return appended, fetched, searched

    with trio.fail_after(10):
        appended, fetched, searched = await in_thread(client)
    assert appended == ("OK", [b"APPEND completed"])
    assert fetched == ("OK", [(b"1 (UID 1 FLAGS (\\Seen) BODY[] {%d}" % len(MSG), MSG), b")"])
    assert searched == ("OK", [b"1"])
    message = server.mailbox(USER).messages[0]
    assert (message.uid, message.data, message.flags) == (1, MSG, {"\\Seen"})

    with trio.fail_after(5):
        raw = await RawClient.connect(server.port)
        await raw.login_select()
        await raw.send(b"x1 APPEND INBOX {4+}\r\nabcd\r\n")
        assert await raw.readline() == b"* 2 EXISTS"  # we have INBOX selected
        assert await raw.readline() == b"x1 OK APPEND completed"
    assert server.mailbox(USER).messages[1].data == b"abcd"


# ---------------------------------------------------------------------------------------
# IDLE


async def test_idle_push_exists_and_expunge(server: ImapTestServer) -> None:
    with trio.fail_after(5):
        client = await RawClient.connect(server.port)
        await client.login_select()
        tag = await client.idle()
        await server.wait_for(lambda: server.idle_count(USER) == 1)
        uid = server.append(USER, MSG)
        assert await client.readline() == b"* 1 EXISTS"
        server.append(USER, MSG)
        server.append(USER, MSG)
        assert await client.readline() == b"* 3 EXISTS"
        assert server.expunge(USER, uid)
        assert await client.readline() == b"* 1 EXPUNGE"
        assert await client.done(tag) == []
        await server.wait_for(lambda: server.idle_count() == 0)
        _, tagged = await client.command("NOOP")
        assert tagged.endswith(b"OK NOOP completed")
    events = [e.event for e in server.log if e.user == USER]
    assert events == ["LOGIN", "IDLE", "DONE"]
    assert server.stats.pushes == 3


async def test_idle_only_for_the_right_mailbox_and_user(server: ImapTestServer) -> None:
    server.add_mailbox(USER, "Other")
    with trio.fail_after(5):
        client = await RawClient.connect(server.port)
        await client.login_select()
        tag = await client.idle()
        await server.wait_for(lambda: server.idle_count(USER) == 1)
        server.append(USER, MSG, mailbox="Other")
        server.append("b@x.test", MSG)
        server.append(USER, MSG)
        assert await client.readline() == b"* 1 EXISTS"
        assert await client.done(tag) == []
    assert server.stats.pushes == 1


async def test_store_expunge_reaches_other_idler(server: ImapTestServer) -> None:
    for _ in range(3):
        server.append(USER, MSG)
    with trio.fail_after(5):
        idler = await RawClient.connect(server.port)
        await idler.login_select()
        tag = await idler.idle()
        await server.wait_for(lambda: server.idle_count(USER) == 1)
        worker = await RawClient.connect(server.port)
        await worker.login_select()
        untagged, tagged = await worker.command("UID STORE 2:3 +FLAGS (\\Deleted)")
        assert untagged == [
            b"* 2 FETCH (UID 2 FLAGS (\\Deleted))",
            b"* 3 FETCH (UID 3 FLAGS (\\Deleted))",
        ]
        untagged, tagged = await worker.command("EXPUNGE")
        assert untagged == [b"* 3 EXPUNGE", b"* 2 EXPUNGE"]
        assert tagged.endswith(b"OK EXPUNGE completed")
        assert await idler.readline() == b"* 3 EXPUNGE"
        assert await idler.readline() == b"* 2 EXPUNGE"
        server.append(USER, MSG)
        assert await idler.readline() == b"* 2 EXISTS"
        assert await idler.done(tag) == []
        untagged, _ = await idler.command("UID SEARCH ALL")
        assert untagged == [b"* SEARCH 1 4"]
    assert [m.uid for m in server.mailbox(USER).messages] == [1, 4]


async def test_keepalive_still_here(nursery: trio.Nursery) -> None:
    srv = ImapTestServer(keepalive_interval=0.05)
    srv.add_user(USER, PASSWORD)
    await nursery.start(srv.serve)
    with trio.fail_after(5):
        client = await RawClient.connect(srv.port)
        await client.login_select()
        tag = await client.idle()
        start = trio.current_time()
        assert await client.readline() == b"* OK Still here"
        first = trio.current_time() - start
        assert await client.readline() == b"* OK Still here"
        assert await client.done(tag) == []
    assert 0.02 <= first <= 1.0
    assert srv.stats.keepalives >= 2


async def test_no_push_fault_reports_on_noop_only(nursery: trio.Nursery) -> None:
    srv = ImapTestServer(keepalive_interval=0.05)
    srv.add_user(USER, PASSWORD)
    srv.faults(USER).no_push = True
    await nursery.start(srv.serve)
    with trio.fail_after(5):
        client = await RawClient.connect(srv.port)
        await client.login_select()
        tag = await client.idle()
        await srv.wait_for(lambda: srv.idle_count(USER) == 1)
        srv.append(USER, MSG)
        # The new mail happened before these keepalives were sent: nothing else came.
        assert await client.readline() == b"* OK Still here"
        assert await client.readline() == b"* OK Still here"
        assert await client.done(tag) == []
        untagged, _ = await client.command("NOOP")
        assert untagged == [b"* 1 EXISTS"]
    assert srv.stats.pushes == 0


async def test_aioimaplib_idle_receives_push(server: ImapTestServer) -> None:
    token = trio.lowlevel.current_trio_token()

    def wait_until_idle() -> None:  # runs in a worker thread of the asyncio loop
        trio.from_thread.run(
            server.wait_for, lambda: server.idle_count(USER) == 1, trio_token=token
        )

    def append() -> None:
        trio.from_thread.run_sync(lambda: server.append(USER, MSG), trio_token=token)

    async def scenario() -> list[bytes]:
        imap = aioimaplib.IMAP4(host="127.0.0.1", port=server.port, timeout=5)
        await imap.wait_hello_from_server()
        assert (await imap.login(USER, PASSWORD)).result == "OK"
        assert (await imap.select("INBOX")).result == "OK"
        idle = await imap.idle_start(timeout=5)
        await asyncio.to_thread(wait_until_idle)
        await asyncio.to_thread(append)
        pushed: list[bytes] = await imap.wait_server_push(timeout=5)
        imap.idle_done()
        await asyncio.wait_for(idle, 5)
        await imap.logout()
        return pushed

    with trio.fail_after(15):
        pushed = await in_thread(lambda: asyncio.run(scenario()))
    assert b"1 EXISTS" in pushed
    events = [e.event for e in server.log if e.user == USER]
    assert events == ["LOGIN", "IDLE", "DONE", "LOGOUT", "DISCONNECT"]


# ---------------------------------------------------------------------------------------
# double watches: every interval with two connections logged in as one user


async def test_overlaps_record_each_interval_of_two_logins_as_one_user(
    server: ImapTestServer,
) -> None:
    with trio.fail_after(5):
        first = await RawClient.connect(server.port)
        await first.login_select()
        other_user = await RawClient.connect(server.port)
        await other_user.login_select("b@x.test", "pw2")
        not_logged_in = await RawClient.connect(server.port)
        await not_logged_in.readline()
        assert server.overlaps() == []  # one login per user, and a greeting is no login
        second = await RawClient.connect(server.port)
        await second.login_select()
        [ongoing] = server.overlaps(USER)
        assert ongoing.end is None and server.overlaps("b@x.test") == []
        first_id, second_id = (s.id for s in server.sessions(USER))
        assert ongoing.sessions == (first_id, second_id)
        third = await RawClient.connect(server.port)
        await third.login_select()  # joins the interval that is going on
        await second.command("LOGOUT")
        await server.wait_for(lambda: server.connections(USER) == 2)
        [still] = server.overlaps(USER)  # two are left: the interval goes on
        assert still.end is None and len(still.sessions) == 3
        await first.aclose()
        await server.wait_for(lambda: server.connections(USER) == 1)
        [ended] = server.overlaps(USER)
        assert ended.start == ongoing.start and ended.end is not None
        assert ended.end > ended.start and len(ended.sessions) == len(set(ended.sessions)) == 3
        assert all(peer.startswith("127.0.0.1:") for peer in ended.peers)
        again = await RawClient.connect(server.port)
        await again.login_select()  # a new interval, however short
        server.drop(USER)
        await server.wait_for(lambda: server.connections(USER) == 0)
    assert [o.end is not None for o in server.overlaps()] == [True, True]
    assert server.overlaps()[1].start >= ended.end


async def test_a_refused_login_is_no_overlap(server: ImapTestServer) -> None:
    with trio.fail_after(5):
        first = await RawClient.connect(server.port)
        await first.login_select()
        second = await RawClient.connect(server.port)
        await second.readline()
        _, tagged = await second.command(f'LOGIN {USER} "wrong"')
        assert b" NO " in tagged
    assert server.overlaps() == []


# ---------------------------------------------------------------------------------------
# fault injection


async def test_drop_rst_and_fin(server: ImapTestServer) -> None:
    with trio.fail_after(5):
        first = await RawClient.connect(server.port)
        await first.login_select()
        second = await RawClient.connect(server.port)
        await second.login_select("b@x.test", "pw2")
        assert server.drop(USER, how="rst") == 1
        with pytest.raises(trio.BrokenResourceError):
            await first.stream.receive_some(100)
        assert server.drop("b@x.test", how="fin") == 1
        assert await second.stream.receive_some(100) == b""
        await server.wait_for(lambda: server.stats.connections_open == 0)
    assert server.connections(USER) == 0
    assert [e.event for e in server.log if e.user == USER] == ["LOGIN", "DROP", "DISCONNECT"]


async def test_drop_all_and_session_handles(server: ImapTestServer) -> None:
    with trio.fail_after(5):
        clients = [await RawClient.connect(server.port) for _ in range(3)]
        for client in clients[:2]:
            await client.login_select()
        await clients[2].readline()  # greeted, not logged in
        await server.wait_for(lambda: server.connections(USER) == 2)
        sessions = server.sessions(USER)
        assert [s.selected for s in sessions] == ["INBOX", "INBOX"]
        sessions[0].drop("fin")
        assert await clients[0].stream.receive_some(100) == b""
        await server.wait_for(lambda: server.connections(USER) == 1)
        assert server.drop_all("fin") == 2
        for client in clients[1:]:
            assert await client.stream.receive_some(100) == b""


async def test_per_session_faults(server: ImapTestServer) -> None:
    with trio.fail_after(5):
        slow = await RawClient.connect(server.port)
        await slow.login_select()
        fast = await RawClient.connect(server.port)
        await fast.login_select()
        await server.wait_for(lambda: server.connections(USER) == 2)
        server.sessions(USER)[0].faults.response_delay = 0.3
        start = trio.current_time()
        await fast.command("NOOP")
        assert trio.current_time() - start < 0.3
        await slow.command("NOOP")
        assert trio.current_time() - start >= 0.3


async def test_greeting_and_response_delay(server: ImapTestServer) -> None:
    server.global_faults.greeting_delay = 0.2
    with trio.fail_after(5):
        start = trio.current_time()
        client = await RawClient.connect(server.port)
        await client.readline()
        assert trio.current_time() - start >= 0.2
        server.global_faults.greeting_delay = 0
        await client.command(f"LOGIN {USER} {PASSWORD}")
        server.faults(USER).response_delay = 0.2
        start = trio.current_time()
        await client.command("NOOP")
        assert trio.current_time() - start >= 0.2


async def test_silent_existing_connection_then_resume(server: ImapTestServer) -> None:
    with trio.fail_after(5):
        client = await RawClient.connect(server.port)
        await client.login_select()
        server.faults(USER).silent = True
        await client.send(b"s1 NOOP\r\n")
    # Proving absence needs a window: nothing may arrive, and the socket must stay open.
    with trio.move_on_after(0.3) as window:
        data = await client.stream.receive_some(100)
        pytest.fail(f"silent connection sent {data!r}")
    assert window.cancelled_caught
    assert server.stats.connections_open == 1
    assert server.stats.commands["NOOP"] == 0  # not even read
    with trio.fail_after(5):
        server.faults(USER).silent = False
        assert await client.readline() == b"s1 OK NOOP completed"


async def test_silent_idle_connection_gets_no_push(server: ImapTestServer) -> None:
    with trio.fail_after(5):
        client = await RawClient.connect(server.port)
        await client.login_select()
        await client.idle()
        await server.wait_for(lambda: server.idle_count(USER) == 1)
        server.faults(USER).silent = True
        server.append(USER, MSG)
    with trio.move_on_after(0.3) as window:
        data = await client.stream.receive_some(100)
        pytest.fail(f"silent connection sent {data!r}")
    assert window.cancelled_caught
    with trio.fail_after(5):
        server.faults(USER).silent = False
        assert await client.readline() == b"* 1 EXISTS"


async def test_global_silent_accepts_but_never_greets(server: ImapTestServer) -> None:
    server.global_faults.silent = True
    with trio.fail_after(5):
        client = await RawClient.connect(server.port)
        await server.wait_for(lambda: server.stats.connections_open == 1)
    with trio.move_on_after(0.3) as window:
        data = await client.stream.receive_some(100)
        pytest.fail(f"silent server sent {data!r}")
    assert window.cancelled_caught
    with trio.fail_after(5):
        server.drop_all("rst")  # drop works on silent connections
        with pytest.raises(trio.BrokenResourceError):
            await client.stream.receive_some(100)


async def test_user_silent_login_never_answered(server: ImapTestServer) -> None:
    server.faults(USER).silent = True
    with trio.fail_after(5):
        client = await RawClient.connect(server.port)
        await client.readline()  # the user is unknown before LOGIN: greeting comes
        await client.send(f"l1 LOGIN {USER} {PASSWORD}\r\n".encode())
        await server.wait_for(lambda: server.connections(USER) == 1)
    with trio.move_on_after(0.2) as window:
        await client.stream.receive_some(100)
        pytest.fail("LOGIN answered")
    assert window.cancelled_caught


async def test_bye(server: ImapTestServer) -> None:
    with trio.fail_after(5):
        client = await RawClient.connect(server.port)
        await client.login_select()
        await client.idle()
        await server.wait_for(lambda: server.idle_count(USER) == 1)
        assert server.bye(USER) == 1
        assert await client.readline() == b"* BYE server shutting down"
        assert await client.stream.receive_some(100) == b""
        await server.wait_for(lambda: server.idle_count() == 0)
    assert [e.event for e in server.log if e.user == USER] == ["LOGIN", "IDLE", "BYE", "DISCONNECT"]


async def test_bye_all_reaches_unauthenticated_too(server: ImapTestServer) -> None:
    with trio.fail_after(5):
        authed = await RawClient.connect(server.port)
        await authed.login_select()
        anonymous = await RawClient.connect(server.port)
        await anonymous.readline()
        await server.wait_for(lambda: server.stats.connections_open == 2)
        assert server.bye_all() == 2
        for client in (authed, anonymous):
            assert await client.readline() == b"* BYE server shutting down"
            assert await client.stream.receive_some(100) == b""
        await server.wait_for(lambda: server.stats.connections_open == 0)


async def test_restart_with_new_uidvalidity(server: ImapTestServer) -> None:
    for _ in range(3):
        server.append(USER, MSG)
    server.expunge(USER, 1)
    port = server.port
    with trio.fail_after(5):
        client = await RawClient.connect(server.port)
        await client.login_select()
        await server.restart(new_uidvalidity=True)
        assert await client.stream.receive_some(100) == b""
        assert server.port == port
        client = await RawClient.connect(port)
        await client.readline()
        await client.command(f"LOGIN {USER} {PASSWORD}")
        untagged, _ = await client.command("SELECT INBOX")
        searched, _ = await client.command("UID SEARCH ALL")
    assert b"* OK [UIDVALIDITY 1001] UIDs valid" in untagged
    assert b"* OK [UIDNEXT 3] Predicted next UID" in untagged
    assert b"* 2 EXISTS" in untagged
    assert searched == [b"* SEARCH 1 2"]
    assert [m.uid for m in server.mailbox(USER).messages] == [1, 2]
    assert server.mailbox("b@x.test").uidvalidity == 1001


async def test_restart_keeps_uidvalidity_and_downtime_refuses(server: ImapTestServer) -> None:
    server.append(USER, MSG)

    async def restart() -> None:
        await server.restart(downtime=0.3)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(restart)
            await server.wait_for(lambda: any(e.event == "RESTART" for e in server.log))
            with pytest.raises(OSError):
                await trio.open_tcp_stream("127.0.0.1", server.port)
        client = await RawClient.connect(server.port)
        await client.login_select()
    mailbox = server.mailbox(USER)
    assert (mailbox.uidvalidity, [m.uid for m in mailbox.messages]) == (1000, [1])


async def test_set_uidvalidity(server: ImapTestServer) -> None:
    server.set_uidvalidity(USER, 77)
    with trio.fail_after(5):
        client = await RawClient.connect(server.port)
        await client.readline()
        await client.command(f"LOGIN {USER} {PASSWORD}")
        untagged, _ = await client.command("STATUS INBOX (UIDVALIDITY)")
    assert untagged == [b'* STATUS "INBOX" (UIDVALIDITY 77)']


# ---------------------------------------------------------------------------------------
# TLS


async def test_starttls(nursery: trio.Nursery, ca: trustme.CA) -> None:
    srv = ImapTestServer(tls_context=server_ssl_context(ca))
    srv.add_user(USER, PASSWORD)
    await nursery.start(srv.serve)

    def client() -> tuple[object, ...]:
        with imaplib.IMAP4("127.0.0.1", srv.port, timeout=5) as imap:
            before = imap.capabilities
            imap.starttls(ssl_context=client_ssl_context(ca))
            after = imap.capabilities
            login = imap.login(USER, PASSWORD)
            select = imap.select()
            imap.logout()
            return before, after, login, select

    with trio.fail_after(10):
        before, after, login, select = await in_thread(client)
    assert before == ("IMAP4REV1", "IDLE", "STARTTLS", "AUTH=PLAIN")
    assert after == ("IMAP4REV1", "IDLE", "AUTH=PLAIN")
    assert isinstance(login, tuple) and login[0] == "OK"
    assert select == ("OK", [b"0"])


async def test_implicit_tls_and_idle_over_tls(nursery: trio.Nursery, ca: trustme.CA) -> None:
    srv = ImapTestServer(tls_context=server_ssl_context(ca), implicit_tls=True)
    srv.add_user(USER, PASSWORD)
    await nursery.start(srv.serve)
    assert srv.tls_port not in (0, srv.port)

    def client() -> object:
        with imaplib.IMAP4_SSL(
            "127.0.0.1", srv.tls_port, ssl_context=client_ssl_context(ca), timeout=5
        ) as imap:
            assert "STARTTLS" not in imap.capabilities
            imap.login(USER, PASSWORD)
            result = imap.select()
            imap.logout()
            return result

    with trio.fail_after(10):
        assert await in_thread(client) == ("OK", [b"0"])
        tcp = await trio.open_tcp_stream("127.0.0.1", srv.tls_port)
        stream = trio.SSLStream(tcp, client_ssl_context(ca), server_hostname="127.0.0.1")
        raw = RawClient(stream)
        await raw.login_select()
        tag = await raw.idle()
        await srv.wait_for(lambda: srv.idle_count(USER) == 1)
        srv.append(USER, MSG)  # wakes the session out of a pending TLS receive
        assert await raw.readline() == b"* 1 EXISTS"
        srv.append(USER, MSG)
        assert await raw.readline() == b"* 2 EXISTS"
        assert await raw.done(tag) == []
        _, tagged = await raw.command("NOOP")
        assert tagged.endswith(b"OK NOOP completed")


# ---------------------------------------------------------------------------------------
# scale


def ensure_fd_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return
    if hard != resource.RLIM_INFINITY and hard < wanted:
        unavailable(f"needs {wanted} file descriptors, hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


async def test_two_thousand_idle_clients(nursery: trio.Nursery) -> None:
    n_users = 1000
    per_user = 2
    ensure_fd_limit(2 * n_users * per_user + 200)  # both ends live in this process
    srv = ImapTestServer(keepalive_interval=None)
    for i in range(n_users):
        srv.add_user(f"u{i}@x.test", "pw")
    await nursery.start(srv.serve)
    clients: list[tuple[int, RawClient, bytes]] = []
    limiter = trio.CapacityLimiter(200)

    async def open_client(i: int) -> None:
        async with limiter:
            client = await RawClient.connect(srv.port)
            await client.login_select(f"u{i}@x.test", "pw")
            tag = await client.idle()
        clients.append((i, client, tag))

    # a hang guard, not a speed claim: 4,000 sockets in one process took 8 s on a 2-core
    # machine busy with a 6,000-session benchmark
    with trio.fail_after(30):
        async with trio.open_nursery() as starters:
            for i in range(n_users):
                for _ in range(per_user):
                    starters.start_soon(open_client, i)
        await srv.wait_for(lambda: srv.idle_count() == n_users * per_user)
        assert srv.stats.connections_open == n_users * per_user
        srv.append("u7@x.test", MSG)
        await srv.wait_for(lambda: srv.stats.pushes == per_user)
        seen: dict[int, list[list[bytes]]] = {}

        async def finish(i: int, client: RawClient, tag: bytes) -> None:
            async with limiter:
                seen.setdefault(i, []).append(await client.done(tag))
                await client.aclose()

        async with trio.open_nursery() as finishers:
            for i, client, tag in clients:
                finishers.start_soon(finish, i, client, tag)
    assert seen.pop(7) == [[b"* 1 EXISTS"]] * per_user
    assert all(lines == [[]] * per_user for lines in seen.values())
    assert srv.stats.pushes == per_user


# ---------------------------------------------------------------------------------------
# NOTIFY (RFC 5465)

NOTIFY_SET = (
    'NOTIFY SET (selected (MessageNew MessageExpunge)) (mailboxes ("Junk" "Gone") '
    "(MessageNew MessageExpunge))"
)


async def test_notify_pushes_status_for_the_mailboxes_named_during_idle(
    server: ImapTestServer,
) -> None:
    server.add_mailbox(USER, "Junk")
    server.add_mailbox(USER, "Other")
    with trio.fail_after(5):
        client = await RawClient.connect(server.port)
        await client.login_select()
        _, tagged = await client.command(NOTIFY_SET)
        assert tagged.startswith(b"t3 BAD")  # not announced: unknown command
        server.notify_capability = True
        untagged, _ = await client.command("CAPABILITY")
        assert b"NOTIFY" in untagged[0].split()
        _, tagged = await client.command(NOTIFY_SET)  # "Gone" does not exist: skipped
        assert tagged == b"t5 OK NOTIFY completed"
        tag = await client.idle()
        server.append(USER, MSG, "Other")  # not named: nothing
        junk = server.mailbox(USER, "Junk")
        server.append(USER, MSG, "Junk")
        line = await client.readline()
        assert line == (
            f'* STATUS "Junk" (MESSAGES 1 UIDNEXT 2 UIDVALIDITY {junk.uidvalidity})'.encode()
        )
        server.append(USER, MSG)  # INBOX, the selected one: EXISTS as always
        assert await client.readline() == b"* 1 EXISTS"
        assert await client.done(tag) == []
        assert server.notification_overflow(USER) == 1
        tag = await client.idle()
        assert await client.readline() == b"* OK [NOTIFICATIONOVERFLOW] NOTIFY is off now"
        server.append(USER, MSG, "Junk")  # NOTIFY is off: no push
        server.append(USER, MSG)
        assert await client.readline() == b"* 2 EXISTS"
        await client.done(tag)
    assert server.stats.bad == 1


async def test_notify_refuses_message_new_without_expunge_and_on_demand(
    server: ImapTestServer,
) -> None:
    server.notify_capability = True
    with trio.fail_after(5):
        client = await RawClient.connect(server.port)
        await client.login_select()
        _, tagged = await client.command('NOTIFY SET (mailboxes "INBOX" (MessageNew))')
        assert tagged == b"t3 NO [BADEVENT] MessageNew needs MessageExpunge"
        server.notify_refusal = "NO [NOTIFICATIONOVERFLOW] too many"
        _, tagged = await client.command(NOTIFY_SET)
        assert tagged == b"t4 NO [NOTIFICATIONOVERFLOW] too many"
        _, tagged = await client.command("NOTIFY NONE")
        assert tagged.startswith(b"t5 NO")
