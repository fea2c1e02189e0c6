"""PushMonitor: a connection the daemon gave up on keeps that reason when the socket closes."""

from __future__ import annotations

from trio_idle.imap.push_monitor import PushMonitor


async def test_the_reason_given_to_mark_dead_survives_the_close_that_follows() -> None:
    monitor = PushMonitor()
    monitor.mark_dead("server sent a line longer than 1 MiB without CRLF")
    monitor.connection_lost(None)  # the transport we closed reports it
    assert monitor.problem() == (
        "connection lost (server sent a line longer than 1 MiB without CRLF)"
    )


async def test_a_close_without_an_earlier_reason_is_described() -> None:
    monitor = PushMonitor()
    monitor.connection_lost(ConnectionResetError("peer reset"))
    monitor.mark_dead("later")
    assert monitor.problem() == "connection lost (ConnectionResetError: peer reset)"
