"""Every caller of the daemon's one HTTP client (trio_idle/backend/client.py) on real
sockets on 127.0.0.1: the scan webhook, the backend's token source, the daemon's own
refresh at a provider and the health pinger get the same plumbing — a timeout names the
limit that fired, a kept-alive connection the server dropped is sent again once and
counted, and only calls to our backend tell the backend watch."""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Final

import h11
import pytest
import trio
import trio.testing

from tests.fixtures import webhook_client
from trio_idle.accounts.connections import AUTH_OAUTH2, MailConnection
from trio_idle.accounts.credentials import TokenSource, TokenUnavailable
from trio_idle.auth.token_backend import BackendTokenSource, make_token_source, token_http
from trio_idle.auth.token_refresh import RefreshingTokens
from trio_idle.backend.watch import BackendWatch
from trio_idle.backend.webhook import BackendAuth, ScanJob, WebhookClient
from trio_idle.core.backoff import BackoffPolicy
from trio_idle.core.config import OAuthSettings, parse_settings
from trio_idle.core.crypto import derive_key
from trio_idle.core.secret import Secret
from trio_idle.core.stats import Stats
from trio_idle.ops.http_serve import Received, encode_response, read_request
from trio_idle.ops.pinger import ping_client, ping_once

SECRET = "backend-client-ADMIN-s3cret"
#: one answer every caller accepts: a scan reply, a backend token and a provider token
ANSWER = json.dumps(
    {
        "scanned": 1,
        "blocked": 0,
        "accessToken": "tok-backend",
        "expiresAt": 4e9,
        "access_token": "tok-provider",
        "expires_in": 3600,
    }
).encode()

#: one request with a caller's own semantics: its error text, or None if it went well
One = Callable[[], Awaitable[str | None]]


def conn(refresh: str | None = None) -> MailConnection:
    return MailConnection(
        id="c1",
        user_id="u1",
        email="alice@gmail.com",
        host="imap.gmail.com",
        port=993,
        login="alice@gmail.com",
        password=Secret(""),
        auth=AUTH_OAUTH2,
        refresh_token=None if refresh is None else Secret(refresh),
    )


@contextlib.asynccontextmanager
async def caller(name: str, url: str, stats: Stats, total: float = 30.0) -> AsyncIterator[One]:
    """``name``'s client towards ``url`` (each phase ``total``), as the daemon builds it,
    and a function sending one request with it."""
    closing: Callable[[], Awaitable[None]]
    if name == "scan":
        webhook = webhook_client(url, secret=SECRET, total_timeout=total, stats=stats)
        job = ScanJob("c1", "u1", "alice@gmail.com", "INBOX", "exists")

        async def one() -> str | None:
            reply = await webhook.send(job)
            return None if reply.status == 200 else reply.detail

        closing = webhook.aclose
    elif name == "ping":
        client = ping_client(total, False, stats)

        async def one() -> str | None:
            return await ping_once(client, url)

        closing = client.aclose
    else:
        source: TokenSource
        if name == "backend-token":
            auth = BackendAuth("x-admin-secret", Secret(SECRET))
            backend = BackendTokenSource(
                url, auth, token_http(total, stats=stats), refresh_ahead=60
            )
            source, closing, row = backend, backend.aclose, conn()
        else:
            oauth = OAuthSettings(
                google_client_id="cid",
                google_client_secret=Secret("provider-cl1ent-s3cret"),
                google_token_url=url,
                oauth_timeout=total,
                oauth_rate=1000.0,
            )
            refreshing = RefreshingTokens(
                oauth,
                key=derive_key("backend-client-test-key-0123456789abcdef"),
                backend=None,
                retry=BackoffPolicy(0.0, 0.0),
                revoked_retry=BackoffPolicy(0.0, 0.0),
                stats=stats,
            )
            source, closing, row = refreshing, refreshing.aclose, conn("provider-r3fresh-token")

        async def one() -> str | None:
            try:
                await source.get(row, force=True)
            except TokenUnavailable as exc:
                return str(exc)
            return None

    try:
        yield one
    finally:
        await closing()


#: each caller and how its errors name the peer
CALLERS: Final = {
    "scan": "backend",
    "backend-token": "token endpoint",
    "provider-token": "google token endpoint",
    "ping": "ping receiver",
}


Handler = Callable[[trio.SocketStream, int], Awaitable[None]]


