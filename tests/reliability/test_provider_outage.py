"""One provider down: its sessions come back at its own pace, the others' are not queued
behind them, and no mail that arrived meanwhile is missed.

Two IMAP test servers on 127.0.0.1, on two ports: two host keys (``host:port``, see
``trio_idle.core.host_pacing``). The "outage" server has 100 mailboxes and takes 10
logins/s (``TRIO_IDLE_HOST_CONNECT_RATES``); the "other" one has 40 and no own limit.
The outage server resets every connection and refuses new ones for 2 s while mail
arrives; once its sessions are coming back, the other drops its sessions once. Both
backlogs compete for the global pace of 50 connects/s (20 handshakes at once, a quarter
per host: the defaults).

With per-host pacing the other server's 40 sessions get the 40/s the outage server cannot
use, so they are all back in IDLE after at most a few of the outage server's logins. With
one first-come-first-served pace (``TRIO_IDLE_HOST_PACING=false``) the two would take
turns and the outage server would get as many logins as the other (and more than it
takes). Asserted on counts, not on times.
"""

from __future__ import annotations

from functools import partial

import pytest
import trio
import trio.testing
from trio_idle_testing import ImapTestServer

from tests.harness import ListSource, row, running_daemon
from tests.reliability.rig import PASSWORD, Rig, mailbox_name

OUTAGE_MAILBOXES = 100
OTHER_MAILBOXES = 40
OUTAGE_RATE = 10.0
DOWNTIME = 2.0
MAILED = 10  # mailboxes of each server that get a message during the outage


def newest_idle(server: ImapTestServer, users: set[str], after: int) -> set[str]:
    """Which of ``users`` are in IDLE on a session newer than id ``after``."""
    return {s.user for s in server.sessions() if s.idling and s.id > after and s.user in users}


@pytest.mark.timeout(120)  # its own 60 s limit must fire first, with its message
async def test_other_hosts_sessions_come_back_without_waiting_for_the_outage_backlog(
    rig: Rig,
) -> None:
    outage = rig.server
    other = ImapTestServer(keepalive_interval=None)
    outage_users = [mailbox_name(n, "down") for n in range(OUTAGE_MAILBOXES)]
    other_users = [mailbox_name(n, "other") for n in range(OTHER_MAILBOXES)]
    rows = rig.add(*outage_users)
    async with trio.open_nursery() as servers:
        await servers.start(other.serve)
        for user in other_users:
            other.add_user(user, PASSWORD)
            rows.append(row(user, user, PASSWORD, other.port))
        settings = rig.settings(
            TRIO_IDLE_CONNECT_RATE="50",
            TRIO_IDLE_CONNECT_CONCURRENCY="20",
            TRIO_IDLE_HOST_CONNECT_RATES=f"127.0.0.1:{outage.port}={OUTAGE_RATE:g}",
            TRIO_IDLE_BACKOFF_INITIAL="500ms",
            TRIO_IDLE_BACKOFF_MAX="2s",
        )
        assert settings.limits.host_pacing  # the default is what is tested
        with trio.fail_after(60):
            async with running_daemon(settings, ListSource(rows)) as daemon:
                await rig.all_idle(outage_users)
                await other.wait_for(
                    lambda: newest_idle(other, set(other_users), 0) == set(other_users)
                )
                outage_before = max(s.id for s in outage.sessions())
                other_before = max(s.id for s in other.sessions())
                logins_before = outage.stats.logins
                scans_before = len(rig.backend.requests)

                # the outage: every connection reset, nothing accepted for DOWNTIME, and
                # mail arrives meanwhile on both servers
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(partial(outage.restart, how="rst", downtime=DOWNTIME))
                    await trio.testing.wait_all_tasks_blocked()
                    for n in range(MAILED):
                        outage.append(outage_users[n], b"Subject: during\r\n\r\nhi\r\n")
                        other.append(other_users[n], b"Subject: during\r\n\r\nhi\r\n")
                # back: once its backlog is coming in, the other server drops every session
                await outage.wait_for(lambda: outage.stats.logins >= logins_before + 5)
                other.drop_all()
                logins_at_drop = outage.stats.logins
                await other.wait_for(
                    lambda: newest_idle(other, set(other_users), other_before) == set(other_users)
                )
                outage_logins_meanwhile = outage.stats.logins - logins_at_drop

                await outage.wait_for(
                    lambda: (
                        newest_idle(outage, set(outage_users), outage_before) == set(outage_users)
                    )
                )
                # nothing missed: every mailbox that got mail was scanned after it
                for user in outage_users[:MAILED] + other_users[:MAILED]:
                    while not [r for r in rig.backend.requests[scans_before:] if r.email == user]:
                        await rig.backend.wait_for_requests(len(rig.backend.requests) + 1)
                assert daemon.stats.get("connects") >= 2 * (OUTAGE_MAILBOXES + OTHER_MAILBOXES)
        servers.cancel_scope.cancel()

    # the other server's 40 went at the 40/s the outage server cannot use: about 10 of the
    # outage server's logins happened meanwhile (one per 1/10 s), not the 40 or more that
    # taking turns at the global pace would have given it
    assert outage_logins_meanwhile <= OTHER_MAILBOXES * 3 // 4, outage_logins_meanwhile
