"""Account health reports at the backend: the in-process daemon, our IMAP test server and
the test backend's status route, over real sockets on 127.0.0.1.

What a backend team would notice: an auth failure arrives exactly once, the recovery once;
a short outage arrives never, a long one once it has lasted; a failing endpoint gets the
newest state, one report at a time; no message carries the password.
"""

from __future__ import annotations

import random

import trio
from loguru import logger
from trio_idle_testing.backend import Reply, ScanRequest

from tests.fixtures import webhook_client
from tests.harness import KEY, ListSource, poll_until, row, running_daemon
from tests.reliability.rig import PASSWORD, Rig
from trio_idle.accounts.connections import MailConnection, build_connection
from trio_idle.accounts.outcome_text import ConnectionSecrets
from trio_idle.core.crypto import derive_key
from trio_idle.core.errors import ImapAuthError
from trio_idle.core.stats import Stats
from trio_idle.mailbox.account_health import Connected
from trio_idle.mailbox.health_reporter import AccountHealth, StatusPolicy, run_health_reports

A = "a@health.test"


def states(rig: Rig, conn_id: str = A) -> list[str]:
    return [r.body["state"] for r in rig.backend.status_for(conn_id, accepted=True)]


async def test_an_auth_failure_is_reported_once_and_the_recovery_once(rig: Rig) -> None:
    settings = rig.settings(TRIO_IDLE_AUTH_BACKOFF="100ms", TRIO_IDLE_AUTH_BACKOFF_MAX="200ms")
    server, backend = rig.server, rig.backend
    async with running_daemon(settings, rig.source(A)):
        with trio.fail_after(15):
            await rig.idle(A)
            await backend.wait_for_status(lambda: states(rig) == ["ok"])
            server.faults(A).refuse_login = True
            server.drop(A, "fin")
            await server.wait_for(lambda: server.stats.login_failures >= 4)
            await backend.wait_for_status(lambda: len(states(rig)) >= 2)
            server.faults(A).refuse_login = False
            await backend.wait_for_status(lambda: len(states(rig)) >= 3)
            await rig.idle(A)
    assert states(rig) == ["ok", "auth_failed", "ok"]
    failed = backend.status_for(A, accepted=True)[1].body
    assert failed["reason"] == "invalid_credentials"
    assert "AUTHENTICATIONFAILED" in failed["message"]
    assert failed["userId"] == "user-1" and failed["email"] == A
    assert all(r.problems == [] for r in backend.status_reports)
    # the scans' ledger never saw a health report
    assert all(r.path == backend.path for r in backend.requests)


async def test_unreachable_is_reported_only_after_it_lasted(rig: Rig) -> None:
    settings = rig.settings(
        TRIO_IDLE_UNREACHABLE_AFTER="1500ms",
        TRIO_IDLE_CONNECT_TIMEOUT="300ms",
        TRIO_IDLE_BACKOFF_INITIAL="100ms",
        TRIO_IDLE_BACKOFF_MAX="200ms",
    )
    server, backend = rig.server, rig.backend
    async with running_daemon(settings, rig.source(A)) as daemon:
        with trio.fail_after(20):
            first = await rig.idle(A)
            health = rig.handle(daemon, A).health.tracker
            await backend.wait_for_status(lambda: states(rig) == ["ok"])
            # a server restart: back within the debounce, nobody is told
            server.drop(A, "rst")
            second = await rig.idle(A, after=first)
            # the server sees IDLE before the daemon has read its "+ idling"
            await poll_until(lambda: health.current is not None and health.current.state == "ok")
            # a real outage: the server accepts but never greets
            server.global_faults.silent = True
            down_at = trio.current_time()
            server.drop(A, "rst")
            await backend.wait_for_status(lambda: len(states(rig)) >= 2)
            told_at = backend.status_for(A, accepted=True)[1].received_at
            server.global_faults.silent = False
            await backend.wait_for_status(lambda: len(states(rig)) >= 3)
            await rig.idle(A, after=second)
    assert states(rig) == ["ok", "unreachable", "ok"]
    unreachable = backend.status_for(A, accepted=True)[1].body
    assert unreachable["reason"] == "timeout"
    assert unreachable["attempts"] >= 2
    assert told_at - down_at >= 1.5  # the debounce's lower bound, on trio's clock


