"""Fixtures of the restart tests: the IMAP test server, and each state backend's settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from trio_idle_testing import ImapTestServer

from tests.servers.postgres import execute_sql


@pytest.fixture
async def server(nursery: trio.Nursery) -> ImapTestServer:
    """The IMAP test server, without keepalives (they would only add noise here)."""
    imap = ImapTestServer(keepalive_interval=None)
    await nursery.start(imap.serve)
    return imap


def state_settings(
    request: pytest.FixtureRequest, tmp_path: Path, *statements: str
) -> dict[str, str]:
    """Settings selecting the state backend ``request.param`` names: ``sqlite`` (a file in
    ``tmp_path``) or ``postgres`` (a fresh database, ``statements`` run on it first: the
    tables the test's ``trio-idle db migrate`` would have created)."""
    if request.param == "sqlite":
        return {"TRIO_IDLE_STATE": "sqlite", "TRIO_IDLE_STATE_PATH": str(tmp_path / "s.db")}
    dsn: str = request.getfixturevalue("pg_dsn")
    execute_sql(dsn, *statements)
    return {"TRIO_IDLE_STATE": "postgres", "DATABASE_URL": dsn}
