"""The health endpoint over real HTTP while sessions run against a real Dovecot."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from trio_idle_testing.backend import ScanBackend

from tests.harness import (
    ADMIN_SECRET,
    KEY,
    ListSource,
    LogCapture,
    make_settings,
    row,
    running_daemon,
)
from tests.ops.conftest import closed_port
from tests.ops.helpers import sample, until
from tests.reliability.scripted_server import Peer, ScriptedServer
from tests.servers.dovecot import DovecotServer
from trio_idle.core.errors import SourceError
from trio_idle.runtime.supervision import StartupError

STATUS_TOKEN = "st-9f8e7d6c5b4a39281706f5e4d3c2b1a0"
BEARER = {"authorization": f"Bearer {STATUS_TOKEN}"}


def _ready(r: httpx.Response) -> bool:
    return r.status_code == 200


def _not_ready(r: httpx.Response) -> bool:
    return r.status_code == 503


async def test_readyz_metrics_and_status_follow_the_sessions(
    dovecot: DovecotServer, backend: ScanBackend, logs: LogCapture
) -> None:
    a, b = dovecot.new_user("hza"), dovecot.new_user("hzb")
    settings = make_settings(
        backend.url,
        TRIO_IDLE_IMAP_SECURITY="plain",
        TRIO_IDLE_HEALTH_ADDR="127.0.0.1:0",
        TRIO_IDLE_STATUS_TOKEN=STATUS_TOKEN,
        # a kicked session stays in backing-off long enough to be seen
        TRIO_IDLE_BACKOFF_INITIAL="3s",
        TRIO_IDLE_BACKOFF_MAX="5s",
    )
    source = ListSource(
        [
            row("a", a.email, a.password, dovecot.plain_port),
            row("b", b.email, b.password, dovecot.plain_port),
        ]
    )
    async with running_daemon(settings, source) as daemon:
        assert daemon.supervisor is not None and daemon.supervisor.health_url is not None
        async with httpx.AsyncClient(base_url=daemon.supervisor.health_url) as http:
            # both sessions up: ready, and the metrics say so
            with trio.fail_after(20):
                ready = await until(lambda: http.get("/readyz"), _ready)
            body = ready.json()
            assert body["ready"] is True and body["reasons"] == []
            assert body["sessions"] == {
                "connecting": 0,
                "idle": 2,
                "polling": 0,
                "backing-off": 0,
                "auth-failed": 0,
            }
            assert body["sessions_total"] == 2 and body["connections_in_source"] == 2

            metrics = (await http.get("/metrics")).text
            assert sample(metrics, "trio_idle_sessions", state="idle") == 2
            assert sample(metrics, "trio_idle_sessions", state="backing-off") == 0
            assert sample(metrics, "trio_idle_connects_total") == 2
            assert sample(metrics, "trio_idle_source_connections") == 2
            refreshed_at = sample(metrics, "trio_idle_last_refresh_success_timestamp_seconds")
            assert time.time() - 60 < refreshed_at <= time.time()
            assert sample(metrics, "trio_idle_event_loop_lag_seconds") < 1.0
            # no per-mailbox labels
            labels = {
                name
                for family in text_string_to_metric_families(metrics)
                for s in family.samples
                for name in s.labels
            }
            assert labels <= {
                "by",  # idle_restarts_total{by="ticker"|"session"}, exported from the start
                "state",
                "cause",
                "reason",
                "status",
                "result",
                "operation",
                "kind",
                "le",
                "version",
            }, labels
            assert a.email not in metrics and b.email not in metrics

            healthz = await http.get("/healthz")
            assert healthz.status_code == 200 and healthz.json()["ok"] is True

            # the server drops b: b backs off (3 s), readiness flips, then b is back
            await trio.to_thread.run_sync(dovecot.kick, b.email)
            with trio.fail_after(10):
                down = await until(lambda: http.get("/readyz"), _not_ready)
            assert down.json()["sessions"]["backing-off"] == 1
            assert down.json()["sessions"]["idle"] == 1
            assert "only 1 of 2 sessions" in down.json()["reasons"][0]
            metrics = (await http.get("/metrics")).text
            assert sample(metrics, "trio_idle_sessions", state="backing-off") == 1
            assert sample(metrics, "trio_idle_disconnects_total", cause="connection_lost") == 1
            with trio.fail_after(20):
                await until(lambda: http.get("/readyz"), _ready)
            metrics = (await http.get("/metrics")).text
            assert sample(metrics, "trio_idle_connects_total") == 3

            # b's row now points at a closed port: it stays down, readiness stays off
            source.rows[1] = row("b", b.email, b.password, closed_port())
            daemon.request_refresh()
            with trio.fail_after(15):
                down = await until(lambda: http.get("/readyz"), _not_ready)
                await logs.wait_for(f"[idle/{b.email}] connect failed: connection to")
            metrics = (await http.get("/metrics")).text
            assert sample(metrics, "trio_idle_sessions", state="idle") == 1
            assert sample(metrics, "trio_idle_sessions", state="backing-off") == 1
            assert sample(metrics, "trio_idle_disconnects_total", cause="connect_failed") >= 1

            status = await http.get("/status", headers=BEARER)
            assert status.status_code == 200
            detail = status.json()
            by_id = {c["id"]: c for c in detail["connections"]}
            assert by_id["a"]["state"] == "idle"
            assert by_id["b"]["state"] == "backing-off"
            assert "refused" in by_id["b"]["last_error"]
            raw = status.text + json.dumps(detail) + metrics
            for secret in (a.password, b.password, ADMIN_SECRET, KEY, STATUS_TOKEN):
                assert secret not in raw


async def test_ready_share_is_the_threshold(
    dovecot: DovecotServer, backend: ScanBackend, logs: LogCapture
) -> None:
    """With TRIO_IDLE_READY_SHARE=0.5, one of two sessions down is still ready."""
    a = dovecot.new_user("hzs")
    settings = make_settings(
        backend.url,
        TRIO_IDLE_IMAP_SECURITY="plain",
        TRIO_IDLE_HEALTH_ADDR="127.0.0.1:0",
        TRIO_IDLE_READY_SHARE="0.5",
    )
    source = ListSource(
        [
            row("a", a.email, a.password, dovecot.plain_port),
            row("dead", "dead@example.test", "x", closed_port()),
        ]
    )
    async with running_daemon(settings, source) as daemon:
        assert daemon.supervisor is not None and daemon.supervisor.health_url is not None
        async with httpx.AsyncClient(base_url=daemon.supervisor.health_url) as http:
            with trio.fail_after(20):
                ready = await until(
                    lambda: http.get("/readyz"),
                    lambda r: r.status_code == 200 and r.json()["sessions"]["idle"] == 1,
                )
            assert (
                ready.json()["sessions"]["backing-off"] + ready.json()["sessions"]["connecting"]
                == 1
            )
            assert ready.json()["up_share"] == 0.5


async def test_endpoint_is_off_by_default(backend: ScanBackend) -> None:
    async with running_daemon(make_settings(backend.url), ListSource()) as daemon:
        assert daemon.supervisor is not None
        assert daemon.supervisor.health_url is None


async def test_unknown_route_and_method(backend: ScanBackend) -> None:
    settings = make_settings(backend.url, TRIO_IDLE_HEALTH_ADDR="127.0.0.1:0")
    async with running_daemon(settings, ListSource()) as daemon:
        assert daemon.supervisor is not None and daemon.supervisor.health_url is not None
        # ready only once the list was read (a loaded machine is slower than the HEAD)
        await daemon.wait_refreshed(after=0)
        async with httpx.AsyncClient(base_url=daemon.supervisor.health_url) as http:
            assert (await http.get("/nope")).status_code == 404
            assert (await http.post("/healthz", content=b"x")).status_code == 405
            head = await http.head("/readyz")
            assert head.status_code == 200 and head.content == b""
            # keep-alive: several requests on one connection
            for _ in range(3):
                assert (await http.get("/healthz")).status_code == 200


# -- /status: bearer token, off without one, its own address ------------------------------


async def test_status_needs_the_bearer_token(backend: ScanBackend, logs: LogCapture) -> None:
    settings = make_settings(
        backend.url, TRIO_IDLE_HEALTH_ADDR="127.0.0.1:0", TRIO_IDLE_STATUS_TOKEN=STATUS_TOKEN
    )
    async with running_daemon(settings, ListSource()) as daemon:
        assert daemon.supervisor is not None and daemon.supervisor.health_url is not None
        async with httpx.AsyncClient(base_url=daemon.supervisor.health_url) as http:
            missing = await http.get("/status")
            assert missing.status_code == 401
            assert missing.headers["www-authenticate"] == 'Bearer realm="trio-idle"'
            assert "connections" not in missing.json()
            for guess in ("wrong", STATUS_TOKEN[:-1], STATUS_TOKEN + "0"):
                wrong = await http.get("/status", headers={"authorization": f"Bearer {guess}"})
                assert wrong.status_code == 401
                assert 'error="invalid_token"' in wrong.headers["www-authenticate"]
            basic = await http.get("/status", auth=("admin", STATUS_TOKEN))
            assert basic.status_code == 401

            ok = await http.get("/status", headers={"authorization": f"bearer {STATUS_TOKEN}"})
            assert ok.status_code == 200 and ok.json()["connections"] == []

            metrics = (await http.get("/metrics")).text
            assert sample(metrics, "trio_idle_status_auth_failures_total", reason="missing") == 1
            assert sample(metrics, "trio_idle_status_auth_failures_total", reason="wrong") == 4
    # five refusals, one line (the rest are counted, not logged); never the token
    refused = logs.matching("/status refused")
    assert len(refused) == 1 and refused[0].startswith(
        "[idle/health] /status refused: missing bearer token (from 127.0.0.1:"
    )
    assert STATUS_TOKEN not in logs.text() and STATUS_TOKEN[:-1] not in logs.text()


async def test_status_is_off_without_a_token(backend: ScanBackend, logs: LogCapture) -> None:
    settings = make_settings(backend.url, TRIO_IDLE_HEALTH_ADDR="127.0.0.1:0")
    async with running_daemon(settings, ListSource()) as daemon:
        assert daemon.supervisor is not None and daemon.supervisor.health_url is not None
        async with httpx.AsyncClient(base_url=daemon.supervisor.health_url) as http:
            off = await http.get("/status", headers=BEARER)
            assert off.status_code == 404
            assert off.json()["error"] == "/status is off"
            assert "TRIO_IDLE_STATUS_TOKEN" in off.json()["enable"]
            assert (await http.get("/healthz")).status_code == 200
    assert logs.matching("/status off: TRIO_IDLE_STATUS_TOKEN is not set")


async def test_status_on_its_own_address(backend: ScanBackend) -> None:
    settings = make_settings(
        backend.url,
        TRIO_IDLE_HEALTH_ADDR="127.0.0.1:0",
        TRIO_IDLE_STATUS_ADDR="127.0.0.1:0",
        TRIO_IDLE_STATUS_TOKEN=STATUS_TOKEN,
    )
    async with running_daemon(settings, ListSource()) as daemon:
        sup = daemon.supervisor
        assert sup is not None and sup.health_url is not None and sup.status_url is not None
        assert sup.status_url != sup.health_url
        async with (
            httpx.AsyncClient(base_url=sup.health_url) as health,
            httpx.AsyncClient(base_url=sup.status_url) as status,
        ):
            # the health port no longer has /status, not even with the token
            moved = await health.get("/status", headers=BEARER)
            assert moved.status_code == 404 and "/status" not in moved.json()["routes"]
            assert (await health.get("/metrics")).status_code == 200
            assert (await health.get("/healthz")).status_code == 200
            # the status address has /status only, behind the token
            assert (await status.get("/status")).status_code == 401
            ok = await status.get("/status", headers=BEARER)
            assert ok.status_code == 200 and "connections" in ok.json()
            for route in ("/healthz", "/readyz", "/metrics"):
                assert (await status.get(route)).status_code == 404


async def test_a_status_address_in_use_stops_the_start(backend: ScanBackend) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = make_settings(
            backend.url,
            TRIO_IDLE_STATUS_ADDR=f"127.0.0.1:{port}",
            TRIO_IDLE_STATUS_TOKEN=STATUS_TOKEN,
        )
        with pytest.raises(BaseExceptionGroup) as caught:
            async with running_daemon(settings, ListSource()):
                pytest.fail("the daemon started although its status address is taken")
    errors = [str(e) for e in _leaves(caught.value) if isinstance(e, StartupError)]
    assert len(errors) == 1
    assert errors[0].startswith(f"cannot listen on 127.0.0.1:{port} (TRIO_IDLE_STATUS_ADDR): ")
    assert "in use" in errors[0]


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


# -- /healthz, /readyz, /metrics carry nothing from a row or a server -----------------------

CANARY_EMAIL = "canary.user@canary-mail.test"
CANARY_SERVER_TEXT = "canary-server-text-Q7XJ"
CANARY_ROW_ID = "canary-row-id-K4PZ"
CANARY_CONN_ID = "canary-conn-id-M3RT"
CANARY_SOURCE_TEXT = "canary-source-error-W2MV"


class CanarySource(ListSource):
    """A source whose outage message is recognisable."""

    async def fetch(self) -> list[dict[str, Any]]:
        if self.fail:
            self.fetches += 1
            raise SourceError(f"database said {CANARY_SOURCE_TEXT}")
        return await super().fetch()


async def rejecting_login(peer: Peer) -> None:
    """Greets like a server, then refuses LOGIN with a recognisable text."""
    text = CANARY_SERVER_TEXT.encode()
    await peer.send(b"* OK [CAPABILITY IMAP4rev1 IDLE] " + text + b"\r\n")
    while True:
        tag, name = await peer.command()
        if name == b"CAPABILITY":
            await peer.send(b"* CAPABILITY IMAP4rev1 IDLE\r\n" + tag + b" OK " + text + b"\r\n")
        elif name == b"LOGIN":
            await peer.send(tag + b" NO [AUTHENTICATIONFAILED] " + text + b"\r\n")
        else:
            await peer.send(tag + b" BAD " + text + b"\r\n")


async def test_healthz_readyz_and_metrics_carry_no_row_or_server_text(
    backend: ScanBackend, nursery: trio.Nursery
) -> None:
    server = ScriptedServer(rejecting_login)
    await nursery.start(server.serve)
    settings = make_settings(
        backend.url,
        TRIO_IDLE_IMAP_SECURITY="plain",
        TRIO_IDLE_HEALTH_ADDR="127.0.0.1:0",
        TRIO_IDLE_STATUS_TOKEN=STATUS_TOKEN,
    )
    bad_row = row(CANARY_ROW_ID, "other@canary-mail.test", "pw", server.port)
    bad_row["encryptedPassword"] = "00:11:22"  # undecryptable: a skipped row with its id
    source = CanarySource([row(CANARY_CONN_ID, CANARY_EMAIL, "pw", server.port), bad_row])
    host_port = f"127.0.0.1:{server.port}"
    canaries = (
        CANARY_EMAIL,
        "canary-mail",
        CANARY_SERVER_TEXT,
        CANARY_ROW_ID,
        host_port,
        CANARY_CONN_ID,
    )
    async with running_daemon(settings, source) as daemon:
        assert daemon.supervisor is not None and daemon.supervisor.health_url is not None
        async with httpx.AsyncClient(base_url=daemon.supervisor.health_url) as http:
            with trio.fail_after(10):  # the server has refused the login
                await until(
                    lambda: http.get("/readyz"),
                    lambda r: r.json()["sessions"]["auth-failed"] == 1,
                )
            # the list refresh fails from now on, with a recognisable message
            source.fail = True
            attempts = daemon.status().refresh_attempts
            daemon.request_refresh()
            with trio.fail_after(10):
                await daemon.wait_refreshed(after=attempts)
            # the canaries are in the daemon's state: /status (with the token) shows them
            detail = (await http.get("/status", headers=BEARER)).text
            for canary in (*canaries, CANARY_SOURCE_TEXT):
                assert canary in detail, canary
            answers = {
                route: (await http.get(route)).text for route in ("/healthz", "/readyz", "/metrics")
            }
    assert sample(answers["/metrics"], "trio_idle_sessions", state="auth-failed") == 1
    assert json.loads(answers["/readyz"])["sessions"]["auth-failed"] == 1
    for route, text in answers.items():
        for canary in (*canaries, CANARY_SOURCE_TEXT, "canary", "@"):
            assert canary not in text, (route, canary)
