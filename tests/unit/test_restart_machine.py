"""The IDLE restart as a pure state machine, fed plain server lines as h11's tests feed
bytes: what it writes (exact bytes), what each answer does, and what a missing answer is
named — then the same machine driven by a connection whose read path is fed bytes (the
ticker writes, the session's reads feed the answers; an EXISTS among them reaches the
monitor).

Both ways a restart runs (the ticker's, the session's) use this machine, so these are
the errors the session logs (``connection lost: NOOP failed: NO``, ``no answer to NOOP
within 30s``).
"""

from __future__ import annotations

import ast
import inspect
import itertools
import socket
from types import ModuleType
from typing import cast

import pytest
import trio

from trio_idle.core.errors import ImapError
from trio_idle.imap import aioimap, client
from trio_idle.imap.aioimap import SELECTED, ImapProtocol
from trio_idle.imap.client import ImapConnection, ImapTimeouts
from trio_idle.imap.framing import DEFAULT_LIMITS
from trio_idle.imap.push_monitor import PushMonitor
from trio_idle.imap.restart import (
    ANSWERED_DONE,
    ANSWERED_NOOP,
    Answered,
    Failed,
    IdleResumed,
    RestartMachine,
    SendIdle,
    TimedOut,
)
from trio_idle.net.transport import ImapTransport

TIMEOUT = 30.0


class Counter:
    """The connection's tag counter: A2, A3, ... (A1 is the IDLE being left)."""

    def __init__(self) -> None:
        self._counter = itertools.count(2)

    def new_tag(self) -> str:
        return f"A{next(self._counter)}"


def tags() -> Counter:
    return Counter()


def machine() -> RestartMachine:
    return RestartMachine(tags(), TIMEOUT)


def play(m: RestartMachine, *lines: bytes) -> list[object]:
    return [m.feed(line) for line in lines]


# -- the machine, line by line ---------------------------------------------------------


def test_a_pipelined_tick_writes_three_commands_and_ends_idling_on_the_continuation() -> None:
    m = machine()
    assert m.begin(100.0, "A1", noop=True, pipelined=True) == b"DONE\r\nA2 NOOP\r\nA3 IDLE\r\n"
    assert (m.running, m.awaiting, m.deadline, m.number) == (True, "DONE", 130.0, 1)
    assert play(m, b"A1 OK IDLE terminated\r\n", b"A2 OK NOOP completed\r\n", b"+ idling\r\n") == [
        ANSWERED_DONE,
        ANSWERED_NOOP,
        IdleResumed("A3"),
    ]
    assert not m.running
    assert m.pipelines


def test_a_renewal_writes_no_noop() -> None:
    m = machine()
    assert m.begin(0.0, "A1", noop=False, pipelined=True) == b"DONE\r\nA2 IDLE\r\n"
    assert play(m, b"A1 OK done", b"+ idling") == [ANSWERED_DONE, IdleResumed("A2")]


@pytest.mark.parametrize("noop", [True, False])
def test_not_pipelined_idle_is_written_alone_once_the_rest_is_answered(noop: bool) -> None:
    m = machine()
    written = m.begin(0.0, "A1", noop=noop, pipelined=False)
    assert written == (b"DONE\r\nA2 NOOP\r\n" if noop else b"DONE\r\n")
    answers = [b"A1 OK done", b"A2 OK noop"] if noop else [b"A1 OK done"]
    *before, last = answers
    assert play(m, *before) == [ANSWERED_DONE] * len(before)
    tag = "A3" if noop else "A2"
    assert m.feed(last) == SendIdle(f"{tag} IDLE\r\n".encode(), tag, refused=False)
    assert m.running and m.awaiting == "IDLE"
    assert m.feed(b"+ idling") == IdleResumed(tag)


def test_untagged_lines_between_the_answers_are_not_the_machines() -> None:
    m = machine()
    m.begin(0.0, "A1", noop=True, pipelined=True)
    between = [b"* 4 EXISTS", b"* OK still here", b"* 1 EXPUNGE", b"* 3 RECENT"]
    lines = [*between, b"A1 OK done", *between, b"A2 OK noop", *between, b"+ idling"]
    events = play(m, *lines)
    assert [e for e in events if e is not None] == [ANSWERED_DONE, ANSWERED_NOOP, IdleResumed("A3")]


