"""Scan backend faults: the scan is retried until accepted, and never piles up.

The invariant (:mod:`tests.reliability.invariant`) counts only POSTs answered 2xx, so
"the mail was scanned" means the backend really accepted a scan that started after it.
"""

from __future__ import annotations

import pytest
import trio
from trio_idle_testing.backend import Reply

from tests.harness import ListSource, poll_until, row, running_daemon
from tests.recording_proxy import RecordingProxy, point_proxies_at
from tests.reliability.rig import Rig

A = "alice@rel.test"


async def test_backend_down_then_up(rig: Rig) -> None:
    async with running_daemon(rig.settings(), rig.source(A)) as daemon:
        with trio.fail_after(10):
            await rig.idle(A)
        rig.backend.down()
        rig.ledger.append(A, "while the backend is down")
        with trio.fail_after(10):
            await rig.log(f"[idle/{A}] scan failed: backend unreachable", count=3)
        rig.backend.up()
        with trio.fail_after(10):
            await rig.ledger.settle(10)
            await rig.quiet(daemon, A)
        assert rig.backend.max_in_flight(A) == 1
        assert len(rig.backend.requests_for(A)) == 1  # refused attempts never arrived
        assert daemon.stats.get("scans_retried", "network") >= 3


async def test_backend_500s_are_retried_with_the_same_scan_id(rig: Rig) -> None:
    rig.backend.script(A, [Reply(500), Reply(503), Reply(500)])
    async with running_daemon(rig.settings(), rig.source(A)) as daemon:
        with trio.fail_after(10):
            await rig.idle(A)
            rig.ledger.append(A, "answered 500 three times first")
            await rig.ledger.settle(10)
            await rig.quiet(daemon, A)
        requests = rig.backend.requests_for(A)
        assert [r.status for r in requests] == [500, 503, 500, 200]
        assert len({r.scan_id for r in requests}) == 1  # one scan, retried
        assert rig.backend.max_in_flight(A) == 1


async def test_a_kept_alive_connection_the_backend_dropped_costs_no_retry(rig: Rig) -> None:
    """The backend closes the kept-alive connection the second scan goes out on, before
    answering (its keep-alive timeout crossing the request): that scan is sent again at
    once on a fresh connection, same scan id: no "scan failed", no backoff, counted."""
    rig.backend.script(A, [Reply(), Reply(disconnect=True)])
    async with running_daemon(rig.settings(), rig.source(A)) as daemon:
        with trio.fail_after(10):
            await rig.idle(A)
            rig.ledger.append(A, "answered on a new connection, kept alive")
            await rig.ledger.settle(10)
            await rig.quiet(daemon, A)
            rig.ledger.append(A, "sent on the kept-alive connection, which is dropped")
            await rig.ledger.settle(10)
            await rig.quiet(daemon, A)
        first, dropped, answered = rig.backend.requests_for(A)
        assert (dropped.connection_number, dropped.status) == (first.connection_number, None)
        assert answered.connection_number != first.connection_number
        assert answered.scan_id == dropped.scan_id
        assert daemon.stats.get("backend_stale_connection_retries") == 1
        assert daemon.stats.get("scans_retried") == 0
        assert rig.logs.matching(f"[idle/{A}] scan failed") == []


async def test_every_scan_line_names_the_scan_id_the_backend_received(rig: Rig) -> None:
    """A scan can be followed from the daemon's log into the backend's: its failed
    attempts and its accepted one name the id the backend got as ``x-scan-id``."""
    rig.backend.script(A, [Reply(503)])
    async with running_daemon(rig.settings(), rig.source(A)) as daemon:
        with trio.fail_after(10):
            await rig.idle(A)
            rig.ledger.append(A, "answered 503 first")
            await rig.ledger.settle(10)
            await rig.quiet(daemon, A)
        failed, accepted = rig.backend.requests_for(A)
        assert failed.scan_id and failed.scan_id == accepted.scan_id
        # each scan names its own id: these lines are this scan's, and only they
        failed_line, done_line = rig.logs.matching(f"(scan {accepted.scan_id})")
        assert f"[idle/{A}] scan failed: backend answered 503" in failed_line
        assert f"[idle/{A}] scan-triggered → scanned=" in done_line


