"""Throwaway *real* servers for the test-suite (PostgreSQL and Dovecot).

The modules in this package know nothing about pytest; ``tests/conftest.py`` wraps them
in fixtures.  They only raise :class:`ServerUnavailable` when a server cannot be started
because something it needs (a binary, a system user) is missing on this machine; the
fixtures turn that into ``pytest.skip`` (or ``pytest.fail`` when the environment variable
``TRIO_IDLE_REQUIRE_SERVERS=1`` is set, as CI does).  Every other start-up problem is a
real error and is raised as :class:`ServerStartError` with the server's log attached.

Import these modules as ``tests.servers.postgres`` / ``tests.servers.dovecot`` (``tests``
is a namespace package; ``tests/conftest.py`` makes sure the repository root is on
``sys.path`` even under a plain ``pytest`` invocation).
"""

from __future__ import annotations

import socket
from pathlib import Path

__all__ = ["ServerStartError", "ServerUnavailable", "free_tcp_port", "tail"]


class ServerUnavailable(RuntimeError):
    """A server cannot run on this machine (missing binary or system user).

    Fixtures translate this into a skip, or a failure when CI requires the servers.
    """


class ServerStartError(RuntimeError):
    """A server binary exists but failed to start, stop or answer in time."""


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on *host* that was free a moment ago.

    The port is found by binding to port 0 and closing the socket again, so another
    process may grab it before the server binds it; the servers retry with a fresh
    port when that happens on their first start.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def tail(path: Path, max_chars: int = 4000) -> str:
    """Return the last *max_chars* characters of a log file ("" if it does not exist)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-max_chars:]
