"""Health decisions: pure functions of a :class:`HealthSnapshot`, tested without sockets.

Three questions, three answers (each a :class:`Health` with log-safe reasons):

- :func:`assess_liveness` (``/healthz``): is the event loop responsive? Not if the
  measured loop lag exceeds ``max_loop_lag``.
- :func:`assess_readiness` (``/readyz``): is there nothing the *operator* must fix? Not
  ready when the connection list was not loaded successfully within two refresh
  intervals (database down), when fewer than ``ready_share`` of the sessions the
  operator answers for are ``idle`` or ``polling`` (IMAP servers unreachable, token
  endpoint down, every session failing), when every request to the backend has failed
  for ``backend_down_after`` seconds (backend down, or it refuses ``ADMIN_SECRET``), or
  when this instance is fenced (shared mode).
- :func:`assess_health` (the outbound ping and the systemd watchdog's judgement):
  readiness and liveness together, except that a daemon that has not loaded the list
  yet is given two refresh intervals from its start before that counts against it.

What end users cause is *not* the operator's to fix and never makes the daemon unready
or unhealthy: a session in ``auth-failed`` (:data:`USER_STATES`: a wrong or changed
password, IMAP switched off, an app password required, a revoked or missing OAuth2
grant, a locked account) is left out of the share, whichever share of the sessions it
is; the backend already gets those as account health, and the metrics carry them as a
ratio. No sessions at all (an empty list, or only user-blocked ones) counts as ready:
nothing the operator answers for is unwatched.

Nothing here reads a clock or the daemon: :mod:`trio_idle.runtime.supervision` takes the snapshot
(and :class:`BackendWatch` is fed by :mod:`trio_idle.backend.webhook` with the time of each answer).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final

import attrs

from trio_idle.mailbox.session_states import AUTH_FAILED, SESSION_STATES, UP_STATES

#: Session states that end users cause and fix (the backend gets them as account
#: health): left out of the readiness share.
USER_STATES: Final = frozenset({AUTH_FAILED})


def count_states(states: Iterable[str]) -> dict[str, int]:
    """``["idle", "idle", "connecting"]`` → every known state with its count (zeros kept)."""
    counts = dict.fromkeys(SESSION_STATES, 0)
    for state in states:
        counts[state] = counts.get(state, 0) + 1
    return counts


@attrs.frozen(kw_only=True)
class HealthSnapshot:
    """Everything the health decisions look at. Times are on one monotonic clock."""

    now: float
    started_at: float
    refresh_interval: float
    #: time of the last successful refresh, ``None`` before the first one
    last_refresh_ok: float | None
    #: count per session state (see :func:`count_states`)
    sessions: Mapping[str, int]
    connections_in_source: int
    loop_lag: float
    max_loop_lag: float
    ready_share: float
    #: since when every request to the backend has failed; ``None`` while it answers
    backend_failing_since: float | None = None
    #: how long the backend may fail every request before that is an operator problem
    backend_down_after: float = 60.0
    #: shared mode: this instance cannot renew its lease (its sessions are stopped)
    fenced: bool = False

    @property
    def sessions_total(self) -> int:
        return sum(self.sessions.values())

    @property
    def sessions_up(self) -> int:
        return sum(n for state, n in self.sessions.items() if state in UP_STATES)

    @property
    def sessions_user_blocked(self) -> int:
        """Sessions down for a reason their user must fix (:data:`USER_STATES`)."""
        return sum(n for state, n in self.sessions.items() if state in USER_STATES)

    @property
    def sessions_operator(self) -> int:
        """Sessions the operator answers for: all but the user-blocked ones."""
        return self.sessions_total - self.sessions_user_blocked

    @property
    def up_share(self) -> float:
        """Share of the operator's sessions watching their mailbox; 1.0 when there are none."""
        total = self.sessions_operator
        return 1.0 if total == 0 else self.sessions_up / total

    @property
    def backend_failing_for(self) -> float | None:
        """Seconds every request to the backend has failed; ``None`` while it answers."""
        since = self.backend_failing_since
        return None if since is None else max(0.0, self.now - since)

    @property
    def refresh_age(self) -> float | None:
        return None if self.last_refresh_ok is None else self.now - self.last_refresh_ok


