"""Exception types shared by the daemon's layers. Messages never contain secrets."""

from __future__ import annotations


class ImapError(Exception):
    """The IMAP connection failed or misbehaved; the client must be discarded."""


class ImapConnectError(ImapError):
    """Could not establish the connection (DNS, TCP, TLS, greeting)."""


class ImapAuthError(ImapError):
    """The server rejected the login: retried only after a long backoff."""


class ConnectionLost(ImapError):
    """The server closed the connection, said BYE, or stopped answering."""


class SourceError(Exception):
    """The connection list could not be read; the message is safe to log."""
