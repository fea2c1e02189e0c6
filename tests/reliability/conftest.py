"""Fixtures of the reliability suite: IMAP test server, scan backend, log capture, rig.

Every test here also gets :func:`no_stray_errors`: the daemon counts what it survives
instead of dying of it (an asyncio task destroyed while pending, an error no one awaited,
a bug caught at a session's or the reconciler's edge), so without this check a test that
leaves such a leftover behind would stay green.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
import trio
from trio_idle_testing import ImapTestServer
from trio_idle_testing.backend import ScanBackend

from tests import harness
from tests.harness import LogCapture
from tests.reliability.invariant import Ledger
from tests.reliability.rig import Rig
from trio_idle.runtime.daemon import Daemon

#: counters that must stay 0 in every test: each is a fault the daemon only logged
STRAY_ERROR_COUNTERS = ("asyncio_errors", "internal_errors")


def stray_errors(daemons: list[Daemon]) -> list[str]:
    """``name=count`` for each non-zero :data:`STRAY_ERROR_COUNTERS` of each daemon.

    Collects garbage first: asyncio reports a pending task only when it is destroyed.
    """
    gc.collect()
    return [
        f"daemon {n}: {name}={count}"
        for n, daemon in enumerate(daemons)
        for name in STRAY_ERROR_COUNTERS
        if (count := daemon.stats.get(name))
    ]


@pytest.fixture(autouse=True)
def no_stray_errors() -> Iterator[None]:
    """Fail the test if a daemon it started counted an asyncio or internal error.

    Checked after the test's other fixtures are torn down (this one is set up first),
    so leftovers destroyed when the daemon's loop closes are counted too.
    """
    harness.started_daemons.clear()
    yield
    found = stray_errors(harness.started_daemons)
    harness.started_daemons.clear()
    if found:
        pytest.fail(
            "the daemon survived faults it should never have had "
            f"(see the [idle/asyncio] / internal error lines): {', '.join(found)}"
        )


@pytest.fixture
async def server(nursery: trio.Nursery) -> ImapTestServer:
    """An IMAP test server on 127.0.0.1 (plaintext), no users yet."""
    imap = ImapTestServer(keepalive_interval=120.0, uidvalidity=1000)
    await nursery.start(imap.serve)
    return imap


@pytest.fixture
def rig(server: ImapTestServer, backend: ScanBackend, logs: LogCapture) -> Rig:
    return Rig(server, backend, logs, Ledger(server, backend))
