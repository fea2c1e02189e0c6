"""Several in-process daemons share the mailboxes through the real Postgres (shared mode).

The IMAP test server records every interval, however short, during which two
connections were logged in to one mailbox (:meth:`ImapTestServer.overlaps`): every test
asserts there was none, across joins, leaves, kills and an instance cut off from
Postgres, and that after every change each mailbox is watched again by exactly one.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import pytest
import trio
import trio_asyncio
from trio_idle_testing import ImapTestServer
from trio_idle_testing.backend import ScanBackend

from tests.harness import ListSource, capture_logs, make_settings, row
from tests.servers.postgres import execute_sql, fetch_sql
from trio_idle.cluster.assignment import shares
from trio_idle.cluster.membership import MEMBERSHIP_SQL, MEMBERSHIP_TABLE, Beat, PostgresMembership
from trio_idle.core.secret import Secret
from trio_idle.mailbox.reconcile import START_STEP
from trio_idle.ops.health import assess_readiness
from trio_idle.runtime.daemon import Daemon, run_daemon
from trio_idle.state.tables import POSTGRES_DDL, POSTGRES_TABLE

PASSWORD = "S3ntinel-pw-cluster"
TTL, POLL = 3.0, 0.5
#: takeover bound: TTL + one poll, plus a reconnect and the test's own polling
TAKEOVER = TTL + POLL + 2.5
#: the tests with an instance cut off from Postgres: a longer lease, so that half of it
#: leaves room for slow LOGOUTs (``SLOW_ANSWER`` per command, DONE then LOGOUT) and the
#: other half a clear margin before the takeover, on a loaded machine too
SLOW_TTL, SLOW_LOGOUT, SLOW_ANSWER = 6.0, "2500ms", 1.0


def watched_once(server: ImapTestServer, users: list[str]) -> bool:
    """Every mailbox has exactly one session in IDLE."""
    return all(server.idle_count(u) == 1 for u in users)


class Proxy:
    """TCP forwarder to Postgres that can be cut: open links close, new ones hang."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.port = 0
        self.cut = False
        self._scopes: set[trio.CancelScope] = set()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    def set_cut(self, cut: bool) -> None:
        self.cut = cut
        if cut:
            for scope in list(self._scopes):
                scope.cancel()

    async def _handle(self, client: trio.SocketStream) -> None:
        with trio.CancelScope() as scope:
            self._scopes.add(scope)
            try:
                if self.cut:
                    await trio.sleep_forever()
                upstream = await trio.open_tcp_stream("127.0.0.1", self.target)
                async with upstream, trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, client, upstream, nursery.cancel_scope)
                    nursery.start_soon(self._pump, upstream, client, nursery.cancel_scope)
            finally:
                self._scopes.discard(scope)
        await client.aclose()

    @staticmethod
    async def _pump(src: trio.SocketStream, dst: trio.SocketStream, done: trio.CancelScope) -> None:
        try:
            async for chunk in src:
                await dst.send_all(chunk)
        except trio.BrokenResourceError:
            pass
        done.cancel()


class Instance:
    """One daemon of the cluster; :meth:`kill` cancels it like a crash (no leave)."""

    def __init__(self, name: str, daemon: Daemon, scope: trio.CancelScope) -> None:
        self.name, self.daemon, self.scope = name, daemon, scope

    @property
    def running(self) -> set[str]:
        return set(self.daemon.reconciler.handles)

    def kill(self) -> None:
        self.scope.cancel()


@pytest.fixture
def cluster_dsn(pg_dsn: str) -> str:
    execute_sql(pg_dsn, POSTGRES_DDL, MEMBERSHIP_SQL.create)  # what `db migrate` does
    return pg_dsn


Starter = Callable[..., Any]


