"""/readyz and the health ping follow what the operator must fix, not what end users
cause: real Dovecot, a real scan backend and ping receiver, the daemon in-process."""

from __future__ import annotations

from typing import Any

import httpx
import trio
from trio_idle_testing.backend import ScanBackend

from tests.harness import ListSource, LogCapture, make_settings, row, running_daemon
from tests.ops.conftest import PingReceiver, closed_port
from tests.ops.helpers import until
from tests.servers.dovecot import DovecotServer

TOKEN = "5e4d-readiness-ping"
MESSAGE = b"From: a@example.test\r\nTo: b@example.test\r\nSubject: hi\r\n\r\nbody\r\n"


def settings_for(backend: ScanBackend, ping: PingReceiver, **env: str) -> Any:
    return make_settings(
        backend.url,
        TRIO_IDLE_IMAP_SECURITY="plain",
        TRIO_IDLE_HEALTH_ADDR="127.0.0.1:0",
        TRIO_IDLE_PING_URL=f"{ping.url}/ping/{TOKEN}",
        TRIO_IDLE_PING_INTERVAL="100ms",
        **env,
    )


def sessions_are(**expected: int) -> Any:
    def check(r: httpx.Response) -> bool:
        sessions = r.json()["sessions"]
        return all(sessions[state] == n for state, n in expected.items())

    return check


def is_success(target: str) -> bool:
    return target == f"/ping/{TOKEN}"


async def test_one_users_wrong_password_out_of_two_is_ready_and_pings_success(
    dovecot: DovecotServer, backend: ScanBackend, ping_receiver: PingReceiver, logs: LogCapture
) -> None:
    good, wrong = dovecot.new_user("rdg"), dovecot.new_user("rdw")
    source = ListSource(
        [
            row("good", good.email, good.password, dovecot.plain_port),
            row("wrong", wrong.email, wrong.password + "-typo", dovecot.plain_port),
        ]
    )
    async with running_daemon(settings_for(backend, ping_receiver), source) as daemon:
        assert daemon.supervisor is not None and daemon.supervisor.health_url is not None
        async with httpx.AsyncClient(base_url=daemon.supervisor.health_url) as http:
            with trio.fail_after(20):
                await logs.wait_for(f"[idle/{wrong.email}] authentication failed")
                ready = await until(
                    lambda: http.get("/readyz"), sessions_are(idle=1, **{"auth-failed": 1})
                )
            settled = len(ping_receiver.pings)
            assert ready.status_code == 200, ready.json()
            assert ready.json()["ready"] is True and ready.json()["sessions_user_blocked"] == 1
            with trio.fail_after(10):
                # pings from now on: success, and only success
                await ping_receiver.wait_for(lambda p: len(ping_receiver.pings) > settled + 3)
            later = [p.target for p in ping_receiver.pings[settled:]]
            assert later and all(is_success(t) for t in later), later
            assert (await http.get("/readyz")).status_code == 200


async def test_every_session_failing_for_other_reasons_is_not_ready_and_pings_fail(
    backend: ScanBackend, ping_receiver: PingReceiver
) -> None:
    port = closed_port()
    source = ListSource(
        [row("a", "a@example.test", "pw-a", port), row("b", "b@example.test", "pw-b", port)]
    )
    async with running_daemon(settings_for(backend, ping_receiver), source) as daemon:
        assert daemon.supervisor is not None and daemon.supervisor.health_url is not None
        async with httpx.AsyncClient(base_url=daemon.supervisor.health_url) as http:
            with trio.fail_after(15):
                down = await until(lambda: http.get("/readyz"), sessions_are(**{"backing-off": 2}))
                ping = await ping_receiver.wait_for(
                    lambda p: p.target.startswith(f"/ping/{TOKEN}/")
                )
    assert down.status_code == 503
    assert down.json()["reasons"] == ["only 0 of 2 sessions are idle or polling (need 90%)"]
    assert ping.target.startswith(f"/ping/{TOKEN}/fail?reason=only+0+of+2")
    assert not any(is_success(p.target) for p in ping_receiver.pings)


async def test_backend_down_is_not_ready_until_it_answers_again(
    dovecot: DovecotServer, backend: ScanBackend, ping_receiver: PingReceiver, logs: LogCapture
) -> None:
    user = dovecot.new_user("rdb")
    source = ListSource([row("c", user.email, user.password, dovecot.plain_port)])
    settings = settings_for(backend, ping_receiver, TRIO_IDLE_BACKEND_DOWN_AFTER="1ms")
    async with running_daemon(settings, source) as daemon:
        assert daemon.supervisor is not None and daemon.supervisor.health_url is not None
        async with httpx.AsyncClient(base_url=daemon.supervisor.health_url) as http:
            with trio.fail_after(20):
                await until(lambda: http.get("/readyz"), lambda r: r.status_code == 200)
                backend.down()
                await dovecot.aappend(user.email, user.password, MESSAGE)
                await logs.wait_for(f"[idle/{user.email}] scan failed: backend unreachable")
                down = await until(lambda: http.get("/readyz"), lambda r: r.status_code == 503)
                failed = len(ping_receiver.pings)
                ping = await ping_receiver.wait_for(
                    lambda p: (
                        ping_receiver.pings.index(p) >= failed
                        and p.target.startswith(f"/ping/{TOKEN}/fail")
                    )
                )
            body = down.json()
            assert body["sessions"]["idle"] == 1  # the mailbox is watched: only the backend
            assert len(body["reasons"]) == 1
            assert body["reasons"][0].startswith("every request to the backend has failed for")
            assert "backend" in ping.target
            with trio.fail_after(20):
                backend.up()
                await backend.wait_for_requests(1, email=user.email, finished=True)
                up = await until(lambda: http.get("/readyz"), lambda r: r.status_code == 200)
            assert up.json()["backend_failing_seconds"] is None


async def test_an_empty_connection_list_is_ready(
    backend: ScanBackend, ping_receiver: PingReceiver
) -> None:
    async with running_daemon(settings_for(backend, ping_receiver), ListSource()) as daemon:
        assert daemon.supervisor is not None and daemon.supervisor.health_url is not None
        async with httpx.AsyncClient(base_url=daemon.supervisor.health_url) as http:
            with trio.fail_after(10):
                ready = await until(lambda: http.get("/readyz"), lambda r: r.status_code == 200)
                await ping_receiver.wait_for(lambda p: is_success(p.target))
    assert ready.json()["sessions_total"] == 0 and ready.json()["reasons"] == []
    assert not any(p.target.startswith(f"/ping/{TOKEN}/") for p in ping_receiver.pings)
