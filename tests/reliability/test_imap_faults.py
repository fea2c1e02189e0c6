"""IMAP-side faults: every one ends with the mail scanned (the invariant) plus its own behaviour.

Each test runs the real daemon in-process against :class:`ImapTestServer`, injects one fault
at run time and checks :class:`~tests.reliability.invariant.Ledger` for every message it
appended (always after the mailbox's first session: mail older than that is the daemon
restart problem, not covered here).
"""

from __future__ import annotations

import functools

import pytest
import trio
from trio_idle_testing import ImapTestServer

from tests.harness import ListSource, poll_until, running_daemon
from tests.reliability.rig import Rig

A = "alice@rel.test"


def reasons(rig: Rig, user: str, after: float = float("-inf")) -> list[str]:
    return [r.reason for r in rig.backend.requests_for(user) if r.received_at > after]


def restarted(server: ImapTestServer) -> bool:
    return any(e.event == "RESTART" for e in server.log)


async def test_server_restart_mail_during_downtime_is_caught_up(rig: Rig) -> None:
    server = rig.server
    async with running_daemon(rig.settings(), rig.source(A)) as daemon:
        with trio.fail_after(10):
            first = await rig.idle(A)
            rig.ledger.append(A, "before the restart (pushed)")
            await rig.ledger.wait_covered()
        attempts = daemon.stats.get("connect_attempts")
        with trio.fail_after(15):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(functools.partial(server.restart, downtime=2.0))
                await server.wait_for(lambda: restarted(server))  # closed, not listening
                during = rig.ledger.append(A, "during the downtime")
            # listening again
            await rig.idle(A, after=first)
            await rig.ledger.settle(10)
        assert "reconnect" in reasons(rig, A, after=during.at)
        assert rig.logs.matching(f"[idle/{A}] catch-up scan (uidnext 2→3)")
        assert rig.logs.matching(f"[idle/{A}] connection lost")
        # no reconnect storm while the port refused: each retry waits >= 200 ms (2 s down)
        assert daemon.stats.get("connect_attempts") - attempts <= 2.0 / 0.2 + 2


@pytest.mark.parametrize("how", ["rst", "fin"])
async def test_dropped_connection_reconnects_and_catches_up(rig: Rig, how: str) -> None:
    async with running_daemon(rig.settings(), rig.source(A)):
        with trio.fail_after(10):
            first = await rig.idle(A)
            assert rig.server.drop(A, how) == 1  # type: ignore[arg-type]
            await rig.log(f"[idle/{A}] connection lost")
            during = rig.ledger.append(A, f"after {how}, before the reconnect")
            await rig.idle(A, after=first)
            await rig.ledger.settle(10)
        assert reasons(rig, A, after=during.at)[0] == "reconnect"
        # and IDLE works on the new connection
        with trio.fail_after(10):
            pushed = rig.ledger.append(A, "on the new connection")
            await rig.ledger.settle(10)
        assert reasons(rig, A, after=pushed.at) == ["exists"]


async def test_bye_reconnects_and_catches_up(rig: Rig) -> None:
    async with running_daemon(rig.settings(), rig.source(A)):
        with trio.fail_after(10):
            first = await rig.idle(A)
            assert rig.server.bye(A) == 1
            line = (await rig.log(f"[idle/{A}] connection lost"))[0]
            during = rig.ledger.append(A, "after BYE")
            await rig.idle(A, after=first)
            await rig.ledger.settle(10)
        assert "BYE server shutting down" in line
        assert reasons(rig, A, after=during.at)[0] == "reconnect"


async def test_half_open_connection_is_detected_by_the_tick(rig: Rig) -> None:
    settings = rig.settings(TRIO_IDLE_TICK_INTERVAL="1s", TRIO_IDLE_COMMAND_TIMEOUT="1s")
    async with running_daemon(settings, rig.source(A)) as daemon:
        with trio.fail_after(10):
            first = await rig.idle(A)
        rig.server.faults(A).silent = True  # no FIN, no RST: the socket just stops
        during = rig.ledger.append(A, "while half-open (never pushed)")
        with trio.fail_after(10):
            line = (await rig.log(f"[idle/{A}] connection lost"))[0]
            # reconnects keep trying: LOGIN is never answered while the user is silent
            await rig.log(f"[idle/{A}] connect failed: no answer to LOGIN within 1s")
        assert "no answer to" in line and "within 1s" in line
        assert rig.backend.requests_for(A) == []
        rig.server.faults(A).silent = False
        with trio.fail_after(10):
            await rig.idle(A, after=first)
            await rig.ledger.settle(10)
        assert reasons(rig, A, after=during.at)[0] == "reconnect"
        assert daemon.stats.get("disconnects") == 1


async def test_login_refused_waits_the_auth_backoff_without_hammering(rig: Rig) -> None:
    settings = rig.settings(TRIO_IDLE_AUTH_BACKOFF="10min", TRIO_IDLE_AUTH_BACKOFF_MAX="1h")
    server = rig.server
    async with running_daemon(settings, rig.source(A)) as daemon:
        with trio.fail_after(10):
            await rig.idle(A)
            server.faults(A).refuse_login = True
            server.drop(A, "fin")
            line = (await rig.log(f"[idle/{A}] authentication failed"))[0]
        assert "next login attempt in 10min" in line
        assert "check the stored password" in line
        assert rig.handle(daemon, A).memory.state == "auth-failed"
        # A window of 15 normal reconnect delays (200 ms): no second LOGIN.
        with trio.move_on_after(3.0):
            await server.wait_for(lambda: server.stats.login_failures > 1)
        failed = [e for e in server.log if e.user == A and e.event == "LOGIN_FAILED"]
        assert len(failed) == 1
        assert server.stats.login_failures == 1
        assert len(rig.logs.matching(f"[idle/{A}] authentication failed")) == 1