def test_a_refused_noop_ends_the_restart_with_the_sessions_error() -> None:
    m = machine()
    m.begin(0.0, "A1", noop=True, pipelined=True)
    assert play(m, b"A1 OK done", b"A2 NO [UNAVAILABLE] later") == [
        ANSWERED_DONE,
        Failed("NOOP failed: NO"),
    ]
    assert not m.running
    assert play(m, b"A3 OK", b"+ idling") == [None, None]  # over: lines are ignored


def test_a_refused_done_ends_the_restart() -> None:
    m = machine()
    m.begin(0.0, "A1", noop=False, pipelined=True)
    assert m.feed(b"A1 BAD what") == Failed("DONE failed: IDLE ended with BAD")


def test_a_refused_pipelined_idle_is_sent_alone_now_and_next_time() -> None:
    m = machine()
    m.begin(0.0, "A1", noop=True, pipelined=True)
    events = play(m, b"A1 OK", b"A2 OK", b"A3 BAD IDLE must come alone")
    assert events[2] == SendIdle(b"A4 IDLE\r\n", "A4", refused=True)
    assert not m.pipelines  # remembered for the connection's life
    assert m.feed(b"+ idling") == IdleResumed("A4")
    # the next restart may not pipeline it: IDLE goes out alone once NOOP is answered
    with pytest.raises(RuntimeError):
        m.begin(1.0, "A4", noop=True, pipelined=True)
    assert m.begin(1.0, "A4", noop=True, pipelined=False) == b"DONE\r\nA5 NOOP\r\n"
    assert play(m, b"A4 OK", b"A5 OK") == [ANSWERED_DONE, SendIdle(b"A6 IDLE\r\n", "A6", False)]
    # refused on its own: no second chance
    assert m.feed(b"A6 NO never") == Failed("IDLE failed: server refused IDLE: NO")


def test_an_answer_under_another_tag_is_not_the_awaited_ones() -> None:
    m = machine()
    m.begin(0.0, "A1", noop=True, pipelined=True)
    # NOOP's tag while DONE's answer is awaited: out of order, the restart fails
    assert m.feed(b"A2 OK noop") == Failed("DONE failed: answer for another command: OK")
    m = machine()
    m.begin(0.0, "A1", noop=True, pipelined=True)
    assert play(m, b"A1 OK", b"A9 OK") == [
        ANSWERED_DONE,
        Failed("NOOP failed: answer for another command: OK"),
    ]


def test_a_continuation_before_idle_is_awaited_is_ignored() -> None:
    m = machine()
    m.begin(0.0, "A1", noop=True, pipelined=True)
    assert play(m, b"+ early", b"A1 OK", b"+ early") == [None, ANSWERED_DONE, None]
    # not pipelined: a "+" before IDLE was written is not IDLE's
    m = machine()
    m.begin(0.0, "A1", noop=False, pipelined=False)
    assert m.feed(b"+ early") is None
    assert isinstance(m.feed(b"A1 OK"), SendIdle)
    assert m.feed(b"+ idling") == IdleResumed("A2")


def test_a_bye_in_the_middle_is_the_monitors_and_the_restart_then_times_out() -> None:
    m = machine()
    m.begin(0.0, "A1", noop=True, pipelined=True)
    assert play(m, b"A1 OK", b"* BYE shutting down") == [ANSWERED_DONE, None]
    assert m.running and m.awaiting == "NOOP"
    assert m.check(m.number) == TimedOut("NOOP")


@pytest.mark.parametrize(
    ("pipelined", "answers", "missing"),
    [
        (True, [], "DONE"),
        (True, [b"A1 OK"], "NOOP"),
        (True, [b"A1 OK", b"A2 OK"], "IDLE"),
        (True, [b"A1 OK", b"A2 OK", b"A3 BAD alone"], "IDLE"),  # resent, then silence
        (False, [b"A1 OK", b"A2 OK"], "IDLE"),
    ],
)
def test_a_timeout_at_each_stage_names_the_missing_answer(
    pipelined: bool, answers: list[bytes], missing: str
) -> None:
    m = machine()
    m.begin(10.0, "A1", noop=True, pipelined=pipelined)
    play(m, *answers)
    assert not m.overdue(39.9)
    assert m.overdue(40.0)
    assert str(m) == missing  # errors name the machine: "no answer to NOOP within 30s"
    assert m.check(m.number) == TimedOut(missing)
    assert not m.running
    assert m.feed(b"+ idling") is None  # a late answer changes nothing


