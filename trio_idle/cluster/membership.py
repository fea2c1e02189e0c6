"""Several instances sharing the mailboxes: the membership table, heartbeats, fencing.

With ``TRIO_IDLE_CLUSTER=shared`` every instance registers in ``trio_idle_instance``
(created by ``trio-idle db migrate``; the daemon never alters the backend's own tables)
and renews its heartbeat every ``TRIO_IDLE_CLUSTER_POLL``. One statement renews and reads
the live member list (:attr:`MembershipSql.beat`): live are the members whose heartbeat is
within ``TRIO_IDLE_CLUSTER_TTL`` of the database's ``now()``. Lease times come from the
database clock only, never from the instances' clocks, and every statement is a plain one
on a short connection without a statement cache, so it works through a transaction
pooler (PgBouncer, Supabase).

Guarantees (with :func:`trio_idle.cluster.assignment.plan_share`):

- Fencing: an instance that has not renewed for half the TTL (measured from when its
  last successful renewal was *sent*, so never later than the database saw it) stops all
  its sessions and logs why, until a renewal succeeds again. The others consider it dead
  only a full TTL after its last heartbeat, so its sessions are gone (LOGOUT is bounded
  by ``TRIO_IDLE_LOGOUT_TIMEOUT``, which must be below TTL/2) before anyone takes over.
- A renewal attempt never outlives the moment the instance must fence: it is cancelled
  then (the asyncpg call is cancelled through trio-asyncio).
- A graceful shutdown deletes the instance's row after its sessions ended, so the others
  take over at their next poll instead of after the TTL.

- A failed renewal's text (the fence reason ``/status`` shows, the log lines) is the
  database driver's error passed through a :class:`~trio_idle.core.scrub.Scrubs` (the
  daemon's masks ``DATABASE_URL`` and its password): secrets masked, control characters
  escaped, at most :data:`ERROR_LIMIT` characters.

Cancellation: :meth:`Membership.run` may be cancelled at any point; it leaves the row in
place (its heartbeat then expires like a crashed instance's).
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Callable, Sequence
from typing import Any, Final, Protocol

import attrs
import trio
from loguru import logger

from trio_idle.core.scrub import PLAIN, Scrubs
from trio_idle.core.secret import Secret
from trio_idle.net.pg_call import pg_call

#: the membership table's name (Postgres)
MEMBERSHIP_TABLE: Final = "trio_idle_instance"
#: how much of a database error a fence reason or a heartbeat log line quotes
ERROR_LIMIT: Final = 200


@attrs.frozen
class MembershipSql:
    """The membership statements (asyncpg ``$n`` parameters), documented in
    docs/operations.md. Every one is self-contained: no session state, no prepared
    statement kept, so a transaction pooler may hand each to another server connection."""

    table: str = MEMBERSHIP_TABLE

    @property
    def create(self) -> str:
        return (
            f"CREATE TABLE IF NOT EXISTS {self.table} ("
            " instance_id text PRIMARY KEY,"
            " started_at timestamptz NOT NULL DEFAULT now(),"
            " heartbeat_at timestamptz NOT NULL)"
        )

    @property
    def beat(self) -> str:
        """``$1`` instance id, ``$2`` TTL in seconds → rows ``(instance_id, age, db_now)``:
        this instance (age 0) and every other live one, ``db_now`` the database's UNIX
        time. The CTE's insert is not visible to the outer SELECT (one snapshot), hence
        the UNION with its RETURNING row."""
        return (
            f"WITH beat AS (INSERT INTO {self.table} (instance_id, heartbeat_at) "
            "VALUES ($1, now()) ON CONFLICT (instance_id) DO UPDATE SET heartbeat_at = now() "
            "RETURNING instance_id) "
            "SELECT instance_id, extract(epoch FROM now() - heartbeat_at)::float8 AS age, "
            "extract(epoch FROM now())::float8 AS db_now "
            f"FROM {self.table} "
            "WHERE instance_id <> $1 AND heartbeat_at > now() - make_interval(secs => $2::float8) "
            "UNION ALL SELECT instance_id, 0.0::float8, extract(epoch FROM now())::float8 "
            "FROM beat"
        )

    @property
    def leave(self) -> str:
        """``$1`` instance id: delete its row, and rows of instances gone for a day."""
        return (
            f"DELETE FROM {self.table} WHERE instance_id = $1 "
            "OR heartbeat_at < now() - interval '1 day'"
        )


MEMBERSHIP_SQL: Final = MembershipSql()


@attrs.frozen
class Member:
    """A live instance as the last heartbeat saw it; ``age`` is seconds since its
    heartbeat, by the database clock."""

    instance_id: str
    age: float


@attrs.frozen
class Beat:
    """One successful renewal: the live members (this one included) and ``db_now``, the
    database's UNIX time of the statement."""

    members: tuple[Member, ...]
    db_now: float

    @property
    def ids(self) -> frozenset[str]:
        return frozenset(m.instance_id for m in self.members)


