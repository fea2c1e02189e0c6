"""Refused destinations (``TRIO_IDLE_REFUSE_NETWORKS``), on loopback only.

No test here opens a connection to anything outside 127.0.0.0/8 and ::1, and no name but
``localhost`` is resolved for real: the :func:`guard` fixture wraps every socket's
``connect`` and refuses (without a packet) any other destination, recording it so the
test fails; made-up names (``imap.metadata.test`` → 169.254.169.254) come from a fake
resolver patched into the asyncio loop (:class:`FakeDns`). Refusals are checked two ways:
a real listener on a refused loopback address sees no connection, and the recorded
connect calls show no attempt.
"""

from __future__ import annotations

import contextlib
import functools
import io
import ipaddress
import socket
import ssl
from collections.abc import AsyncIterator, Iterator
from typing import Any

import attrs
import pytest
import trio
import trio_asyncio
import trustme
from trio_idle_testing import ImapTestServer

from tests.fixtures import mail_connection
from tests.harness import ListSource, row, running_daemon
from tests.reliability.invariant import Ledger
from tests.reliability.rig import PASSWORD, Rig
from trio_idle.accounts.connections import MailConnection
from trio_idle.core.destinations import DEFAULT_NETWORKS, parse_networks
from trio_idle.core.errors import ImapConnectError
from trio_idle.imap.client import ImapConnection, ImapTimeouts
from trio_idle.imap.connect import connect
from trio_idle.mailbox.account_health import hint
from trio_idle.operator_commands import run_check

A = "alice@rel.test"
B = "bob@rel.test"
TIMEOUTS = ImapTimeouts(connect=5, command=5, keepalive_idle=60)
REFUSED = "which TRIO_IDLE_REFUSE_NETWORKS refuses"


def loopback(host: str) -> bool:
    return ipaddress.ip_address(host.split("%")[0]).is_loopback


@attrs.define
class Guard:
    """Every TCP/UDP ``connect`` made in the test process, by destination."""

    seen: list[tuple[str, int]] = attrs.field(factory=list)
    outside: list[tuple[str, int]] = attrs.field(factory=list)

    def to(self, port: int) -> list[tuple[str, int]]:
        return [a for a in self.seen if a[1] == port]


@pytest.fixture(autouse=True)
def guard(monkeypatch: pytest.MonkeyPatch) -> Iterator[Guard]:
    """Records every connect; refuses any outside loopback, and fails the test if one came."""
    record = Guard()
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def check(sock: socket.socket, address: Any) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            where = (str(address[0]), int(address[1]))
            record.seen.append(where)
            if not loopback(where[0]):
                record.outside.append(where)
                raise OSError(101, f"test guard: no connection to {where[0]} may be opened")

    def connect(sock: socket.socket, address: Any) -> None:
        check(sock, address)
        real_connect(sock, address)

    def connect_ex(sock: socket.socket, address: Any) -> int:
        check(sock, address)
        return real_connect_ex(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    yield record
    assert record.outside == [], "a connection outside loopback was attempted"


@attrs.define
class FakeDns:
    """Made-up names → scripted answers (one list per lookup, the last one repeats);
    ``localhost`` and IP literals go to the real resolver; anything else fails the test."""

    answers: dict[str, list[list[str] | OSError]] = attrs.field(factory=dict)
    lookups: list[str] = attrs.field(factory=list)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real = trio.socket.getaddrinfo
        fake = self

        async def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
            name = host.decode() if isinstance(host, bytes) else str(host)
            if name not in fake.answers:
                assert name == "localhost" or _is_literal(name), f"real lookup of {name!r}"
                return list(await real(host, port, *args, **kwargs))
            fake.lookups.append(name)
            script = fake.answers[name]
            answer = script.pop(0) if len(script) > 1 else script[0]
            if isinstance(answer, OSError):
                raise answer
            return [_addrinfo(address, int(port)) for address in answer]

        monkeypatch.setattr(trio.socket, "getaddrinfo", getaddrinfo)


def _is_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _addrinfo(address: str, port: int) -> tuple[Any, ...]:
    if ipaddress.ip_address(address).version == 6:
        return (socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, port, 0, 0))
    return (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, port))


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> FakeDns:
    fake = FakeDns()
    fake.install(monkeypatch)
    return fake