@pytest.fixture
async def start(
    nursery: trio.Nursery, server: ImapTestServer, backend: ScanBackend, cluster_dsn: str
) -> AsyncIterator[Starter]:
    started: list[Instance] = []

    async def start_instance(
        name: str,
        users: list[str],
        dsn: str = cluster_dsn,
        *,
        membership_db: Any = None,
        source: Any = None,
        ttl: float = TTL,
        **env: str,
    ) -> Instance:
        settings = make_settings(
            backend.url,
            TRIO_IDLE_IMAP_SECURITY="plain",
            TRIO_IDLE_STATE="postgres",
            DATABASE_URL=dsn,
            TRIO_IDLE_CLUSTER="shared",
            TRIO_IDLE_INSTANCE_ID=name,
            TRIO_IDLE_CLUSTER_TTL=f"{ttl}s",
            TRIO_IDLE_CLUSTER_POLL=f"{POLL}s",
            TRIO_IDLE_CATCHUP_RATE="1000",
            **env,
        )
        if source is None:
            source = ListSource([row(u, u, PASSWORD, server.port) for u in users])
        scope = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[Daemon]) -> None:
            with scope:
                await run_daemon(
                    settings, source, membership_db=membership_db, task_status=task_status
                )

        daemon: Daemon = await nursery.start(run)
        instance = Instance(name, daemon, scope)
        started.append(instance)
        return instance

    yield start_instance
    for instance in started:
        instance.daemon.shutdown("test finished")
    with trio.move_on_after(8):
        for instance in started:
            await instance.daemon.wait_stopped()


def make_users(server: ImapTestServer, n: int) -> list[str]:
    names = [f"c{i}@cluster.test" for i in range(n)]
    for name in names:
        server.add_user(name, PASSWORD)
    return names


def converged(instances: list[Instance], users: list[str]) -> bool:
    """Each instance runs exactly its rendezvous share of the live members, nothing held."""
    expected = shares(users, [i.name for i in instances])
    return all(i.running == expected[i.name] for i in instances) and all(
        (s := i.daemon.status().cluster) is not None and s.held == 0 for i in instances
    )


async def settle(
    server: ImapTestServer, instances: list[Instance], users: list[str], ttl: float = TTL
) -> None:
    with trio.fail_after(6 * ttl):
        await server.wait_for(lambda: converged(instances, users) and watched_once(server, users))


def scans_since(backend: ScanBackend, email: str, t: float) -> list[Any]:
    return [r for r in backend.requests_for(email) if r.received_at >= t]


async def state_flushed(dsn: str, users: list[str]) -> None:
    """Every mailbox's scan is in the shared store (what a takeover reads)."""

    def done() -> bool:
        rows = fetch_sql(dsn, f"SELECT count(*) FROM {POSTGRES_TABLE} WHERE uidnext IS NOT NULL")
        return int(rows[0][0]) >= len(users)

    with trio.fail_after(15):
        # the database offers no event to wait on
        while not await trio.to_thread.run_sync(done):  # noqa: ASYNC110
            await trio.sleep(0.1)


async def test_three_instances_split_the_mailboxes_once_each(
    start: Starter, server: ImapTestServer, backend: ScanBackend
) -> None:
    users = make_users(server, 150)
    instances = [await start(n, users) for n in ("a", "b", "c")]
    await settle(server, instances, users)
    assert server.overlaps() == []
    counts = sorted(len(i.running) for i in instances)
    assert sum(counts) == 150 and counts[-1] <= 75  # balanced: nobody holds half
    status = instances[0].daemon.status().cluster
    assert status is not None and status.instance_id == "a"
    assert [m.instance_id for m in status.members] == ["a", "b", "c"]
    assert status.owned == len(instances[0].running) and not status.fenced

    # every mailbox got its startup scan, whoever started it first; a second one only
    # where a handover (one TTL after "b" and "c" joined) beat the previous owner's
    # batched state write on a loaded machine: at least once, never missed
    def startup_scans() -> list[str | None]:
        return [r.email for r in backend.requests if r.body.get("reason") == "startup"]

    with trio.fail_after(10):  # a session may be idling before its scan reached the backend
        while set(startup_scans()) != set(users):
            await backend.wait_for_requests(len(backend.requests) + 1)
    startup = startup_scans()
    assert max(startup.count(u) for u in users) <= 2
    assert len(startup) - len(users) <= len(users) // 10, "handovers rescanned too much"


