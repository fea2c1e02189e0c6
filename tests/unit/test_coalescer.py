"""Scan coalescing: one active, one pending, the rest absorbed."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from trio_idle.coalescer import ScanCoalescer


async def test_burst_of_twenty_costs_two_scans(
    autojump_clock: trio.testing.MockClock,
) -> None:
    c = ScanCoalescer()
    assert c.request("exists") is True
    assert await c.next_scan() == "exists"
    assert c.active and c.pending == 0

    assert c.request("tick") is True  # second: becomes the pending scan
    assert c.pending == 1 and c.pending_reason == "tick"
    results = [c.request("exists") for _ in range(18)]
    assert results == [False] * 18
    assert c.absorbed == 18
    assert c.requested == 20
    assert c.pending == 1 and c.pending_reason == "tick"  # first pending reason kept

    c.done()
    assert not c.active
    assert await c.next_scan() == "tick"
    c.done()
    # nothing left: a third scan is not started
    with trio.move_on_after(10) as scope:
        await c.next_scan()
    assert scope.cancelled_caught


async def test_request_while_active_and_pending_returns_false() -> None:
    c = ScanCoalescer()
    c.request("a")
    await c.next_scan()
    assert c.request("b") is True
    assert c.request("c") is False
    assert c.absorbed == 1


async def test_requests_before_the_worker_runs_fold_into_one() -> None:
    c = ScanCoalescer()
    assert c.request("reconnect") is True
    assert c.request("exists") is False
    assert await c.next_scan() == "reconnect"


async def test_next_scan_returns_reasons_in_order() -> None:
    c = ScanCoalescer()
    seen: list[str] = []

    async def worker() -> None:
        while True:
            seen.append(await c.next_scan())
            c.done()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker)
        for reason in ("reconnect", "exists", "tick", "exists"):
            await trio.testing.wait_all_tasks_blocked()
            assert c.request(reason) is True
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert seen == ["reconnect", "exists", "tick", "exists"]


async def test_waiting_worker_is_woken_by_a_request() -> None:
    c = ScanCoalescer()
    got: list[str] = []

    async def worker() -> None:
        got.append(await c.next_scan())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        c.request("exists")
    assert got == ["exists"]
    assert c.active


async def test_cancellation_while_waiting_leaves_state_intact(
    autojump_clock: trio.testing.MockClock,
) -> None:
    c = ScanCoalescer()
    c.request("first")
    await c.next_scan()
    c.done()
    with trio.move_on_after(1) as scope:
        await c.next_scan()
    assert scope.cancelled_caught
    assert (c.pending, c.active, c.pending_reason) == (0, False, None)
    assert (c.requested, c.absorbed) == (1, 0)
    # still fully usable afterwards
    assert c.request("second") is True
    with trio.fail_after(1):
        assert await c.next_scan() == "second"


async def test_catch_up_scans_wait_for_their_pace_slot(autojump_clock: object) -> None:
    from trio_idle.limiter import Pacer

    pacer = Pacer(rate=1.0)
    await pacer.wait()  # someone else took the slot just now: ours is one second away
    coalescer = ScanCoalescer()
    coalescer.request("startup")
    assert await coalescer.next_scan() == "startup"
    start = trio.current_time()
    assert await coalescer.wait_paced(pacer) is False
    assert trio.current_time() - start == pytest.approx(1.0)


async def test_new_mail_cuts_a_paced_wait_short(autojump_clock: object) -> None:
    from trio_idle.limiter import Pacer

    pacer = Pacer(rate=0.01)  # slots 100 s apart
    await pacer.wait()
    coalescer = ScanCoalescer()
    coalescer.request("reconnect")
    await coalescer.next_scan()
    async with trio.open_nursery() as nursery:

        async def exists_soon() -> None:
            await trio.sleep(2)
            # absorbed into the waiting scan, which now goes at once
            assert coalescer.request("exists") is False

        nursery.start_soon(exists_soon)
        start = trio.current_time()
        assert await coalescer.wait_paced(pacer) is True
        assert trio.current_time() - start == pytest.approx(2.0)
    assert coalescer.pending == 0
    # a second catch-up request during the wait would have been queued as pending instead
    assert coalescer.request("reconnect") is True


# -- every async method is a checkpoint (as trio's own primitives are) --------------------


async def test_next_scan_with_a_scan_pending_is_still_a_checkpoint() -> None:
    c = ScanCoalescer()
    c.request("exists")
    with trio.testing.assert_checkpoints():
        assert await c.next_scan() == "exists"


async def test_cancelled_next_scan_raises_even_with_a_scan_pending_and_keeps_it() -> None:
    c = ScanCoalescer()
    c.request("reconnect")
    with trio.CancelScope() as scope:
        scope.cancel()
        await c.next_scan()
        raise AssertionError("next_scan returned inside a cancelled scope")
    assert scope.cancelled_caught
    assert (c.pending, c.pending_reason, c.active) == (1, "reconnect", False)
    assert await c.next_scan() == "reconnect"  # nothing was lost to the cancel


async def test_a_worker_taking_scans_in_a_loop_lets_other_tasks_run() -> None:
    c = ScanCoalescer()
    other_ran = False

    async def other() -> None:
        nonlocal other_ran
        other_ran = True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        for _ in range(3):  # never blocks: a scan is always pending
            c.request("exists")
            await c.next_scan()
            c.done()
        assert other_ran


async def test_wait_paced_is_a_checkpoint_even_with_a_free_slot() -> None:
    from trio_idle.limiter import Pacer

    c = ScanCoalescer()
    c.request("startup")
    await c.next_scan()
    with trio.testing.assert_checkpoints():
        assert await c.wait_paced(Pacer(rate=1000.0)) is False
