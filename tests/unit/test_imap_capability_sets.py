"""Connections with the same capabilities share one frozenset, and no server can grow the
table that makes that so without bound."""

from __future__ import annotations

import pytest
import trio
from trio_idle_testing.imap_server import ImapTestServer

from tests.fixtures import mail_connection
from trio_idle.imap import aioimap
from trio_idle.imap.aioimap import CapabilitySets, ImapProtocol
from trio_idle.imap.client import ImapTimeouts
from trio_idle.imap.connect import connect
from trio_idle.imap.framing import DEFAULT_LIMITS
from trio_idle.imap.push_monitor import PushMonitor

TIMEOUTS = ImapTimeouts(connect=10, command=10, keepalive_idle=60)


@pytest.fixture
def table(monkeypatch: pytest.MonkeyPatch) -> CapabilitySets:
    """A fresh process table, small enough to fill (the real one is left as it was)."""
    fresh = CapabilitySets(limit=8, max_words=16, max_chars=200)
    monkeypatch.setattr(aioimap, "CAPABILITY_SETS", fresh)
    return fresh


def protocol_with(words: list[str]) -> ImapProtocol:
    protocol = ImapProtocol(PushMonitor(), DEFAULT_LIMITS)
    assert protocol.learn_capabilities(words)
    return protocol


async def test_connections_to_one_server_share_one_set(
    table: CapabilitySets, nursery: trio.Nursery
) -> None:
    server = ImapTestServer()
    for user in ("a@x.test", "b@x.test"):
        server.add_user(user, "pw")
    await nursery.start(server.serve)
    imaps = []
    for user in ("a@x.test", "b@x.test"):
        conn = mail_connection(email=user, host="127.0.0.1", port=server.port, password="pw")
        imap = await connect(conn, security="plain", context=None, timeouts=TIMEOUTS)
        await imap.login(user, "pw")
        imaps.append(imap)
    first, second = (imap.protocol.capabilities for imap in imaps)
    assert "IDLE" in first
    assert first is second
    assert len(table) == 1
    for imap in imaps:
        imap.abort()


async def test_the_same_words_in_any_order_are_one_set_and_others_are_not(
    table: CapabilitySets,
) -> None:
    a = protocol_with(["IMAP4rev1", "IDLE", "UIDPLUS"])
    b = protocol_with(["UIDPLUS", "IMAP4rev1", "IDLE"])
    c = protocol_with(["IMAP4rev1", "IDLE"])
    assert a.capabilities is b.capabilities
    assert c.capabilities == {"IMAP4rev1", "IDLE"}
    assert c.capabilities is not a.capabilities
    # LOGIN's answer may announce more: the union is shared too
    c.add_capabilities(["UIDPLUS"])
    assert c.capabilities is a.capabilities
    assert len(table) == 2


async def test_a_server_announcing_new_sets_forever_does_not_grow_the_table(
    table: CapabilitySets,
) -> None:
    """The plant: a hostile server makes up a capability on every connection."""
    for i in range(10 * table.limit):
        protocol = protocol_with(["IMAP4rev1", "IDLE", f"X-MADE-UP-{i}"])
        # past the bound the connection still has exactly what its server announced
        assert protocol.capabilities == {"IMAP4rev1", "IDLE", f"X-MADE-UP-{i}"}
    assert len(table) == table.limit
    assert table.private == 9 * table.limit
    # a set kept before the table filled is still shared
    again = protocol_with(["IMAP4rev1", "IDLE", "X-MADE-UP-0"])
    assert again.capabilities is protocol_with(["IDLE", "IMAP4rev1", "X-MADE-UP-0"]).capabilities


async def test_a_set_too_large_to_keep_stays_private(table: CapabilitySets) -> None:
    many = ["IMAP4rev1", *(f"X{i}" for i in range(table.max_words))]
    long = ["IMAP4rev1", "X" * table.max_chars]
    for words in (many, long):
        first, second = protocol_with(words), protocol_with(words)
        assert first.capabilities == second.capabilities == set(words)
        assert first.capabilities is not second.capabilities
    assert len(table) == 0
    assert table.private == 4
