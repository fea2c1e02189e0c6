"""One mailbox failing in any way never delays another mailbox's scans.

Each case breaks mailbox BAD one way (IMAP side, backend side, or a server that is not
there at all) and, while it is broken, appends to the healthy mailbox A again and again:
each of A's mails must be scanned within 5 s, A's session must never be disturbed, and
once the fault is cleared (or BAD's row corrected to point at the real server) BAD's own
mail, appended while broken, is scanned too.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_idle_testing.backend import Reply, ScanRequest

from tests.harness import ListSource, row, running_daemon
from tests.reliability.rig import PASSWORD, Rig
from tests.reliability.scripted_server import Peer, ScriptedServer

A = "healthy@rel.test"
BAD = "bad@rel.test"
SETTINGS = {
    "TRIO_IDLE_TICK_INTERVAL": "1s",
    "TRIO_IDLE_COMMAND_TIMEOUT": "1s",
    "TRIO_IDLE_CONNECT_TIMEOUT": "1s",
    "TRIO_IDLE_SCAN_TIMEOUT": "1s",
    "TRIO_IDLE_AUTH_BACKOFF": "1s",
    "TRIO_IDLE_AUTH_BACKOFF_MAX": "2s",
}

#: breaks BAD, returns how to undo it
Fault = Callable[[Rig], Callable[[], None]]


def silent(rig: Rig) -> Callable[[], None]:
    rig.server.faults(BAD).silent = True
    return lambda: setattr(rig.server.faults(BAD), "silent", False)


def login_refused(rig: Rig) -> Callable[[], None]:
    rig.server.faults(BAD).refuse_login = True
    rig.server.drop(BAD, "fin")
    return lambda: setattr(rig.server.faults(BAD), "refuse_login", False)


def no_push(rig: Rig) -> Callable[[], None]:
    rig.server.faults(BAD).no_push = True
    return lambda: setattr(rig.server.faults(BAD), "no_push", False)


def backend_held(rig: Rig) -> Callable[[], None]:
    return rig.backend.hold(BAD).release


def _backend_reply_for_bad(rig: Rig, reply: Reply) -> Callable[[], None]:
    state = {"on": True}

    def choose(request: ScanRequest) -> Reply:
        return reply if state["on"] and request.email == BAD else Reply()

    rig.backend.default_reply = choose
    return lambda: state.update(on=False)


def backend_500(rig: Rig) -> Callable[[], None]:
    return _backend_reply_for_bad(rig, Reply(500))


def backend_429(rig: Rig) -> Callable[[], None]:
    return _backend_reply_for_bad(rig, Reply(429, headers={"retry-after": "1"}))


def backend_slow(rig: Rig) -> Callable[[], None]:
    return _backend_reply_for_bad(rig, Reply(delay=3.0))


def nothing(rig: Rig) -> Callable[[], None]:
    return lambda: None


#: (name, where BAD's row points: "server" | "closed" | "blackhole" | "bye", the fault)
CASES: list[tuple[str, str, Fault]] = [
    ("silent", "server", silent),
    ("login_refused", "server", login_refused),
    ("no_push", "server", no_push),
    ("backend_held", "server", backend_held),
    ("backend_500", "server", backend_500),
    ("backend_429", "server", backend_429),
    ("backend_slow", "server", backend_slow),
    ("port_closed", "closed", nothing),
    ("never_greets", "blackhole", nothing),
    ("bye_greeting", "bye", nothing),
]


@asynccontextmanager
async def bad_port(kind: str, rig: Rig, nursery: trio.Nursery) -> AsyncIterator[int]:
    """Where BAD's row points."""
    if kind == "server":
        yield rig.server.port
    elif kind == "closed":
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        yield port  # nobody listens: connection refused
    elif kind == "blackhole":
        with socket.socket() as sock:  # listens, never accepts: no greeting ever
            sock.bind(("127.0.0.1", 0))
            sock.listen(100)
            yield sock.getsockname()[1]
    else:

        async def bye(peer: Peer) -> None:
            await peer.send(b"* BYE Too many connections\r\n")

        scripted = ScriptedServer(bye)
        await nursery.start(scripted.serve)
        yield scripted.port


@pytest.mark.parametrize(("where", "fault"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
async def test_a_failing_mailbox_never_delays_another(
    rig: Rig, nursery: trio.Nursery, tmp_path: Path, where: str, fault: Fault
) -> None:
    rig.add(A, BAD)
    env = dict(SETTINGS)
    if where != "server":
        # BAD first connects once its row is corrected: only the state store (the
        # default, here private) tells the daemon it never scanned that mailbox
        env.update(TRIO_IDLE_STATE="sqlite", TRIO_IDLE_STATE_PATH=str(tmp_path / "s.db"))
    async with bad_port(where, rig, nursery) as port:
        rows: list[dict[str, Any]] = [*rig.rows(A), row(BAD, BAD, PASSWORD, port)]
        source = ListSource(rows)
        async with running_daemon(rig.settings(**env), source) as daemon:
            with trio.fail_after(10):
                await rig.idle(A)
                if where == "server":
                    await rig.idle(BAD)
            clear = fault(rig)
            # BAD's mailbox lives on the test server in every case; where the row points
            # elsewhere, the daemon cannot see this mail until the row is fixed
            broken_mail = rig.ledger.append(BAD, "while broken")
            for n in range(6):
                mail = rig.ledger.append(A, f"healthy mail #{n}")
                with trio.fail_after(5):
                    await rig.ledger.wait_covered([mail])
                await trio.sleep(0.25)  # spacing only: let BAD's failure cycles interleave
            assert rig.handle(daemon, A).memory.sessions == 1
            assert rig.backend.max_in_flight(A) == 1
            if where != "server":  # the daemon cannot have seen it: a test that can fail
                assert rig.ledger.uncovered([broken_mail]) == [broken_mail]
            clear()
            if where != "server":  # the cure for a wrong address: the row is corrected
                source.rows = [*rig.rows(A, BAD)]
                daemon.request_refresh()
            with trio.fail_after(20):
                await rig.ledger.settle(20)
