"""Seeded chaos: 50 mailboxes, random IMAP and backend faults and new mail for ~15 s.

Faults: connection reset / FIN, BYE, half-open for a while, no EXISTS push for a while,
answers slower than the command timeout for a while, login refused for a while, whole-server
restart (sometimes with a new UIDVALIDITY, sometimes with downtime), an outage in which one
old message is expunged and one new one arrives (the count stays as it was), backend
answering 500 / 429 (Retry-After) / slower than the scan timeout for a while, backend down
for a while. A quarter of the mailboxes answer SELECT without UIDNEXT, like Courier-IMAP
(STATUS still has it), and another quarter give it neither in SELECT nor in STATUS. Then
every fault is cleared, and every message appended during the run must be followed by an
accepted scan POST of its mailbox that started after it and whose range includes it. A
fifth of the mail is filed into Junk (Gmail's ``[Gmail]/Spam``, watched with
``TRIO_IDLE_FOLDERS=INBOX,\\Junk`` by STATUS on each tick): its scans must name that
folder, through the same outages.

Replay: ``CHAOS_SEED=<seed> python -m pytest tests/reliability/test_chaos.py`` (the seed is
printed and is part of every assertion message). ``CHAOS_SECONDS`` changes the duration.
The seed fixes the sequence of faults and appends and their spacing; the interleaving with
the daemon's I/O still varies from run to run.
"""

from __future__ import annotations

import functools
import os
import random
from collections.abc import Callable

import pytest
import trio
from trio_idle_testing.backend import Reply, ScanRequest

from tests.harness import running_daemon
from tests.reliability.rig import Rig, mailbox_name

KINDS = (
    *("rst", "fin", "bye", "silent", "no_push", "slow_server", "login_refused", "restart"),
    *("expunge_outage",) * 3,  # more likely: only half the mailboxes lack UIDNEXT
    *("backend_500", "backend_429", "backend_slow", "backend_down"),
)
MAILBOXES = 50
#: old mail in each mailbox before the daemon starts, for the outages to expunge
OLD_MAIL = 10
SECONDS = float(os.environ.get("CHAOS_SECONDS", "15"))
SETTINGS = {
    "TRIO_IDLE_TICK_INTERVAL": "1s",
    "TRIO_IDLE_COMMAND_TIMEOUT": "1s",
    "TRIO_IDLE_CONNECT_TIMEOUT": "2s",
    "TRIO_IDLE_SCAN_TIMEOUT": "1s",
    "TRIO_IDLE_AUTH_BACKOFF": "1s",
    "TRIO_IDLE_AUTH_BACKOFF_MAX": "2s",
    "TRIO_IDLE_LOG_LEVEL": "INFO",
    "TRIO_IDLE_FOLDERS": "INBOX,\\Junk",
}
#: the folder ``\\Junk`` resolves to (Gmail's name, marked \\Junk in LIST)
JUNK = "[Gmail]/Spam"