class MembershipDb(Protocol):
    """Where heartbeats go. :class:`PostgresMembership` in production; tests may wrap it."""

    async def beat(self, instance_id: str, ttl: float) -> Beat: ...

    async def leave(self, instance_id: str) -> None: ...


async def _pg_beat(conn: Any, instance_id: str, ttl: float) -> list[Any]:
    return list(await conn.fetch(MEMBERSHIP_SQL.beat, instance_id, ttl))


async def _pg_leave(conn: Any, instance_id: str) -> None:
    await conn.execute(MEMBERSHIP_SQL.leave, instance_id)


async def _pg_migrate(conn: Any) -> None:
    await conn.execute(MEMBERSHIP_SQL.create)


class PostgresMembership:
    """The membership table through asyncpg, a short connection per statement. Must run
    inside the daemon's trio-asyncio loop."""

    def __init__(self, dsn: Secret) -> None:
        self._dsn = dsn

    async def _call(self, fn: Any, *args: Any) -> Any:
        # no connect timeout of its own: the caller's trio deadline bounds the whole call
        return await pg_call(self._dsn, 60, fn, *args)

    async def migrate(self) -> None:
        await self._call(_pg_migrate)

    async def beat(self, instance_id: str, ttl: float) -> Beat:
        rows = await self._call(_pg_beat, instance_id, ttl)
        members = tuple(sorted((Member(r[0], float(r[1])) for r in rows), key=_member_key))
        db_now = float(rows[0][2]) if rows else math.nan
        return Beat(members, db_now)

    async def leave(self, instance_id: str) -> None:
        await self._call(_pg_leave, instance_id)


def _member_key(member: Member) -> str:
    return member.instance_id


def default_instance_id() -> str:
    """``hostname-pid``: unique per process on a host, readable in the member list."""
    return f"{socket.gethostname()}-{os.getpid()}"


@attrs.frozen
class MembershipView:
    """What ``/status`` and the metrics show of the membership."""

    instance_id: str
    members: tuple[Member, ...]
    fenced: bool
    fence_reason: str | None
    #: connections this instance owns (running or waiting for a handover)
    owned: int
    #: of those, held back until the previous owner's lease has certainly expired
    held: int


