"""A session's timers and decisions, against a scripted IMAP server in virtual time.

Each test runs :func:`~trio_idle.mailbox.session.run_session` on a
:class:`~trio_idle_testing.fake_imap.FakeImapServer` under pytest-trio's
``autojump_clock`` (``MockClock(autojump_threshold=0)``): hours of session life take
milliseconds, and every timestamp asserted is exact. Assertions are on what the server
received (:attr:`FakeImapServer.calls`), the session's state and the scans it asked for;
log text only for the lines operators grep for.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from trio_idle_testing.fake_imap import FakeImapServer

from tests.fixtures import webhook_client
from tests.unit.session_rig import (
    COMMAND_TIMEOUT,
    CONN,
    RENEW,
    TICK,
    Rig,
    closed,
    connected,
    connected_session,
    expected_first_timers,
    make_rig,
    running,
    scanning,
    settled,
)
from trio_idle.core.stats import Stats
from trio_idle.imap.responses import MailboxState
from trio_idle.mailbox.scan_worker import ScanPolicy
from trio_idle.mailbox.session import run_session
from trio_idle.mailbox.session_states import AUTH_FAILED, BACKOFF, IDLE, POLLING
from trio_idle.state.records import Key, ScannedState
from trio_idle.state.store import StateStore


@pytest.fixture
def rig() -> Rig:
    """A session's rig on the :func:`default_server`; a test scripts the server (e.g.
    ``server.idle = False``) before it runs the session."""
    return make_rig()


@pytest.fixture
def server(rig: Rig) -> FakeImapServer:
    return rig.server


# -- the tick -----------------------------------------------------------------------------


async def test_tick_leaves_idle_noops_and_reenters_on_a_jittered_schedule(
    autojump_clock: trio.testing.MockClock, rig: Rig, server: FakeImapServer
) -> None:
    async with connected_session(rig) as t0:
        assert server.commands() == ["connect", "LOGIN", "SELECT", "IDLE"]
        assert rig.memory.state == IDLE
        await settled(rig, lambda: len(server.times("NOOP")) == 3)
    first_tick, _ = expected_first_timers(t0)
    assert t0 + TICK / 2 <= first_tick < t0 + TICK  # jittered, from the session's RNG
    assert server.times("NOOP") == [first_tick, first_tick + TICK, first_tick + 2 * TICK]
    assert server.commands()[4:] == ["DONE", "NOOP", "IDLE"] * 3 + ["LOGOUT"]
    assert rig.coalescer.requested == 0  # nothing new: no scan


async def test_mail_only_reported_in_the_noop_answer_is_scanned_at_the_tick(
    autojump_clock: trio.testing.MockClock, rig: Rig, server: FakeImapServer
) -> None:
    server.push = False
    async with connected_session(rig) as t0:
        server.deliver(2)
        await trio.testing.wait_all_tasks_blocked()
        assert rig.coalescer.requested == 0  # this server does not push
        await settled(rig, lambda: len(server.times("NOOP")) == 1)
        assert rig.coalescer.pending_reason == "tick"
        assert rig.coalescer.pending_since == expected_first_timers(t0)[0]
    assert rig.stats.get("exists_events", "tick") == 1
    # announced mail moves the remembered UIDNEXT, so a reconnect will not scan it again
    assert rig.memory.mailbox == MailboxState(exists=5, uidnext=12, uidvalidity=5)


async def test_pushed_exists_requests_a_scan_at_once(
    autojump_clock: trio.testing.MockClock, rig: Rig, server: FakeImapServer
) -> None:
    async with connected_session(rig):
        await trio.sleep(7)
        server.deliver()
        await trio.testing.wait_all_tasks_blocked()
        assert rig.coalescer.pending_reason == "exists"
        assert rig.coalescer.pending_since == trio.current_time()
        server.expunge()  # deleting mail is not new mail
        await trio.testing.wait_all_tasks_blocked()
        assert rig.coalescer.requested == 1
    assert "NOOP" not in server.commands()  # within the first tick's half interval


async def test_server_without_idle_is_polled_with_noop_every_tick(
    autojump_clock: trio.testing.MockClock, rig: Rig, server: FakeImapServer
) -> None:
    server.idle = False
    async with connected_session(rig) as t0:
        assert rig.memory.state == POLLING
        await settled(rig, lambda: len(server.times("NOOP")) == 1)
        server.deliver()
        await settled(rig, lambda: len(server.times("NOOP")) == 2)
    first_tick, _ = expected_first_timers(t0)
    assert server.times("NOOP") == [first_tick, first_tick + TICK]
    assert "IDLE" not in server.commands()
    assert rig.coalescer.pending_reason == "tick"


# -- IDLE renewal -------------------------------------------------------------------------


async def test_idle_is_renewed_before_the_25_minute_threshold_and_every_interval_after(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rig = make_rig(tick_interval=7200.0)  # first tick after 3600 s: only renewals here
    server = rig.server
    async with connected_session(rig) as t0:
        await settled(rig, lambda: len(server.times("DONE")) == 2 and server.link.idling)
    _, renew_at = expected_first_timers(t0, tick=7200.0)
    assert t0 + 0.8 * RENEW <= renew_at <= t0 + RENEW  # never late: servers cut at 29 min
    assert server.times("DONE") == [renew_at, renew_at + RENEW]
    assert server.commands()[4:] == ["DONE", "IDLE", "DONE", "IDLE", "LOGOUT"]  # no NOOP
    renewals = [t for t in rig.log.texts("info") if "idle renewing" in t]
    assert renewals == ["[idle/alice@example.test] idle renewing (25min threshold)"] * 2


# -- dead connections ---------------------------------------------------------------------


async def test_half_open_connection_is_found_by_the_tick_and_replaced(
    autojump_clock: trio.testing.MockClock, rig: Rig, server: FakeImapServer
) -> None:
    async with connected_session(rig) as t0:
        server.go_silent()
        server.refuse_connects = 1  # and the first reconnect fails: the backoff grows
        await connected(rig, link=3)
    first_tick, _ = expected_first_timers(t0)
    gave_up = first_tick + COMMAND_TIMEOUT
    # link 1: DONE written at the tick, never answered; no LOGOUT to a dead connection
    assert server.commands(link=1)[-1] == "DONE"
    assert server.times("DONE", link=1) == [first_tick]
    assert server.times("connect", link=2) == [gave_up + 5.0]
    retry = server.times("connect", link=3)[0] - (gave_up + 5.0)
    assert 5.0 <= retry <= 10.0  # second attempt: jittered, doubled bound
    assert rig.stats.get("disconnects") == 1 and rig.stats.get("connect_failures") == 1
    warnings = rig.log.texts("warning")
    assert "[idle/alice@example.test] connection lost: no answer to DONE within 30s" in warnings
    info = rig.log.texts("info")
    assert "[idle/alice@example.test] reconnecting in 5s (attempt 2)" in info
    assert any(t.endswith("(attempt 3)") and "reconnecting in " in t for t in info)


async def test_state_and_error_while_backing_off_after_a_half_open_connection(
    autojump_clock: trio.testing.MockClock, rig: Rig, server: FakeImapServer
) -> None:
    async with connected_session(rig):
        server.go_silent()
        await settled(rig, closed(rig))
        assert rig.memory.state == BACKOFF
        assert rig.memory.last_error == "no answer to DONE within 30s"
        assert rig.memory.connected_since is None
        await connected(rig, link=2)
        assert rig.memory.state == IDLE and rig.memory.last_error is None
        assert rig.memory.sessions == 2


async def test_bye_during_idle_reconnects_after_five_seconds_without_a_scan(
    autojump_clock: trio.testing.MockClock, rig: Rig, server: FakeImapServer
) -> None:
    async with connected_session(rig):
        await trio.sleep(50)
        bye_at = trio.current_time()
        server.bye("Server shutting down")
        await settled(rig, closed(rig))
        assert rig.memory.state == BACKOFF
        assert rig.memory.last_error == "server said 'BYE Server shutting down'"
        await connected(rig, link=2)
    assert server.times("connect", link=2) == [bye_at + 5.0]
    assert "LOGOUT" not in server.commands(link=1)
    assert rig.coalescer.requested == 0  # mailbox unchanged: no catch-up scan


async def test_a_failing_noop_costs_one_reconnect(
    autojump_clock: trio.testing.MockClock, rig: Rig, server: FakeImapServer
) -> None:
    server.idle = False
    server.fail_next("NOOP")
    async with connected_session(rig) as t0:
        await connected(rig, link=2)
    first_tick, _ = expected_first_timers(t0)
    assert server.times("connect", link=2) == [first_tick + 5.0]
    assert rig.stats.get("disconnects") == 1
    # the link had answered SELECT: a polite LOGOUT before reconnecting
    assert server.commands(link=1)[-2:] == ["NOOP", "LOGOUT"]


# -- catch-up decisions -------------------------------------------------------------------


async def _reconnect_after(rig: Rig, change: Callable[[FakeImapServer], object]) -> None:
    server = rig.server
    await connected(rig)
    server.drop()
    await settled(rig, closed(rig))
    change(server)
    await connected(rig, link=2)


@pytest.mark.parametrize(
    ("change", "scan", "why"),
    [
        (lambda s: s.deliver(2), True, "uidnext 10→12"),
        (lambda s: setattr(s, "uidvalidity", 6), True, "uidvalidity changed"),
        (lambda s: None, False, None),
        (lambda s: s.expunge(), False, None),
    ],
    ids=["uidnext-moved", "uidvalidity-changed", "unchanged", "only-deleted"],
)
async def test_reconnect_scans_only_when_mail_may_have_arrived_unseen(
    autojump_clock: trio.testing.MockClock,
    rig: Rig,
    change: Callable[[FakeImapServer], object],
    scan: bool,
    why: str | None,
) -> None:
    async with running(rig):
        await _reconnect_after(rig, change)
    if scan:
        assert rig.coalescer.pending_reason == "reconnect" and rig.coalescer.requested == 1
        assert rig.stats.get("catch_up_scans", "reconnect") == 1
        assert f"[idle/alice@example.test] catch-up scan ({why})" in rig.log.texts("info")
    else:
        assert rig.coalescer.requested == 0
    assert rig.memory.mailbox == rig.server._mailbox()


async def test_mail_announced_before_a_reconnect_is_not_scanned_again(
    autojump_clock: trio.testing.MockClock, rig: Rig, server: FakeImapServer
) -> None:
    async with connected_session(rig):
        server.deliver(3)
        await trio.testing.wait_all_tasks_blocked()
        assert rig.coalescer.pending_reason == "exists"
        server.drop()
        await settled(rig, closed(rig))
        await connected(rig, link=2)
    assert rig.coalescer.requested == 1
    assert rig.stats.get("catch_up_scans") == 0


class MemoryBackend:
    name = "memory"

    def __init__(self, rows: dict[Key, ScannedState]) -> None:
        self.rows = rows

    async def load_all(self) -> dict[Key, ScannedState]:
        return dict(self.rows)

    async def write(self, upserts: Any, deletes: Any) -> None:
        pass


@pytest.mark.parametrize(
    ("stored", "scan"),
    [
        (None, True),  # new to the store: we cannot know
        (ScannedState(5, 10, 0.0), False),  # the last run scanned up to UIDNEXT 10
        (ScannedState(5, 8, 0.0), True),  # mail arrived while down
        (ScannedState(4, 10, 0.0), True),  # UIDVALIDITY changed while down
    ],
    ids=["no-row", "up-to-date", "uidnext-moved", "uidvalidity-changed"],
)
async def test_first_session_compares_with_what_the_last_run_scanned(
    autojump_clock: trio.testing.MockClock, stored: ScannedState | None, scan: bool
) -> None:
    rows = {} if stored is None else {(CONN.id, "INBOX"): stored}
    store = StateStore(MemoryBackend(rows), Stats())
    await store.load()
    rig = make_rig(store=store)
    async with running(rig):
        await connected(rig)
        # a later reconnect compares with this session, not with the store
        rig.server.drop()
        await connected(rig, link=2)
    assert rig.coalescer.requested == (1 if scan else 0)
    assert rig.stats.get("catch_up_scans", "startup") == (1 if scan else 0)
    assert rig.stats.get("catch_up_scans", "reconnect") == 0
    if scan:
        assert rig.coalescer.pending_reason == "startup"


# -- authentication -----------------------------------------------------------------------


async def test_rejected_login_waits_the_long_auth_backoff(
    autojump_clock: trio.testing.MockClock, rig: Rig, server: FakeImapServer
) -> None:
    server.reject_logins = 2
    async with running(rig):
        await settled(rig, closed(rig))
        assert rig.memory.state == AUTH_FAILED
        assert rig.memory.last_error == "login rejected for alice: NO [AUTHENTICATIONFAILED]"
        await connected(rig, link=3)
    first, second, third = (server.times("connect", n)[0] for n in (1, 2, 3))
    assert second - first == 900.0  # TRIO_IDLE_AUTH_BACKOFF, not the 5 s reconnect
    assert 900.0 <= third - second <= 1800.0
    assert rig.memory.state == IDLE
    errors = rig.log.texts("error")
    assert errors[0] == (
        "[idle/alice@example.test] authentication failed: login rejected for alice: "
        "NO [AUTHENTICATIONFAILED] — check the stored password; next login attempt in 15min"
    )
    assert rig.stats.get("auth_failures") == 2
    assert not any("reconnecting in" in t for t in rig.log.texts("info"))
    assert all(c.command != "SELECT" for c in server.calls if c.link < 3)


async def test_a_login_that_worked_starts_the_auth_backoff_over(
    autojump_clock: trio.testing.MockClock, rig: Rig, server: FakeImapServer
) -> None:
    server.reject_logins = 1
    async with running(rig):
        await connected(rig, link=2)
        server.reject_logins = 1  # the password is wrong again after the next drop
        server.drop()
        await connected(rig, link=4)
    refused, again = server.times("connect", 3)[0], server.times("connect", 4)[0]
    # 15 min exactly: the first failure since a login worked, not the second in a row
    assert again - refused == 900.0
    assert rig.stats.get("auth_failures") == 2


# -- ending -------------------------------------------------------------------------------


async def test_cancelled_session_logs_out_at_once(
    autojump_clock: trio.testing.MockClock, rig: Rig, server: FakeImapServer
) -> None:
    async with connected_session(rig):
        await trio.sleep(10)
    assert server.commands() == ["connect", "LOGIN", "SELECT", "IDLE", "LOGOUT"]
    assert server.times("LOGOUT") == [10.0 + server.times("IDLE")[0]]
    assert server.link.closed


async def test_logout_to_a_silent_server_waits_the_logout_timeout_then_closes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rig = make_rig(logout_timeout=2.0)
    server = rig.server
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_session, CONN, rig.env, rig.coalescer, rig.memory, rig.log)
        await connected(rig)
        server.go_silent()
        nursery.cancel_scope.cancel()
        cancelled_at = trio.current_time()
    assert trio.current_time() - cancelled_at == 2.0
    assert server.commands()[-1] == "LOGOUT" and server.link.closed


# -- coalescing through the real scan task ------------------------------------------------


async def test_any_mix_of_triggers_costs_at_most_one_active_and_one_pending_scan(
    autojump_clock: trio.testing.MockClock, rig: Rig, server: FakeImapServer
) -> None:
    posts: list[dict[str, Any]] = []
    release = trio.Event()

    async def backend(request: httpx.Request) -> httpx.Response:
        posts.append(json.loads(request.content))
        await release.wait()  # the first scan stays in flight
        return httpx.Response(200, json={"scanned": 1, "blocked": 0})

    webhook = webhook_client("http://backend.invalid/scan", backend)
    policy = ScanPolicy("INBOX", 1.0, 60.0)
    async with running(rig), scanning(rig, webhook, policy):
        await connected(rig)
        server.deliver()  # scan 1 goes out and hangs
        await trio.testing.wait_all_tasks_blocked()
        assert len(posts) == 1 and rig.coalescer.active
        for _ in range(20):  # pushed EXISTS: the first becomes the pending scan
            await trio.sleep(1)
            server.deliver()
        server.push = False
        server.deliver()  # found by the tick
        await settled(rig, lambda: len(server.times("NOOP")) == 1 and server.link.idling)
        server.drop()  # and mail while disconnected: a reconnect catch-up
        await settled(rig, closed(rig))
        server.deliver()
        await connected(rig, link=2)
        assert len(posts) == 1
        assert rig.coalescer.pending == 1 and rig.coalescer.requested == 23
        release.set()
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(10 * TICK)  # ticks find nothing more: no third scan
    await webhook.aclose()
    assert [p["reason"] for p in posts] == ["exists", "exists"]
    assert rig.coalescer.absorbed == 21
    assert rig.stats.get("scans_ok") == 2
    assert rig.stats.get("catch_up_scans", "reconnect") == 1
