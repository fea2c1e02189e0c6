"""PushMonitor: only new mail, BYE and a lost connection wake the session."""

from __future__ import annotations

import gc

import trio
import trio.testing

from trio_idle.imap.push_monitor import PushMonitor


async def asleep(monitor: PushMonitor, seconds: float = 30.0) -> bool:
    """True when ``wait()`` is still blocked after ``seconds`` (virtual time)."""
    with trio.move_on_after(seconds) as scope:
        await monitor.wait()
    return scope.cancelled_caught


def selected(exists: int) -> PushMonitor:
    monitor = PushMonitor()
    monitor.untagged(f"{exists} EXISTS".encode())  # from the SELECT response
    return monitor


async def test_exists_before_select_sets_the_count_without_new_mail(
    autojump_clock: trio.testing.MockClock,
) -> None:
    monitor = PushMonitor()
    monitor.untagged(b"3 EXISTS")
    assert monitor.exists == 3
    assert monitor.new_mail == 0
    assert await asleep(monitor)


async def test_exists_growth_counts_new_mail_and_wakes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    monitor = selected(3)
    monitor.untagged(b"* 5 EXISTS")
    assert monitor.new_mail == 2
    with trio.fail_after(1):
        await monitor.wait()
    assert monitor.take_new_mail() == 2
    assert monitor.new_mail == 0
    assert await asleep(monitor)  # taken: sleeps again


async def test_duplicate_exists_does_not_count_twice(
    autojump_clock: trio.testing.MockClock,
) -> None:
    monitor = selected(2)
    monitor.untagged(b"* 3 EXISTS")
    monitor.untagged(b"* 3 EXISTS")
    assert monitor.take_new_mail() == 1
    monitor.untagged(b"* 3 EXISTS")
    assert monitor.new_mail == 0
    assert await asleep(monitor)


async def test_expunge_then_exists_of_same_number_is_one_new_message(
    autojump_clock: trio.testing.MockClock,
) -> None:
    monitor = selected(3)
    monitor.untagged(b"* 2 EXPUNGE")
    assert monitor.exists == 2
    assert monitor.new_mail == 0
    assert await asleep(monitor)  # an expunge alone wakes nobody
    monitor.untagged(b"* 3 EXISTS")  # one message arrived after the expunge
    assert monitor.new_mail == 1
    with trio.fail_after(1):
        await monitor.wait()


async def test_expunge_followed_by_consistent_exists_is_not_new_mail(
    autojump_clock: trio.testing.MockClock,
) -> None:
    monitor = selected(3)
    monitor.untagged(b"* 1 EXPUNGE")
    monitor.untagged(b"* 2 EXISTS")
    assert monitor.exists == 2
    assert monitor.new_mail == 0
    assert await asleep(monitor)


async def test_keepalives_and_flag_updates_do_not_wake(
    autojump_clock: trio.testing.MockClock,
) -> None:
    monitor = selected(3)
    woke = False

    async def waiter() -> None:
        nonlocal woke
        await monitor.wait()
        woke = True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        for _ in range(5):
            await trio.sleep(60)
            monitor.untagged(b"* OK Still here")
            monitor.untagged(b"* 3 FETCH (FLAGS (\\Seen))")
            monitor.activity()
        await trio.testing.wait_all_tasks_blocked()
        assert not woke
        assert monitor.problem() is None
        monitor.untagged(b"* 4 EXISTS")
        await trio.testing.wait_all_tasks_blocked()
        assert woke
    assert monitor.new_mail == 1


async def test_activity_updates_last_activity(autojump_clock: trio.testing.MockClock) -> None:
    monitor = PushMonitor()
    start = monitor.last_activity
    await trio.sleep(42)
    monitor.activity()
    assert monitor.last_activity - start == 42


async def test_bye_wakes_and_is_the_problem(autojump_clock: trio.testing.MockClock) -> None:
    monitor = selected(3)
    assert monitor.problem() is None
    monitor.untagged(b"* BYE Server shutting down")
    with trio.fail_after(1):
        await monitor.wait()
    assert monitor.problem() == "server said 'BYE Server shutting down'"
    assert monitor.new_mail == 0