async def test_login_refused_then_accepted_catches_up(rig: Rig) -> None:
    settings = rig.settings(TRIO_IDLE_AUTH_BACKOFF="1s", TRIO_IDLE_AUTH_BACKOFF_MAX="2s")
    server = rig.server
    async with running_daemon(settings, rig.source(A)):
        with trio.fail_after(10):
            first = await rig.idle(A)
            server.faults(A).refuse_login = True
            server.drop(A, "fin")
            await rig.log(f"[idle/{A}] authentication failed")
            during = rig.ledger.append(A, "while the login is refused")
            server.faults(A).refuse_login = False
            await rig.idle(A, after=first)
            await rig.ledger.settle(10)
        assert reasons(rig, A, after=during.at)[0] == "reconnect"


async def test_slow_greeting_within_the_connect_timeout_still_connects(rig: Rig) -> None:
    settings = rig.settings(TRIO_IDLE_CONNECT_TIMEOUT="3s")
    async with running_daemon(settings, rig.source(A)):
        with trio.fail_after(10):
            first = await rig.idle(A)
            rig.server.global_faults.greeting_delay = 0.5
            rig.server.drop(A, "rst")
            await rig.log(f"[idle/{A}] connection lost")
            rig.ledger.append(A, "before the slow greeting")
            await rig.idle(A, after=first)
            await rig.ledger.settle(10)
    assert not rig.logs.matching("no IMAP greeting")
    assert len(rig.logs.matching(f"[idle/{A}] connected")) == 2


async def test_greeting_slower_than_the_connect_timeout_is_reported_and_retried(rig: Rig) -> None:
    settings = rig.settings(TRIO_IDLE_CONNECT_TIMEOUT="1s")
    server = rig.server
    async with running_daemon(settings, rig.source(A)):
        with trio.fail_after(10):
            first = await rig.idle(A)
            server.global_faults.greeting_delay = 30
            server.drop(A, "rst")
            await rig.log(f"[idle/{A}] connection lost")
            rig.ledger.append(A, "while greetings are too slow")
            expected = f"[idle/{A}] connect failed: no IMAP greeting from 127.0.0.1:{server.port}"
            await rig.log(expected, count=2)  # reported, and retried
        assert rig.logs.matching(expected)[0].endswith("within 1s")
        server.global_faults.greeting_delay = 0
        with trio.fail_after(10):
            await rig.idle(A, after=first)
            await rig.ledger.settle(10)


async def test_tick_whose_noop_goes_unanswered_names_the_noop_and_reconnects(rig: Rig) -> None:
    # The tick's DONE, NOOP and IDLE run as one call; a timeout must still say which
    # command the server left unanswered.
    settings = rig.settings(TRIO_IDLE_TICK_INTERVAL="1s", TRIO_IDLE_COMMAND_TIMEOUT="1s")
    server = rig.server
    async with running_daemon(settings, rig.source(A)) as daemon:
        with trio.fail_after(10):
            first = await rig.idle(A)
            seen = server.stats.commands.copy()
            server.faults(A).response_delay = 0.25  # DONE will be answered, slowly
            await poll_until(lambda: server.stats.commands["DONE"] > seen["DONE"], 0.005)
            server.faults(A).response_delay = 60  # ...but not the NOOP after it
            line = (await rig.log(f"[idle/{A}] connection lost"))[0]
        assert line.endswith("connection lost: no answer to NOOP within 1s")
        server.faults(A).response_delay = 0
        during = rig.ledger.append(A, "after the unanswered NOOP")
        with trio.fail_after(10):
            await rig.idle(A, after=first)
            await rig.ledger.settle(10)
        assert reasons(rig, A, after=during.at)[0] in ("reconnect", "exists")
        assert daemon.stats.get("disconnects") == 1


async def test_server_that_never_pushes_is_caught_by_the_tick(rig: Rig) -> None:
    settings = rig.settings(TRIO_IDLE_TICK_INTERVAL="1s")
    source = rig.source(A)
    rig.server.faults(A).no_push = True
    async with running_daemon(settings, source) as daemon:
        with trio.fail_after(10):
            await rig.idle(A)
            during = rig.ledger.append(A, "never pushed")
            await rig.ledger.settle(10)
        assert reasons(rig, A, after=during.at) == ["tick"]
        assert rig.logs.matching(f"[idle/{A}] tick: 1 new message(s) found")
        assert rig.handle(daemon, A).memory.sessions == 1  # found without reconnecting
        assert rig.server.stats.pushes == 0


async def test_uidvalidity_change_scans_even_when_uidnext_went_down(rig: Rig) -> None:
    server = rig.server
    rig.add(A)
    for _ in range(5):
        server.append(A, b"Subject: old\r\n\r\nold\r\n")
    for uid in range(1, 5):
        server.expunge(A, uid)
    assert server.mailbox(A).uidnext == 6
    async with running_daemon(rig.settings(), ListSource(rig.rows(A))):
        with trio.fail_after(10):
            first = await rig.idle(A)
        with trio.fail_after(15):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    functools.partial(server.restart, new_uidvalidity=True, downtime=0.5)
                )
                await server.wait_for(lambda: restarted(server))
                during = rig.ledger.append(A, "after the UIDVALIDITY change")
            await rig.idle(A, after=first)
            await rig.ledger.settle(10)
        # the mailbox was rebuilt: 2 messages, UIDNEXT 3 < 6 seen before
        assert (server.mailbox(A).uidvalidity, server.mailbox(A).uidnext) == (1001, 3)
        assert reasons(rig, A, after=during.at)[0] == "reconnect"
        assert rig.logs.matching(f"[idle/{A}] catch-up scan (uidvalidity changed)")
