"""What the state store keeps, record by record, and what a backend that keeps it must do.

A record is what one row holds (:class:`ScannedState` per mailbox, :class:`StoredRefreshToken`
and :class:`ReportedHealth` per connection); a backend protocol is the seam between
:class:`~trio_idle.state.store.StateStore` (or the token refresh) and a SQLite file or a
PostgreSQL database. Pure: no I/O here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import attrs

Key = tuple[str, str]  # (connection id, mailbox)


@attrs.frozen
class ScannedState:
    """The mailbox as of the last successful scan. ``scanned_at`` is UNIX time."""

    uidvalidity: int | None
    uidnext: int | None
    scanned_at: float
    removed_at: float | None = None


@attrs.frozen
class ReportedHealth:
    """The account health the backend last accepted for a connection (or refused for
    good): ``state`` and ``reason`` as in the report, ``reported_at`` UNIX time."""

    state: str
    reason: str | None
    reported_at: float


@attrs.frozen(repr=False)
class StoredRefreshToken:
    """A rotated refresh token as stored: ``encrypted`` is ``iv:tag:ct`` (never the
    plaintext), ``replaces`` the fingerprint of the row's token it supersedes."""

    encrypted: str
    replaces: str
    updated_at: float

    def __repr__(self) -> str:
        return f"StoredRefreshToken(encrypted=********, updated_at={self.updated_at!r})"


class StateBackend(Protocol):
    """Where the state lives. Methods may block (SQLite) or be trio-async (Postgres)."""

    name: str

    async def load_all(self) -> dict[Key, ScannedState]: ...

    async def write(
        self, upserts: Sequence[tuple[Key, ScannedState]], deletes: Sequence[Key]
    ) -> None: ...


@runtime_checkable
class HealthBackend(Protocol):
    """A state backend that also keeps the account health last reported."""

    name: str

    async def load_health(self) -> dict[str, ReportedHealth]: ...

    async def write_health(
        self, upserts: Sequence[tuple[str, ReportedHealth]], deletes: Sequence[str]
    ) -> None: ...


class TokenBackend(Protocol):
    """Where rotated refresh tokens live (the state store's SQLite file or database)."""

    name: str

    async def load_tokens(self) -> dict[str, StoredRefreshToken]: ...

    async def save_token(self, conn_id: str, stored: StoredRefreshToken) -> None: ...
