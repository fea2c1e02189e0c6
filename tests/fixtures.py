"""Builders and fakes the test layers share: one mailbox connection, a webhook client on a
scripted backend, a logger that records.

Plain functions and classes, importable from any layer: no pytest fixtures (those live in
the ``conftest.py`` files) and nothing that starts a server, a socket or the daemon (that
is :mod:`tests.harness`, which imports the whole runtime). A unit test that needs a
:class:`MailConnection` should not pull in the daemon to get one.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import httpx
from trio_idle_testing.recording_log import RecordingLog

from trio_idle.accounts.connections import AUTH_PASSWORD, MailConnection
from trio_idle.backend.webhook import WebhookClient
from trio_idle.core.secret import Secret

__all__ = ["Handler", "RecordingLog", "accept_all", "mail_connection", "mock_webhook"]


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


def mock_webhook(
    handler: Handler = accept_all,
    *,
    url: str = "http://backend.invalid/scan",
    secret: str = "virtual-admin-secret",
    total_timeout: float = 3600.0,
) -> WebhookClient:
    """A :class:`WebhookClient` whose requests go to ``handler`` through an
    ``httpx.MockTransport``: no sockets, so it runs under the autojump clock (the long
    default timeout never fires by itself there). One connection, no signing; the caller
    closes it (``aclose``). Real HTTP is tests/unit/test_webhook_client.py's business."""
    return WebhookClient(
        url,
        secret_header="x-admin-secret",
        secret=Secret(secret),
        signing_secret=None,
        total_timeout=total_timeout,
        max_connections=1,
        transport=httpx.MockTransport(handler),
    )
