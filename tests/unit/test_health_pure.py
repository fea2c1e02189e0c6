"""The health decisions as pure functions of a snapshot (no sockets, no clock)."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from trio_idle.backend.watch import BackendWatch
from trio_idle.mailbox.session_states import SESSION_STATES
from trio_idle.ops.health import (
    Health,
    HealthSnapshot,
    assess_health,
    assess_liveness,
    assess_readiness,
    count_states,
    readiness_body,
    status_line,
)


def snap(**overrides: Any) -> HealthSnapshot:
    values: dict[str, Any] = {
        "now": 1000.0,
        "started_at": 0.0,
        "refresh_interval": 300.0,
        "last_refresh_ok": 900.0,
        "sessions": count_states(["idle"] * 9 + ["polling"]),
        "connections_in_source": 10,
        "loop_lag": 0.01,
        "max_loop_lag": 5.0,
        "ready_share": 0.9,
    }
    values.update(overrides)
    return HealthSnapshot(**values)


def test_count_states_keeps_every_state_with_zeros() -> None:
    counts = count_states(["idle", "idle", "connecting"])
    assert list(counts) == list(SESSION_STATES)
    assert counts == {"connecting": 1, "idle": 2, "polling": 0, "backing-off": 0, "auth-failed": 0}
    assert count_states(["weird"])["weird"] == 1  # an unknown state is still counted


def test_all_good() -> None:
    s = snap()
    assert assess_liveness(s) == assess_readiness(s) == assess_health(s) == Health(True, ())
    assert s.up_share == 1.0 and s.sessions_up == 10 and s.sessions_total == 10


def test_share_exactly_at_the_threshold_is_ready() -> None:
    s = snap(sessions=count_states(["idle"] * 9 + ["backing-off"]))
    assert s.up_share == 0.9
    assert assess_readiness(s).ok and assess_health(s).ok


def test_share_below_the_threshold() -> None:
    s = snap(sessions=count_states(["idle"] * 8 + ["backing-off", "connecting"]))
    verdict = assess_readiness(s)
    assert not verdict.ok
    assert verdict.reasons == ("only 8 of 10 sessions are idle or polling (need 90%)",)
    assert not assess_health(s).ok
    assert assess_liveness(s).ok  # sessions down do not make the process unhealthy


def test_one_users_wrong_password_out_of_two_is_ready_and_healthy() -> None:
    s = snap(sessions=count_states(["idle", "auth-failed"]), connections_in_source=2)
    assert s.sessions_user_blocked == 1 and s.sessions_operator == 1 and s.up_share == 1.0
    assert assess_readiness(s).ok and assess_health(s).ok


def test_every_session_auth_failed_is_the_users_business() -> None:
    s = snap(sessions=count_states(["auth-failed"] * 3), connections_in_source=3)
    assert s.up_share == 1.0  # nothing the operator answers for is unwatched
    assert assess_readiness(s).ok and assess_health(s).ok


def test_user_blocked_sessions_are_left_out_of_the_share_not_counted_as_up() -> None:
    s = snap(sessions=count_states(["idle"] * 8 + ["backing-off"] * 2 + ["auth-failed"] * 5))
    verdict = assess_readiness(s)
    assert verdict.reasons == (
        "only 8 of 10 sessions are idle or polling (need 90%; 5 auth-failed not counted)",
    )
    assert not assess_health(s).ok


def test_every_session_failing_for_other_reasons_is_not_ready() -> None:
    s = snap(sessions=count_states(["backing-off", "backing-off"]), connections_in_source=2)
    assert assess_readiness(s).reasons == ("only 0 of 2 sessions are idle or polling (need 90%)",)
    assert assess_health(s).reasons == assess_readiness(s).reasons


@pytest.mark.parametrize(
    ("failing_since", "ok"), [(None, True), (1000.0, True), (941.0, True), (940.0, False)]
)
def test_backend_down_after_its_bound(failing_since: float | None, ok: bool) -> None:
    s = snap(backend_failing_since=failing_since, backend_down_after=60.0)
    assert assess_readiness(s).ok is ok and assess_health(s).ok is ok
    assert assess_liveness(s).ok
    if not ok:
        assert assess_readiness(s).reasons == ("every request to the backend has failed for 60s",)


def test_backend_down_with_no_sessions_is_still_not_ready() -> None:
    s = snap(sessions=count_states([]), backend_failing_since=0.0, connections_in_source=0)
    assert not assess_readiness(s).ok


def test_a_fenced_instance_is_not_ready() -> None:
    # fenced: its sessions are stopped, so the share alone would say "ready"
    s = snap(sessions=count_states([]), fenced=True)
    assert assess_readiness(s).reasons == ("this instance is fenced (cannot renew its lease)",)
    assert not assess_health(s).ok


def test_backend_watch_keeps_the_start_of_a_run_of_failures() -> None:
    watch = BackendWatch()
    assert watch.failing_since is None
    watch.failed(10.0)
    watch.failed(20.0)
    assert watch.failing_since == 10.0
    watch.answered()
    assert watch.failing_since is None
    watch.failed(30.0)
    assert watch.failing_since == 30.0


def test_connecting_sessions_are_not_up() -> None:
    s = snap(sessions=count_states(["connecting"] * 2))
    assert not assess_readiness(s).ok


def test_no_sessions_is_ready() -> None:
    s = snap(sessions=count_states([]), connections_in_source=0)
    assert s.up_share == 1.0
    assert assess_readiness(s).ok


def test_share_zero_accepts_anything() -> None:
    s = snap(sessions=count_states(["backing-off"] * 3), ready_share=0.0)
    assert assess_readiness(s).ok


@pytest.mark.parametrize(("age", "ok"), [(0.0, True), (600.0, True), (600.5, False)])
def test_refresh_must_be_within_two_intervals(age: float, ok: bool) -> None:
    s = snap(last_refresh_ok=1000.0 - age)
    assert assess_readiness(s).ok is ok
    assert assess_health(s).ok is ok
    if not ok:
        assert assess_readiness(s).reasons == (
            "no successful refresh of the connection list for 600s",
        )


def test_never_refreshed_is_not_ready_but_healthy_during_the_grace() -> None:
    early = snap(last_refresh_ok=None, now=100.0, sessions=count_states([]))
    assert assess_readiness(early).reasons == ("the connection list has not been loaded yet",)
    assert assess_health(early).ok  # within 2 intervals of the start
    late = snap(last_refresh_ok=None, now=601.0, sessions=count_states([]))
    assert assess_health(late).reasons == ("the connection list has not been loaded yet",)


def test_loop_lag_above_the_threshold() -> None:
    s = snap(loop_lag=6.0)
    assert assess_liveness(s).reasons == ("event loop lag 6.00s exceeds 5s",)
    assert not assess_health(s).ok
    assert assess_readiness(s).ok  # readiness is about the mailboxes
    assert assess_liveness(snap(loop_lag=5.0)).ok


def test_health_collects_every_reason() -> None:
    s = snap(loop_lag=9.0, last_refresh_ok=0.0, sessions=count_states(["backing-off"]))
    verdict = assess_health(s)
    assert len(verdict.reasons) == 3
    assert verdict.summary() == "; ".join(verdict.reasons)
    assert Health(True).summary() == "ok"


def test_readiness_body_and_status_line() -> None:
    s = snap(sessions=count_states(["idle", "idle", "backing-off"]), connections_in_source=4)
    body = readiness_body(s, assess_readiness(s))
    assert body["ready"] is False
    assert body["sessions"] == s.sessions
    assert body["sessions_total"] == 3 and body["sessions_up"] == 2
    assert body["sessions_user_blocked"] == 0
    assert body["backend_failing_seconds"] is None and body["fenced"] is False
    assert body["up_share"] == 0.6667 and body["ready_share"] == 0.9
    assert body["connections_in_source"] == 4 and body["last_refresh_age_seconds"] == 100.0
    assert status_line(s) == (
        "2/3 sessions watching (idle 2, backing-off 1); 4 connections in the source"
    )
    empty = snap(sessions=count_states([]), connections_in_source=0)
    assert status_line(empty) == "0/0 sessions watching; 0 connections in the source"


def test_the_health_decisions_import_no_network_library() -> None:
    # a fresh interpreter: this test process has imported everything already
    code = (
        "import sys, trio_idle.ops.health\n"
        "print(sorted(m for m in ('aioimaplib', 'trio_asyncio', 'trio_idle.mailbox.session')"
        " if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"