async def test_backend_429_retry_after_is_honoured(rig: Rig) -> None:
    # the normal retry delay is at most 500 ms here; Retry-After asks for 1 s
    rig.backend.script(A, [Reply(429, headers={"retry-after": "1"})])
    async with running_daemon(rig.settings(), rig.source(A)):
        with trio.fail_after(10):
            await rig.idle(A)
            rig.ledger.append(A, "rate limited first")
            await rig.ledger.settle(10)
        limited, accepted = rig.backend.requests_for(A)
        assert (limited.status, accepted.status) == (429, 200)
        assert accepted.received_at - limited.received_at >= 1.0
        assert rig.logs.matching(f"[idle/{A}] scan failed: backend answered 429 (rate limited)")


async def test_backend_slower_than_the_scan_timeout_is_retried(rig: Rig) -> None:
    rig.backend.script(A, [Reply(delay=4.0)])
    settings = rig.settings(TRIO_IDLE_SCAN_TIMEOUT="1s")
    async with running_daemon(settings, rig.source(A)) as daemon:
        with trio.fail_after(10):
            await rig.idle(A)
            rig.ledger.append(A, "first reply too slow")
            await rig.log(f"[idle/{A}] scan failed: backend sent nothing for 1s (read timeout)")
            await rig.ledger.settle(10)
            await rig.quiet(daemon, A)
        slow, retried = rig.backend.requests_for(A)
        assert slow.scan_id == retried.scan_id
        assert retried.status == 200
        # the retry went out only after the slow attempt was given up (no stampede). The
        # backend's max_in_flight is 2 here: it only notices the abandoned request when its
        # 4 s delay is over; from the daemon's side one attempt was active at a time.
        assert daemon.stats.get("scans_sent") == 2


async def test_outage_with_200_new_mails_costs_at_most_two_scans_after_recovery(rig: Rig) -> None:
    async with running_daemon(rig.settings(), rig.source(A)) as daemon:
        with trio.fail_after(10):
            await rig.idle(A)
        handle = rig.handle(daemon, A)
        rig.backend.down()
        for n in range(1, 201):
            rig.ledger.append(A, f"outage mail {n}")

            def seen(count: int = n) -> bool:
                mailbox = handle.memory.mailbox
                return mailbox is not None and mailbox.exists == count

            with trio.fail_after(5):  # the daemon saw it (one EXISTS each)
                await rig.logs.wait_until(seen)
            assert handle.coalescer.pending <= 1
        assert handle.coalescer.active and handle.coalescer.pending == 1
        assert handle.coalescer.absorbed >= 150
        assert rig.backend.requests_for(A) == []
        rig.backend.up()
        with trio.fail_after(10):
            await rig.ledger.settle(10)
            await rig.quiet(daemon, A)
        assert len(rig.backend.requests_for(A)) <= 2
        assert rig.backend.max_in_flight(A) == 1


async def test_backend_500_outage_keeps_one_scan_in_flight(rig: Rig) -> None:
    failing = True
    rig.backend.default_reply = lambda request: Reply(500) if failing else Reply()
    async with running_daemon(rig.settings(), rig.source(A)) as daemon:
        with trio.fail_after(10):
            await rig.idle(A)
        handle = rig.handle(daemon, A)
        with trio.fail_after(10):
            for n in range(8):  # each new mail lands while the scan is being retried
                rig.ledger.append(A, f"during the 500 outage #{n}")
                await rig.backend.wait_for_requests(n + 1, email=A, finished=True)
                assert handle.coalescer.pending <= 1
        failing = False
        answered_500 = len(rig.backend.requests_for(A))
        with trio.fail_after(10):
            await rig.ledger.settle(10)
            await rig.quiet(daemon, A)
        assert len(rig.backend.requests_for(A)) - answered_500 <= 2
        assert rig.backend.max_in_flight(A) == 1


