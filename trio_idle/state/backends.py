"""Which state backend the settings ask for: a SQLite file, PostgreSQL, or none."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from trio_idle.core.config import Settings
from trio_idle.state.postgres import PostgresBackend
from trio_idle.state.records import StateBackend, TokenBackend
from trio_idle.state.sqlite import SqliteBackend, default_state_path


def make_state_backend(settings: Settings, env: Mapping[str, str]) -> StateBackend | None:
    """The backend the settings ask for (``None`` for ``state = none``)."""
    if settings.store.state == "none":
        return None
    if settings.store.state == "postgres":
        assert settings.connections.database_url is not None  # enforced by config parsing
        return PostgresBackend(settings.connections.database_url)
    path = Path(settings.store.state_path) if settings.store.state_path else default_state_path(env)
    return SqliteBackend(path)


def make_token_backend(settings: Settings, env: Mapping[str, str]) -> TokenBackend | None:
    """Where rotated refresh tokens are kept: the state store's file or database
    (``None`` for ``state = none``: rotations then live only as long as the process)."""
    backend = make_state_backend(settings, env)
    return backend if isinstance(backend, SqliteBackend | PostgresBackend) else None