@attrs.frozen
class Health:
    """A verdict. ``reasons`` is empty when ``ok``; each reason is one short, log-safe line."""

    ok: bool
    reasons: tuple[str, ...] = ()

    @classmethod
    def of(cls, reasons: Iterable[str]) -> Health:
        found = tuple(reasons)
        return cls(not found, found)

    def summary(self) -> str:
        return "ok" if self.ok else "; ".join(self.reasons)


def _lag_reasons(snap: HealthSnapshot) -> list[str]:
    if snap.loop_lag > snap.max_loop_lag:
        return [f"event loop lag {snap.loop_lag:.2f}s exceeds {snap.max_loop_lag:g}s"]
    return []


def _share_reasons(snap: HealthSnapshot) -> list[str]:
    if snap.up_share < snap.ready_share:
        blocked = snap.sessions_user_blocked
        aside = f"; {blocked} auth-failed not counted" if blocked else ""
        return [
            f"only {snap.sessions_up} of {snap.sessions_operator} sessions are idle or polling "
            f"(need {snap.ready_share:.0%}{aside})"
        ]
    return []


def _backend_reasons(snap: HealthSnapshot) -> list[str]:
    failing = snap.backend_failing_for
    if failing is not None and failing >= snap.backend_down_after:
        return [f"every request to the backend has failed for {failing:.0f}s"]
    return []


def _fence_reasons(snap: HealthSnapshot) -> list[str]:
    return ["this instance is fenced (cannot renew its lease)"] if snap.fenced else []


def _refresh_reasons(snap: HealthSnapshot, *, grace: bool) -> list[str]:
    limit = 2 * snap.refresh_interval
    age = snap.refresh_age
    if age is None:
        if grace and snap.now - snap.started_at <= limit:
            return []
        return ["the connection list has not been loaded yet"]
    if age > limit:
        return [f"no successful refresh of the connection list for {age:.0f}s"]
    return []


def assess_liveness(snap: HealthSnapshot) -> Health:
    """``/healthz``: the process answers and its event loop is responsive."""
    return Health.of(_lag_reasons(snap))


def _operator_reasons(snap: HealthSnapshot, *, grace: bool) -> list[str]:
    return (
        _refresh_reasons(snap, grace=grace)
        + _share_reasons(snap)
        + _backend_reasons(snap)
        + _fence_reasons(snap)
    )


def assess_readiness(snap: HealthSnapshot) -> Health:
    """``/readyz``: nothing the operator must fix (list fresh, enough of the operator's
    sessions watching, backend answering, not fenced); user-caused failures never count."""
    return Health.of(_operator_reasons(snap, grace=False))


def assess_health(snap: HealthSnapshot) -> Health:
    """The ping's verdict: readiness (a stale list only after a start-up grace) or a
    lagging loop."""
    return Health.of(_operator_reasons(snap, grace=True) + _lag_reasons(snap))


def readiness_body(snap: HealthSnapshot, verdict: Health) -> dict[str, object]:
    """The JSON body of ``/readyz`` (counts only; never per-mailbox data)."""
    age = snap.refresh_age
    failing = snap.backend_failing_for
    return {
        "ready": verdict.ok,
        "reasons": list(verdict.reasons),
        "sessions": dict(snap.sessions),
        "sessions_total": snap.sessions_total,
        "sessions_up": snap.sessions_up,
        "sessions_user_blocked": snap.sessions_user_blocked,
        "up_share": round(snap.up_share, 4),
        "ready_share": snap.ready_share,
        "connections_in_source": snap.connections_in_source,
        "last_refresh_age_seconds": None if age is None else round(age, 3),
        "backend_failing_seconds": None if failing is None else round(failing, 3),
        "fenced": snap.fenced,
    }


def status_line(snap: HealthSnapshot) -> str:
    """One line for systemd's ``STATUS=``: ``"3/4 sessions watching (idle 3, ...)"``."""
    parts = ", ".join(f"{state} {n}" for state, n in snap.sessions.items() if n)
    detail = f" ({parts})" if parts else ""
    return (
        f"{snap.sessions_up}/{snap.sessions_total} sessions watching{detail}; "
        f"{snap.connections_in_source} connections in the source"
    )
