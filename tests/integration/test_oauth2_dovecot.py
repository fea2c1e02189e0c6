"""OAuth2 sign-in against a real Dovecot that checks tokens itself (oauth2 passdb,
introspection by POST to a local HTTP server here), with tokens from the backend's token
endpoint (:class:`~trio_idle_testing.backend.ScanBackend`'s token route) through the real
:class:`~trio_idle.auth.token_backend.BackendTokenSource`. Loopback only."""

from __future__ import annotations

import contextlib
import http.server
import itertools
import json
import random
import threading
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import trio
import trio.testing
from loguru import logger
from trio_idle_testing.backend import Reply, ScanBackend, ScanRequest

from tests.conftest import unavailable
from tests.fixtures import mail_connection
from tests.servers import ServerUnavailable
from tests.servers.dovecot import DovecotServer, DovecotUser
from trio_idle.accounts.connections import AUTH_OAUTH2, MailConnection
from trio_idle.accounts.credentials import TOKEN_ERROR
from trio_idle.auth.token_backend import BackendTokenSource
from trio_idle.core.config import GROUPS, OPTIONS, Settings
from trio_idle.core.errors import ImapAuthError
from trio_idle.core.limiter import ConnectLimiter
from trio_idle.core.secret import Secret
from trio_idle.core.stats import Stats
from trio_idle.imap.client import ImapTimeouts
from trio_idle.imap.connect import connect
from trio_idle.mailbox.coalescer import ScanCoalescer
from trio_idle.mailbox.session import ConnectionMemory, SessionEnv, run_session
from trio_idle.mailbox.session_states import AUTH_FAILED, BACKOFF, IDLE

ADMIN = "test-admin-secret-value"
TOKEN_PREFIX = "S3ntinel-oauth-"  # every token here: leak_guard fails a test that prints one
TIMEOUTS = ImapTimeouts(connect=10, command=10, keepalive_idle=60)


class Introspection:
    """The token introspection endpoint Dovecot asks: ``tokens`` maps token → user."""

    def __init__(self) -> None:
        self.tokens: dict[str, str] = {}
        self.asked: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                form = urllib.parse.parse_qs(self.rfile.read(length).decode())
                token = (form.get("token") or [""])[0]
                outer.asked.append(token)
                user = outer.tokens.get(token)
                body = json.dumps(
                    {"active": True, "username": user} if user else {"active": False}
                ).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/introspect"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def idp() -> Iterator[Introspection]:
    server = Introspection()
    yield server
    server.close()


@pytest.fixture(scope="module")
def oauth_dovecot(idp: Introspection) -> Iterator[DovecotServer]:
    try:
        server = DovecotServer(oauth2_introspection_url=idp.url)
    except ServerUnavailable as exc:
        unavailable(str(exc))
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


_minted = itertools.count(1)


def mint(idp: Introspection, user: str | None) -> str:
    """A new token; valid for ``user`` at Dovecot (None: a token Dovecot refuses)."""
    token = f"{TOKEN_PREFIX}{next(_minted)}-{random.randrange(10**9)}"
    if user is not None:
        idp.tokens[token] = user
    return token


def oauth_conn(user: DovecotUser, dovecot: DovecotServer) -> MailConnection:
    return mail_connection(
        f"id-{user.email}",
        email=user.email,
        host=dovecot.host,
        port=dovecot.plain_port,
        auth=AUTH_OAUTH2,
    )


def login_methods(dovecot: DovecotServer, email: str) -> list[str]:
    """The SASL method of every successful login of ``email`` in Dovecot's log."""
    methods = []
    for line in dovecot.log_path.read_text(errors="replace").splitlines():
        if f"Login: user=<{email}>" in line and "method=" in line:
            methods.append(line.split("method=", 1)[1].split(",", 1)[0])
    return methods


# -- the client against Dovecot ----------------------------------------------------------


