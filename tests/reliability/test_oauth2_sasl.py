"""OAuth2 sign-in over real sockets: our aioimaplib-driven SASL against the test server
(XOAUTH2 and OAUTHBEARER, with and without SASL-IR, and Gmail's error dance)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest
import trio
import trio_asyncio
from trio_idle_testing import ImapTestServer

from tests.fixtures import mail_connection
from trio_idle.accounts.connections import AUTH_OAUTH2, MailConnection
from trio_idle.core.errors import ImapAuthError
from trio_idle.core.secret import Secret
from trio_idle.imap.client import ImapConnection, ImapTimeouts
from trio_idle.imap.connect import connect

A = "alice@oauth.test"
GOOD = "S3ntinel-oauth-good-token"
BAD = "S3ntinel-oauth-bad-token"
TIMEOUTS = ImapTimeouts(connect=5, command=5, keepalive_idle=60)


def setup(server: ImapTestServer, mechanisms: tuple[str, ...], sasl_ir: bool) -> MailConnection:
    server.add_user(A, "unused-password")
    server.oauth2_check = lambda user, token: token == GOOD
    server.oauth2_mechanisms = mechanisms
    server.sasl_ir = sasl_ir
    return mail_connection("c", user_id=None, email=A, port=server.port, auth=AUTH_OAUTH2)


@contextlib.asynccontextmanager
async def connected(conn: MailConnection) -> AsyncIterator[ImapConnection]:
    """A plain-text connection to ``conn``'s server, not signed in yet; LOGOUT after."""
    async with trio_asyncio.open_loop():
        imap = await connect(conn, security="plain", context=None, timeouts=TIMEOUTS)
        try:
            yield imap
        finally:
            with trio.CancelScope(shield=True):
                await imap.logout(1.0)


@pytest.mark.parametrize("mechanisms", [("XOAUTH2",), ("XOAUTH2", "OAUTHBEARER")])
@pytest.mark.parametrize("sasl_ir", [True, False])
async def test_a_good_token_signs_in(
    server: ImapTestServer, mechanisms: tuple[str, ...], sasl_ir: bool
) -> None:
    async with connected(setup(server, mechanisms, sasl_ir)) as imap:
        await imap.authenticate_oauth2(A, GOOD)
        state = await imap.select("INBOX")  # only valid once signed in
    assert state.exists == 0
    assert server.stats.logins == 1
    want = "OAUTHBEARER" if "OAUTHBEARER" in mechanisms else "XOAUTH2"
    assert server.stats.commands["AUTHENTICATE"] == 1
    assert server.oauth2_attempts == [want]


@pytest.mark.parametrize("mechanisms", [("XOAUTH2",), ("OAUTHBEARER",)])
@pytest.mark.parametrize("sasl_ir", [True, False])
async def test_a_bad_token_gets_the_error_dance_and_its_status(
    server: ImapTestServer, mechanisms: tuple[str, ...], sasl_ir: bool
) -> None:
    async with connected(setup(server, mechanisms, sasl_ir)) as imap:
        with trio.fail_after(10), pytest.raises(ImapAuthError) as info:
            await imap.authenticate_oauth2(A, BAD)
    error = info.value
    assert error.sasl_status == "401" and error.mechanism == (
        "OAUTHBEARER" if "OAUTHBEARER" in mechanisms else "XOAUTH2"
    )
    assert "AUTHENTICATIONFAILED" in str(error) and "token status 401" in str(error)
    assert BAD not in str(error)
    assert server.stats.login_failures == 1 and server.stats.bad == 0
    assert server.oauth2_attempts == [error.mechanism]


async def test_check_login_signs_oauth2_rows_in_with_a_backend_token(
    server: ImapTestServer,
) -> None:
    import httpx

    from trio_idle.auth.token_backend import BackendTokenSource, token_http
    from trio_idle.backend.webhook import BackendAuth
    from trio_idle.core.config import Settings
    from trio_idle.operator_commands import try_login

    conn = setup(server, ("XOAUTH2", "OAUTHBEARER"), True)
    replies = iter([GOOD, BAD])

    def endpoint(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"accessToken": next(replies), "expiresAt": 4e9})

    tokens = BackendTokenSource(
        "http://127.0.0.1:1/t", BackendAuth("x", Secret("s")),
        token_http(5, transport=httpx.MockTransport(endpoint)), refresh_ahead=300,
    )  # fmt: skip
    import attrs

    plain = Settings()
    plain = attrs.evolve(plain, imap=attrs.evolve(plain.imap, imap_security="plain"))
    async with trio_asyncio.open_loop():
        assert await try_login(conn, plain, None, tokens) is None
        tokens.forget(conn.id)
        error = await try_login(conn, plain, None, tokens)
        assert await try_login(conn, plain, None, None) == (
            "no token source for oauth2 connections"
        )
    await tokens.aclose()
    assert error is not None and "token status 401" in error and BAD not in error
    assert server.stats.logins == 1