async def test_a_killed_instance_share_moves_within_ttl_and_poll_and_catches_up(
    start: Starter, server: ImapTestServer, backend: ScanBackend, cluster_dsn: str
) -> None:
    users = make_users(server, 60)
    instances = [await start(n, users) for n in ("a", "b", "c")]
    await settle(server, instances, users)
    await state_flushed(cluster_dsn, users)
    victim = instances[2]
    lost = sorted(victim.running)
    with_mail, without_mail = lost[::2], lost[1::2]
    killed_at = trio.current_time()
    victim.kill()
    for user in with_mail:  # mail arrives while nobody watches these mailboxes
        server.append(user, b"Subject: during the move\r\n\r\nhi\r\n")
    with trio.fail_after(TAKEOVER):
        await server.wait_for(lambda: converged(instances[:2], users))
        await server.wait_for(lambda: watched_once(server, users))
    assert server.overlaps() == []
    with trio.fail_after(10):
        for user in with_mail:
            while not scans_since(backend, user, killed_at):
                await backend.wait_for_requests(len(backend.requests) + 1)
    # the new owners read where "c" left off: no rescan of mailboxes without new mail
    assert all(not scans_since(backend, u, killed_at) for u in without_mail)
    rows = await trio.to_thread.run_sync(
        fetch_sql, cluster_dsn, f"SELECT instance_id FROM {MEMBERSHIP_TABLE}"
    )
    assert {r[0] for r in rows} == {"a", "b", "c"}  # a crash leaves its row, TTL ends it


async def cut_off_dsn(dsn: str, nursery: trio.Nursery) -> tuple[Proxy, str]:
    """A proxy to the Postgres of ``dsn`` and the DSN through it."""
    parts = urlsplit(dsn)
    proxy = Proxy(parts.port or 5432)
    await nursery.start(proxy.serve)
    return proxy, dsn.replace(f":{parts.port}/", f":{proxy.port}/")


@pytest.mark.timeout(120)  # ≈ 20 s; its own waits add up past 60 s
async def test_an_instance_cut_off_from_postgres_fences_and_comes_back(
    start: Starter, server: ImapTestServer, cluster_dsn: str, nursery: trio.Nursery
) -> None:
    """The cut-off instance's mailboxes answer slowly (DONE and LOGOUT take
    ``2 * SLOW_ANSWER``, within its LOGOUT timeout): fenced at half the TTL, its sessions
    are still gone before the others take over at the full TTL. Fenced only at the full
    TTL, they would overlap the new owners' for about that long."""
    users = make_users(server, 60)
    proxy, via_proxy = await cut_off_dsn(cluster_dsn, nursery)
    slow = {"ttl": SLOW_TTL, "TRIO_IDLE_LOGOUT_TIMEOUT": SLOW_LOGOUT}
    a, b = await start("a", users, **slow), await start("b", users, **slow)
    c = await start("c", users, dsn=via_proxy, **slow)
    instances = [a, b, c]
    await settle(server, instances, users, SLOW_TTL)
    assert c.running
    for user in c.running:
        for session in server.sessions(user):
            session.faults.response_delay = SLOW_ANSWER
    proxy.set_cut(True)
    cut_at = trio.current_time()
    # generous: a fence as late as the full TTL must get as far as the overlap check
    with trio.fail_after(SLOW_TTL + POLL + 2):
        await server.wait_for(lambda: not c.running)
    fenced_after = trio.current_time() - cut_at
    status = c.daemon.status().cluster
    assert status is not None and status.fenced
    with trio.fail_after(SLOW_TTL + TAKEOVER):
        await server.wait_for(lambda: converged([a, b], users) and watched_once(server, users))
        # the cut-off instance's slow LOGOUTs are over: each mailbox has one connection
        await server.wait_for(lambda: all(server.connections(u) == 1 for u in users))
    assert server.overlaps() == []
    assert fenced_after <= SLOW_TTL / 2 + 1, fenced_after
    assert "half the TTL" in (status.fence_reason or "")
    # its sessions are stopped (none left to count), yet it is not ready
    assert c.daemon.supervisor is not None
    readiness = assess_readiness(c.daemon.supervisor.snapshot())
    assert "this instance is fenced (cannot renew its lease)" in readiness.reasons
    proxy.set_cut(False)
    await settle(server, instances, users, SLOW_TTL)
    assert server.overlaps() == []