@pytest.mark.parametrize("mechanism", ["OAUTHBEARER", "XOAUTH2"])
async def test_signs_in_with_each_mechanism(
    oauth_dovecot: DovecotServer, idp: Introspection, mechanism: str
) -> None:
    import trio_asyncio

    user = oauth_dovecot.new_user("oa")
    token = mint(idp, user.email)
    conn = oauth_conn(user, oauth_dovecot)
    async with trio_asyncio.open_loop():
        imap = await connect(conn, security="plain", context=None, timeouts=TIMEOUTS)
        try:
            caps = imap.protocol.capabilities
            assert {"AUTH=XOAUTH2", "AUTH=OAUTHBEARER"} <= caps
            if mechanism == "XOAUTH2":
                # as a server offering only XOAUTH2 (the set is shared: not changed)
                assert imap.protocol.learn_capabilities(list(caps - {"AUTH=OAUTHBEARER"}))
            await imap.authenticate_oauth2(user.email, token)
            await imap.select("INBOX")
        finally:
            with trio.CancelScope(shield=True):
                await imap.logout(2.0)
    assert token in idp.asked
    assert login_methods(oauth_dovecot, user.email) == [mechanism]


async def test_a_bad_token_is_refused_with_dovecots_status(
    oauth_dovecot: DovecotServer, idp: Introspection
) -> None:
    import trio_asyncio

    user = oauth_dovecot.new_user("oa")
    token = mint(idp, None)
    async with trio_asyncio.open_loop():
        imap = await connect(
            oauth_conn(user, oauth_dovecot), security="plain", context=None, timeouts=TIMEOUTS
        )
        try:
            with pytest.raises(ImapAuthError) as info:
                await imap.authenticate_oauth2(user.email, token)
        finally:
            with trio.CancelScope(shield=True):
                await imap.logout(2.0)
    assert "AUTHENTICATIONFAILED" in str(info.value) and token not in str(info.value)
    assert info.value.sasl_status is not None  # Dovecot sends its JSON error challenge
    assert login_methods(oauth_dovecot, user.email) == []


# -- sessions with tokens from the backend ---------------------------------------------------


def make_settings(**values: Any) -> Settings:
    groups: dict[str, dict[str, Any]] = {}
    for option in OPTIONS:
        if option.field in values:
            groups.setdefault(option.group, {})[option.field] = values.pop(option.field)
    assert not values, values
    return Settings(**{g: GROUPS[g](**fields) for g, fields in groups.items()})


class TokenEndpoint:
    """The backend's token route: mints a token per request, valid at Dovecot unless
    the connection's grant was revoked; records ``force`` of every request."""

    def __init__(self, backend: ScanBackend, idp: Introspection, clock: list[float]) -> None:
        self.idp = idp
        self.clock = clock
        self.revoked: set[str] = set()
        self.lifetime = 3600.0
        self.issued: dict[str, list[str]] = {}
        self.forced: dict[str, list[bool]] = {}
        backend.token_reply = self

    def __call__(self, request: ScanRequest) -> Reply:
        email = str(request.body.get("email"))
        self.forced.setdefault(email, []).append(bool(request.body.get("force")))
        token = mint(self.idp, None if email in self.revoked else email)
        self.issued.setdefault(email, []).append(token)
        return Reply(json={"accessToken": token, "expiresAt": self.clock[0] + self.lifetime})


@contextlib.asynccontextmanager
async def sessions(
    backend: ScanBackend, *conns: MailConnection, clock: list[float]
) -> AsyncIterator[tuple[dict[str, ConnectionMemory], Stats]]:
    import trio_asyncio

    settings = make_settings(
        imap_security="plain",
        backend_url=backend.url,
        admin_secret=Secret(ADMIN),
        backoff_initial=0.2,  # a kicked session is back at once
    )
    tokens = BackendTokenSource.from_settings(settings.webhook)
    tokens._now = lambda: clock[0]  # the wall clock tokens expire by, moved by the tests
    env = SessionEnv(
        imap=settings.imap,
        timers=settings.timers,
        backoff=settings.backoff,
        start_from=settings.store.start_from,
        limiter=ConnectLimiter(20, 50.0),
        ssl_context=None,
        stats=Stats(),
        tokens=tokens,
    )
    memories = {c.email: ConnectionMemory() for c in conns}
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        for c in conns:
            nursery.start_soon(run_session, c, env, ScanCoalescer(), memories[c.email], logger)
        with trio.fail_after(30):
            yield memories, env.stats
        nursery.cancel_scope.cancel()
    await tokens.aclose()


async def until(condition: Any) -> None:
    # session state has no event to wait on: poll, bounded by the caller's deadline
    while not condition():  # noqa: ASYNC110
        await trio.sleep(0.02)


