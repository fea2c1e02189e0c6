"""Which instance watches which connection: rendezvous hashing and safe handovers. Pure.

Every instance computes :func:`owner` from the same live member list (read from the
membership table, :mod:`trio_idle.cluster.membership`) and so agrees on one owner per connection
without talking to the others. Rendezvous (highest-random-weight) hashing: each
(member, connection) pair gets a pseudo-random weight, the heaviest member owns the
connection. A member joining takes about ``1/N`` of every other member's connections; a
member leaving hands only its own to the others, spread evenly.

:func:`plan_share` adds the handover rule that keeps a mailbox from being watched twice:
a connection that moves to this instance from a member that is still alive is held back
for one lease (``ttl`` on the database clock), by which time the previous owner has
either seen the new member list and stopped it, or failed to renew and fenced itself.
A connection whose previous owner is no longer alive starts at once: a member drops out
of the list only after its lease expired, and it stopped its sessions at half the lease.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable, Mapping

import attrs


def weight(member: str, conn_id: str) -> int:
    """The rendezvous weight of ``member`` for ``conn_id``: 64 bits of BLAKE2b of both.

    Stable across processes, hosts and Python versions (no ``hash()`` randomisation)."""
    digest = hashlib.blake2b(
        member.encode() + b"\x00" + conn_id.encode(), digest_size=8, person=b"trio-idle"
    ).digest()
    return int.from_bytes(digest, "big")


def owner(conn_id: str, members: Iterable[str]) -> str | None:
    """The member that watches ``conn_id``, ``None`` without members. Ties (which 64-bit
    weights make unlikely) go to the greater member id, so every instance agrees."""
    return max(members, key=lambda m: (weight(m, conn_id), m), default=None)


def shares(conn_ids: Iterable[str], members: Collection[str]) -> dict[str, set[str]]:
    """Each member → the connections it owns (every member listed, maybe with none)."""
    out: dict[str, set[str]] = {m: set() for m in members}
    for conn_id in conn_ids:
        who = owner(conn_id, members)
        if who is not None:
            out[who].add(conn_id)
    return out


@attrs.frozen
class SharePlan:
    """What this instance runs now, and which connections wait for a previous owner.

    ``holds`` maps a connection to the database time (UNIX seconds) from which it may
    start; carry it into the next :func:`plan_share` call.
    """

    run: frozenset[str]
    holds: Mapping[str, float]

    @property
    def owned(self) -> int:
        """Connections this instance owns: running or held."""
        return len(self.run) + len(self.holds)


def plan_share(
    conn_ids: Iterable[str],
    me: str,
    current: frozenset[str],
    previous: frozenset[str],
    running: Collection[str],
    holds: Mapping[str, float],
    db_now: float,
    ttl: float,
) -> SharePlan:
    """The connections ``me`` may run in the member list ``current`` (``me`` in it).

    ``previous`` is the member list the last plan was made from (after a start or a
    fence: ``current`` without ``me``, since what the others did meanwhile is unknown);
    ``running`` what runs now; ``holds`` the previous plan's holds; ``db_now`` the
    database clock of ``current``. For each connection ``me`` owns in ``current``:

    - running already → keeps running;
    - held → runs once ``db_now`` reaches its hold;
    - its owner in ``previous`` was ``me``, nobody, or a member not alive any more →
      runs now;
    - else (a live member may still watch it) → held until ``db_now + ttl``.

    Connections ``me`` does not own are neither run nor held.
    """
    run: set[str] = set()
    new_holds: dict[str, float] = {}
    for conn_id in conn_ids:
        if owner(conn_id, current) != me:
            continue
        if conn_id in running:
            run.add(conn_id)
        elif conn_id in holds:
            if db_now >= holds[conn_id]:
                run.add(conn_id)
            else:
                new_holds[conn_id] = holds[conn_id]
        else:
            before = owner(conn_id, previous)
            if before is None or before == me or before not in current:
                run.add(conn_id)
            else:
                new_holds[conn_id] = db_now + ttl
    return SharePlan(frozenset(run), new_holds)