@pytest.mark.timeout(120)  # ≈ 15 s; its own waits add up past 60 s
async def test_a_joiner_waits_for_an_owner_cut_off_from_postgres(
    start: Starter, server: ImapTestServer, cluster_dsn: str, nursery: trio.Nursery
) -> None:
    """ "a" cannot renew its heartbeat but still watches its mailboxes until it fences (half
    the TTL); "b" joins meanwhile and sees "a" alive: it must hold what moves to it until
    "a"'s lease has certainly ended, then take everything over."""
    users = make_users(server, 40)
    proxy, via_proxy = await cut_off_dsn(cluster_dsn, nursery)
    a = await start("a", users, dsn=via_proxy, ttl=SLOW_TTL)
    await settle(server, [a], users, SLOW_TTL)
    proxy.set_cut(True)
    b = await start("b", users, ttl=SLOW_TTL)
    with trio.fail_after(2 * SLOW_TTL + TAKEOVER):
        await server.wait_for(lambda: converged([b], users) and watched_once(server, users))
    assert server.overlaps() == []
    proxy.set_cut(False)
    await settle(server, [a, b], users, SLOW_TTL)
    assert server.overlaps() == []


async def test_an_instance_leaving_hands_its_share_over_without_waiting_for_its_lease(
    start: Starter, server: ImapTestServer
) -> None:
    users = make_users(server, 60)
    instances = [await start(n, users) for n in ("a", "b", "c")]
    await settle(server, instances, users)
    leaving = instances[2]
    assert leaving.running
    leaving.daemon.shutdown("test: c leaves the cluster")
    # its row is deleted once its sessions ended: the others take over at their next poll,
    # not a TTL after its last heartbeat
    with trio.fail_after(TTL):
        await server.wait_for(
            lambda: converged(instances[:2], users) and watched_once(server, users)
        )
    assert server.overlaps() == []


async def test_a_fourth_instance_takes_about_a_quarter_and_drops_none(
    start: Starter, server: ImapTestServer
) -> None:
    users = make_users(server, 120)
    instances = [await start(n, users) for n in ("a", "b", "c")]
    await settle(server, instances, users)
    before = {u: i.name for i in instances for u in i.running}
    instances.append(await start("d", users))
    await settle(server, instances, users)
    after = {u: i.name for i in instances for u in i.running}
    moved = [u for u in users if before[u] != after[u]]
    assert all(after[u] == "d" for u in moved)
    assert 0.12 <= len(moved) / len(users) <= 0.40
    assert server.overlaps() == []


