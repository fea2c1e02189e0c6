"""The account health reporter runs only while a report is due or debounced: an outcome
starts it, it ends when the backend has the newest state (virtual time)."""

from __future__ import annotations

import json
import random

import httpx
import trio
import trio.testing
from trio_idle_testing.recording_log import RecordingLog

from tests.fixtures import mail_connection, webhook_client
from trio_idle.accounts.outcome_text import ConnectionSecrets
from trio_idle.core.errors import ImapConnectError
from trio_idle.core.stats import Stats
from trio_idle.mailbox.account_health import Connected
from trio_idle.mailbox.health_reporter import AccountHealth, StatusPolicy, run_health_reports

CONN = mail_connection(port=1, login="alice", password="pw-on-demand")
URL = "http://backend.invalid/api/mail/connection-status"


async def test_reporter_exists_only_while_a_report_waits(
    autojump_clock: trio.testing.MockClock,
) -> None:
    posted: list[str] = []
    answers = [200, 503, 200]

    async def backend(request: httpx.Request) -> httpx.Response:
        posted.append(json.loads(request.content)["state"])
        return httpx.Response(answers.pop(0), json={})

    webhook = webhook_client(URL, backend)
    health = AccountHealth(CONN, unreachable_after=300)
    stats = Stats()
    async with trio.open_nursery() as nursery:

        def start() -> None:
            nursery.start_soon(
                run_health_reports,
                health,
                webhook,
                StatusPolicy(URL, 1.0, 60.0),
                stats,
                RecordingLog(),
                random.Random(1),
            )

        health.attach(start)
        await trio.testing.wait_all_tasks_blocked()
        assert len(nursery.child_tasks) == 0  # no outcome yet: nothing to report

        health.observe(Connected(idle=True))  # the first classification is reported
        await trio.testing.wait_all_tasks_blocked()
        assert posted == ["ok"] and len(nursery.child_tasks) == 0

        health.observe(Connected(idle=True))  # no change: no report, no task
        await trio.testing.wait_all_tasks_blocked()
        assert posted == ["ok"] and len(nursery.child_tasks) == 0

        refused = ImapConnectError("refused", kind="refused")
        health.observe(ConnectionSecrets().failure(refused))  # debounced...
        await trio.testing.wait_all_tasks_blocked()
        assert posted == ["ok"] and len(nursery.child_tasks) == 1  # ...by a waiting reporter
        await trio.sleep(300)  # due now: 503, retried, then accepted; the reporter ends
        await trio.sleep(120)
        assert posted == ["ok", "unreachable", "unreachable"]
        assert len(nursery.child_tasks) == 0
        health.detach()
    await webhook.aclose()
    assert stats.get("health_reports", "ok") == 2 and stats.get("health_reports", "retried") == 1


async def test_a_report_a_cancelled_reporter_did_not_deliver_is_sent_on_attach(
    autojump_clock: trio.testing.MockClock,
) -> None:
    posted: list[str] = []

    def backend(request: httpx.Request) -> httpx.Response:
        posted.append(json.loads(request.content)["state"])
        return httpx.Response(200, json={})

    webhook = webhook_client(URL, backend)
    health = AccountHealth(CONN, unreachable_after=300)
    for first in (True, False):  # the connection, then its restarted successor
        async with trio.open_nursery() as nursery:

            def start() -> None:
                nursery.start_soon(
                    run_health_reports,
                    health,
                    webhook,
                    StatusPolicy(URL, 1.0, 60.0),
                    Stats(),
                    RecordingLog(),
                    random.Random(1),
                )

            health.attach(start)
            if first:
                nursery.cancel_scope.cancel()  # goes before its reporter sends anything
                health.observe(Connected(idle=False))
        health.detach()
    await webhook.aclose()
    assert posted == ["degraded"]
