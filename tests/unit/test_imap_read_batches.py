"""The read path parses in batches: what one read completes is handed to aioimaplib at
most :data:`~trio_idle.imap.aioimap.STEP_PARTS` lines and literals at a time, and the
reading task checkpoints between batches (``ImapConnection._pump``; the clock-free proof
on a real socket is in tests/reliability/test_envelope_fetch.py). Pure: bytes in,
commands and counters out."""

from __future__ import annotations

from tests.fixtures import Wire
from trio_idle.imap.aioimap import SELECTED, STEP_PARTS, Command, ImapProtocol
from trio_idle.imap.framing import DEFAULT_LIMITS, MAX_LITERALS
from trio_idle.imap.push_monitor import PushMonitor

ONE = b"* 1 FETCH (UID 1 ENVELOPE (NIL %s))\r\n" % (b"{1}\r\nx " * 31,)


def fetching() -> tuple[ImapProtocol, Command, PushMonitor]:
    monitor = PushMonitor()
    protocol = ImapProtocol(monitor, DEFAULT_LIMITS)
    protocol.connection_made(Wire())
    protocol.data_received(b"* OK ready\r\n")
    protocol.state = SELECTED
    fetch = Command("FETCH", protocol.new_tag(), "1:*", "(UID ENVELOPE)", prefix="UID")
    protocol.register(fetch)
    return protocol, fetch, monitor


async def test_one_read_of_thousands_of_literals_is_parsed_batch_by_batch() -> None:
    protocol, fetch, _ = fetching()
    start = protocol.parsed_parts  # the greeting
    batches: list[int] = []
    protocol.after_parse = lambda: batches.append(protocol.parsed_parts)
    protocol.data_received(ONE * 100 + f"{fetch.tag} OK done\r\n".encode())
    assert protocol.backlog and not fetch.done
    while protocol.backlog:
        protocol.parse_some()
    assert fetch.done and fetch.result == "OK"
    assert protocol.parsed_parts - start == 100 * 32 + 1  # every response and literal, once
    assert len(fetch.lines) == 100 * (1 + 31 * 2) + 1  # each literal, and the text after it
    sizes = [after - before for before, after in zip([start, *batches], batches, strict=False)]
    assert len(sizes) >= 100 * 32 // (STEP_PARTS + MAX_LITERALS)
    assert max(sizes) <= STEP_PARTS + MAX_LITERALS  # a batch ends the response it began


async def test_a_small_read_is_parsed_at_once() -> None:
    protocol, fetch, _ = fetching()
    protocol.data_received(ONE * 2 + f"{fetch.tag} OK done\r\n".encode())
    assert fetch.done and not protocol.backlog


async def test_nothing_waits_once_logout_was_written_or_the_connection_broke() -> None:
    """The reader reads again only when no backlog is left: a backlog that can never be
    parsed (LOGOUT written, a protocol error) must not keep it from reading (it would
    spin until its deadline)."""
    protocol, _, monitor = fetching()
    protocol.data_received(ONE * 100)
    assert protocol.backlog
    protocol.closing = True
    assert not protocol.backlog

    protocol, _, monitor = fetching()
    protocol.data_received(ONE * 100)
    protocol.data_received(b"Z9 OK not ours\r\n")  # nothing more is parsed
    while protocol.backlog:
        protocol.parse_some()
    assert monitor.lost is not None and "protocol error" in monitor.lost
    assert not protocol.backlog