def test_a_check_of_an_answered_or_older_restart_does_nothing() -> None:
    m = machine()
    m.begin(0.0, "A1", noop=False, pipelined=True)
    first = m.number
    play(m, b"A1 OK", b"+ idling")
    assert m.check(first) is None
    m.begin(1.0, "A2", noop=False, pipelined=True)
    assert m.check(first) is None and m.running
    assert m.check(m.number) == TimedOut("DONE")


def test_one_restart_at_a_time_and_none_after_abandon() -> None:
    m = machine()
    m.begin(0.0, "A1", noop=True, pipelined=True)
    with pytest.raises(RuntimeError):
        m.begin(0.0, "A1", noop=True, pipelined=True)
    m.abandon()
    assert not m.running
    assert m.feed(b"A1 OK") is None
    assert m.check(m.number) is None


def test_a_tick_allocates_no_event_for_the_answers_that_change_nothing() -> None:
    m = machine()
    m.begin(0.0, "A1", noop=True, pipelined=True)
    done, noop = play(m, b"A1 OK", b"A2 OK")
    assert done is ANSWERED_DONE and noop is ANSWERED_NOOP and isinstance(done, Answered)


# -- the machine driven by a connection, fed bytes -------------------------------------


class Wire:
    """The connection's socket in memory: what was written, and the server's bytes
    waiting to be read (a read takes one chunk; none left: the server closed). The
    reader waits on :attr:`socket`, one end of a socket pair that is always readable."""

    unsent = False

    def __init__(self) -> None:
        self.written = b""
        self.incoming: list[bytes] = []
        self.closed = False
        self.socket, self._peer = socket.socketpair()
        self._peer.send(b"x")  # never read: every wait for the socket returns at once

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            trio.lowlevel.notify_closing(self.socket)
            self.socket.close()
            self._peer.close()

    def is_closing(self) -> bool:
        return self.closed

    def receive_nowait(self) -> bytes:
        return self.incoming.pop(0) if self.incoming else b""

    def take(self) -> bytes:
        data, self.written = self.written, b""
        return data


async def idling() -> tuple[ImapConnection, Wire, str]:
    """A selected connection idling under the tag returned (3 messages)."""
    monitor = PushMonitor()
    protocol = ImapProtocol(monitor, DEFAULT_LIMITS)
    wire = Wire()
    protocol.connection_made(wire)
    protocol.data_received(b"* OK ready\r\n")
    protocol.state = SELECTED
    protocol.add_capabilities(["IDLE"])
    monitor.exists = 3
    imap = ImapConnection(
        protocol,
        monitor,
        ImapTimeouts(connect=5, command=TIMEOUT, keepalive_idle=60),
        cast(ImapTransport, wire),
    )
    wire.incoming.append(b"+ idling\r\n")
    await imap.idle_start()
    return imap, wire, wire.take().split(b" ")[0].decode()


def written_tags(data: bytes) -> list[str]:
    """The tags of the commands in ``data`` (``DONE`` has none)."""
    return [line.split(b" ")[0].decode() for line in data.split(b"\r\n") if b" " in line]


def server_sends(imap: ImapConnection, data: bytes) -> None:
    """The session's read path gets ``data`` (what :meth:`ImapConnection._take` does
    with a read)."""
    imap.protocol.data_received(data)


async def test_the_tickers_restart_is_answered_by_the_sessions_reads_and_counts_tick_mail() -> None:
    imap, wire, old = await idling()
    number = imap.begin_restart(noop=True)  # the ticker: writes, reads nothing
    assert number is not None
    written = wire.take()
    noop, idle = written_tags(written)
    assert written == f"DONE\r\n{noop} NOOP\r\n{idle} IDLE\r\n".encode()
    # an EXISTS inside the answers: the monitor counts it, as the tick's
    server_sends(imap, f"{old} OK done\r\n* 5 EXISTS\r\n{noop} OK noop\r\n".encode())
    assert imap.monitor.new_mail == 2 and imap.monitor.tick_mail == 2
    server_sends(imap, b"* OK still here\r\n+ idling\r\n* 6 EXISTS\r\n")
    # once idling again, mail is pushed mail again, not the tick's
    assert imap.monitor.new_mail == 3 and imap.monitor.tick_mail == 2
    imap.check_restart(number)  # due later: the answers are in, nothing happens
    assert imap.monitor.problem() is None and not wire.closed
    # idling under the new IDLE: the next restart's DONE is answered under its tag
    assert imap.begin_restart(noop=False) is not None
    (again,) = written_tags(wire.take())
    server_sends(imap, f"{idle} OK done\r\n+ idling\r\n".encode())
    assert imap.monitor.problem() is None
    assert imap.begin_restart(noop=False) is not None  # idling again: the ticker may
    assert written_tags(wire.take()) != [again]
    imap.abort()