class Chaos:
    """Random faults, each undone after a while (and all undone by :meth:`calm`)."""

    def __init__(self, rig: Rig, users: list[str], rng: random.Random) -> None:
        self.rig = rig
        self.users = users
        self.rng = rng
        self.backend_mode: dict[str, Reply] = {}  # email -> reply while faulty
        self.done: list[str] = []  # what happened, for the failure report
        #: mailboxes that get no more mail after their expunge outage: no later mail may
        #: hide that the outage's own mail was never scanned (a count that stayed the same)
        self.retired: set[str] = set()
        rig.backend.default_reply = self._reply
        for user in users:
            rig.server.add_mailbox(user, JUNK, special_use=("\\Junk",))
            for n in range(OLD_MAIL):
                rig.server.append(user, f"Subject: old {n}\r\n\r\nold\r\n".encode())
        self.uidnext_modes()

    def uidnext_modes(self) -> None:
        """Mailbox n % 4 == 1: no UIDNEXT in SELECT (Courier); n % 4 == 2: in neither
        SELECT nor STATUS. Standing modes, not faults: :meth:`calm` keeps them."""
        for n, user in enumerate(self.users):
            faults = self.rig.server.faults(user)
            faults.no_select_uidnext = n % 4 in (1, 2)
            faults.no_status_uidnext = n % 4 == 2

    def _reply(self, request: ScanRequest) -> Reply:
        return self.backend_mode.get(request.email or "", Reply())

    def note(self, what: str) -> None:
        self.done.append(f"{trio.current_time():.2f} {what}")

    async def later(self, seconds: float, undo: Callable[[], None]) -> None:
        await trio.sleep(seconds)
        undo()

    def backend_back(self, user: str) -> Callable[[], None]:
        """The undo of a backend fault: ``user``'s scans are answered normally again."""

        def undo() -> None:
            self.backend_mode.pop(user, None)

        return undo

    async def run(self, nursery: trio.Nursery, lasting: trio.Nursery) -> None:
        """Inject faults until cancelled; undo tasks go to ``nursery`` (cancelled with this
        task: :meth:`calm` undoes everything), restarts to ``lasting`` (a restart cut short
        would leave the server not listening)."""
        server, backend, rng = self.rig.server, self.rig.backend, self.rng
        while True:
            await trio.sleep(rng.uniform(0.1, 0.5))
            user = rng.choice(self.users)
            kind = rng.choice(KINDS)
            self.note(f"{kind} {user}")
            if kind in ("rst", "fin"):
                server.drop(user, kind)  # type: ignore[arg-type]
            elif kind == "bye":
                server.bye(user)
            elif kind in ("silent", "no_push", "slow_server", "login_refused"):
                faults = server.faults(user)
                field, value = {
                    "slow_server": ("response_delay", rng.uniform(0.2, 1.5)),  # vs 1 s timeout
                    "login_refused": ("refuse_login", True),
                }.get(kind, (kind, True))
                setattr(faults, field, value)
                if kind == "login_refused":
                    server.drop(user, "fin")
                undo = functools.partial(setattr, faults, field, type(value)())
                nursery.start_soon(self.later, rng.uniform(0.5, 3.0), undo)
            elif kind == "expunge_outage":
                nursery.start_soon(self.expunge_outage, user)
            elif kind == "restart":
                new_uidvalidity = rng.random() < 0.3
                downtime = rng.choice([0.0, rng.uniform(0.1, 1.0)])
                lasting.start_soon(
                    functools.partial(
                        server.restart, new_uidvalidity=new_uidvalidity, downtime=downtime
                    )
                )
            elif kind == "backend_down":
                backend.down()
                nursery.start_soon(self.later, rng.uniform(0.3, 2.0), backend.up)
            else:
                reply = {
                    "backend_500": Reply(500),
                    "backend_429": Reply(429, headers={"retry-after": "1"}),
                    "backend_slow": Reply(delay=1.5),  # scan timeout is 1 s
                }[kind]
                self.backend_mode[user] = reply
                nursery.start_soon(self.later, rng.uniform(0.5, 3.0), self.backend_back(user))

    async def expunge_outage(self, user: str) -> None:
        """Cut ``user``'s connection, wait (a while) for the next session to idle — it
        has just counted the mailbox — then cut it again, and while nobody is connected
        expunge one old message and append one: the count stays as that session saw it.
        The mailbox gets no other mail from now on (:attr:`retired`)."""
        self.retired.add(user)
        server = self.rig.server
        after = max((s.id for s in server.sessions(user)), default=0)
        server.drop(user, "rst")
        with trio.move_on_after(3):  # other faults may keep it away; cut it anyway
            await self.rig.idle(user, after=after)
        # no checkpoint from here on: nobody is connected during the change
        server.drop(user, "rst")
        self.rig.ledger.expunge_handled(user, note="during an outage")
        self.rig.ledger.append(user, "during an outage, after an expunge")

    async def append(self) -> None:
        while True:
            await trio.sleep(self.rng.uniform(0.0, 0.08))
            user = self.rng.choice(self.users)
            if user not in self.retired:
                if self.rng.random() < 0.2:
                    self.rig.ledger.append(user, "chaos, filed into Junk", JUNK)
                else:
                    self.rig.ledger.append(user, "chaos")

    def calm(self) -> None:
        self.backend_mode.clear()
        self.rig.backend.up()
        for user in self.users:
            self.rig.server.faults(user).reset()
        self.uidnext_modes()


@pytest.mark.timeout(120)  # ≈ 17 s; its own waits add up past 60 s
async def test_chaos(rig: Rig) -> None:
    seed = int(os.environ.get("CHAOS_SEED") or random.randrange(2**32))
    print(f"CHAOS_SEED={seed}")
    context = f"[replay with CHAOS_SEED={seed}]"
    users = [mailbox_name(n, "chaos") for n in range(MAILBOXES)]
    source = rig.source(*users)
    chaos = Chaos(rig, users, random.Random(seed))
    async with running_daemon(rig.settings(**SETTINGS), source) as daemon:
        with trio.fail_after(20):
            await rig.all_idle(users)  # mail before a first session is out of scope
        async with trio.open_nursery() as lasting:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(chaos.run, nursery, lasting)
                nursery.start_soon(chaos.append)
                await trio.sleep(SECONDS)
                nursery.cancel_scope.cancel()
            # one last mail per mailbox under whatever faults are active now: no later
            # mail can hide a lost notification of these
            for user in users:
                if user not in chaos.retired:  # their last mail came in an outage
                    rig.ledger.append(user, "last, under the final faults")
                    rig.ledger.append(user, "last Junk, under the final faults", JUNK)
        chaos.calm()
        calm_at = trio.current_time()
        await rig.ledger.settle(30, context=f"{context}\nfaults:\n" + "\n".join(chaos.done))
        print(
            f"{len(rig.ledger.appends)} appends, {len(chaos.done)} faults, "
            f"{len(rig.ledger.expunges)} expunged in outages, "
            f"{len(rig.backend.requests)} POSTs, {daemon.stats.get('disconnects')} disconnects, "
            f"all scanned {trio.current_time() - calm_at:.1f}s after the faults stopped, "
            f"slowest mail scanned after {max(rig.ledger.delays()):.1f}s"
        )
        with trio.fail_after(30):
            await rig.all_idle(users)  # and every mailbox is watched again
        assert daemon.stats.get("internal_errors") == 0, context
        assert len(rig.ledger.appends) > 100, context
        for user in users:
            coalescer = rig.handle(daemon, user).coalescer
            assert coalescer.pending <= 1, context
            junk = rig.handle(daemon, user).memory.folders.by_name[JUNK].coalescer
            assert junk.pending <= 1, context