async def test_an_expiring_token_is_replaced_before_reconnecting(
    oauth_dovecot: DovecotServer, idp: Introspection, backend: ScanBackend
) -> None:
    clock = [1_800_000_000.0]
    endpoint = TokenEndpoint(backend, idp, clock)
    user = oauth_dovecot.new_user("oa")
    async with sessions(backend, oauth_conn(user, oauth_dovecot), clock=clock) as (mem, _):
        await until(lambda: mem[user.email].state == IDLE)
        first = endpoint.issued[user.email][0]
        clock[0] += endpoint.lifetime - 60  # the token now expires within refresh_ahead
        del idp.tokens[first]  # and the provider would no longer take it
        oauth_dovecot.kick(user.email)
        await until(lambda: mem[user.email].sessions == 2 and mem[user.email].state == IDLE)
    assert endpoint.forced[user.email] == [False, False]  # renewed ahead, not refused
    assert idp.asked.count(endpoint.issued[user.email][1]) == 1
    assert first not in idp.asked[idp.asked.index(first) + 1 :]


async def test_a_revoked_grant_is_an_auth_failure_after_one_forced_refresh(
    oauth_dovecot: DovecotServer, idp: Introspection, backend: ScanBackend
) -> None:
    clock = [1_800_000_000.0]
    endpoint = TokenEndpoint(backend, idp, clock)
    user = oauth_dovecot.new_user("oa")
    async with sessions(backend, oauth_conn(user, oauth_dovecot), clock=clock) as (mem, stats):
        await until(lambda: mem[user.email].state == IDLE)
        idp.tokens.pop(endpoint.issued[user.email][0])  # the user revoked access
        endpoint.revoked.add(user.email)
        oauth_dovecot.kick(user.email)
        await until(lambda: mem[user.email].state == AUTH_FAILED)
        assert endpoint.forced[user.email] == [False, True]
        assert stats.get("auth_failures") == 1
    assert "AUTHENTICATIONFAILED" in (mem[user.email].last_error or "")


async def test_token_endpoint_down_keeps_running_sessions_and_backs_off_new_ones(
    oauth_dovecot: DovecotServer, idp: Introspection, backend: ScanBackend
) -> None:
    clock = [1_800_000_000.0]
    TokenEndpoint(backend, idp, clock)
    running, late = oauth_dovecot.new_user("oa"), oauth_dovecot.new_user("ob")
    async with sessions(backend, oauth_conn(running, oauth_dovecot), clock=clock) as (mem, _):
        await until(lambda: mem[running.email].state == IDLE)
        backend.down()
        async with trio.open_nursery() as nursery:
            late_memory = ConnectionMemory()
            settings = make_settings(
                imap_security="plain", backend_url=backend.url, admin_secret=Secret(ADMIN)
            )
            source = BackendTokenSource.from_settings(settings.webhook)
            env = SessionEnv(
                ConnectLimiter(20, 50.0),
                None,
                Stats(),
                imap=settings.imap,
                timers=settings.timers,
                backoff=settings.backoff,
                start_from=settings.store.start_from,
                tokens=source,
            )
            nursery.start_soon(
                run_session, oauth_conn(late, oauth_dovecot), env, ScanCoalescer(),
                late_memory, logger,
            )  # fmt: skip
            await until(lambda: late_memory.state == BACKOFF)
            nursery.cancel_scope.cancel()
        await source.aclose()
        assert env.stats.get("token_failures", TOKEN_ERROR) >= 1
        assert "token endpoint unreachable" in (late_memory.last_error or "")
        assert mem[running.email].state == IDLE
        assert await trio.to_thread.run_sync(oauth_dovecot.connections, running.email) == 1
    backend.up()


async def test_a_slow_token_endpoint_does_not_delay_other_mailboxes(
    oauth_dovecot: DovecotServer, idp: Introspection, backend: ScanBackend
) -> None:
    clock = [1_800_000_000.0]
    TokenEndpoint(backend, idp, clock)
    slow, fast = oauth_dovecot.new_user("oa"), oauth_dovecot.new_user("ob")
    gate = backend.hold(slow.email)
    async with sessions(
        backend, oauth_conn(slow, oauth_dovecot), oauth_conn(fast, oauth_dovecot), clock=clock
    ) as (mem, _):
        await until(lambda: mem[fast.email].state == IDLE)
        assert mem[slow.email].sessions == 0 and gate.waiting == 1
        gate.release()
        await until(lambda: mem[slow.email].state == IDLE)
