"""ConnectLimiter: bounded concurrency and a steady start rate, on virtual time."""

from __future__ import annotations

import itertools

import trio
import trio.testing

from trio_idle.limiter import ConnectLimiter


async def run_tasks(limiter: ConnectLimiter, count: int, hold: float) -> tuple[list[float], int]:
    starts: list[float] = []
    inside = 0
    most = 0

    async def connect() -> None:
        nonlocal inside, most
        async with limiter.slot():
            starts.append(trio.current_time())
            inside += 1
            most = max(most, inside)
            # in_progress also counts a task holding a slot while it waits for its start time
            assert inside <= limiter.in_progress
            await trio.sleep(hold)  # handshake + login
            inside -= 1

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(connect)
    assert limiter.in_progress == 0
    return starts, most


async def test_concurrency_and_rate(autojump_clock: trio.testing.MockClock) -> None:
    limiter = ConnectLimiter(concurrency=2, rate=10.0)
    starts, most = await run_tasks(limiter, 10, hold=0.05)
    assert len(starts) == 10
    assert most <= 2
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert all(gap >= 0.1 - 1e-9 for gap in gaps), gaps
    assert starts[-1] - starts[0] < 1.0 + 1e-9  # the rate, not something slower


async def test_concurrency_limits_when_handshakes_are_slow(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limiter = ConnectLimiter(concurrency=2, rate=10.0)
    starts, most = await run_tasks(limiter, 10, hold=1.0)
    assert most == 2
    assert all(b - a >= 0.1 - 1e-9 for a, b in itertools.pairwise(starts))
    # 10 one-second handshakes two at a time take five rounds
    assert starts[-1] - starts[0] >= 4.0 - 1e-9


async def test_rate_allows_a_burst_after_an_idle_period(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limiter = ConnectLimiter(concurrency=5, rate=10.0)
    await run_tasks(limiter, 3, hold=0.0)
    await trio.sleep(60)  # a quiet minute does not leave a backlog of reservations
    t0 = trio.current_time()
    starts, _ = await run_tasks(limiter, 1, hold=0.0)
    assert starts == [t0]


async def test_cancelled_waiter_releases_nothing_it_did_not_take(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limiter = ConnectLimiter(concurrency=1, rate=1000.0)
    async with trio.open_nursery() as nursery:

        async def holder() -> None:
            async with limiter.slot():
                await trio.sleep(10)

        nursery.start_soon(holder)
        await trio.testing.wait_all_tasks_blocked()
        with trio.move_on_after(1):
            async with limiter.slot():
                raise AssertionError("slot granted while the only one is held")
        assert limiter.in_progress == 1
    assert limiter.in_progress == 0
