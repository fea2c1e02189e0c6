"""Opening a TCP socket to a host: resolved once, checked against refused networks.

Used for IMAP servers, whose host an end user typed: their addresses are checked against
``TRIO_IDLE_REFUSE_NETWORKS``. (The backend, an operator's URL, is reached with trio's
happy eyeballs instead: :mod:`trio_idle.backend.http_transport`.)
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Any

import trio

from trio_idle.core.destinations import Network, refusal_message, refused


class RefusedDestination(Exception):
    """Every address of the host is in a refused network; ``str()`` is the log line."""


async def resolve(host: str, port: int) -> list[tuple[int, Any]]:
    """Every ``(family, sockaddr)`` of ``host`` for TCP, in the resolver's order."""
    infos = await trio.socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    if not infos:
        raise socket.gaierror(socket.EAI_NONAME, "no addresses")
    return [(family, sockaddr) for family, _, _, _, sockaddr in infos]


async def open_socket(host: str, port: int, refuse: tuple[Network, ...] = ()) -> socket.socket:
    """A non-blocking TCP socket connected to an address of ``host`` that ``refuse`` allows.

    The host is resolved once, here, and the socket connected to exactly the addresses
    that were checked: nothing resolves the name again (no DNS-rebinding gap). Allowed
    addresses are tried in the resolver's order; if none connects, the first error is
    raised (:class:`RefusedDestination` if ``refuse`` allows none). The caller's cancel
    scope bounds it; never leaks a socket, also when cancelled.
    """
    addresses = await resolve(host, port)
    allowed = [(f, a) for f, a in addresses if refused(a[0], refuse) is None]
    if not allowed:
        shown = list(dict.fromkeys(str(a[0]) for _, a in addresses))
        raise RefusedDestination(refusal_message(host, shown))
    errors: list[OSError] = []
    for family, sockaddr in allowed:
        try:
            sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        except OSError as exc:  # e.g. no IPv6 on this machine: try the next address
            errors.append(exc)
            continue
        try:
            sock.setblocking(False)
            error = sock.connect_ex(sockaddr)
            if error in (errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK):
                await trio.lowlevel.wait_writable(sock)
                error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                raise OSError(error, os.strerror(error))  # e.g. ConnectionRefusedError
        except OSError as exc:
            close_socket(sock)
            errors.append(exc)
            continue
        except BaseException:
            close_socket(sock)
            raise
        return sock
    raise errors[0]


def close_socket(sock: socket.socket) -> None:
    """Close ``sock``, waking any trio task waiting on it."""
    trio.lowlevel.notify_closing(sock)
    sock.close()