@attrs.define
class Listener:
    """A TCP listener that only counts the connections it accepts."""

    port: int = 0
    accepted: int = 0

    async def _accept(self, stream: trio.SocketStream) -> None:
        self.accepted += 1
        await stream.aclose()


@contextlib.asynccontextmanager
async def listener(host: str) -> AsyncIterator[Listener]:
    counter = Listener()
    listeners = await trio.open_tcp_listeners(0, host=host)
    counter.port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, counter._accept, listeners)
        yield counter
        nursery.cancel_scope.cancel()


def connection_to(host: str, port: int) -> MailConnection:
    return mail_connection("c", user_id=None, email=A, host=host, port=port, password=PASSWORD)


@contextlib.contextmanager
def refused_connect() -> Iterator[list[str]]:
    """Expect an :class:`ImapConnectError`; its message lands in the yielded list."""
    message: list[str] = []
    with pytest.raises(ImapConnectError) as info:
        yield message
    message.append(str(info.value))


# -- through the daemon, real sockets -------------------------------------------------------


async def test_a_row_on_a_refused_address_never_connects_and_others_keep_working(
    rig: Rig, guard: Guard
) -> None:
    async with listener("127.0.0.2") as refused_host:
        rows = [row(B, B, PASSWORD, refused_host.port, host="127.0.0.2"), *rig.add(A)]
        settings = rig.settings(TRIO_IDLE_REFUSE_NETWORKS="127.0.0.2/32")
        async with running_daemon(settings, ListSource(rows)):
            with trio.fail_after(10):
                await rig.idle(A)
                # refused on the first attempt and on the retry after the backoff
                lines = await rig.log(f"[idle/{B}] connect failed:", count=2)
                rig.ledger.append(A, "the other mailbox still gets its pushes")
                await rig.ledger.settle(10)
        assert refused_host.accepted == 0
        assert guard.to(refused_host.port) == []
    assert lines[0] == (
        f"[idle/{B}] connect failed: 127.0.0.2 is an address TRIO_IDLE_REFUSE_NETWORKS refuses"
    )
    assert guard.outside == []


async def test_localhost_is_refused_by_its_resolved_addresses(
    nursery: trio.Nursery, rig: Rig, guard: Guard
) -> None:
    # the healthy server lives on 127.0.0.5, outside the refused 127.0.0.1/32 and ::1
    other = ImapTestServer(keepalive_interval=120.0, uidvalidity=1000)
    await nursery.start(functools.partial(other.serve, host="127.0.0.5"))
    other.add_user(A, PASSWORD)
    healthy = Rig(other, rig.backend, rig.logs, Ledger(other, rig.backend))
    async with listener("127.0.0.1") as local:
        rows = [
            row(B, B, PASSWORD, local.port, host="localhost"),
            row(A, A, PASSWORD, other.port, host="127.0.0.5"),
        ]
        settings = rig.settings(TRIO_IDLE_REFUSE_NETWORKS="127.0.0.1/32,::1/128")
        async with running_daemon(settings, ListSource(rows)):
            with trio.fail_after(10):
                await healthy.idle(A)
                (line,) = await rig.log(f"[idle/{B}] connect failed:")
                healthy.ledger.append(A, "unaffected by the refused row")
                await healthy.ledger.settle(10)
        assert local.accepted == 0
    assert line.startswith(f"[idle/{B}] connect failed: localhost resolves to ")
    assert line.endswith(REFUSED)
    assert "127.0.0.1" in line
    assert guard.to(local.port) == []  # not even an attempt, on 127.0.0.1 or ::1