class Membership:
    """The heartbeat loop of one instance and its fence.

    ``on_change`` is called (synchronously, no checkpoint in between) after every renewal
    that succeeded and whenever the instance fences itself; the daemon recomputes its
    share then. Read :attr:`fenced`, :attr:`beat` and :attr:`generation` from it.
    ``scrub`` makes the database's error text safe to show (:attr:`fence_reason`, logs).
    """

    def __init__(
        self,
        db: MembershipDb,
        instance_id: str,
        *,
        ttl: float,
        poll_interval: float,
        on_change: Callable[[], None],
        scrub: Scrubs = PLAIN,
    ) -> None:
        self.db = db
        self._scrub = scrub
        self.instance_id = instance_id
        self.ttl = ttl
        self.poll_interval = poll_interval
        self._on_change = on_change
        #: the last successful renewal (``None`` before the first)
        self.beat: Beat | None = None
        #: no valid lease: every session must be stopped; true until the first renewal
        self.fenced = True
        self.fence_reason: str | None = "not registered yet"
        #: counts the times a lease was (re)gained: a new one means the previous member
        #: list is unknown (the others may have taken over meanwhile)
        self.generation = 0
        self._valid_until = -math.inf
        #: the text of the last failed renewal since the last good one
        self._last_error: str | None = None
        self._stop = trio.CancelScope()
        self._wake = trio.Event()

    def stop(self) -> None:
        """End :meth:`run` (graceful shutdown); the row is deleted by :meth:`leave`."""
        self._stop.cancel()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Renew every ``poll_interval`` (sooner after a failure); fence at half the TTL
        without a renewal. Reports started at once (fenced until the first renewal)."""
        task_status.started()
        with self._stop:
            while True:
                sent = trio.current_time()
                # a renewal still in flight when the lease must end is no renewal
                deadline = sent + self.poll_interval
                if not self.fenced:
                    deadline = min(deadline, self._valid_until)
                error: str | None = None
                beat: Beat | None = None
                with trio.move_on_at(deadline):
                    try:
                        beat = await self.db.beat(self.instance_id, self.ttl)
                    except Exception as exc:
                        # the driver's words may quote the DSN or the server's text
                        error = self._scrub.scrub(f"{type(exc).__name__}: {exc}", ERROR_LIMIT)
                if beat is not None and self.instance_id in beat.ids:
                    self._renewed(sent, beat)
                    next_at = sent + self.poll_interval
                else:
                    if error is None:
                        waited = deadline - sent
                        # an attempt that had no time left (the lease ended as it was
                        # due) tells nothing new: the fence names the last real failure
                        if waited > 0 or self._last_error is None:
                            error = f"no answer within {max(waited, 0.0):.1f}s"
                        else:
                            error = self._last_error
                    self._last_error = error
                    self._failed(error)
                    next_at = trio.current_time() + min(self.poll_interval, self.ttl / 8)
                    if not self.fenced:
                        next_at = min(next_at, self._valid_until)
                with trio.move_on_at(next_at):
                    await self._wake.wait()
                self._wake = trio.Event()

    def _renewed(self, sent: float, beat: Beat) -> None:
        self._valid_until = sent + self.ttl / 2
        self._last_error = None
        self.beat = beat
        if self.fenced:
            self.generation += 1
            if self.fence_reason != "not registered yet":
                logger.warning(
                    f"[idle/cluster] heartbeat renewed again: instance {self.instance_id} "
                    "resumes its share (moved connections wait for the others' leases)"
                )
            else:
                logger.info(
                    f"[idle/cluster] instance {self.instance_id} registered; "
                    f"{len(beat.members)} live members"
                )
            self.fenced, self.fence_reason = False, None
        self._on_change()

    def _failed(self, error: str) -> None:
        now = trio.current_time()
        if not self.fenced and now >= self._valid_until:
            self.fenced = True
            self.fence_reason = (
                f"heartbeat not renewed for {self.ttl / 2:g}s (half the TTL): {error}"
            )
            logger.error(
                f"[idle/cluster] instance {self.instance_id} fenced: {self.fence_reason}; "
                "stopping every session until the heartbeat is renewed"
            )
            self._on_change()
        else:
            logger.warning(f"[idle/cluster] heartbeat failed ({error}); retrying")

    async def leave(self) -> None:
        """Delete this instance's row (after its sessions ended); bounded, never raises."""
        with trio.move_on_after(min(self.ttl / 2, 5.0)):
            try:
                await self.db.leave(self.instance_id)
                logger.info(f"[idle/cluster] instance {self.instance_id} left the membership")
            except Exception as exc:
                text = self._scrub.scrub(f"{type(exc).__name__}: {exc}", ERROR_LIMIT)
                logger.warning(f"[idle/cluster] cannot delete the membership row: {text}")

    def members(self) -> tuple[Member, ...]:
        return () if self.beat is None else self.beat.members

    def member_ids(self) -> Sequence[str]:
        return [m.instance_id for m in self.members()]
