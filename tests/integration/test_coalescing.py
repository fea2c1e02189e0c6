"""At most one active and one pending scan per connection, whatever the burst."""

from __future__ import annotations

import trio
from trio_idle_testing.backend import ScanBackend

from tests.harness import ListSource, LogCapture, make_settings, row, running_daemon
from tests.servers.dovecot import DovecotServer

MESSAGE = b"Subject: burst\r\n\r\nbody\r\n"


async def test_burst_while_scan_held_costs_exactly_two_posts(
    dovecot: DovecotServer, backend: ScanBackend, logs: LogCapture
) -> None:
    busy, other = dovecot.new_user("busy"), dovecot.new_user("other")
    # the held scan must stay the active one (no timeout-and-retry) for the whole burst
    settings = make_settings(
        backend.url, TRIO_IDLE_IMAP_SECURITY="plain", TRIO_IDLE_SCAN_TIMEOUT="60s"
    )
    source = ListSource(
        [
            row("busy", busy.email, busy.password, dovecot.plain_port),
            row("other", other.email, other.password, dovecot.plain_port),
        ]
    )
    async with running_daemon(settings, source) as daemon:
        with trio.fail_after(15):
            await logs.wait_for(f"[idle/{busy.email}] connected")
            await logs.wait_for(f"[idle/{other.email}] connected")
        gate = backend.hold(busy.email)
        await dovecot.aappend(busy.email, busy.password, MESSAGE)
        with trio.fail_after(15):
            await backend.wait_for_requests(1, email=busy.email)  # first scan is now held open
        # 20 bursts of new mail, each announced separately by IDLE
        for n in range(20):
            await dovecot.aappend(busy.email, busy.password, MESSAGE)
            with trio.fail_after(15):
                await logs.wait_for(f"[idle/{busy.email}] exists-event received", count=n + 2)
        handle = daemon.reconciler.handles["busy"]
        assert handle.coalescer.active and handle.coalescer.pending == 1
        assert handle.coalescer.absorbed >= 19

        # the other mailbox is not delayed by the held one
        await dovecot.aappend(other.email, other.password, MESSAGE)
        with trio.fail_after(15):
            await backend.wait_for_requests(1, email=other.email, finished=True)

        gate.release()
        with trio.fail_after(15):
            await backend.wait_for_requests(2, email=busy.email, finished=True)
            await logs.wait_until(
                lambda: not handle.coalescer.active and not handle.coalescer.pending
            )
        # idle now with nothing pending: no further POST can come without new mail
        assert len(backend.requests_for(busy.email)) == 2
        assert backend.max_in_flight(busy.email) == 1
        assert daemon.stats.get("scans_coalesced") >= 19
