"""Opening an IMAP connection: TCP, TLS or STARTTLS, the greeting, and what a failure means.

:func:`connect` is the one way a session gets an
:class:`~trio_idle.imap.client.ImapConnection`: the socket is opened by
:func:`~trio_idle.net.tcp_connect.open_socket` (refused networks checked on each address),
TLS verifies the name the user typed, the greeting and CAPABILITY (and STARTTLS) are
the connection's own :meth:`~trio_idle.imap.client.ImapConnection.handshake`. Every
failure becomes one :class:`~trio_idle.core.errors.ImapConnectError` whose text says
what went wrong (DNS, refused, TLS trust, no greeting, closed) and whose ``kind``
(:func:`connect_error_kind`) the account health report uses.
"""

from __future__ import annotations

import socket
import ssl
from typing import Final

import trio

from trio_idle.accounts.connections import MailConnection
from trio_idle.core.destinations import DEFAULT_NETWORKS, Network
from trio_idle.core.errors import (
    KIND_DNS,
    KIND_REFUSED,
    KIND_SERVER_CLOSED,
    KIND_TIMEOUT,
    KIND_TLS,
    ConnectionLost,
    ImapConnectError,
    ImapError,
)
from trio_idle.imap.aioimap import ImapProtocol
from trio_idle.imap.client import BadGreeting, ImapConnection, ImapTimeouts, NoStartTls
from trio_idle.imap.framing import DEFAULT_LIMITS, ImapLimits
from trio_idle.imap.push_monitor import PushMonitor
from trio_idle.net.tcp_connect import RefusedDestination, open_socket
from trio_idle.net.transport import ImapTransport, TransportClosed

IMPLICIT_TLS_PORT: Final = 993
STARTTLS_PORT: Final = 143


def resolve_security(mode: str, port: int) -> str:
    """``auto`` picks by port: 993 → tls, 143 → starttls, anything else → tls."""
    if mode != "auto":
        return mode
    return "starttls" if port == STARTTLS_PORT else "tls"


def make_ssl_context(ca_file: str | None) -> ssl.SSLContext:
    """One verifying client context shared by all sessions (contexts are costly).

    System CAs are always trusted; ``ca_file`` adds private CAs on top.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


async def connect(
    conn: MailConnection,
    *,
    security: str,
    context: ssl.SSLContext | None,
    timeouts: ImapTimeouts,
    refuse: tuple[Network, ...] = DEFAULT_NETWORKS,
    limits: ImapLimits = DEFAULT_LIMITS,
) -> ImapConnection:
    """Open TCP (+TLS or STARTTLS), wait for the greeting and capabilities.

    Raises :class:`ImapConnectError` with a diagnosis (DNS, refused, TLS trust, no or a
    refusing greeting, closed during the handshake) within ``timeouts.connect`` seconds.
    No connection is attempted to an address in ``refuse`` (``TRIO_IDLE_REFUSE_NETWORKS``;
    see :mod:`trio_idle.core.destinations`): if the host has no other address, the error says
    so. TLS verifies the certificate against ``conn.host``, not the address.

    What the server sends is bounded by ``limits`` from the first byte on. Cancelled or
    failed, it leaves no socket open.
    """
    monitor = PushMonitor()
    where = f"{conn.host}:{conn.port}"
    imap: ImapConnection | None = None
    try:
        with trio.fail_after(timeouts.connect):
            sock = await open_socket(conn.host, conn.port, refuse)
            transport = ImapTransport(sock)
            protocol = ImapProtocol(monitor, limits)
            protocol.connection_made(transport)
            imap = ImapConnection(
                protocol, monitor, timeouts, transport, host=conn.host, port=conn.port
            )
            _set_keepalive(sock, timeouts.keepalive_idle)
            if security != "plain" and context is None:
                context = make_ssl_context(None)  # never plaintext for want of a context
            if security == "tls":
                assert context is not None
                await transport.start_tls(context, conn.host)
            await imap.handshake(security, context)
    except BaseException as exc:
        if imap is not None:
            imap.abort()
        if not isinstance(exc, Exception):
            raise
        raise _connect_error(exc, conn, where, timeouts, monitor) from None
    if monitor.problem() is not None:
        imap.abort()
        raise ImapConnectError(f"{where}: {monitor.problem()}", kind=KIND_SERVER_CLOSED)
    return imap


def _connect_error(
    exc: Exception, conn: MailConnection, where: str, timeouts: ImapTimeouts, monitor: PushMonitor
) -> Exception:
    """The :class:`ImapConnectError` a failed :func:`connect` raises (or ``exc`` itself
    if it is not a connect failure, e.g. a bug)."""
    if isinstance(exc, trio.TooSlowError):
        return ImapConnectError(
            f"no IMAP greeting from {where} within {timeouts.connect:g}s", kind=KIND_TIMEOUT
        )
    if isinstance(exc, NoStartTls):
        return ImapConnectError(f"{where} does not offer STARTTLS", kind=KIND_TLS)
    if isinstance(exc, BadGreeting):
        return ImapConnectError(f"{where} failed the IMAP greeting: {exc}", kind=KIND_SERVER_CLOSED)
    if isinstance(exc, RefusedDestination):
        return ImapConnectError(str(exc), kind=KIND_REFUSED)
    if isinstance(exc, (ConnectionLost, TransportClosed)):
        problem = monitor.problem() or "connection lost (closed by server)"
        return ImapConnectError(f"{where}: {problem}", kind=KIND_SERVER_CLOSED)
    if isinstance(exc, ImapError):
        return ImapConnectError(f"{where}: {exc}", kind=KIND_SERVER_CLOSED)
    if isinstance(exc, (TimeoutError, OSError)):
        return ImapConnectError(
            _describe_connect_error(exc, conn.host, conn.port), kind=connect_error_kind(exc)
        )
    return exc


def _describe_connect_error(exc: BaseException, host: str, port: int) -> str:
    where = f"{host}:{port}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate of {where} not trusted: {exc.verify_message} (see --ca-file)"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake with {where} failed: {exc.reason or exc}"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve {host}: {exc.strerror}"
    if isinstance(exc, ConnectionRefusedError):
        return f"connection to {where} refused"
    if isinstance(exc, OSError):
        return f"cannot connect to {where}: {exc.strerror or exc}"
    return f"cannot connect to {where}: {type(exc).__name__}: {exc}"


def connect_error_kind(exc: BaseException) -> str:
    """The :mod:`trio_idle.core.errors` kind of what :func:`_describe_connect_error` describes."""
    if isinstance(exc, ssl.SSLError):
        return KIND_TLS
    if isinstance(exc, socket.gaierror):
        return KIND_DNS
    if isinstance(exc, TimeoutError):
        return KIND_TIMEOUT
    if isinstance(exc, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)):
        return KIND_SERVER_CLOSED
    if isinstance(exc, OSError):
        return KIND_REFUSED
    return KIND_SERVER_CLOSED


def _set_keepalive(sock: socket.socket, idle: float) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if hasattr(socket, "TCP_KEEPIDLE"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, int(idle)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 15)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 4)
