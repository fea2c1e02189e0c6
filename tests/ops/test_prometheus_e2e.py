"""End to end: a real Prometheus scrapes a real ``trio-idle serve`` process, evaluates the
shipped rules, and reports the scan alert while the backend is down.

Prometheus stays on loopback: it listens on 127.0.0.1, keeps its data in a temp dir, and
its configuration holds nothing but the one scrape job (tests/servers/prometheus.py).
Scrapes and rule evaluations run every second; the shipped ``for:`` durations (minutes)
are rewritten to 1 s in the copy Prometheus loads — the expressions are the shipped ones.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
import trio
from trio_idle_testing.backend import ScanBackend

from tests.harness import ADMIN_SECRET, KEY, serve_process
from tests.ops.helpers import answer, until
from tests.servers import free_tcp_port
from tests.servers.dovecot import DovecotServer
from tests.servers.prometheus import PrometheusServer

MESSAGE = b"From: a@example.test\r\nTo: b@example.test\r\nSubject: e2e\r\n\r\nbody\r\n"


def alert_states(body: dict[str, Any]) -> dict[str, str]:
    return {a["labels"]["alertname"]: a["state"] for a in body["data"]["alerts"]}


async def test_the_scan_alert_fires_through_prometheus_while_the_backend_is_down(
    dovecot: DovecotServer, backend: ScanBackend, prometheus_for: Any, tmp_path: Path
) -> None:
    user = dovecot.new_user("prom")
    conn_file = tmp_path / "connections.toml"
    conn_file.write_text(
        f'[[connection]]\nid = "c1"\nemail = "{user.email}"\nimap_host = "127.0.0.1"\n'
        f'imap_port = {dovecot.plain_port}\npassword_env = "PW_C1"\n'
    )
    health_port = free_tcp_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIO_IDLE_")}
    env.update(
        ADMIN_SECRET=ADMIN_SECRET,
        ENCRYPTION_KEY=KEY,
        BACKEND_URL=backend.url,
        PW_C1=user.password,
        TRIO_IDLE_SOURCE="file",
        TRIO_IDLE_CONNECTIONS_FILE=str(conn_file),
        TRIO_IDLE_IMAP_SECURITY="plain",
        TRIO_IDLE_STATE="none",
        TRIO_IDLE_HEALTH_ADDR=f"127.0.0.1:{health_port}",
        TRIO_IDLE_SCAN_RETRY_INITIAL="200ms",
        TRIO_IDLE_SCAN_RETRY_MAX="1s",
        TRIO_IDLE_BACKEND_DOWN_AFTER="1s",
    )
    async with (
        serve_process(env, tmp_path / "serve.log"),
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{health_port}") as daemon,
    ):
        with trio.fail_after(30):
            await until(answer(daemon, "/readyz"), lambda r: r is not None and r.status_code == 200)
        prometheus: PrometheusServer = await trio.to_thread.run_sync(
            prometheus_for, f"127.0.0.1:{health_port}"
        )
        async with httpx.AsyncClient(base_url=prometheus.url) as prom:
            with trio.fail_after(30):
                # scraped and evaluated at least once while all is well: no alert at all
                await until(
                    lambda: prom.get("/api/v1/query", params={"query": "up"}),
                    lambda r: [s["value"][1] for s in r.json()["data"]["result"]] == ["1"],
                )
                await until(
                    lambda: prom.get("/api/v1/rules"),
                    lambda r: all(
                        g["lastEvaluation"] > "0001-01-02" for g in r.json()["data"]["groups"]
                    ),
                )
            assert alert_states((await prom.get("/api/v1/alerts")).json()) == {}

            backend.down()
            await dovecot.aappend(user.email, user.password, MESSAGE)
            seen: dict[str, set[str]] = {}

            def record(r: httpx.Response) -> bool:
                for name, state in alert_states(r.json()).items():
                    seen.setdefault(name, set()).add(state)
                return "firing" in seen.get("TrioIdleScansFailing", set())

            with trio.fail_after(60):
                await until(lambda: prom.get("/api/v1/alerts"), record)
            firing = [
                a
                for a in (await prom.get("/api/v1/alerts")).json()["data"]["alerts"]
                if a["labels"]["alertname"] == "TrioIdleScansFailing"
            ]
            assert firing[0]["labels"]["severity"] == "critical"
            assert firing[0]["labels"]["instance"] == f"127.0.0.1:{health_port}"
            assert firing[0]["annotations"]["runbook_url"].endswith("#trioidlescansfailing")
            # the mailbox itself is watched: nothing else fires
            assert set(seen) == {"TrioIdleScansFailing"}, seen
            # and the daemon itself says why it is not ready
            readyz = await daemon.get("/readyz")
            assert readyz.status_code == 503
            assert readyz.json()["reasons"][0].startswith("every request to the backend")
        backend.up()