async def test_db_migrate_creates_the_membership_table_idempotently(pg_dsn: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIO_IDLE_")}
    env["DATABASE_URL"] = pg_dsn
    for _ in range(2):
        result = await trio.run_process(
            [sys.executable, "-m", "trio_idle.cli", "db", "migrate"],
            env=env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr.decode()
        assert f"{MEMBERSHIP_TABLE} is ready".encode() in result.stdout
    rows = await trio.to_thread.run_sync(
        fetch_sql, pg_dsn, f"SELECT count(*) FROM {MEMBERSHIP_TABLE}"
    )
    assert rows[0][0] == 0


async def test_membership_statements_take_id_and_ttl_as_parameters_on_the_database_clock(
    cluster_dsn: str,
) -> None:
    """An id the settings would refuse (quotes, a statement of its own) still goes to the
    table verbatim and harms nothing: the statements take the id and the TTL as
    parameters, never as SQL text. Liveness is the database's ``now()`` minus the
    heartbeat it stored: rows dated by the database itself, not by this process."""
    hostile = "a'); DROP TABLE trio_idle_instance; --\"$1"
    execute_sql(
        cluster_dsn,
        f"INSERT INTO {MEMBERSHIP_TABLE} (instance_id, heartbeat_at) VALUES "
        "('dead', now() - interval '4 seconds'), ('alive', now() - interval '2 seconds')",
    )
    db = PostgresMembership(Secret(cluster_dsn))
    async with trio_asyncio.open_loop():
        beat = await db.beat(hostile, 3.0)
        assert beat.ids == {hostile, "alive"}
        ages = {m.instance_id: m.age for m in beat.members}
        assert ages[hostile] == 0.0 and 2.0 <= ages["alive"] < 3.0
        # the TTL is a parameter too: 1.5 s makes "alive" dead
        assert (await db.beat(hostile, 1.5)).ids == {hostile}
        await db.leave(hostile)
    rows = await trio.to_thread.run_sync(
        fetch_sql, cluster_dsn, f"SELECT instance_id FROM {MEMBERSHIP_TABLE} ORDER BY 1"
    )
    assert [r[0] for r in rows] == ["alive", "dead"]  # only its own row was deleted


class GoneAfterRegistration:
    """The real membership table until :attr:`gone` is set; from then on every heartbeat
    goes to a database that does not exist, whose name holds the DSN's password, a
    terminal escape and a forged log line: Postgres's own error quotes that name."""

    def __init__(self, dsn: str) -> None:
        self.db = PostgresMembership(Secret(dsn))
        name = f"gone-{urlsplit(dsn).password}\x1b[2J\n[idle/cluster] forged"
        self.missing = PostgresMembership(Secret(f"{dsn.rsplit('/', 1)[0]}/{quote(name, safe='')}"))
        self.gone = False

    async def beat(self, instance_id: str, ttl: float) -> Beat:
        return await (self.missing if self.gone else self.db).beat(instance_id, ttl)

    async def leave(self, instance_id: str) -> None:
        await self.db.leave(instance_id)


async def test_a_database_error_reaches_status_scrubbed(
    start: Starter, server: ImapTestServer, cluster_dsn: str
) -> None:
    """The fence reason /status shows quotes the driver's error through the scrubber:
    never the DATABASE_URL password, no control character, bounded."""
    password = urlsplit(cluster_dsn).password
    assert password
    token = "st-cluster-5b4a39281706f5e4d3c2"
    users = make_users(server, 4)
    db = GoneAfterRegistration(cluster_dsn)
    with capture_logs() as logs:
        a = await start(
            "a",
            users,
            membership_db=db,
            TRIO_IDLE_HEALTH_ADDR="127.0.0.1:0",
            TRIO_IDLE_STATUS_TOKEN=token,
        )
        await settle(server, [a], users)
        db.gone = True
        with trio.fail_after(TTL + POLL + 2):
            await server.wait_for(lambda: not a.running)
        assert a.daemon.supervisor is not None and a.daemon.supervisor.health_url is not None
        async with httpx.AsyncClient(base_url=a.daemon.supervisor.health_url) as http:
            reply = await http.get("/status", headers={"authorization": f"Bearer {token}"})
    cluster = reply.json()["cluster"]
    assert cluster["fenced"] is True
    reason = cluster["fence_reason"]
    assert "half the TTL" in reason and 'InvalidCatalogNameError: database "gone-' in reason
    assert password not in reason and "********" in reason
    # one printable line: the escape and the line break are spelt out, not sent
    assert (
        "\x1b" not in reason
        and "\n" not in reason
        and "\\x1b[2J\\x0a[idle/cluster] forged" in reason
    )
    assert len(reason) <= 300
    failures = logs.matching("heartbeat") + logs.matching("fenced")
    assert failures and not [line for line in failures if password in line or "\x1b" in line]


class FirstBeatAlone:
    """The real membership table, but each instance's first heartbeat sees only itself:
    what happens when instances register at the same moment (each statement's snapshot
    misses the other's uncommitted row)."""

    def __init__(self, dsn: str) -> None:
        self.db = PostgresMembership(Secret(dsn))
        self.seen: set[str] = set()

    async def beat(self, instance_id: str, ttl: float) -> Beat:
        beat = await self.db.beat(instance_id, ttl)
        if instance_id in self.seen:
            return beat
        self.seen.add(instance_id)
        alone = tuple(m for m in beat.members if m.instance_id == instance_id)
        return Beat(alone, beat.db_now)

    async def leave(self, instance_id: str) -> None:
        await self.db.leave(instance_id)


async def test_instances_registering_at_once_never_watch_a_mailbox_twice(
    start: Starter, server: ImapTestServer, cluster_dsn: str
) -> None:
    users = make_users(server, 60)
    db = FirstBeatAlone(cluster_dsn)
    instances: list[Instance] = []

    async def one(name: str) -> None:
        instances.append(await start(name, users, membership_db=db))

    async with trio.open_nursery() as nursery:
        for name in ("a", "b", "c"):
            nursery.start_soon(one, name)
    instances.sort(key=lambda i: i.name)
    await settle(server, instances, users)
    assert server.overlaps() == []


class AfterFirstBeat:
    """A connection list whose first read waits until the instance has registered (a
    slow database at start): the first share is planned before any row is known."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.source = ListSource(rows)
        self.name = self.source.name
        self.daemon: Daemon | None = None

    async def fetch(self) -> list[dict[str, Any]]:
        # neither the test nor the membership offers an event to wait on
        while self.daemon is None or self.daemon.share is None:  # noqa: ASYNC110
            await trio.sleep(0.01)
        membership = self.daemon.share.membership
        while membership.beat is None:  # noqa: ASYNC110 - the membership has no event
            await trio.sleep(0.01)
        return await self.source.fetch()


async def test_a_joiner_whose_first_refresh_comes_late_waits_for_the_lease(
    start: Starter, server: ImapTestServer
) -> None:
    users = make_users(server, 60)
    a = await start("a", users)
    await settle(server, [a], users)
    source = AfterFirstBeat([row(u, u, PASSWORD, server.port) for u in users])
    b = await start("b", users, source=source)
    source.daemon = b.daemon
    await settle(server, [a, b], users)
    assert server.overlaps() == []


async def test_a_large_share_starts_a_step_at_a_time(
    start: Starter, server: ImapTestServer
) -> None:
    """A failover moves thousands of mailboxes at once: started in one go, their starts
    stopped the event loop (every running session's pushes waited). Here another task
    runs between the steps."""
    users = make_users(server, 2 * START_STEP + 50)
    seen: list[int] = []
    with capture_logs() as logs:
        a = await start("a", users)
        with trio.fail_after(15):
            # a task of the same loop, e.g. a session with a push to deliver
            while len(a.running) < len(users):
                seen.append(len(a.running))
                await trio.lowlevel.checkpoint()
            await logs.wait_for(f"started {len(users)} connections of this instance's share")
    between = sorted({count for count in seen if 0 < count < len(users)})
    assert between and all(count % START_STEP == 0 for count in between), between


async def test_a_shutdown_during_the_share_start_starts_nothing_more(
    start: Starter, server: ImapTestServer
) -> None:
    users = make_users(server, 3 * START_STEP)
    a = await start("a", users)
    with trio.fail_after(15):
        while len(a.running) < START_STEP:
            await trio.lowlevel.checkpoint()
    started = len(a.running)
    a.daemon.shutdown("test: shutdown while starting the share")
    assert started < len(users)
    with trio.fail_after(8):
        await a.daemon.wait_stopped()
    assert a.running == set()  # nothing was started after the shutdown
    # the rest of the share never connected
    logged_in = {e.user for e in server.log if e.event == "LOGIN"}
    assert len(logged_in) <= started