async def test_a_refused_pipelined_idle_is_resent_alone_and_the_ticker_hands_back_the_next() -> (
    None
):
    imap, wire, old = await idling()
    assert imap.begin_restart(noop=True) is not None
    noop, idle = written_tags(wire.take())
    server_sends(imap, f"{old} OK\r\n{noop} OK\r\n{idle} BAD alone please\r\n".encode())
    (alone,) = written_tags(resent := wire.take())
    assert resent == f"{alone} IDLE\r\n".encode()
    server_sends(imap, b"+ idling\r\n")
    assert imap.monitor.problem() is None
    assert imap.begin_restart(noop=True) is None  # the session runs it: IDLE alone
    imap.abort()


@pytest.mark.parametrize("by", ["ticker", "session"])
async def test_a_refused_noop_is_one_error_whoever_wrote_it(by: str) -> None:
    imap, wire, old = await idling()
    protocol = imap.protocol
    noop = f"{protocol.tagpre}{protocol.tagnum}"  # the next tag
    answer = f"{old} OK\r\n{noop} NO busy\r\n".encode()
    if by == "ticker":
        assert imap.begin_restart(noop=True) is not None
        server_sends(imap, answer)
        error = imap.monitor.failure
    else:
        wire.incoming.append(answer)
        with trio.fail_after(5), pytest.raises(ImapError) as caught:
            await imap.restart_idle(noop=True)
        error = caught.value
    assert type(error) is ImapError and str(error) == "NOOP failed: NO"
    assert written_tags(wire.take())[0] == noop
    imap.abort()


async def test_an_unanswered_tick_is_named_by_the_tickers_check() -> None:
    imap, wire, old = await idling()
    number = imap.begin_restart(noop=True)
    assert number is not None
    server_sends(imap, f"{old} OK done\r\n".encode())  # DONE answered, NOOP never
    imap.check_restart(number)
    assert str(imap.monitor.failure) == "no answer to NOOP within 30s"
    assert wire.closed


async def test_an_idle_the_server_ended_itself_is_restarted_by_the_session() -> None:
    imap, wire, old = await idling()
    server_sends(imap, f"{old} OK IDLE timed out\r\n".encode())  # before any DONE
    # its answer is parsed already: the ticker leaves the restart to the session's task,
    # which feeds that answer to the machine first
    assert imap.begin_restart(noop=True) is None
    protocol = imap.protocol
    noop, idle = (f"{protocol.tagpre}{protocol.tagnum + n}" for n in (0, 1))
    wire.incoming.append(f"{noop} OK\r\n+ idling\r\n".encode())
    with trio.fail_after(5):
        await imap.restart_idle(noop=True)
    assert wire.take() == f"DONE\r\n{noop} NOOP\r\n{idle} IDLE\r\n".encode()
    assert imap.monitor.problem() is None
    assert imap.begin_restart(noop=False) is not None  # idling under the new IDLE
    imap.abort()


# -- who may feed the machine ----------------------------------------------------------


def _functions_using(module: ModuleType, name: str) -> set[str]:
    """The functions of ``module`` whose body names ``name`` (an attribute or a call)."""
    tree = ast.parse(inspect.getsource(module))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for inner in ast.walk(node):
                if isinstance(inner, ast.Attribute) and inner.attr == name:
                    found.add(node.name)
    return found


def test_only_the_read_path_feeds_the_machine() -> None:
    # the machine is fed in one place, the hook the parser calls ...
    assert _functions_using(client, "feed") == {"_restart_line"}
    assert _functions_using(aioimap, "on_answer") == {"__init__", "lost", "_handle_response"}
    # ... which the ticker's synchronous side only installs (_write_restart) or removes;
    # the one direct call is the session's own restart (an answer parsed before it began)
    assert _functions_using(client, "_restart_line") == {"_write_restart", "restart_idle"}
    assert inspect.iscoroutinefunction(ImapConnection.restart_idle)
