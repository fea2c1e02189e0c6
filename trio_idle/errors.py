"""Exception types shared by the daemon's layers. Messages never contain secrets."""

from __future__ import annotations


class ImapError(Exception):
    """The IMAP connection failed or misbehaved; the client must be discarded."""


class ImapConnectError(ImapError):
    """Could not establish the connection (DNS, TCP, TLS, greeting)."""


class ImapAuthError(ImapError):
    """The server rejected the login: retried only after a long backoff.

    ``status`` is what an OAuth2 server said about the token in its SASL error
    challenge (Gmail's ``{"status": "401", ...}``, Dovecot's ``"invalid_token"``),
    ``None`` for a password login or a server that said nothing; ``mechanism`` is the
    SASL mechanism used (``None`` for LOGIN). Both are log-safe.
    """

    def __init__(
        self, message: str, *, status: str | None = None, mechanism: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.mechanism = mechanism


class ConnectionLost(ImapError):
    """The server closed the connection, said BYE, or stopped answering."""


class SourceError(Exception):
    """The connection list could not be read; the message is safe to log."""
