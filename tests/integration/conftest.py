"""Fixtures for tests that run the daemon against real servers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import trio

from tests.harness import ADMIN_SECRET, LogCapture, capture_logs
from trio_idle.testing.backend import ScanBackend


@pytest.fixture
async def backend(nursery: trio.Nursery) -> ScanBackend:
    """A real HTTP scan backend on 127.0.0.1 that checks the webhook contract."""
    scan_backend = ScanBackend(secret=ADMIN_SECRET)
    await nursery.start(scan_backend.serve)
    return scan_backend


@pytest.fixture
def logs() -> Iterator[LogCapture]:
    with capture_logs() as capture:
        yield capture
