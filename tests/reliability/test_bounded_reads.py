"""Bounded reads: what a server sends is framed by the daemon before aioimaplib parses it.

Each test plays one server behaviour on a scripted server next to a healthy mailbox and
checks what a user would see: the log line naming the bound, the mailbox reconnecting
with backoff, or (for a burst that is merely large) the session staying up.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trio
import trustme
from trio_idle_testing import ImapTestServer

from tests.harness import make_settings, row, running_daemon
from tests.reliability.rig import Rig
from tests.reliability.scripted_server import Peer, ScriptedServer

A = "alice@rel.test"
BAD = "bad@rel.test"


async def enter_idle(peer: Peer) -> bytes:
    """Greet, LOGIN, SELECT (0 messages), wait for IDLE and confirm it; return its tag."""
    await peer.login_and_select()
    tag = await peer.expect_idle()
    await peer.send(b"+ idling\r\n")
    return tag


async def burst_then_exists(peer: Peer) -> None:
    await enter_idle(peer)
    # one write: 3,000 untagged lines ran aioimaplib's line parser out of stack
    await peer.send(b"* 0 FETCH (FLAGS (\\Seen))\r\n" * 1500 + b"* OK still here\r\n" * 1500)
    await peer.send(b"* 1 EXISTS\r\n")
    while True:
        await peer.line()


async def test_three_thousand_lines_in_one_read_keep_the_session(
    rig: Rig, nursery: trio.Nursery
) -> None:
    bad = ScriptedServer(burst_then_exists)
    await nursery.start(bad.serve)
    source = rig.source(A)
    source.rows.append(row(BAD, BAD, "x", bad.port))
    async with running_daemon(rig.settings(), source) as daemon:
        with trio.fail_after(10):
            await rig.log(f"[idle/{BAD}] exists-event received (new mail)")
            await rig.backend.wait_for_requests(1, BAD, finished=True)
        assert [r.reason for r in rig.backend.requests_for(BAD)] == ["exists"]
        assert bad.connections == 1
        assert rig.handle(daemon, BAD).memory.sessions == 1
        assert not rig.logs.matching(f"[idle/{BAD}] connection lost")
        assert daemon.stats.get("internal_errors") == 0


async def long_line(peer: Peer) -> None:
    await enter_idle(peer)
    chunk = b"x" * 65536
    for _ in range(64):  # 4 MiB, never a CRLF
        await peer.send(chunk)


async def huge_literal(peer: Peer) -> None:
    await enter_idle(peer)
    await peer.send(b"* 1 FETCH (BODY[] {999999999}\r\n")
    chunk = b"y" * 65536
    for _ in range(64):
        await peer.send(chunk)


async def bare_lf_literal(peer: Peer) -> None:
    await enter_idle(peer)
    # aioimaplib's pattern reads "{999999}\n" as a literal; the framer (rightly) does not
    await peer.send(b"* OK {999999}\n\r\n" + b"z" * 65536)
    while True:
        await peer.line()


async def long_select_answer(peer: Peer) -> None:
    await peer.send(b"* OK [CAPABILITY IMAP4rev1 IDLE] ready\r\n")
    while True:
        tag, name = await peer.command()
        if name == b"CAPABILITY":
            await peer.send(b"* CAPABILITY IMAP4rev1 IDLE\r\n" + tag + b" OK done\r\n")
        elif name == b"LOGIN":
            await peer.send(tag + b" OK LOGIN completed\r\n")
        elif name == b"SELECT":
            line = b"* OK " + b"s" * 1000 + b"\r\n"
            for _ in range(3000):  # ~3 MiB of lines aioimaplib would keep for SELECT
                await peer.send(line)


@pytest.mark.parametrize(
    ("script", "kind", "reason"),
    [
        (
            long_line,
            "connection lost",
            "server sent a line longer than 1 MiB without CRLF",
        ),
        (
            huge_literal,
            "connection lost",
            "server announced a 953.7 MiB literal (limit 1 MiB)",
        ),
        (
            bare_lf_literal,
            "connection lost",
            "server sent a malformed response (a bare LF next to a literal)",
        ),
        (
            long_select_answer,
            "connect failed",
            "server sent more than 2 MiB in answer to SELECT",
        ),
    ],
    ids=lambda v: getattr(v, "__name__", None),
)
async def test_a_bound_exceeded_drops_that_connection_with_one_clear_line(
    rig: Rig, nursery: trio.Nursery, script: object, kind: str, reason: str
) -> None:
    bad = ScriptedServer(script)  # type: ignore[arg-type]
    await nursery.start(bad.serve)
    source = rig.source(A)
    source.rows.append(row(BAD, BAD, "x", bad.port))
    async with running_daemon(rig.settings(), source) as daemon:
        with trio.fail_after(10):
            await rig.idle(A)
            await bad.wait_connections(2)  # dropped, then reconnected after the backoff
            await rig.log(f"[idle/{BAD}] reconnecting in")
        line = next(x for x in rig.logs.matching(f"[idle/{BAD}] ") if f" {kind}: " in x)
        # "connection lost: IDLE: connection lost (…)" if it came while IDLE was being entered
        assert line.startswith(f"[idle/{BAD}] {kind}: "), line
        assert line.endswith(f"connection lost ({reason})"), line
        assert "\n" not in line
        rig.ledger.append(A, "after the bad connections")
        with trio.fail_after(5):
            await rig.ledger.wait_covered()
        assert daemon.stats.get("internal_errors") == 0
        assert daemon.stats.get("asyncio_errors") == 0


async def test_lines_after_the_greeting_do_not_each_start_a_handshake(
    rig: Rig, nursery: trio.Nursery
) -> None:
    commands: list[bytes] = []

    async def script(peer: Peer) -> None:
        await peer.send(b"* OK ready\r\n" + b"* OK and more\r\n" * 3000)
        while True:
            tag, name = await peer.command()
            commands.append(name)
            if name == b"CAPABILITY":
                await peer.send(b"* CAPABILITY IMAP4rev1 IDLE\r\n" + tag + b" OK done\r\n")
            else:
                await peer.send(tag + b" NO go away\r\n")

    bad = ScriptedServer(script)
    await nursery.start(bad.serve)
    source = rig.source(A)
    source.rows.append(row(BAD, BAD, "x", bad.port))
    async with running_daemon(rig.settings(), source) as daemon:
        with trio.fail_after(10):
            await rig.log(f"[idle/{BAD}] authentication failed")
        assert commands[:2] == [b"CAPABILITY", b"LOGIN"]  # then LOGOUT
        assert commands.count(b"CAPABILITY") == 1
        assert daemon.stats.get("internal_errors") == 0


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


async def test_starttls_works_through_the_framer(
    rig: Rig, nursery: trio.Nursery, ca: trustme.CA, tmp_path: Path
) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    tls = ImapTestServer(tls_context=context, keepalive_interval=120.0)
    await nursery.start(tls.serve)
    tls.add_user(A, "pw-tls")
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    settings = make_settings(
        rig.backend.url, TRIO_IDLE_IMAP_SECURITY="starttls", TRIO_IDLE_CA_FILE=str(ca_file)
    )
    source = rig.source()
    source.rows.append(row(A, A, "pw-tls", tls.port))
    async with running_daemon(settings, source):
        with trio.fail_after(10):
            await tls.wait_for(lambda: any(s.idling for s in tls.sessions(A)))
            tls.append(A, b"Subject: over TLS\r\n\r\nhi\r\n")
            await rig.log(f"[idle/{A}] exists-event received (new mail)")
        assert [s.tls for s in tls.sessions(A)] == [True]


async def test_plaintext_after_starttls_is_refused(rig: Rig, nursery: trio.Nursery) -> None:
    async def script(peer: Peer) -> None:
        await peer.send(b"* OK [CAPABILITY IMAP4rev1 STARTTLS IDLE] ready\r\n")
        while True:
            tag, name = await peer.command()
            if name == b"CAPABILITY":
                await peer.send(b"* CAPABILITY IMAP4rev1 STARTTLS IDLE\r\n" + tag + b" OK ok\r\n")
            elif name == b"STARTTLS":
                # in the same write: an answer the attacker wants read as if under TLS
                await peer.send(tag + b" OK begin TLS\r\n* CAPABILITY IMAP4rev1 IDLE\r\n")
                await peer.line()

    bad = ScriptedServer(script)
    await nursery.start(bad.serve)
    source = rig.source()
    source.rows.append(row(BAD, BAD, "x", bad.port))
    async with running_daemon(
        make_settings(rig.backend.url, TRIO_IDLE_IMAP_SECURITY="starttls"), source
    ):
        with trio.fail_after(10):
            line = (await rig.log(f"[idle/{BAD}] connect failed"))[0]
        assert line == (
            f"[idle/{BAD}] connect failed: 127.0.0.1:{bad.port} failed the IMAP greeting: "
            "server sent data after accepting STARTTLS (refused)"
        )