async def test_metadata_names_are_refused_and_only_allowed_addresses_are_tried(
    rig: Rig, guard: Guard, dns: FakeDns
) -> None:
    dns.answers["imap.metadata.test"] = [["169.254.169.254"]]
    dns.answers["imap.mapped.test"] = [["::ffff:169.254.169.254"]]
    dns.answers["imap.aws6.test"] = [["fd00:ec2::254"]]
    # a refused address first, then the real server: the latter is used, the former never
    dns.answers["imap.mixed.test"] = [["169.254.169.254", "127.0.0.1"]]
    mixed = "carol@rel.test"
    rows = [
        row("m1", "m1@rel.test", PASSWORD, 993, host="imap.metadata.test"),
        row("m2", "m2@rel.test", PASSWORD, 993, host="imap.mapped.test"),
        row("m3", "m3@rel.test", PASSWORD, 993, host="imap.aws6.test"),
        *rig.add(A),
        row(mixed, mixed, PASSWORD, rig.server.port, host="imap.mixed.test"),
    ]
    rig.server.add_user(mixed, PASSWORD)
    settings = rig.settings()
    assert settings.imap.refuse_networks == DEFAULT_NETWORKS  # the defaults do this
    async with running_daemon(settings, ListSource(rows)):
        with trio.fail_after(10):
            await rig.all_idle([A, mixed])
            refusals = {
                user: (await rig.log(f"[idle/{user}] connect failed:"))[0]
                for user in ("m1@rel.test", "m2@rel.test", "m3@rel.test")
            }
    assert refusals["m1@rel.test"].endswith(
        "connect failed: imap.metadata.test resolves to 169.254.169.254, " + REFUSED
    )
    assert refusals["m2@rel.test"].endswith(
        "connect failed: imap.mapped.test resolves to ::ffff:169.254.169.254, " + REFUSED
    )
    assert refusals["m3@rel.test"].endswith(
        "connect failed: imap.aws6.test resolves to fd00:ec2::254, " + REFUSED
    )
    assert guard.outside == []
    assert guard.to(993) == []
    assert {a for a in guard.to(rig.server.port) if a[0] != "127.0.0.1"} == set()


# -- connect() itself ---------------------------------------------------------------------


async def test_the_name_is_resolved_once_and_the_checked_address_is_the_one_connected(
    server: ImapTestServer, guard: Guard, dns: FakeDns
) -> None:
    # DNS rebinding: allowed on the first lookup, the metadata address on every later one
    dns.answers["imap.rebind.test"] = [["127.0.0.1"], ["169.254.169.254"]]
    server.add_user(A, PASSWORD)
    conn = connection_to("imap.rebind.test", server.port)
    async with trio_asyncio.open_loop():
        imap = await connect(conn, security="plain", context=None, timeouts=TIMEOUTS)
        try:
            await imap.login(A, PASSWORD)
        finally:
            await imap.logout(1.0)
        assert dns.lookups == ["imap.rebind.test"]  # nothing looked the name up again
        assert guard.to(server.port) == [("127.0.0.1", server.port)]
        # the next connect sees the new answer, and refuses it without trying it
        with refused_connect() as message:
            await connect(conn, security="plain", context=None, timeouts=TIMEOUTS)
    assert message == [f"imap.rebind.test resolves to 169.254.169.254, {REFUSED}"]
    assert dns.lookups == ["imap.rebind.test"] * 2
    assert guard.outside == []
    assert guard.to(server.port) == [("127.0.0.1", server.port)]


async def test_refuse_nothing_still_never_reaches_outside_the_test(
    server: ImapTestServer, guard: Guard, dns: FakeDns
) -> None:
    # With refuse=none the metadata address *would* be tried: the guard (not the daemon)
    # stops it here, which shows that the tests above would notice an attempt.
    dns.answers["imap.metadata.test"] = [["169.254.169.254"]]
    conn = connection_to("imap.metadata.test", 993)
    async with trio_asyncio.open_loop():
        with refused_connect() as message:
            await connect(
                conn,
                security="plain",
                context=None,
                timeouts=TIMEOUTS,
                refuse=parse_networks("none"),
            )
    assert message[0].startswith("cannot connect to imap.metadata.test:993: test guard")
    assert guard.outside == [("169.254.169.254", 993)]
    guard.outside.clear()  # the guard did its job: nothing was sent


