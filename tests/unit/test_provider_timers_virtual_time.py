"""A provider preset's shorter IDLE renewal, applied by a real session in virtual time
(scripted IMAP server, ``autojump_clock``; see tests/unit/test_session_virtual_time.py)."""

from __future__ import annotations

import random

import attrs
import trio
import trio.testing

from tests.unit.session_rig import (
    CONN,
    RENEW,
    SEED,
    Rig,
    connected,
    make_rig,
    running,
    settled,
)
from trio_idle.accounts.connections import MailConnection
from trio_idle.accounts.providers import preset_named
from trio_idle.mailbox.session import first_timers

GMX_CONN = attrs.evolve(CONN, email="alice@gmx.test", provider="gmx")
TICK = 7200.0  # no tick inside the window: only renewals


async def renewals(rig: Rig, conn: MailConnection, count: int) -> tuple[float, list[float]]:
    """Run ``conn``'s session until it renewed IDLE ``count`` times: (connected at, DONEs)."""
    server = rig.server
    async with running(rig, conn):
        t0 = await connected(rig)
        await settled(rig, lambda: len(server.times("DONE")) == count and server.link.idling)
    return t0, server.times("DONE")


async def test_gmx_sessions_renew_idle_at_the_preset_s_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    renew = preset_named("gmx").idle_renew
    assert renew is not None and renew < RENEW
    rig = make_rig(tick_interval=TICK)
    t0, done = await renewals(rig, GMX_CONN, 3)
    _, first = first_timers(t0, TICK, renew, random.Random(SEED))
    assert done == [first, first + renew, first + 2 * renew]
    assert done[-1] < t0 + 3 * renew  # well inside the 25 min the global setting allows
    lines = [t for t in rig.log.texts("info") if "idle renewing" in t]
    assert lines == ["[idle/alice@gmx.test] idle renewing (8min threshold)"] * 3


async def test_sessions_of_other_providers_keep_the_global_renewal(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rig = make_rig(tick_interval=TICK)
    t0, done = await renewals(rig, attrs.evolve(CONN, provider="gmail"), 2)
    _, first = first_timers(t0, TICK, RENEW, random.Random(SEED))
    assert done == [first, first + RENEW]