async def test_an_oversized_reply_is_retried_with_the_same_scan_id(rig: Rig) -> None:
    rig.backend.script(A, [Reply(body_size=300 << 20, chunked=True)])
    async with running_daemon(rig.settings(), rig.source(A)) as daemon:
        with trio.fail_after(10):
            await rig.idle(A)
            rig.ledger.append(A, "first answered with a 300 MB body")
            await rig.log(f"[idle/{A}] scan failed: backend reply larger than 64 KiB")
            await rig.backend.wait_for_requests(2, email=A, finished=True)
            await rig.log(f"[idle/{A}] scan-triggered → scanned=1 blocked=0")
            await rig.quiet(daemon, A)
        oversized, retried = rig.backend.requests_for(A)
        assert oversized.scan_id == retried.scan_id
        assert retried.status == 200
        assert daemon.stats.get("scans_sent") == 2


async def test_the_scan_ignores_proxies_named_in_the_environment(
    rig: Rig, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = RecordingProxy()
    point_proxies_at(monkeypatch, await nursery.start(proxy.serve))
    async with running_daemon(rig.settings(), rig.source(A)) as daemon:
        with trio.fail_after(10):
            await rig.idle(A)
            rig.ledger.append(A, "with HTTP_PROXY set")
            await rig.ledger.settle(10)
            await rig.log(f"[idle/{A}] scan-triggered → scanned=1 blocked=0")
            await rig.quiet(daemon, A)
    assert proxy.requests == []  # ADMIN_SECRET never went there


async def test_http_trust_env_sends_the_scan_through_the_proxy(
    rig: Rig, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = RecordingProxy()
    point_proxies_at(monkeypatch, await nursery.start(proxy.serve))
    settings = rig.settings(TRIO_IDLE_HTTP_TRUST_ENV="true")
    async with running_daemon(settings, rig.source(A)):
        with trio.fail_after(10):
            await rig.idle(A)
            rig.ledger.append(A, "through the proxy")
            await rig.log(f"[idle/{A}] scan-triggered → scanned=7 blocked=3")  # its answer
    # the account health report ("ok") goes through the proxy too
    (seen,) = [r for r in proxy.requests if r.target != rig.backend.url + rig.backend.status_path]
    assert (seen.method, seen.target) == ("POST", rig.backend.scan_url)
    assert rig.backend.requests_for(A) == []


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_a_redirect_is_not_followed_and_the_scan_is_rejected(
    rig: Rig, nursery: trio.Nursery, status: int
) -> None:
    """The backend answers a redirect to another server: nothing goes there (the secret
    header stays with BACKEND_URL), the scan is not retried, and one error line says so,
    as the contract has it for any 3xx."""
    elsewhere = RecordingProxy()
    await nursery.start(elsewhere.serve)
    location = f"{elsewhere.url}{rig.backend.path}"
    rig.backend.script(A, [Reply(status, headers={"location": location})])
    async with running_daemon(rig.settings(), rig.source(A)) as daemon:
        with trio.fail_after(10):
            await rig.idle(A)
            rig.server.append(A, b"Subject: redirected\r\n\r\nx\r\n")
            (line,) = await rig.log(f"[idle/{A}] scan rejected: backend answered {status}")
            await rig.quiet(daemon, A)
    assert "(not retried)" in line and location not in line
    assert [r.status for r in rig.backend.requests_for(A)] == [status]
    assert elsewhere.requests == []
    assert daemon.stats.get("scans_retried", "network") == 0


async def test_a_token_endpoint_that_fails_counts_against_the_backend(rig: Rig) -> None:
    """Readiness watches whether the backend answers: in the daemon the token requests
    feed the same watch as the scans, so a backend that only ever refuses tokens (with
    a 503) is seen failing before any scan was sent."""
    rig.backend.token_reply = lambda request: Reply(503)
    rig.server.add_user(A, "unused-password")
    oauth_row = {**row(A, A, "unused-password", rig.server.port), "authType": "oauth2"}
    settings = rig.settings(TRIO_IDLE_CONNECTION_STATUS="false")
    async with running_daemon(settings, ListSource([oauth_row])) as daemon:
        with trio.fail_after(10):
            await poll_until(lambda: daemon.backend().failing_since is not None)
        sent = rig.backend.requests_for(A)
        assert sent and {r.path for r in sent} == {rig.backend.token_path}
