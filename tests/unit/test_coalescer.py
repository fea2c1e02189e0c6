"""Scan coalescing: one active, one pending, the rest absorbed.

The scan task takes scans with :meth:`ScanCoalescer.take_next` (how it is started and
ends: tests/unit/test_scan_on_demand.py)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from trio_idle.core.limiter import Pacer
from trio_idle.mailbox.coalescer import ScanCoalescer


async def test_burst_of_twenty_costs_two_scans() -> None:
    c = ScanCoalescer()
    assert c.request("exists") is True
    assert c.take_next() == "exists"
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
    assert c.take_next() == "tick"
    c.done()
    # nothing left: a third scan is not started, and nothing changed by asking
    assert c.take_next() is None
    assert (c.pending, c.active, c.pending_reason) == (0, False, None)
    assert (c.requested, c.absorbed) == (20, 18)


async def test_request_while_active_and_pending_returns_false() -> None:
    c = ScanCoalescer()
    c.request("a")
    c.take_next()
    assert c.request("b") is True
    assert c.request("c") is False
    assert c.absorbed == 1


async def test_requests_before_the_worker_runs_fold_into_one() -> None:
    c = ScanCoalescer()
    assert c.request("reconnect") is True
    assert c.request("exists") is False
    assert c.take_next() == "reconnect"


async def test_scans_are_taken_with_their_reasons_in_order() -> None:
    c = ScanCoalescer()
    seen: list[str | None] = []
    for reason in ("reconnect", "exists", "tick", "exists"):
        assert c.request(reason) is True
        seen.append(c.take_next())
        c.done()
    assert seen == ["reconnect", "exists", "tick", "exists"]


async def test_catch_up_scans_wait_for_their_pace_slot(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pacer = Pacer(rate=1.0)
    await pacer.wait()  # someone else took the slot just now: ours is one second away
    coalescer = ScanCoalescer()
    coalescer.request("startup")
    assert coalescer.take_next() == "startup"
    start = trio.current_time()
    assert await coalescer.wait_paced(pacer) is False
    assert trio.current_time() - start == pytest.approx(1.0)


async def test_new_mail_cuts_a_paced_wait_short(autojump_clock: trio.testing.MockClock) -> None:
    pacer = Pacer(rate=0.01)  # slots 100 s apart
    await pacer.wait()
    coalescer = ScanCoalescer()
    coalescer.request("reconnect")
    coalescer.take_next()
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


async def test_wait_paced_is_a_checkpoint_even_with_a_free_slot() -> None:
    c = ScanCoalescer()
    c.request("startup")
    c.take_next()
    with trio.testing.assert_checkpoints():
        assert await c.wait_paced(Pacer(rate=1000.0)) is False
