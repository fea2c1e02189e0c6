"""The health endpoint over real HTTP while sessions run against a real Dovecot."""

from __future__ import annotations

import json
import time

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

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
from tests.servers.dovecot import DovecotServer
from trio_idle.testing.backend import ScanBackend


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

            status = await http.get("/status")
            assert status.status_code == 200
            detail = status.json()
            by_id = {c["id"]: c for c in detail["connections"]}
            assert by_id["a"]["state"] == "idle"
            assert by_id["b"]["state"] == "backing-off"
            assert "refused" in by_id["b"]["last_error"]
            raw = status.text + json.dumps(detail) + metrics
            for secret in (a.password, b.password, ADMIN_SECRET, KEY):
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
        async with httpx.AsyncClient(base_url=daemon.supervisor.health_url) as http:
            assert (await http.get("/nope")).status_code == 404
            assert (await http.post("/healthz", content=b"x")).status_code == 405
            head = await http.head("/readyz")
            assert head.status_code == 200 and head.content == b""
            # keep-alive: several requests on one connection
            for _ in range(3):
                assert (await http.get("/healthz")).status_code == 200
