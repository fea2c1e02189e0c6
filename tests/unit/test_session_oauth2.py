"""An oauth2 connection's session against a scripted IMAP server in virtual time: where
its tokens come from, what a refused token, a missing grant and a failing token source
cost it (see :mod:`trio_idle.mailbox.session`)."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Any

import attrs
import trio
import trio.testing

from tests.unit import session_rig
from tests.unit.session_rig import (
    CONN,
    Rig,
    connected,
    make_rig,
    settled,
)
from trio_idle.accounts.connections import AUTH_OAUTH2, MailConnection
from trio_idle.accounts.credentials import (
    TOKEN_ERROR,
    TOKEN_REVOKED,
    TOKEN_UNAVAILABLE,
    AccessToken,
    TokenUnavailable,
)
from trio_idle.core.secret import Secret
from trio_idle.mailbox.session_states import AUTH_FAILED, BACKOFF, IDLE

OAUTH_CONN = attrs.evolve(CONN, auth=AUTH_OAUTH2, password=Secret(""))


class ScriptedTokens:
    """A :class:`~trio_idle.accounts.credentials.TokenSource` that mints ``tok-<n>`` (or raises
    what ``failures`` holds next) and records every call."""

    def __init__(self, user: str | None = None) -> None:
        self.calls: list[tuple[float, bool]] = []
        self.failures: list[TokenUnavailable] = []
        self.user = user
        self.minted = 0
        #: a source that never answers (its own deadline is the test's business)
        self.hang = False
        self._called = trio.Event()

    async def wait_calls(self, count: int) -> None:
        """Return once ``get`` has been called ``count`` times, the caller blocked again."""
        while len(self.calls) < count:
            await self._called.wait()
        await trio.testing.wait_all_tasks_blocked()

    async def get(self, conn: MailConnection, *, force: bool = False) -> AccessToken:
        self.calls.append((trio.current_time(), force))
        self._called.set()
        self._called = trio.Event()
        await trio.lowlevel.checkpoint()
        if self.hang:
            await trio.sleep_forever()
        if self.failures:
            raise self.failures.pop(0)
        if force or self.minted == 0:
            self.minted += 1
        return AccessToken(Secret(f"tok-{self.minted}"), 4e9, self.user)

    @property
    def forced(self) -> list[bool]:
        return [force for _, force in self.calls]


def oauth_rig(tokens: ScriptedTokens, **settings: Any) -> Rig:
    rig = make_rig(**settings)
    rig.env = attrs.evolve(rig.env, tokens=tokens)
    return rig


def running(
    rig: Rig, conn: MailConnection = OAUTH_CONN
) -> AbstractAsyncContextManager[trio.CancelScope]:
    """:func:`tests.unit.session_rig.running`, for the oauth2 connection by default."""
    return session_rig.running(rig, conn)


async def test_signs_in_with_a_token_instead_of_login(
    autojump_clock: trio.testing.MockClock,
) -> None:
    tokens = ScriptedTokens(user="alice@sasl.example")
    rig = oauth_rig(tokens)
    async with running(rig):
        await connected(rig)
    server = rig.server
    assert server.commands()[:4] == ["connect", "AUTHENTICATE", "SELECT", "IDLE"]
    assert server.calls[1].arg == "alice@sasl.example"  # the token's user wins
    assert server.tokens_seen == ["tok-1"] and tokens.forced == [False]


async def test_without_a_token_user_the_login_is_the_sasl_user(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rig = oauth_rig(ScriptedTokens())
    async with running(rig):
        await connected(rig)
    assert rig.server.calls[1].arg == "alice"


async def test_password_rows_still_log_in(autojump_clock: trio.testing.MockClock) -> None:
    tokens = ScriptedTokens()
    rig = oauth_rig(tokens)
    async with running(rig, CONN):
        await connected(rig)
    assert "LOGIN" in rig.server.commands() and tokens.calls == []


async def test_a_refused_token_is_replaced_once_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    tokens = ScriptedTokens()
    rig = oauth_rig(tokens)
    server = rig.server
    server.valid_tokens = {"tok-2"}  # the cached tok-1 has been revoked meanwhile
    async with running(rig):
        await connected(rig, link=2)
    assert server.tokens_seen == ["tok-1", "tok-2"]
    assert tokens.forced == [False, True]
    # no backoff: only the connect limiter's pace (50/s) between the two
    assert server.times("connect", 2)[0] - server.times("connect", 1)[0] <= 0.02
    assert rig.memory.state == IDLE and rig.stats.get("auth_failures") == 0
    assert rig.stats.get("token_failures", "refused") == 1
    assert any("access token refused" in t for t in rig.log.texts("info"))


async def test_a_revoked_grant_fails_after_exactly_one_forced_refresh(
    autojump_clock: trio.testing.MockClock,
) -> None:
    tokens = ScriptedTokens()
    rig = oauth_rig(tokens)
    server = rig.server
    server.valid_tokens = set()
    async with running(rig):
        await settled(rig, lambda: len(server.times("connect")) == 2 and server.link.closed)
        assert rig.memory.state == AUTH_FAILED
        assert tokens.forced == [False, True]
        assert rig.stats.get("auth_failures") == 1
        server.valid_tokens = {"tok-3"}  # the user reconnected the account in the app
        await connected(rig, link=3)
    first, second, third = (server.times("connect", n)[0] for n in (1, 2, 3))
    assert second - first <= 0.02 and third - second == 900.0  # the auth backoff
    assert tokens.forced == [False, True, True]  # after a refusal: always a fresh one
    assert server.tokens_seen == ["tok-1", "tok-2", "tok-3"]
    error = rig.log.texts("error")[0]
    assert "authentication failed" in error and "the access token was refused" in error
    assert "tok-" not in " ".join(rig.log.texts())


async def test_token_error_backs_off_as_a_connect_failure_and_honours_retry_after(
    autojump_clock: trio.testing.MockClock,
) -> None:
    tokens = ScriptedTokens()
    tokens.failures = [
        TokenUnavailable(TOKEN_ERROR, "token endpoint answered 503", retry_after=120)
    ]
    rig = oauth_rig(tokens)
    async with running(rig):
        await connected(rig)
        assert rig.memory.state == IDLE
    (t1, _), (t2, _) = tokens.calls
    assert t2 - t1 == 120.0  # Retry-After beats the 5 s first reconnect delay
    assert rig.server.times("connect") == [t2]  # no IMAP connection without a token
    warning = rig.log.texts("warning")[0]
    assert warning == (
        "[idle/alice@example.test] no access token (token_error): token endpoint answered "
        "503; next attempt in 2min"
    )
    assert rig.stats.get("token_failures", TOKEN_ERROR) == 1


async def test_no_grant_waits_the_auth_backoff(autojump_clock: trio.testing.MockClock) -> None:
    for reason in (TOKEN_UNAVAILABLE, TOKEN_REVOKED):
        tokens = ScriptedTokens()
        tokens.failures = [TokenUnavailable(reason, "backend has no OAuth2 grant (404)")]
        rig = oauth_rig(tokens)
        async with running(rig):
            await tokens.wait_calls(1)
            assert rig.memory.state == AUTH_FAILED
            assert rig.memory.last_error == "backend has no OAuth2 grant (404)"
            await connected(rig)
        (t1, _), (t2, _) = tokens.calls
        assert t2 - t1 == 900.0
        assert f"no access token ({reason})" in rig.log.texts("error")[0]


async def test_a_failing_token_source_costs_a_running_session_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    tokens = ScriptedTokens()
    rig = oauth_rig(tokens)
    server = rig.server
    async with running(rig):
        await connected(rig)
        tokens.hang = True  # the backend is down from now on
        await settled(rig, lambda: len(server.times("NOOP")) == 5)  # ticks go on
        assert rig.memory.state == IDLE and len(tokens.calls) == 1
        server.deliver()
        await trio.testing.wait_all_tasks_blocked()
        assert rig.coalescer.requested == 1  # mail is still noticed
        server.drop()  # only a reconnect needs a token
        await tokens.wait_calls(2)
        assert len(server.times("connect")) == 1


async def test_no_token_source_is_a_clear_error(autojump_clock: trio.testing.MockClock) -> None:
    rig = make_rig()
    async with running(rig):
        await trio.testing.wait_all_tasks_blocked()
        assert rig.memory.state == BACKOFF
    assert rig.memory.last_error == "no token source configured for oauth2 connections"
    assert rig.server.calls == []


async def test_the_token_is_scrubbed_from_errors(autojump_clock: trio.testing.MockClock) -> None:
    from trio_idle.core.errors import ImapError

    tokens = ScriptedTokens()
    rig = oauth_rig(tokens)
    rig.server.fail_next("SELECT", ImapError("SELECT failed: server quoted tok-1 back"))
    async with running(rig):
        await connected(rig, link=2)
    assert "tok-1" not in " ".join(rig.log.texts())
    assert any("server quoted ******** back" in t for t in rig.log.texts("warning"))
