"""Fixtures of the reliability suite: IMAP test server, scan backend, log capture, rig."""

from __future__ import annotations

import pytest
import trio

from tests.harness import LogCapture
from tests.reliability.invariant import Ledger
from tests.reliability.rig import Rig
from trio_idle.testing import ImapTestServer
from trio_idle.testing.backend import ScanBackend


@pytest.fixture
async def server(nursery: trio.Nursery) -> ImapTestServer:
    """An IMAP test server on 127.0.0.1 (plaintext), no users yet."""
    imap = ImapTestServer(keepalive_interval=120.0, uidvalidity=1000)
    await nursery.start(imap.serve)
    return imap


@pytest.fixture
def rig(server: ImapTestServer, backend: ScanBackend, logs: LogCapture) -> Rig:
    return Rig(server, backend, logs, Ledger(server, backend))
