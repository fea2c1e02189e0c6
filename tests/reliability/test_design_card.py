"""The design card's shape, clause by clause (docs/architecture.md, "The design card").

- a root nursery holds the reconciler's work: one task per connection (``conn:<id>``);
- each connection's IDLE, reconnect and scan work lives in that task's CancelScope-scoped
  subtree, so removing the connection ends all of it and touches no other connection;
- a connection's scans are coalesced: at most one active and one pending.
"""

from __future__ import annotations

import trio
import trio.lowlevel

from tests.harness import running_daemon
from tests.reliability.rig import Rig

A = "card-a@rel.test"
B = "card-b@rel.test"
SETTINGS = {"TRIO_IDLE_COMMAND_TIMEOUT": "2s", "TRIO_IDLE_SCAN_TIMEOUT": "30s"}


def task_names_under(name: str) -> list[str]:
    """Names of the task called ``name`` and of every task below it, in the whole run."""
    found: list[str] = []

    def walk(task: trio.lowlevel.Task, inside: bool) -> None:
        inside = inside or task.name == name
        if inside:
            found.append(task.name)
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                walk(child, inside)

    root = trio.lowlevel.current_root_task()
    assert root is not None  # inside trio.run
    walk(root, False)
    return found


async def test_removing_a_connection_ends_its_whole_subtree_and_nothing_else(rig: Rig) -> None:
    source = rig.source(A, B)
    async with running_daemon(rig.settings(**SETTINGS), source) as daemon:
        with trio.fail_after(20):
            await rig.all_idle([A, B])
            b_session = await rig.idle(B)
            b_handle = rig.handle(daemon, B)
            a_handle = rig.handle(daemon, A)
            # A has a scan in flight (held by the backend) and one pending behind it
            held = rig.backend.hold(A)
            rig.server.append(A, b"Subject: one\r\n\r\nx\r\n")
            await rig.backend.wait_for_requests(1, A)
            rig.server.append(A, b"Subject: two\r\n\r\nx\r\n")
            await rig.logs.wait_until(lambda: a_handle.coalescer.pending == 1)
            assert any(n.startswith("scan") for n in task_names_under(f"conn:{A}")), (
                "the scan task runs inside the connection's own subtree"
            )
            assert task_names_under(f"conn:{B}"), "B's task sits beside A's"

            source.rows = [r for r in source.rows if r["id"] != A]
            attempts = daemon.status().refresh_attempts
            daemon.request_refresh()
            await daemon.wait_refreshed(after=attempts)
            await a_handle.finished.wait()
            held.release()

            # A: no task of its subtree is left, its IMAP connection said LOGOUT, and the
            # scan that was pending was never sent
            assert task_names_under(f"conn:{A}") == []
            await rig.server.wait_for(lambda: not rig.server.sessions(A))
            assert any(e.user == A and e.event == "LOGOUT" for e in rig.server.log)
            # B: the same session and connection task as before, and it still scans
            assert rig.handle(daemon, B) is b_handle
            assert [s.id for s in rig.server.sessions(B)] == [b_session]
            before = len(rig.backend.requests_for(B))
            rig.server.append(B, b"Subject: three\r\n\r\nx\r\n")
            await rig.backend.wait_for_requests(before + 1, B)
        assert len(rig.backend.requests_for(A)) == 1, "A's pending scan was sent after removal"


async def test_a_burst_costs_at_most_one_active_and_one_pending_scan(rig: Rig) -> None:
    source = rig.source(A)
    async with running_daemon(rig.settings(**SETTINGS), source) as daemon:
        with trio.fail_after(20):
            await rig.idle(A)
            handle = rig.handle(daemon, A)
            held = rig.backend.hold(A)
            rig.server.append(A, b"Subject: first\r\n\r\nx\r\n")
            await rig.backend.wait_for_requests(1, A)
            for n in range(5):  # one push each: five requests while a scan is active
                rig.server.append(A, f"Subject: burst {n}\r\n\r\nx\r\n".encode())
                await rig.log("exists-event received", count=n + 2)
            assert handle.coalescer.active and handle.coalescer.pending == 1
            assert handle.coalescer.absorbed == 4
            held.release()
            await rig.quiet(daemon, A)
        # the held scan and the one pending scan: the burst of five cost one more scan
        assert len(rig.backend.requests_for(A)) == 2
