"""Test helpers for trio-idle (never imported by the daemon itself).

Exported here: :class:`ImapTestServer`, an in-process IMAP4rev1 + IDLE server on trio with
run-time fault injection (modules ``imap_*``). The scan webhook backend lives in
:mod:`trio_idle_testing.backend`.
"""

from .imap_faults import Faults
from .imap_parser import Command, CommandFramer, ParseError, parse_command
from .imap_server import ImapTestServer, LogEntry, Overlap, ServerStats
from .imap_session import ImapTestSession
from .imap_store import Mailbox, Message

__all__ = [
    "Command",
    "CommandFramer",
    "Faults",
    "ImapTestServer",
    "ImapTestSession",
    "LogEntry",
    "Mailbox",
    "Message",
    "Overlap",
    "ParseError",
    "ServerStats",
    "parse_command",
]