async def test_no_secret_in_the_message_even_when_the_server_quotes_the_password(
    rig: Rig,
) -> None:
    settings = rig.settings(TRIO_IDLE_AUTH_BACKOFF="1h", TRIO_IDLE_AUTH_BACKOFF_MAX="1h")
    rig.server.add_user(A, PASSWORD)
    rig.server.faults(A).refuse_login = True
    rig.server.faults(A).login_reply = f"[ALERT] Please log in via your web browser ({PASSWORD})"
    async with running_daemon(settings, ListSource(rig.rows(A))):
        with trio.fail_after(15):
            await rig.backend.wait_for_status(lambda: len(states(rig)) >= 1)
    (report,) = rig.backend.status_for(A)
    assert report.body["state"] == "auth_failed"
    assert "Please log in via your web browser" in report.body["message"]
    assert PASSWORD.encode() not in report.raw_body
    assert "********" in report.body["message"]


async def test_a_failing_endpoint_gets_the_newest_state_one_report_at_a_time(rig: Rig) -> None:
    """The reporter alone against the real sink: it fails while the state changes."""
    backend = rig.backend
    failing = True

    def answer(request: ScanRequest) -> Reply:
        return Reply(503, delay=0.05) if failing else Reply(200, json={})

    backend.status_reply = answer
    settings = rig.settings(TRIO_IDLE_SCAN_RETRY_INITIAL="200ms", TRIO_IDLE_SCAN_RETRY_MAX="400ms")
    conn = build_connection(row(A, A, PASSWORD, 1), derive_key(KEY))
    assert isinstance(conn, MailConnection)
    health = AccountHealth(conn, unreachable_after=600)
    webhook = webhook_client(
        backend.url + backend.status_path,
        secret=settings.webhook.admin_secret,
        total_timeout=5,
        max_connections=4,
    )
    policy = StatusPolicy(backend.url + backend.status_path, 0.2, 0.4)
    failure = ConnectionSecrets.of(conn).failure(
        ImapAuthError("login rejected: NO [AUTHENTICATIONFAILED] x")
    )
    try:
        async with trio.open_nursery() as nursery:
            stats, rng = Stats(), random.Random()
            # wired as the reconciler does: a reporter runs only while a report is due
            health.attach(
                lambda: nursery.start_soon(
                    run_health_reports, health, webhook, policy, stats, logger, rng
                )
            )
            with trio.fail_after(15):
                health.observe(failure)
                await backend.wait_for_status(lambda: len(backend.status_reports) >= 1)
                health.observe(Connected(idle=False))
                await backend.wait_for_status(
                    lambda: any(r.body["state"] == "degraded" for r in backend.status_reports)
                )
                health.observe(Connected(idle=True))
                await backend.wait_for_status(
                    lambda: any(r.body["state"] == "ok" for r in backend.status_reports)
                )
                failing = False
                await backend.wait_for_status(lambda: bool(backend.status_for(A, accepted=True)))
            health.detach()
            nursery.cancel_scope.cancel()
    finally:
        await webhook.aclose()
    sent = [r.body["state"] for r in backend.status_reports]
    assert [r.body["state"] for r in backend.status_for(A, accepted=True)] == ["ok"]
    # once a newer state was sent, an older one never was again
    assert sent[sent.index("degraded") :].count("auth_failed") == 0
    assert sent[sent.index("ok") :] == ["ok"] * len(sent[sent.index("ok") :])
    assert backend.max_status_in_flight == 1
