"""ConnectLimiter: bounded concurrency and a steady start rate, on virtual time."""

from __future__ import annotations

import itertools

import pytest
import trio
import trio.testing

from trio_idle.core.limiter import ConnectLimiter, per_host_cap


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


# -- one host's share ---------------------------------------------------------------------


def test_per_host_cap_is_a_floored_share_of_at_least_one() -> None:
    assert per_host_cap(20, 0.25) == 5
    assert per_host_cap(20, 1.0) == 20
    assert per_host_cap(10, 0.33) == 3
    assert per_host_cap(3, 0.25) == 1
    assert per_host_cap(1, 0.01) == 1


def test_host_share_outside_its_range_is_rejected() -> None:
    for share in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="host_share"):
            ConnectLimiter(concurrency=4, rate=10.0, host_share=share)


async def test_a_host_that_never_answers_holds_only_its_share(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limiter = ConnectLimiter(concurrency=4, rate=1000.0, host_share=0.5)
    done: list[tuple[str, float]] = []

    async def connect(host: str, hold: float) -> None:
        async with limiter.slot(host):
            await trio.sleep(hold)
        done.append((host, trio.current_time()))

    async with trio.open_nursery() as nursery:
        for _ in range(10):  # a tarpit: each handshake takes the whole connect timeout
            nursery.start_soon(connect, "tarpit.example", 30.0)
        await trio.testing.wait_all_tasks_blocked()
        assert limiter.host_in_progress("tarpit.example") == 2
        # the eight waiting for the tarpit hold no global slot
        assert limiter.in_progress == 2
        t0 = trio.current_time()
        for n in range(6):
            nursery.start_soon(connect, f"good{n}.example", 0.1)
    good = [at for host, at in done if host.startswith("good")]
    assert len(good) == 6
    # two slots left for six 0.1 s handshakes: three rounds, not a wait for the tarpit
    assert max(good) - t0 <= 0.3 + 0.01
    tarpit = sorted(at for host, at in done if host == "tarpit.example")
    assert tarpit[-1] - t0 >= 4 * 30.0 - 1e-6  # ten 30 s connects, two at a time
    assert limiter.in_progress == 0
    assert limiter.hosts_tracked == 0


async def test_the_host_is_the_name_as_typed_case_insensitive(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limiter = ConnectLimiter(concurrency=8, rate=1000.0, host_share=0.25)
    async with trio.open_nursery() as nursery:
        for host in ("IMAP.Example.TEST", "imap.example.test", "imap.example.test."):
            nursery.start_soon(_hold, limiter, host, 10.0)
        await trio.testing.wait_all_tasks_blocked()
        assert limiter.host_in_progress("imap.example.test") == 2
        assert limiter.in_progress == 2
        assert limiter.hosts_tracked == 1
        nursery.cancel_scope.cancel()
    assert limiter.hosts_tracked == 0


async def _hold(limiter: ConnectLimiter, host: str, hold: float) -> None:
    async with limiter.slot(host):
        await trio.sleep(hold)


async def test_no_state_is_kept_for_hosts_nobody_connects_to(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limiter = ConnectLimiter(concurrency=20, rate=10_000.0, host_share=0.25)
    async with trio.open_nursery() as nursery:
        for n in range(3000):
            nursery.start_soon(_hold, limiter, f"host{n % 1500}.example", 0.01)
        await trio.testing.wait_all_tasks_blocked()
        assert 0 < limiter.hosts_tracked <= 1500
    assert limiter.hosts_tracked == 0
    assert limiter.in_progress == 0
    # and a failing connect (an exception inside the slot) leaves nothing either
    with pytest.raises(OSError):
        async with limiter.slot("failing.example"):
            raise OSError("connection refused")
    assert limiter.hosts_tracked == 0
    assert limiter.in_progress == 0


async def test_a_cancelled_host_waiter_costs_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limiter = ConnectLimiter(concurrency=4, rate=1000.0, host_share=0.25)
    order: list[str] = []

    async def connect(name: str, hold: float) -> None:
        async with limiter.slot("busy.example"):
            order.append(name)
            await trio.sleep(hold)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(connect, "holder", 10.0)
        await trio.testing.wait_all_tasks_blocked()
        with trio.move_on_after(1):
            async with limiter.slot("busy.example"):
                raise AssertionError("a second slot for a host whose share is one")
        assert limiter.host_in_progress("busy.example") == 1
        assert limiter.in_progress == 1
        nursery.start_soon(connect, "next", 0.0)
        await trio.testing.wait_all_tasks_blocked()
        assert order == ["holder"]
    # the cancelled waiter took nothing with it: the next one got the slot after the holder
    assert order == ["holder", "next"]
    assert limiter.hosts_tracked == 0
    assert limiter.in_progress == 0


async def test_a_waiter_cancelled_while_holding_its_host_slot_gives_it_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # the host's slot is free but every global slot is taken: the waiter holds the former
    limiter = ConnectLimiter(concurrency=2, rate=1000.0, host_share=0.5)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_hold, limiter, "a.example", 10.0)
        nursery.start_soon(_hold, limiter, "b.example", 10.0)
        await trio.testing.wait_all_tasks_blocked()
        with trio.move_on_after(1):
            async with limiter.slot("c.example"):
                raise AssertionError("a third slot of two")
        assert limiter.host_in_progress("c.example") == 0
        assert limiter.hosts_tracked == 2
        nursery.cancel_scope.cancel()
    assert limiter.hosts_tracked == 0
    assert limiter.in_progress == 0


async def test_waiting_for_a_busy_host_uses_up_no_start_times(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limiter = ConnectLimiter(concurrency=8, rate=1.0, host_share=0.125)  # one per host
    starts: dict[str, float] = {}

    async def connect(name: str, host: str, hold: float) -> None:
        async with limiter.slot(host):
            starts[name] = trio.current_time()
            await trio.sleep(hold)

    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(connect, "first", "busy.example", 30.0)
        await trio.testing.wait_all_tasks_blocked()
        for n in range(5):
            nursery.start_soon(connect, f"queued{n}", "busy.example", 0.0)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(connect, "other", "other.example", 0.0)
    # one start per second: "other" takes the second one, not the seventh
    assert starts["other"] - t0 == pytest.approx(1.0)
    assert starts["queued0"] - t0 >= 30.0 - 1e-6
