"""The process ticker under a virtual clock: due order, never early, a failing callback
logged and counted without stopping the others, and an ended session's entries inert."""

from __future__ import annotations

import functools
from typing import Any

import trio
import trio.testing
from trio_idle_testing.recording_log import RecordingLog

from trio_idle.core.stats import Stats
from trio_idle.mailbox.ticker import GRANULARITY, IdleTimers, Ticker


async def test_callbacks_run_in_due_order_never_early(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ticker = Ticker()
    ran: list[tuple[str, float]] = []
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker.run)
        await trio.testing.wait_all_tasks_blocked()
        for name, delay in (("c", 30.0), ("a", 1.0), ("b", 10.0)):
            ticker.call_at(start + delay, functools.partial(ran.append, (name, delay)))
        await trio.sleep(5)
        # one added while the ticker sleeps towards a later entry: it must wake earlier
        ticker.call_at(start + 6.0, lambda: ran.append(("early", 6.0)))
        await trio.sleep(40)
        nursery.cancel_scope.cancel()
    assert [n for n, _ in ran] == ["a", "early", "b", "c"]
    assert len(ticker) == 0


async def test_a_raising_callback_is_logged_counted_and_the_rest_still_run(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stats, log = Stats(), RecordingLog()
    ticker = Ticker(stats, log)
    ran: list[str] = []

    def broken() -> None:
        raise RuntimeError("boom")

    now = trio.current_time()
    ticker.call_at(now + 1, lambda: ran.append("before"))
    ticker.call_at(now + 1, broken)
    ticker.call_at(now + 1, lambda: ran.append("after"))
    with trio.move_on_after(5):
        await ticker.run()
    assert ran == ["before", "after"]
    assert stats.get("internal_errors") == 1
    assert any("[idle/ticker] internal error: RuntimeError: boom" in line for line in log.texts())


class Link:
    """What IdleTimers uses of a link: begin_restart / check_restart."""

    def __init__(self, writable: bool = True) -> None:
        self.writable = writable
        self.begun: list[tuple[float, bool]] = []
        self.checked: list[tuple[float, int]] = []

    def begin_restart(self, *, noop: bool) -> int | None:
        if not self.writable:
            return None
        self.begun.append((trio.current_time(), noop))
        return len(self.begun)

    def check_restart(self, number: int) -> None:
        self.checked.append((trio.current_time(), number))


def timers(
    link: Any, ticker: Ticker | None, stats: Stats, log: RecordingLog, now: float
) -> IdleTimers:
    return IdleTimers(
        link,
        ticker,
        next_tick=now + 120,
        renew_at=now + 1500,
        tick_interval=120,
        renew_interval=1500,
        timeout=30,
        log=log,
        renew_line="[idle/x] idle renewing (25min threshold)",
        stats=stats,
    )


def test_take_due_says_whether_the_restart_is_a_tick_and_moves_what_was_due() -> None:
    log = RecordingLog()
    t = timers(Link(), None, Stats(), log, 0.0)  # tick at 120, renewal at 1500
    assert t.take_due(100) is False  # nothing due yet: nothing moves
    assert (t.next_tick, t.renew_at, log.texts()) == (120, 1500, [])
    assert t.take_due(130) is True
    assert (t.next_tick, t.renew_at, log.texts()) == (250, 1500, [])
    t.next_tick = 2000
    assert t.take_due(1500) is False  # a renewal only: no NOOP, logged
    assert (t.next_tick, t.renew_at) == (2000, 3000)
    assert log.texts() == ["[idle/x] idle renewing (25min threshold)"]
    assert t.take_due(3000) is True  # both at once: one restart with NOOP
    assert (t.next_tick, t.renew_at) == (3120, 4500) and len(log.texts()) == 2


async def test_ticks_renewals_and_checks_on_time(autojump_clock: trio.testing.MockClock) -> None:
    stats, log, link = Stats(), RecordingLog(), Link()
    ticker = Ticker(stats, log)
    start = trio.current_time()
    t = timers(link, ticker, stats, log, start)
    t.start()
    with trio.move_on_after(1500 + 60):
        await ticker.run()
    # a NOOP tick every 120 s; at 1500 s the renewal (its own restart, no NOOP, logged)
    ticks = [round(at - start) for at, noop in link.begun if noop]
    assert ticks[:3] == [120, 240, 360] and len(ticks) == 12
    renewals = [round(at - start) for at, noop in link.begun if not noop]
    assert renewals == [1500]
    assert log.texts() == ["[idle/x] idle renewing (25min threshold)"]
    # each restart is checked by the command timeout (30 s) after it was written
    for (begun_at, _), (checked_at, _number) in zip(link.begun, link.checked, strict=False):
        assert 30 <= checked_at - begun_at <= 30 + 2 * GRANULARITY
    assert [n for _, n in link.checked] == list(range(1, len(link.checked) + 1))
    assert stats.get("idle_restarts", "ticker") == len(link.begun)


async def test_a_busy_link_hands_the_restart_to_the_session(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stats, log, link = Stats(), RecordingLog(), Link(writable=False)
    ticker = Ticker(stats, log)
    t = timers(link, ticker, stats, log, trio.current_time())
    t.start()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker.run)
        with trio.CancelScope() as wake:
            t.wake = wake
            await trio.sleep_forever()
        nursery.cancel_scope.cancel()
    assert wake.cancelled_caught  # the session was woken to run the tick itself
    assert trio.current_time() >= t.next_tick and link.begun == []


async def test_an_ended_session_is_never_ticked(autojump_clock: trio.testing.MockClock) -> None:
    stats, log, link = Stats(), RecordingLog(), Link()
    ticker = Ticker(stats, log)
    t = timers(link, ticker, stats, log, trio.current_time())
    t.start()
    t.ended()
    with trio.move_on_after(600):
        await ticker.run()
    assert link.begun == [] and len(ticker) == 0