async def raw_server(nursery: trio.Nursery, handler: Handler) -> str:
    """A TCP server on 127.0.0.1 playing ``handler`` (with the connection's number) on
    each connection; its base URL."""
    count = 0

    async def guarded(stream: trio.SocketStream) -> None:
        nonlocal count
        count += 1
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await handler(stream, count)

    listeners = await nursery.start(functools.partial(trio.serve_tcp, host="127.0.0.1"), guarded, 0)
    return f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"


async def answer_each(stream: trio.SocketStream, number: int, *, drop_second: bool) -> None:
    """Answer every request with :data:`ANSWER`; with ``drop_second``, the first
    connection's second request is met by a close instead (a keep-alive timeout)."""
    conn = h11.Connection(h11.SERVER)
    served = 0
    while True:
        request = await read_request(conn, stream, max_body=65536, chunk=65536)
        if not isinstance(request, Received):
            return
        served += 1
        if drop_second and number == 1 and served == 2:
            return
        headers = [("content-type", "application/json"), ("content-length", str(len(ANSWER)))]
        await stream.send_all(encode_response(conn, 200, headers, ANSWER))
        conn.start_next_cycle()


@pytest.mark.parametrize("name", CALLERS)
async def test_a_connect_timeout_is_named_with_its_limit_by_every_caller(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, name: str
) -> None:
    """A TLS handshake the server never answers, with a 30 s total: each caller's error
    says the connect timeout (10 s) fired, not "no answer within 30s"."""

    async def never_greet(stream: trio.SocketStream, number: int) -> None:
        await trio.sleep_forever()

    host = await raw_server(nursery, never_greet)
    with trio.fail_after(60):
        async with caller(name, f"https://{host}/endpoint", Stats()) as one:
            error = await one()
    assert error == f"{CALLERS[name]} did not accept a connection within 10s (connect timeout)"


@pytest.mark.parametrize("name", ["scan", "backend-token", "provider-token"])
async def test_a_dropped_keep_alive_connection_is_sent_again_once_and_counted(
    nursery: trio.Nursery, name: str
) -> None:
    """The server closes the kept-alive connection as the second request goes out on it:
    the request goes again at once on a fresh connection (no error for the caller), and
    the operator's counter says so, whichever caller it was. (A ping keeps no connection:
    its answer is never read, so its connection is closed.)"""
    host = await raw_server(nursery, functools.partial(answer_each, drop_second=True))
    stats = Stats()
    with trio.fail_after(10):
        async with caller(name, f"http://{host}/endpoint", stats, total=10.0) as one:
            assert [await one(), await one()] == [None, None]
    assert stats.get("backend_stale_connection_retries") == 1


async def test_only_calls_to_our_backend_tell_the_backend_watch() -> None:
    """Readiness asks whether the backend answers: as the daemon wires them, a token
    request the backend leaves unanswered counts like a scan; a provider's token endpoint
    being down does not."""
    with trio.socket.socket() as sock:  # a port nobody listens on
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = parse_settings(
        {
            "ADMIN_SECRET": SECRET,
            "ENCRYPTION_KEY": "k" * 32,
            "TRIO_IDLE_SOURCE": "file",
            "TRIO_IDLE_CONNECTIONS_FILE": "unused.toml",
            "TRIO_IDLE_STATE": "none",
            "BACKEND_URL": f"http://127.0.0.1:{port}",
            "TRIO_IDLE_GOOGLE_CLIENT_ID": "cid",
            "TRIO_IDLE_GOOGLE_CLIENT_SECRET": "provider-cl1ent-s3cret",
            "TRIO_IDLE_GOOGLE_TOKEN_URL": f"http://127.0.0.1:{port}/token",
        }
    )
    watch = BackendWatch()
    tokens = make_token_source(settings, {}, watch=watch)
    webhook = WebhookClient.from_settings(settings.webhook, watch=watch)
    try:
        with trio.fail_after(10):
            with pytest.raises(TokenUnavailable, match="google token endpoint unreachable"):
                await tokens.get(conn("provider-r3fresh-token"))
            assert watch.failing_since is None
            with pytest.raises(TokenUnavailable, match=r"^token endpoint unreachable"):
                await tokens.get(conn())
            assert watch.failing_since is not None
            watch.answered()
            reply = await webhook.send(ScanJob("c1", "u1", "alice@gmail.com", "INBOX", "exists"))
            assert reply.detail == "backend unreachable (connection refused)"
            assert watch.failing_since is not None
            assert webhook.backend is watch
    finally:
        await tokens.aclose()
        await webhook.aclose()
