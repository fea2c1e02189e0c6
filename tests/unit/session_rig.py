"""One session on a scripted IMAP server in virtual time, for the unit tests that run
:func:`~trio_idle.mailbox.session.run_session` (tests/unit/test_session_virtual_time.py
and its neighbours).

A :class:`Rig` holds a :class:`~trio_idle_testing.fake_imap.FakeImapServer`, the session's
environment (seeded RNG, tiny settings) and what the session reports (coalescer, memory,
log). Tests run under pytest-trio's ``autojump_clock``: hours of session life take
milliseconds and every timestamp is exact.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import attrs
import trio
import trio.testing
from trio_idle_testing.fake_imap import FakeImapServer
from trio_idle_testing.recording_log import RecordingLog

from tests.fixtures import mail_connection
from trio_idle.accounts.connections import MailConnection
from trio_idle.backend.webhook import WebhookClient
from trio_idle.core.config import GROUPS, OPTIONS, Settings
from trio_idle.core.limiter import ConnectLimiter
from trio_idle.core.stats import Stats
from trio_idle.mailbox.coalescer import ScanCoalescer
from trio_idle.mailbox.scan_worker import ScanHooks, ScanPolicy, run_scans
from trio_idle.mailbox.session import ConnectionMemory, SessionEnv, first_timers, run_session
from trio_idle.state.store import StateStore

SEED = 13
TICK, RENEW, COMMAND_TIMEOUT = 120.0, 1500.0, 30.0
CONN = mail_connection(
    "conn-1",
    user_id="user-1",
    email="alice@example.test",
    host="imap.example.test",
    login="alice",
    password="virtual-time-pw",
)
#: generous: virtual time jumps, so this only bounds a hang in the code under test
DEADLINE = 24 * 3600.0


@attrs.define
class Rig:
    server: FakeImapServer
    env: SessionEnv
    coalescer: ScanCoalescer = attrs.field(factory=ScanCoalescer)
    memory: ConnectionMemory = attrs.field(factory=ConnectionMemory)
    log: RecordingLog = attrs.field(factory=RecordingLog)

    @property
    def stats(self) -> Stats:
        return self.env.stats


def default_server() -> FakeImapServer:
    """Three messages, UIDNEXT 10, UIDVALIDITY 5; IDLE announced, new mail pushed."""
    return FakeImapServer(exists=3, uidnext=10, uidvalidity=5)


def make_rig(
    server: FakeImapServer | None = None, store: StateStore | None = None, **settings: Any
) -> Rig:
    """A rig on ``server`` (:func:`default_server` if None); ``settings`` by field name
    (``tick_interval=7200.0``) override the tick, renewal and command timeout here."""
    server = server or default_server()
    server.command_timeout = COMMAND_TIMEOUT
    values: dict[str, Any] = {
        "tick_interval": TICK,
        "idle_renew_interval": RENEW,
        "command_timeout": COMMAND_TIMEOUT,
        **settings,
    }
    groups: dict[str, dict[str, Any]] = {}
    for option in OPTIONS:  # flat names → their groups
        if option.field in values:
            groups.setdefault(option.group, {})[option.field] = values.pop(option.field)
    assert not values, f"unknown settings {sorted(values)}"
    config = Settings(**{g: GROUPS[g](**fields) for g, fields in groups.items()})
    env = SessionEnv(
        imap=config.imap,
        timers=config.timers,
        backoff=config.backoff,
        start_from=config.store.start_from,
        limiter=ConnectLimiter(20, 50.0),
        ssl_context=None,
        stats=Stats(),
        rng=random.Random(SEED),
        store=store,
        connector=server.connector,
    )
    return Rig(server, env)


def expected_first_timers(connected_at: float, tick: float = TICK) -> tuple[float, float]:
    """What the session draws first from its RNG (seeded like the rig's)."""
    return first_timers(connected_at, tick, RENEW, random.Random(SEED))


@contextlib.asynccontextmanager
async def running(rig: Rig, conn: MailConnection = CONN) -> AsyncIterator[trio.CancelScope]:
    """Run ``conn``'s session for the block, then cancel it (it logs out); the block gets
    a deadline so a hang fails instead of running forever. Afterwards the session must
    have counted no internal error."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_session, conn, rig.env, rig.coalescer, rig.memory, rig.log)
        with trio.fail_after(DEADLINE) as scope:
            yield scope
        nursery.cancel_scope.cancel()
    assert rig.stats.get("internal_errors") == 0, rig.log.texts("error")


@contextlib.asynccontextmanager
async def connected_session(rig: Rig) -> AsyncIterator[float]:
    """:func:`running` the default session, the block entered once it is in IDLE (or
    polls); it gets the time the session connected at."""
    async with running(rig):
        yield await connected(rig)


@contextlib.asynccontextmanager
async def scanning(
    rig: Rig, webhook: WebhookClient, policy: ScanPolicy, hooks: ScanHooks | None = None
) -> AsyncIterator[None]:
    """For the block, the session's scans are sent as the reconciler wires it: the
    coalescer starts :func:`run_scans` while a scan is pending; afterwards no task is
    started and the one running is cancelled (a pending scan stays pending)."""
    rng = random.Random(1)  # one for every task, as the daemon's is one per process
    async with trio.open_nursery() as nursery:

        def start() -> None:
            nursery.start_soon(
                run_scans, CONN, rig.coalescer, webhook, policy, rig.stats, rig.log, rng, hooks
            )

        rig.coalescer.attach(start)
        try:
            yield
        finally:
            rig.coalescer.detach()
            nursery.cancel_scope.cancel()


async def settled(rig: Rig, condition: Callable[[], bool]) -> None:
    """Wait until ``condition()`` holds, then until the session is blocked again (the
    clock does not move meanwhile: waiting for blocked tasks beats the autojump)."""
    await rig.server.wait_for(condition)
    await trio.testing.wait_all_tasks_blocked()


async def connected(rig: Rig, link: int = 1) -> float:
    """Wait until connection attempt ``link`` entered IDLE (or polls); when it connected."""
    server = rig.server

    def up() -> bool:
        found = server.links.get(link)
        return found is not None and found.selected and (found.idling or not server.idle)

    await settled(rig, up)
    return server.times("connect", link)[0]


def closed(rig: Rig) -> Callable[[], bool]:
    """A condition for :func:`settled`: the latest connection is closed."""
    return lambda: bool(rig.server.links) and rig.server.link.closed
