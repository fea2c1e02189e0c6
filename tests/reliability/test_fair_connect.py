"""Fair connecting: a host that never sends a greeting cannot make every other mailbox wait.

20 rows point at a tarpit (a listener on 127.0.0.3 that accepts and stays silent, each
connect lasting the whole connect timeout) next to 100 rows on a healthy server. With
the default share (a quarter of the 20 connect slots per host name) the healthy mailboxes
are all in IDLE about as fast as without the tarpit; with every slot open to one host (the
old behaviour, ``TRIO_IDLE_CONNECT_HOST_SHARE=1``) they would wait out the 5 s timeout.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest
import trio

from tests.harness import ListSource, row, running_daemon
from tests.reliability.rig import PASSWORD, Rig, mailbox_name

TARPIT_HOST = "127.0.0.3"  # any 127.x address is loopback on Linux
CONNECT_TIMEOUT = 5.0
MARGIN = 2.0


@attrs.define
class Tarpit:
    """Accepts TCP connections and never sends a byte; counts them."""

    port: int = 0
    open_now: int = 0
    most_open: int = 0
    accepted: int = 0

    async def _hold(self, stream: trio.SocketStream) -> None:
        self.accepted += 1
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        try:
            async with stream:
                while await stream.receive_some(4096):
                    pass  # the client's bytes (none come before a greeting) are ignored
        except trio.BrokenResourceError:
            pass
        finally:
            self.open_now -= 1


@contextlib.asynccontextmanager
async def tarpit() -> AsyncIterator[Tarpit]:
    pit = Tarpit()
    listeners = await trio.open_tcp_listeners(0, host=TARPIT_HOST)
    pit.port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, pit._hold, listeners)
        yield pit
        nursery.cancel_scope.cancel()


async def time_to_all_idle(rig: Rig, rows: list[dict[str, Any]], users: list[str]) -> float:
    """Seconds from starting a daemon with ``rows`` until every one of ``users`` is in
    IDLE on a session of this daemon (newer than any session seen before)."""
    before = max((s.id for s in rig.server.sessions()), default=0)
    wanted = set(users)
    settings = rig.settings(
        TRIO_IDLE_CONNECT_CONCURRENCY="20",
        TRIO_IDLE_CONNECT_TIMEOUT=f"{CONNECT_TIMEOUT:g}s",
    )
    assert settings.limits.connect_host_share == 0.25  # the default is what is tested
    start = trio.current_time()
    async with running_daemon(settings, ListSource(rows)):
        await rig.server.wait_for(
            lambda: wanted <= {s.user for s in rig.server.sessions() if s.idling and s.id > before}
        )
        elapsed = trio.current_time() - start
    await rig.server.wait_for(lambda: not rig.server.sessions())  # all logged out
    return elapsed


@pytest.mark.timeout(120)  # its own 60 s limit must fire first, with its message
async def test_tarpit_rows_do_not_delay_healthy_mailboxes(rig: Rig) -> None:
    healthy = [mailbox_name(n) for n in range(100)]
    healthy_rows = rig.add(*healthy)
    with trio.fail_after(60):
        async with tarpit() as pit:
            without = await time_to_all_idle(rig, healthy_rows, healthy)
            assert pit.accepted == 0
            # the tarpit rows first, so they would be the first to take the slots
            tarpit_rows = [
                row(f"pit{n}", mailbox_name(n, "pit"), PASSWORD, pit.port, host=TARPIT_HOST)
                for n in range(20)
            ]
            with_tarpit = await time_to_all_idle(rig, tarpit_rows + healthy_rows, healthy)
            # the tarpit was really in the way, and never got more than its share (5 of 20)
            assert pit.accepted >= 1
            assert pit.most_open <= 5
    assert with_tarpit <= without + MARGIN, (with_tarpit, without)
    assert with_tarpit < CONNECT_TIMEOUT  # no healthy mailbox waited out a tarpit connect
