"""Fixtures of the Postgres-backed daemon tests (shared mode, LISTEN/NOTIFY)."""

from __future__ import annotations

import pytest
import trio
from trio_idle_testing import ImapTestServer


@pytest.fixture
async def server(nursery: trio.Nursery) -> ImapTestServer:
    """The IMAP test server, without keepalives (they would only add noise here)."""
    imap = ImapTestServer(keepalive_interval=None)
    await nursery.start(imap.serve)
    return imap
