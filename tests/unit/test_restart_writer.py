"""Only the session task reads its IMAP connection, by structure: the process ticker is
given a :class:`~trio_idle.imap.connector.RestartWriter` (synchronous writes, no reads),
and mypy strict keeps it from calling anything else. These tests keep that interface
what the ticker may have, and the ticker typed against it."""

from __future__ import annotations

import inspect
from typing import get_type_hints

from trio_idle.imap.client import ImapConnection
from trio_idle.imap.connector import ImapLink, RestartWriter
from trio_idle.mailbox.ticker import IdleTimers


def members(protocol: type) -> dict[str, object]:
    return {
        name: value
        for name, value in vars(protocol).items()
        if not name.startswith("_") and callable(value)
    }


def test_the_ticker_s_view_of_a_connection_cannot_read_it() -> None:
    writer = members(RestartWriter)
    assert set(writer) == {"begin_restart", "check_restart"}
    # a coroutine here would let the ticker's task wait on (and read) the connection
    assert not [name for name, value in writer.items() if inspect.iscoroutinefunction(value)]


def test_the_ticker_holds_the_write_only_view_and_the_connection_provides_it() -> None:
    assert get_type_hints(IdleTimers.__init__)["link"] is RestartWriter
    assert RestartWriter in ImapLink.__mro__
    for name in members(RestartWriter):
        assert not inspect.iscoroutinefunction(getattr(ImapConnection, name)), name
