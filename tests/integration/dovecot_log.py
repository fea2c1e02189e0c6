"""How the test Dovecot saw each IMAP session of a user end, read from its log file.

A session that received LOGOUT ends with ``imap(<user>)<pid><session>: Info: Disconnected:
Logged out in=...``; one whose socket was simply closed ends with ``Disconnected:
Connection closed ...`` (checked against Dovecot 2.3). Counting logged-in sessions
(``doveadm who``) cannot tell the two apart; this can.
"""

from __future__ import annotations

import re

from tests.harness import poll_until
from tests.servers.dovecot import DovecotServer

_SESSION_END = re.compile(r" imap\((?P<user>[^)]*)\)<\d+><[^>]*>: Info: Disconnected: (?P<why>.*)$")


def session_ends(dovecot: DovecotServer, user: str) -> list[str]:
    """The reason Dovecot logged for each ended IMAP session of ``user``, oldest first."""
    text = dovecot.log_path.read_text(errors="replace")
    return [
        m["why"]
        for line in text.splitlines()
        if (m := _SESSION_END.search(line)) is not None and m["user"] == user
    ]


async def wait_session_ends(dovecot: DovecotServer, user: str, count: int = 1) -> list[str]:
    """Wait until ``count`` sessions of ``user`` have ended; return every reason logged.

    Dovecot's log process writes the line right after the session ends, so this only
    waits for that write. Callers bound it with ``trio.fail_after``.
    """
    await poll_until(lambda: len(session_ends(dovecot, user)) >= count, interval=0.05)
    return session_ends(dovecot, user)


def all_logged_out(reasons: list[str]) -> bool:
    """True if every session ended with LOGOUT (none by a closed socket or a kick)."""
    return bool(reasons) and all(why.startswith("Logged out") for why in reasons)
