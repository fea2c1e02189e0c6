"""What an idling connection's IMAP objects hold of their own: no set, event, bound method
or flag object per connection (a daemon holds thousands; each was 64-700 bytes)."""

from __future__ import annotations

import gc
import types

import trio
from trio_idle_testing.imap_server import ImapTestServer

from tests.fixtures import mail_connection
from trio_idle.imap.client import ImapConnection, ImapTimeouts
from trio_idle.imap.connect import connect

TIMEOUTS = ImapTimeouts(connect=10, command=10, keepalive_idle=60)
#: kinds of object a connection's parts must not hold one each of
PER_CONNECTION = (set, dict, bytearray, trio.Event, types.MethodType)


def held(imap: ImapConnection) -> list[str]:
    """The objects of the kinds above that the connection's parts refer to directly."""
    protocol = imap.protocol
    parts = {
        "connection": imap,
        "protocol": protocol,
        "monitor": imap.monitor,
        "framer": protocol.framer,
        "restart machine": imap._restart,
        "idle command": imap._idle,
    }
    found = []
    for name, part in parts.items():
        own = getattr(part, "__dict__", {})  # aioimaplib's attributes live there
        values = [*(r for r in gc.get_referents(part) if r is not own), *own.values()]
        found += [f"{name}: {type(v).__name__}" for v in values if isinstance(v, PER_CONNECTION)]
    return found


async def test_an_idling_connection_holds_no_set_event_bound_method_or_buffer(
    nursery: trio.Nursery,
) -> None:
    server = ImapTestServer()
    server.add_user("a@x.test", "pw")
    await nursery.start(server.serve)
    conn = mail_connection(email="a@x.test", host="127.0.0.1", port=server.port, password="pw")
    imap = await connect(conn, security="plain", context=None, timeouts=TIMEOUTS)
    try:
        await imap.login("a@x.test", "pw")
        await imap.select("INBOX")
        await imap.noop()  # an async command came and went
        await imap.idle_start()
        assert imap._idle is not None
        assert held(imap) == []
    finally:
        imap.abort()