async def test_bye_wakes_a_waiting_task(autojump_clock: trio.testing.MockClock) -> None:
    monitor = selected(3)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(monitor.wait)
        await trio.sleep(100)
        monitor.untagged(b"BYE idle timeout")
    assert trio.current_time() == 100
    assert "BYE idle timeout" in (monitor.problem() or "")


async def test_connection_lost_wakes_and_describes_the_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    monitor = selected(3)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(monitor.wait)
        await trio.sleep(5)
        monitor.connection_lost(ConnectionResetError("peer reset"))
    assert trio.current_time() == 5
    assert monitor.problem() == "connection lost (ConnectionResetError: peer reset)"


async def test_clean_close_is_described(autojump_clock: trio.testing.MockClock) -> None:
    monitor = selected(3)
    monitor.connection_lost(None)
    with trio.fail_after(1):
        await monitor.wait()
    assert monitor.problem() == "connection lost (closed by server)"


async def test_mark_dead_wakes_once_and_keeps_first_reason() -> None:
    monitor = selected(3)
    monitor.mark_dead("no answer to NOOP within 30s")
    monitor.mark_dead("something later")
    with trio.fail_after(1):
        await monitor.wait()
    assert monitor.problem() == "connection lost (no answer to NOOP within 30s)"


async def test_guard_is_cancelled_on_connection_loss(
    autojump_clock: trio.testing.MockClock,
) -> None:
    monitor = selected(3)
    caught: list[bool] = []

    async def command() -> None:
        with monitor.guard() as scope:
            await trio.sleep(30)  # waiting for a tagged answer
        caught.append(scope.cancelled_caught)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(command)
        nursery.start_soon(command)
        await trio.sleep(1)
        monitor.connection_lost(OSError("broken pipe"))
    assert caught == [True, True]
    assert trio.current_time() == 1  # failed at once, not at the deadline


async def test_guard_entered_after_loss_is_cancelled_immediately(
    autojump_clock: trio.testing.MockClock,
) -> None:
    monitor = selected(3)
    monitor.connection_lost(None)
    with monitor.guard() as scope:
        await trio.sleep(30)
    assert scope.cancelled_caught
    assert trio.current_time() == 0


async def test_guard_not_cancelled_without_loss(autojump_clock: trio.testing.MockClock) -> None:
    monitor = selected(3)
    with monitor.guard() as scope:
        await trio.sleep(30)
    assert not scope.cancelled_caught
    # a finished guard is forgotten: a later loss does not touch it
    monitor.connection_lost(None)
    assert not scope.cancel_called


# -- wait() is a checkpoint whatever is pending (as trio's own waits are) -----------------


async def test_wait_with_mail_pending_is_still_a_checkpoint() -> None:
    monitor = selected(3)
    monitor.untagged(b"* 4 EXISTS")
    with trio.testing.assert_checkpoints():
        await monitor.wait()
    monitor.untagged(b"* BYE bye")
    with trio.testing.assert_checkpoints():
        await monitor.wait()


async def test_cancelled_wait_raises_even_with_mail_pending_and_loses_nothing() -> None:
    monitor = selected(3)
    monitor.untagged(b"* 5 EXISTS")
    with trio.CancelScope() as scope:
        scope.cancel()
        await monitor.wait()
        raise AssertionError("wait returned inside a cancelled scope")
    assert scope.cancelled_caught
    assert monitor.take_new_mail() == 2


# -- what a monitor holds: one per connection, thousands per daemon -----------------------


def _held(monitor: PushMonitor) -> list[object]:
    return [o for o in gc.get_referents(monitor) if isinstance(o, trio.Event | set)]


async def test_a_monitor_nobody_waits_on_holds_no_event_and_no_set() -> None:
    """The session reads the connection itself and never calls wait() or guard(): what
    they need is made when first needed, and the guards' set is dropped when empty."""
    monitor = selected(3)
    monitor.untagged(b"* 4 EXISTS")
    monitor.untagged(b"* BYE bye")
    monitor.mark_dead("gone")
    monitor.connection_lost(None)
    assert _held(monitor) == []
    fresh = selected(3)
    with fresh.guard():
        assert len(_held(fresh)) == 1
    assert _held(fresh) == []
    fresh.untagged(b"* 4 EXISTS")
    await fresh.wait()  # pending: returns, and made nothing to wait on
    assert _held(fresh) == []
