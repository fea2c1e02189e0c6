"""The scan task runs only while a scan is wanted: the coalescer starts it, it ends when
nothing is pending; 1 active + 1 pending still holds, retries included (virtual time)."""

from __future__ import annotations

import json
import random

import httpx
import trio
import trio.testing
from trio_idle_testing.recording_log import RecordingLog

from tests.fixtures import mail_connection, webhook_client
from trio_idle.core.stats import Stats
from trio_idle.mailbox.coalescer import ScanCoalescer
from trio_idle.mailbox.scan_worker import ScanPolicy, run_scans

CONN = mail_connection(port=1, login="alice", password="pw-on-demand")


async def test_starter_is_called_once_per_run_of_pending_scans() -> None:
    c = ScanCoalescer()
    starts: list[int] = []
    c.attach(lambda: starts.append(1))
    assert starts == []  # nothing wanted: no task
    assert c.request("exists") is True
    assert len(starts) == 1
    assert c.take_next() == "exists"
    assert c.request("tick") is True  # pending while active: the running task takes it
    assert c.request("exists") is False
    assert len(starts) == 1
    c.done()
    assert c.take_next() == "tick"
    c.done()
    assert c.take_next() is None  # the task ends here...
    c.task_ended()
    assert c.request("exists") is True  # ...and the next request starts a new one
    assert len(starts) == 2


async def test_a_pending_scan_waits_for_the_next_attach() -> None:
    c = ScanCoalescer()
    starts: list[str] = []
    c.attach(lambda: starts.append("first"))
    c.request("exists")
    c.task_ended()  # the task was cancelled before it took the scan
    c.detach()  # and its connection closed
    c.request("tick")  # absorbed into the pending one; nothing can be started
    assert starts == ["first"] and c.pending == 1
    c.attach(lambda: starts.append("second"))  # the restarted connection
    assert starts == ["first", "second"]
    assert c.take_next() == "exists"


async def test_task_exists_only_while_scans_are_wanted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    posts: list[str] = []
    answers = [503, 200, 200, 200]
    release = trio.Event()

    async def backend(request: httpx.Request) -> httpx.Response:
        posts.append(json.loads(request.content)["reason"])
        if len(posts) == 2:
            await release.wait()  # the retry of the first scan stays in flight
        return httpx.Response(answers.pop(0), json={"scanned": 1, "blocked": 0})

    webhook = webhook_client("http://backend.invalid/scan", backend)
    stats = Stats()
    c = ScanCoalescer()
    async with trio.open_nursery() as nursery:

        def start() -> None:
            nursery.start_soon(
                run_scans,
                CONN,
                c,
                webhook,
                ScanPolicy("INBOX", 1.0, 60.0),
                stats,
                RecordingLog(),
                random.Random(1),
                name="scan",
            )

        c.attach(start)
        await trio.testing.wait_all_tasks_blocked()
        assert len(nursery.child_tasks) == 0  # nothing wanted, no task

        c.request("exists")
        await trio.testing.wait_all_tasks_blocked()
        assert len(nursery.child_tasks) == 1 and c.active
        await trio.sleep(5)  # 503, then the retry after its backoff hangs
        assert posts == ["exists", "exists"]
        for _ in range(20):
            c.request("tick")  # one becomes the pending scan, the rest are absorbed
        await trio.testing.wait_all_tasks_blocked()
        assert len(nursery.child_tasks) == 1 and c.pending == 1 and c.absorbed == 19

        release.set()  # the retry succeeds, the pending scan follows, then the task ends
        await trio.testing.wait_all_tasks_blocked()
        assert posts == ["exists", "exists", "tick"]
        assert len(nursery.child_tasks) == 0 and not c.active and c.pending == 0

        c.request("exists")  # new mail later: a new task, one more scan
        await trio.testing.wait_all_tasks_blocked()
        assert posts == ["exists", "exists", "tick", "exists"]
        assert len(nursery.child_tasks) == 0
        c.detach()
    await webhook.aclose()
    assert stats.get("scans_ok") == 3 and stats.get("scans_retried", "503") == 1


async def test_a_cancelled_task_keeps_the_pending_scan(
    autojump_clock: trio.testing.MockClock,
) -> None:
    c = ScanCoalescer()
    webhook = webhook_client(
        "http://backend.invalid/scan", lambda request: httpx.Response(200, json={})
    )
    started = 0
    async with trio.open_nursery() as nursery:

        def start() -> None:
            nonlocal started
            started += 1
            nursery.start_soon(
                run_scans,
                CONN,
                c,
                webhook,
                ScanPolicy("INBOX", 1.0, 60.0),
                Stats(),
                RecordingLog(),
                random.Random(1),
            )

        c.attach(start)
        nursery.cancel_scope.cancel()  # the connection goes before its task ever ran
        c.request("exists")
    assert started == 1 and c.pending == 1 and not c.active  # not taken, so not lost
    c.detach()
    async with trio.open_nursery() as nursery:
        c.attach(start)  # its successor sends it
    await webhook.aclose()
    assert started == 2 and c.pending == 0 and not c.active
