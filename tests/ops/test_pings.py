"""Outbound health pings to a real HTTP receiver: success while healthy, /fail when not."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest
import trio
from trio_idle_testing.backend import ScanBackend

from tests.harness import ListSource, LogCapture, make_settings, poll_until, row, running_daemon
from tests.ops.conftest import PingReceiver, closed_port
from tests.recording_proxy import RecordingProxy, point_proxies_at
from tests.servers.dovecot import DovecotServer, DovecotUser

TOKEN = "0f1e2d3c-ping-token"


async def test_success_pings_while_every_session_is_up(
    dovecot: DovecotServer,
    dovecot_user: DovecotUser,
    backend: ScanBackend,
    ping_receiver: PingReceiver,
) -> None:
    user = dovecot_user
    settings = make_settings(
        backend.url,
        TRIO_IDLE_IMAP_SECURITY="plain",
        TRIO_IDLE_PING_URL=f"{ping_receiver.url}/ping/{TOKEN}",
        TRIO_IDLE_PING_INTERVAL="200ms",
    )
    source = ListSource([row("c", user.email, user.password, dovecot.plain_port)])
    async with running_daemon(settings, source) as daemon:
        with trio.fail_after(15):
            ping = await ping_receiver.wait_for(lambda p: p.target == f"/ping/{TOKEN}")
            await poll_until(lambda: daemon.stats.get("pings_sent", "ok") >= 1)
        assert ping.method == "GET"
        assert daemon.stats.get("ping_errors") == 0


async def test_fail_ping_with_reason_when_the_imap_server_is_down(
    backend: ScanBackend, ping_receiver: PingReceiver, logs: LogCapture
) -> None:
    settings = make_settings(
        backend.url,
        TRIO_IDLE_IMAP_SECURITY="plain",
        TRIO_IDLE_PING_URL=f"{ping_receiver.url}/ping/{TOKEN}",
        TRIO_IDLE_PING_INTERVAL="200ms",
    )
    port = closed_port()
    source = ListSource(
        [row("a", "a@example.test", "pw-a", port), row("b", "b@example.test", "pw-b", port)]
    )
    async with running_daemon(settings, source) as daemon:
        with trio.fail_after(15):
            ping = await ping_receiver.wait_for(lambda p: p.target.startswith(f"/ping/{TOKEN}/"))
            await poll_until(lambda: daemon.stats.get("pings_sent", "fail") >= 1)
            await logs.wait_for("[idle/health] unhealthy: only 0 of 2 sessions")
    url = urlsplit(ping.target)
    assert ping.method == "GET" and url.path == f"/ping/{TOKEN}/fail"
    (reason,) = parse_qs(url.query)["reason"]
    assert reason == "only 0 of 2 sessions are idle or polling (need 90%)"
    # never healthy, so never a success ping
    assert all(p.target.startswith(f"/ping/{TOKEN}/fail?") for p in ping_receiver.pings)
    assert TOKEN not in logs.text()


async def test_an_unreachable_ping_url_is_counted_not_fatal(
    backend: ScanBackend, logs: LogCapture
) -> None:
    settings = make_settings(
        backend.url,
        TRIO_IDLE_PING_URL=f"http://127.0.0.1:{closed_port()}/ping/{TOKEN}",
        TRIO_IDLE_PING_INTERVAL="100ms",
    )
    async with running_daemon(settings, ListSource()) as daemon:
        with trio.fail_after(15):
            await poll_until(lambda: daemon.stats.get("ping_errors") >= 3)
            await logs.wait_for("[idle/health] health ping failed: ping receiver unreachable")
        assert not daemon.status().stopping
    assert TOKEN not in logs.text()


@pytest.mark.parametrize("trust_env", [False, True])
async def test_pings_use_a_proxy_from_the_environment_only_when_asked(
    backend: ScanBackend,
    ping_receiver: PingReceiver,
    nursery: trio.Nursery,
    monkeypatch: pytest.MonkeyPatch,
    trust_env: bool,
) -> None:
    proxy = RecordingProxy()
    point_proxies_at(monkeypatch, await nursery.start(proxy.serve))
    url = f"{ping_receiver.url}/ping/{TOKEN}"
    settings = make_settings(
        backend.url,
        TRIO_IDLE_PING_URL=url,
        TRIO_IDLE_PING_INTERVAL="100ms",
        TRIO_IDLE_HTTP_TRUST_ENV=str(trust_env).lower(),
    )
    async with running_daemon(settings, ListSource()) as daemon:
        with trio.fail_after(15):
            await poll_until(lambda: daemon.stats.get("pings_sent", "ok") >= 2)
    if trust_env:
        assert {(p.method, p.target) for p in proxy.requests} == {("GET", url)}
        assert ping_receiver.pings == []
    else:
        assert proxy.requests == []
        assert {(p.method, p.target) for p in ping_receiver.pings} == {("GET", f"/ping/{TOKEN}")}
