"""The suite's guard against faults the daemon survives silently (``no_stray_errors``).

An asyncio task destroyed while still pending is logged and counted, not fatal, so a
test can only notice one by reading the counter; this leaks one on purpose and checks
the guard names it.
"""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest
import trio
import trio_asyncio

from tests import harness
from tests.harness import running_daemon
from tests.reliability.conftest import stray_errors
from tests.reliability.rig import Rig
from trio_idle.imap.client import ImapConnection

A = "alice@rel.test"


async def _leak_a_pending_task() -> None:
    """Start a task that waits on a future nobody holds: garbage, but still pending."""
    loop = asyncio.get_running_loop()
    forgotten: asyncio.Future[None] = loop.create_future()

    async def wait_forever() -> None:
        await forgotten

    loop.create_task(wait_forever())  # noqa: RUF006 - the leak is the point


async def test_a_leaked_asyncio_task_fails_the_test(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_select = ImapConnection.select

    async def leaky_select(self: ImapConnection, mailbox: str) -> Any:
        await trio_asyncio.aio_as_trio(_leak_a_pending_task)()  # on the daemon's loop
        return await real_select(self, mailbox)

    monkeypatch.setattr(ImapConnection, "select", leaky_select)
    async with running_daemon(rig.settings(), rig.source(A)) as daemon:
        with trio.fail_after(10):
            await rig.idle(A)
        gc.collect()  # the daemon runs on: asyncio reports the task from its finaliser
    assert harness.started_daemons == [daemon]
    found = stray_errors(harness.started_daemons)
    harness.started_daemons.clear()  # this test's leak is on purpose: spare the guard
    assert found == ["daemon 0: asyncio_errors=1"]
    assert rig.logs.matching("[idle/asyncio] Task was destroyed but it is pending!")


async def test_a_clean_run_has_no_stray_errors(rig: Rig) -> None:
    async with running_daemon(rig.settings(), rig.source(A)):
        with trio.fail_after(10):
            await rig.idle(A)
    assert stray_errors(harness.started_daemons) == []
