"""Exception types shared by the daemon's layers. Messages never contain secrets.

An :class:`ImapError` may carry a machine-readable ``kind`` saying what failed, for the
account health (:mod:`trio_idle.mailbox.account_health`): for connect failures one of
:data:`CONNECT_KINDS`. ``None`` means the raiser did not say; the classifier then falls
back to the exception's class.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

#: the name of the host could not be resolved
KIND_DNS: Final = "dns"
#: nothing accepted the TCP connection, or every address is in a refused network
KIND_REFUSED: Final = "refused"
#: no answer in time (no greeting, no answer to a command)
KIND_TIMEOUT: Final = "timeout"
#: TLS failed: handshake, certificate, or no STARTTLS where it was required
KIND_TLS: Final = "tls"
#: the server closed the connection (or said BYE, or broke the protocol)
KIND_SERVER_CLOSED: Final = "server_closed"
CONNECT_KINDS: Final = (KIND_DNS, KIND_REFUSED, KIND_TIMEOUT, KIND_TLS, KIND_SERVER_CLOSED)

#: the exit code of every command for a configuration error (a bad setting, a missing
#: secret, a file that cannot be read): what supervisors and scripts test for
EXIT_CONFIG: Final = 2


class ImapError(Exception):
    """The IMAP connection failed or misbehaved; the client must be discarded.

    ``kind``: what failed, when the raiser knows (see the module docstring)."""

    def __init__(self, *args: object, kind: str | None = None) -> None:
        super().__init__(*args)
        self.kind = kind


class ImapConnectError(ImapError):
    """Could not establish the connection (DNS, TCP, TLS, greeting)."""


class ImapAuthError(ImapError):
    """The server rejected the login: retried only after a long backoff.

    ``server_text``: the server's own words (its ``NO`` line, password masked), when the
    raiser kept them apart from the message; ``sasl_status``: what an OAuth2 server said
    about the token in its SASL error challenge (Gmail's XOAUTH2 answers base64 JSON such
    as ``{"status":"401"}``, Dovecot's ``"invalid_token"``), ``None`` for a password login
    or a server that said nothing; ``mechanism``: the SASL mechanism used (``None`` for
    LOGIN). All are log-safe.
    """

    def __init__(
        self,
        *args: object,
        kind: str | None = None,
        server_text: str | None = None,
        sasl_status: str | None = None,
        mechanism: str | None = None,
    ) -> None:
        super().__init__(*args, kind=kind)
        self.server_text = server_text
        self.sasl_status = sasl_status
        self.mechanism = mechanism


class MailboxRefused(ImapError):
    """SELECT or EXAMINE answered NO: the mailbox does not exist (any more) or may not be
    opened. The connection itself is fine."""


class ConnectionLost(ImapError):
    """The server closed the connection, said BYE, or stopped answering."""


class SourceError(Exception):
    """The connection list could not be read; the message is safe to log."""


def leaf_exceptions(exc: BaseException) -> list[BaseException]:
    """The exceptions inside ``exc``: itself, or the leaves of an exception group (a
    nursery's, nested at any depth), in order. What an operator must be shown instead
    of ``ExceptionGroup: Exceptions from Trio nursery (1 sub-exception)``."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in leaf_exceptions(inner)]
    return [exc]


def describe(exc: BaseException, scrub: Callable[[object], str]) -> str:
    """``Type: text`` of each leaf of ``exc`` (:func:`leaf_exceptions`), joined with
    ``; ``; each text through ``scrub`` (it may quote a server or a DSN)."""
    parts = []
    for leaf in leaf_exceptions(exc):
        text = scrub(leaf)
        parts.append(f"{type(leaf).__name__}: {text}" if text else type(leaf).__name__)
    return "; ".join(parts)
