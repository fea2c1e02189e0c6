"""The process ticker under a virtual clock: due order, never early, a failing callback
logged and counted without stopping the others, and an ended session's entries inert."""

from __future__ import annotations

import collections
import functools
from typing import Any

import trio
import trio.testing
from trio_idle_testing.recording_log import RecordingLog

from trio_idle.core.stats import Stats
from trio_idle.mailbox.ticker import BATCH, CHECK_GRANULARITY, GRANULARITY, IdleTimers, Ticker


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
        assert 30 <= checked_at - begun_at <= 30 + CHECK_GRANULARITY + GRANULARITY
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


async def test_a_rescheduled_sessions_old_entry_is_dropped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # the session ran a restart itself just after the ticker's was scheduled: the entry
    # of the older generation must do nothing, or the session would be ticked twice
    stats, log, link = Stats(), RecordingLog(), Link()
    ticker = Ticker(stats, log)
    start = trio.current_time()
    t = timers(link, ticker, stats, log, start)
    t.start()
    t.restarted()  # same due time, a newer generation
    assert len(ticker) == 2
    with trio.move_on_after(130):
        await ticker.run()
    assert [round(at - start) for at, _ in link.begun] == [120]
    # and it is gone: one next restart and the check (a stale entry kept would
    # reschedule itself forever, one more per restart the session ran)
    assert len(ticker) == 2


async def test_the_checks_of_one_pass_are_one_entry_run_together(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stats, log = Stats(), RecordingLog()
    ticker = Ticker(stats, log)
    start = trio.current_time()
    links = [Link() for _ in range(3)]
    all_timers = [timers(link, ticker, stats, log, start) for link in links]
    for t in all_timers:
        t.start()
    with trio.move_on_after(121):
        await ticker.run()
    # three restarts written in one pass: three next restarts and one entry for the checks
    assert [len(link.begun) for link in links] == [1, 1, 1]
    assert len(ticker) == 3 + 1
    all_timers[1].ended()  # its check is dropped; the others still run, together
    with trio.move_on_after(40):
        await ticker.run()
    checked = [link.checked for link in links]
    assert checked[1] == []
    assert checked[0] == checked[2] and len(checked[0]) == 1
    (at, number) = checked[0][0]
    assert number == 1 and 30 <= at - links[0].begun[0][0] <= 30 + CHECK_GRANULARITY + GRANULARITY
    assert stats.get("internal_errors") == 0


class OneAtATimeLink(Link):
    """A link that takes no restart while the last one is unchecked (as a real one
    while its answers are outstanding)."""

    def begin_restart(self, *, noop: bool) -> int | None:
        if len(self.begun) > len(self.checked):
            return None
        return super().begin_restart(noop=noop)


async def test_a_check_due_with_the_next_restart_runs_first(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # tick interval == command timeout: the check of one tick and the next tick share a
    # due time; the check must come first, or the link (still running the first) refuses
    # the tick and the session is woken for nothing
    stats, log, link = Stats(), RecordingLog(), OneAtATimeLink()
    ticker = Ticker(stats, log)
    start = trio.current_time()
    t = timers(link, ticker, stats, log, start)
    t.tick_interval = t.timeout = 30
    t.next_tick = start + 30
    t.start()
    with trio.move_on_after(100):
        await ticker.run()
    assert [round(at - start) for at, _ in link.begun] == [30, 60, 90]
    assert [round(at - start) for at, _ in link.checked] == [60, 90]


class BrokenLink(Link):
    def __init__(self, fail: str) -> None:
        super().__init__()
        self.fail = fail

    def begin_restart(self, *, noop: bool) -> int | None:
        if self.fail == "begin":
            raise RuntimeError("begin boom")
        return super().begin_restart(noop=noop)

    def check_restart(self, number: int) -> None:
        if self.fail == "check":
            raise RuntimeError("check boom")
        super().check_restart(number)


async def test_a_raising_restart_or_check_is_logged_counted_and_the_others_still_run(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stats, log = Stats(), RecordingLog()
    ticker = Ticker(stats, log)
    start = trio.current_time()
    links: list[Link] = [Link(), BrokenLink("begin"), BrokenLink("check"), Link()]
    for link in links:
        timers(link, ticker, stats, log, start).start()
    with trio.move_on_after(120 + 31):
        await ticker.run()
    assert [len(link.begun) for link in links] == [1, 0, 1, 1]
    assert [len(link.checked) for link in links] == [1, 0, 0, 1]
    assert stats.get("internal_errors") == 2
    errors = [line for line in log.texts() if "[idle/ticker] internal error" in line]
    assert len(errors) == 2 and "begin boom" in errors[0] and "check boom" in errors[1]


class StepCounter(trio.abc.Instrument):
    """How many steps each task has begun (a step ends where the task yields)."""

    def __init__(self) -> None:
        self.steps: collections.Counter[trio.lowlevel.Task] = collections.Counter()

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps[task] += 1


async def test_a_large_batch_lets_other_tasks_run_every_batch_entries(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ticker = Ticker()
    counter = StepCounter()
    seen: list[int] = []  # the ticker task's step in which each entry ran

    def record() -> None:
        seen.append(counter.steps[trio.lowlevel.current_task()])

    due = trio.current_time()
    for _ in range(2 * BATCH + 1):
        ticker.call_at(due, record)
    trio.lowlevel.add_instrument(counter)
    try:
        with trio.move_on_after(1):
            await ticker.run()
    finally:
        trio.lowlevel.remove_instrument(counter)
    # BATCH entries per step: the ticker yields (a checkpoint) between two batches
    first = seen[0]
    assert seen == [first] * BATCH + [first + 1] * BATCH + [first + 2]


async def test_checks_of_passes_within_a_check_slot_share_one_wake_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # sessions ticking 0.1 s apart: one pass each for their writes, one for all checks
    stats, log = Stats(), RecordingLog()
    ticker = Ticker(stats, log)
    start = trio.current_time()
    links = [Link() for _ in range(5)]
    for i, link in enumerate(links):
        t = timers(link, ticker, stats, log, start)
        t.next_tick = start + 120.1 + 0.1 * i  # checks due 150.1-150.5: slot 151
        t.start()
    with trio.move_on_after(121):
        await ticker.run()
    assert len(ticker) == 5 + 1  # five next restarts, one entry for the five checks
    with trio.move_on_after(40):
        await ticker.run()
    written = {at for link in links for at, _ in link.begun}
    checked = {at for link in links for at, _ in link.checked}
    assert len(written) == 5 and len(checked) == 1
    assert min(checked) >= max(written) + 30 and min(checked) <= min(written) + 30 + 1
