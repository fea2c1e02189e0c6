"""Builders and fakes the test layers share: one mailbox connection, a webhook client on a
scripted backend, a logger that records.

Plain functions and classes, importable from any layer: no pytest fixtures (those live in
the ``conftest.py`` files) and nothing that starts a server, a socket or the daemon (that
is :mod:`tests.harness`, which imports the whole runtime). A unit test that needs a
:class:`MailConnection` should not pull in the daemon to get one.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, Final

import httpx
from trio_idle_testing.recording_log import RecordingLog

from trio_idle.accounts.connections import AUTH_PASSWORD, MailConnection
from trio_idle.backend.webhook import ATTEMPT_GRACE, BackendAuth, WebhookClient, backend_http
from trio_idle.core.crypto import derive_key, encrypt_password
from trio_idle.core.secret import Secret

__all__ = [
    "ROW_KEY",
    "ROW_PASSWORD",
    "Handler",
    "RecordingLog",
    "Wire",
    "accept_all",
    "connection_row",
    "mail_connection",
    "mock_webhook",
]


#: the key :func:`connection_row` encrypts its password with, and that password
ROW_KEY: Final = derive_key("K" * 32)
ROW_PASSWORD: Final = "imap-Passw0rd!"


def connection_row(**changes: Any) -> dict[str, Any]:
    """A valid row of the connection table, as the source reads it: connection ``c1`` of
    ``alice@example.com`` with :data:`ROW_PASSWORD` encrypted under :data:`ROW_KEY` (as
    the Node backend does), then ``changes`` (column name → value) applied."""
    row: dict[str, Any] = {
        "id": "c1",
        "userId": "u1",
        "email": "alice@example.com",
        "imapHost": "imap.example.com",
        "imapPort": 993,
        "imapUser": "alice",
        "encryptedPassword": encrypt_password(ROW_PASSWORD, ROW_KEY),
    }
    row.update(changes)
    return row


def mail_connection(
    conn_id: str = "c1",
    *,
    email: str = "alice@example.test",
    login: str | None = None,
    host: str = "127.0.0.1",
    port: int = 993,
    password: str = "",
    user_id: str | None = "u1",
    auth: str = AUTH_PASSWORD,
    refresh_token: str | None = None,
    security: str | None = None,
    provider: str | None = None,
) -> MailConnection:
    """One mailbox as :func:`~trio_idle.accounts.connections.build_connection` would give
    it from a valid row; ``login`` defaults to ``email``. Secrets are given as text and
    wrapped here, so every call makes fresh :class:`Secret` objects (as every refresh
    decrypts again)."""
    return MailConnection(
        id=conn_id,
        user_id=user_id,
        email=email,
        host=host,
        port=port,
        login=email if login is None else login,
        password=Secret(password),
        auth=auth,
        refresh_token=None if refresh_token is None else Secret(refresh_token),
        security=security,
        provider=provider,
    )


#: what ``httpx.MockTransport`` calls for each request: a reply, or a coroutine giving one
Handler = (
    Callable[[httpx.Request], httpx.Response]
    | Callable[[httpx.Request], Coroutine[Any, Any, httpx.Response]]
)


def accept_all(request: httpx.Request) -> httpx.Response:
    """A backend that accepts every request: 200 with an empty JSON object."""
    return httpx.Response(200, json={})


TEST_ADMIN_SECRET = "virtual-admin-secret"


def webhook_client(
    url: str,
    handler: Handler | None = None,
    *,
    secret: str | Secret = TEST_ADMIN_SECRET,
    total_timeout: float = 3600.0,
    max_connections: int = 1,
    **options: Any,
) -> WebhookClient:
    """A :class:`WebhookClient` posting to ``url`` with the ``x-admin-secret`` header:
    over the real network (loopback) or, given ``handler``, to it in memory
    (``httpx.MockTransport``: no sockets, virtual time works; the long default timeout
    never fires by itself under the autojump clock). ``options`` go to
    :func:`~trio_idle.backend.webhook.backend_http` (``stats``, ``trust_env``, ...); the
    attempt's grace is the daemon's unless given. The caller closes it (``aclose``)."""
    options.setdefault("grace", ATTEMPT_GRACE)
    transport = None if handler is None else httpx.MockTransport(handler)
    http = backend_http(total_timeout, max_connections, transport=transport, **options)
    secret = secret if isinstance(secret, Secret) else Secret(secret)
    return WebhookClient(url, BackendAuth("x-admin-secret", secret), http)


def mock_webhook(
    handler: Handler = accept_all,
    *,
    url: str = "http://backend.invalid/scan",
    total_timeout: float = 3600.0,
) -> WebhookClient:
    """:func:`webhook_client` in memory, to a made-up URL, accepting everything unless
    ``handler`` says otherwise."""
    return webhook_client(url, handler, total_timeout=total_timeout)


class Wire:
    """What :class:`~trio_idle.imap.aioimap.ImapProtocol` writes to in place of an asyncio
    transport (``connection_made(Wire())``): records the bytes written and the close."""

    def __init__(self) -> None:
        self.written = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed
