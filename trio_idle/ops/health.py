"""Health decisions: pure functions of a :class:`HealthSnapshot`, tested without sockets.

Three questions, three answers (each a :class:`Health` with log-safe reasons):

- :func:`assess_liveness` (``/healthz``): is the event loop responsive? Not if the
  measured loop lag exceeds ``max_loop_lag``.
- :func:`assess_readiness` (``/readyz``): is every mailbox being watched? Yes when the
  connection list was loaded successfully within two refresh intervals *and* at least
  ``ready_share`` of the sessions are ``idle`` or ``polling`` (no sessions at all counts
  as ready: nothing is left unwatched).
- :func:`assess_health` (the outbound ping and the systemd watchdog's judgement): liveness
  and readiness together, except that a daemon that has not loaded the list yet is given
  two refresh intervals from its start before that counts against it.

Nothing here reads a clock or the daemon: :mod:`trio_idle.runtime.supervision` takes the snapshot.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import attrs

from trio_idle.mailbox.session_states import SESSION_STATES, UP_STATES


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

    @property
    def sessions_total(self) -> int:
        return sum(self.sessions.values())

    @property
    def sessions_up(self) -> int:
        return sum(n for state, n in self.sessions.items() if state in UP_STATES)

    @property
    def up_share(self) -> float:
        """Share of sessions watching their mailbox; 1.0 when there are none."""
        total = self.sessions_total
        return 1.0 if total == 0 else self.sessions_up / total

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
        return [
            f"only {snap.sessions_up} of {snap.sessions_total} sessions are idle or polling "
            f"(need {snap.ready_share:.0%})"
        ]
    return []


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


def assess_readiness(snap: HealthSnapshot) -> Health:
    """``/readyz``: the list is fresh and enough sessions are watching their mailbox."""
    return Health.of(_refresh_reasons(snap, grace=False) + _share_reasons(snap))


def assess_health(snap: HealthSnapshot) -> Health:
    """The ping's verdict: stale list (after a start-up grace), too many sessions down,
    or a lagging loop."""
    return Health.of(_refresh_reasons(snap, grace=True) + _share_reasons(snap) + _lag_reasons(snap))


def readiness_body(snap: HealthSnapshot, verdict: Health) -> dict[str, object]:
    """The JSON body of ``/readyz`` (counts only; never per-mailbox data)."""
    age = snap.refresh_age
    return {
        "ready": verdict.ok,
        "reasons": list(verdict.reasons),
        "sessions": dict(snap.sessions),
        "sessions_total": snap.sessions_total,
        "sessions_up": snap.sessions_up,
        "up_share": round(snap.up_share, 4),
        "ready_share": snap.ready_share,
        "connections_in_source": snap.connections_in_source,
        "last_refresh_age_seconds": None if age is None else round(age, 3),
    }


def status_line(snap: HealthSnapshot) -> str:
    """One line for systemd's ``STATUS=``: ``"3/4 sessions watching (idle 3, ...)"``."""
    parts = ", ".join(f"{state} {n}" for state, n in snap.sessions.items() if n)
    detail = f" ({parts})" if parts else ""
    return (
        f"{snap.sessions_up}/{snap.sessions_total} sessions watching{detail}; "
        f"{snap.connections_in_source} connections in the source"
    )