async def test_resolver_failures_are_reported_as_such(guard: Guard, dns: FakeDns) -> None:
    dns.answers["imap.nowhere.test"] = [
        socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    ]
    dns.answers["imap.empty.test"] = [[]]
    async with trio_asyncio.open_loop():
        with refused_connect() as nowhere:
            await connect(
                connection_to("imap.nowhere.test", 993),
                security="plain",
                context=None,
                timeouts=TIMEOUTS,
            )
        with refused_connect() as empty:
            await connect(
                connection_to("imap.empty.test", 993),
                security="plain",
                context=None,
                timeouts=TIMEOUTS,
            )
    assert nowhere == ["cannot resolve imap.nowhere.test: Name or service not known"]
    assert empty == ["cannot resolve imap.empty.test: no addresses"]
    assert guard.seen == []


async def test_a_refused_connect_to_every_allowed_address_reports_the_first_error(
    guard: Guard, dns: FakeDns
) -> None:
    # a bound port nobody listens on: both addresses refuse the connection
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]
        dns.answers["imap.down.test"] = [["127.0.0.1", "127.0.0.6"]]
        async with trio_asyncio.open_loop():
            with refused_connect() as message:
                await connect(
                    connection_to("imap.down.test", port),
                    security="plain",
                    context=None,
                    timeouts=TIMEOUTS,
                )
    assert message == [f"connection to imap.down.test:{port} refused"]
    assert guard.to(port) == [("127.0.0.1", port), ("127.0.0.6", port)]


@pytest.mark.parametrize("security", ["tls", "starttls"])
async def test_tls_still_verifies_the_name_of_the_row(
    nursery: trio.Nursery, guard: Guard, dns: FakeDns, security: str
) -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("imap.tls.test").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    server = ImapTestServer(
        keepalive_interval=None, tls_context=server_context, implicit_tls=security == "tls"
    )
    await nursery.start(server.serve)
    server.add_user(A, PASSWORD)
    port = server.tls_port if security == "tls" else server.port
    dns.answers["imap.tls.test"] = [["127.0.0.1"]]
    dns.answers["imap.other.test"] = [["127.0.0.1"]]  # same server, a name the cert lacks
    async with trio_asyncio.open_loop():
        imap: ImapConnection = await connect(
            connection_to("imap.tls.test", port),
            security=security,
            context=client_context,
            timeouts=TIMEOUTS,
        )
        try:
            await imap.login(A, PASSWORD)
        finally:
            await imap.logout(1.0)
        with refused_connect() as message:
            await connect(
                connection_to("imap.other.test", port),
                security=security,
                context=client_context,
                timeouts=TIMEOUTS,
            )
    assert message[0].startswith(f"TLS certificate of imap.other.test:{port} not trusted:")
    assert "imap.other.test" in message[0].split("not trusted:", 1)[1]  # a name mismatch
    assert guard.outside == []


async def test_check_login_refuses_the_same_destinations(rig: Rig, guard: Guard) -> None:
    async with listener("127.0.0.2") as refused_host:
        rows = [row(B, B, PASSWORD, refused_host.port, host="127.0.0.2"), *rig.add(A)]
        settings = rig.settings(TRIO_IDLE_REFUSE_NETWORKS="127.0.0.2/32")
        out = io.StringIO()
        with trio.fail_after(20):
            status = await run_check(settings, ListSource(rows), out, login=True)
        assert refused_host.accepted == 0
    lines = {line.split()[0]: line for line in out.getvalue().splitlines()[1:-1]}
    assert status == 1
    assert lines[A].endswith("ok (login)")
    assert "FAILED: 127.0.0.2 is an address TRIO_IDLE_REFUSE_NETWORKS refuses" in lines[B]
    assert lines[B].endswith("unreachable/refused: " + hint("refused"))
    assert guard.to(refused_host.port) == []
