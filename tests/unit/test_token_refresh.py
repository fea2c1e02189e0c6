"""The daemon's own OAuth2 refresh against a real token endpoint on 127.0.0.1
(:class:`~trio_idle_testing.oauth_server.OAuthTestServer`): caching, refresh ahead of
expiry, one refresh in flight, backoff, revocation, timeouts, and rotation kept across a
restart in SQLite and Postgres."""

from __future__ import annotations

import sqlite3
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import httpx
import pytest
import trio
import trio.testing
from trio_idle_testing.oauth_server import Fault, OAuthTestServer

from tests.fixtures import mail_connection
from trio_idle.accounts.connections import AUTH_OAUTH2, MailConnection
from trio_idle.accounts.credentials import (
    TOKEN_ERROR,
    TOKEN_REVOKED,
    TOKEN_UNAVAILABLE,
    AccessToken,
    TokenUnavailable,
)
from trio_idle.accounts.providers import MICROSOFT_SCOPE
from trio_idle.auth.token_refresh import (
    REFRESH_AHEAD,
    PerConnectionTokens,
    RefreshingTokens,
)
from trio_idle.core.backoff import BackoffPolicy
from trio_idle.core.config import OAuthSettings
from trio_idle.core.crypto import derive_key
from trio_idle.core.secret import Secret
from trio_idle.imap.asyncio_loop import open_asyncio_loop
from trio_idle.state.postgres import PostgresBackend
from trio_idle.state.records import TokenBackend
from trio_idle.state.sqlite import SqliteBackend
from trio_idle.state.tables import POSTGRES_TOKEN_TABLE

CLIENT_ID = "trio-idle-test-client"
CLIENT_SECRET = "oauth-cl1ent-s3cret-http"
KEY = derive_key("oauth-test-key-0123456789abcdef-xyz")
PREFIX = "S3ntinel-"  # every refresh and access token the server issues starts so


class Wall:
    """The clock of token expiry, moved by the test (epoch seconds)."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def server(nursery: trio.Nursery) -> OAuthTestServer:
    oauth = OAuthTestServer(CLIENT_ID, CLIENT_SECRET, prefix=PREFIX)
    await nursery.start(oauth.serve)
    return oauth


def settings_for(server: OAuthTestServer, **kw: object) -> OAuthSettings:
    values: dict[str, object] = {
        "google_client_id": CLIENT_ID,
        "google_client_secret": Secret(CLIENT_SECRET),
        "google_token_url": server.token_url,
        "microsoft_client_id": CLIENT_ID,
        "microsoft_client_secret": Secret(CLIENT_SECRET),
        "microsoft_token_url": server.url + "/{tenant}/oauth2/v2.0/token",
        "microsoft_tenant": "contoso.example",
        "oauth_timeout": 5.0,
        "oauth_rate": 1000.0,
    }
    values.update(kw)
    return OAuthSettings(**values)  # type: ignore[arg-type]


@attrs.define
class Rig:
    server: OAuthTestServer
    wall: Wall
    backend: TokenBackend | None
    opened: list[RefreshingTokens] = attrs.field(factory=list)

    def source(self, **kw: object) -> RefreshingTokens:
        """A fresh source (a daemon start) on the same store."""
        settings = kw.pop("settings", None) or settings_for(self.server)
        tokens = RefreshingTokens(
            settings,  # type: ignore[arg-type]
            key=KEY,
            backend=self.backend,
            retry=kw.pop("retry", BackoffPolicy(0.2, 1.0)),  # type: ignore[arg-type]
            revoked_retry=BackoffPolicy(600.0, 3600.0),
            wall=self.wall,
            **kw,  # type: ignore[arg-type]
        )
        self.opened.append(tokens)
        return tokens


@pytest.fixture
async def rig(server: OAuthTestServer, tmp_path: Path) -> AsyncIterator[Rig]:
    made = Rig(server, Wall(), SqliteBackend(tmp_path / "state.sqlite3"))
    yield made
    for tokens in made.opened:
        await tokens.aclose()


def conn(
    refresh_token: str, email: str = "alice@gmail.com", provider: str | None = None
) -> MailConnection:
    return mail_connection(
        "c-" + email,
        email=email,
        host="imap.gmail.com",
        auth=AUTH_OAUTH2,
        refresh_token=refresh_token,
        provider=provider,
    )


async def test_the_test_server_answers_head_with_a_head_and_serves_on(
    server: OAuthTestServer,
) -> None:
    async with httpx.AsyncClient(timeout=10) as http:
        with trio.fail_after(10):
            head = await http.head(server.token_url)
            assert head.status_code == 405 and head.content == b""
            assert int(head.headers["content-length"]) > 0  # what a GET would get
            after = await http.post(server.introspection_url, data={"token": "unknown"})
    assert after.status_code == 200 and after.json() == {"active": False}


async def test_refreshes_once_and_caches(rig: Rig) -> None:
    grant = rig.server.add_grant("alice")
    tokens = rig.source()
    first = await tokens.get(conn(grant.refresh_token))
    again = await tokens.get(conn(grant.refresh_token))
    assert first is again
    assert first.source == "google"
    assert first.expires_at == rig.wall.now + 3600
    assert rig.server.issued[first.token.reveal()].user == "alice"
    [request] = rig.server.token_requests()
    assert request.form == {
        "grant_type": "refresh_token",
        "refresh_token": grant.refresh_token,
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
    }
    assert first.token.reveal() not in repr(first)


async def test_refreshed_ahead_of_expiry_and_on_force(rig: Rig) -> None:
    grant = rig.server.add_grant("alice")
    tokens = rig.source()
    c = conn(grant.refresh_token)
    first = await tokens.get(c)
    rig.wall.now += 3600 - REFRESH_AHEAD - 1  # still more than 5 min left
    assert await tokens.get(c) is first
    rig.wall.now += 2  # now less: a fresh one
    second = await tokens.get(c)
    assert second.token != first.token
    forced = await tokens.get(c, force=True)  # the server refused the last one
    assert forced.token not in (first.token, second.token)
    assert len(rig.server.token_requests()) == 3


async def test_concurrent_callers_share_one_refresh(rig: Rig) -> None:
    grant = rig.server.add_grant("alice")
    tokens = rig.source()
    gate = rig.server.hold()
    got: list[AccessToken] = []

    async def caller(force: bool) -> None:
        got.append(await tokens.get(conn(grant.refresh_token), force=force))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for n in range(6):
                nursery.start_soon(caller, n % 2 == 1)  # forced ones wait too
            await rig.server.wait_for(lambda: rig.server.in_flight == 1)
            await trio.testing.wait_all_tasks_blocked()
            gate.set()
    assert len(got) == 6 and len({t.token for t in got}) == 1
    assert len(rig.server.token_requests()) == 1


async def test_connections_are_refreshed_independently(rig: Rig) -> None:
    a, b = rig.server.add_grant("alice"), rig.server.add_grant("bob")
    tokens = rig.source()
    gate = rig.server.hold()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(tokens.get, conn(a.refresh_token))
            nursery.start_soon(tokens.get, conn(b.refresh_token, "bob@gmail.com"))
            await rig.server.wait_for(lambda: rig.server.in_flight == 2)  # both in flight
            gate.set()
    assert {r.refresh_token for r in rig.server.token_requests()} == {
        a.refresh_token,
        b.refresh_token,
    }


async def test_refreshes_are_paced_globally(rig: Rig, mock_clock: trio.testing.MockClock) -> None:
    # trio's clock stands still unless jumped: the pacer's next start is reached only then
    interval = 0.5
    grants = [rig.server.add_grant(f"u{i}") for i in range(3)]
    tokens = rig.source(settings=settings_for(rig.server, oauth_rate=1 / interval))
    requests = rig.server.token_requests
    async with trio.open_nursery() as nursery:
        for g in grants:
            nursery.start_soon(tokens.get, conn(g.refresh_token, f"{g.user}@gmail.com"))
        for n in (1, 2, 3):
            await rig.server.wait_for(lambda n=n: len(requests()) >= n)  # type: ignore[misc]
            await trio.testing.wait_all_tasks_blocked()
            assert len(requests()) == n  # the next one waits for its start time
            mock_clock.jump(interval)
    assert [r.status for r in requests()] == [200, 200, 200]


async def test_microsoft_tenant_and_scope(rig: Rig) -> None:
    grant = rig.server.add_grant("carol")
    tokens = rig.source()
    token = await tokens.get(conn(grant.refresh_token, "carol@outlook.com"))
    assert token.source == "microsoft"
    [request] = rig.server.token_requests()
    assert request.path == "/contoso.example/oauth2/v2.0/token"
    assert request.form["scope"] == MICROSOFT_SCOPE


async def test_row_provider_wins_over_the_domain(rig: Rig) -> None:
    grant = rig.server.add_grant("dave")
    tokens = rig.source()
    token = await tokens.get(
        conn(grant.refresh_token, "dave@company.example", provider="microsoft")
    )
    assert token.source == "microsoft"


async def test_unknown_provider_or_missing_client_is_unavailable(rig: Rig) -> None:
    tokens = rig.source(settings=settings_for(rig.server, microsoft_client_id=None))
    with pytest.raises(TokenUnavailable) as unknown:
        await tokens.get(conn(PREFIX + "rt-x", "eve@gmx.de"))
    assert unknown.value.reason == TOKEN_UNAVAILABLE
    with pytest.raises(TokenUnavailable) as unconfigured:
        await tokens.get(conn(PREFIX + "rt-x", "eve@outlook.com"))
    assert unconfigured.value.reason == TOKEN_UNAVAILABLE
    assert "TRIO_IDLE_MICROSOFT_CLIENT_ID" in str(unconfigured.value)
    assert rig.server.token_requests() == []


async def test_revoked_grant_is_reported_once_per_backoff_and_a_new_row_token_works(
    rig: Rig,
) -> None:
    grant = rig.server.add_grant("alice")
    tokens = rig.source()
    await tokens.get(conn(grant.refresh_token))
    rig.server.revoke("alice")
    with pytest.raises(TokenUnavailable) as revoked:
        await tokens.get(conn(grant.refresh_token), force=True)
    assert revoked.value.reason == TOKEN_REVOKED
    assert revoked.value.retry_after is not None and revoked.value.retry_after >= 600
    assert grant.refresh_token not in str(revoked.value)
    with pytest.raises(TokenUnavailable) as again:  # no second request within the backoff
        await tokens.get(conn(grant.refresh_token))
    assert again.value.reason == TOKEN_REVOKED
    assert len(rig.server.token_requests()) == 2
    # the user signs in again in the app: the row carries a new refresh token
    fresh = rig.server.add_grant("alice2")
    token = await tokens.get(conn(fresh.refresh_token))
    assert rig.server.issued[token.token.reveal()].user == "alice2"


async def test_server_errors_back_off_then_recover(rig: Rig) -> None:
    grant = rig.server.add_grant("alice")
    tokens = rig.source()
    rig.server.fail_next(Fault(503))
    with pytest.raises(TokenUnavailable) as failed:
        await tokens.get(conn(grant.refresh_token))
    assert failed.value.reason == TOKEN_ERROR and "503" in str(failed.value)
    wait = failed.value.retry_after
    assert wait is not None and wait > 0
    with pytest.raises(TokenUnavailable):  # within the backoff: answered without a request
        await tokens.get(conn(grant.refresh_token))
    assert len(rig.server.token_requests()) == 1
    await trio.sleep(wait)  # exactly the wait the source announced
    with trio.fail_after(10):
        token = await tokens.get(conn(grant.refresh_token))
    assert rig.server.issued[token.token.reveal()].user == "alice"


async def test_retry_after_of_a_429_is_honoured(rig: Rig) -> None:
    grant = rig.server.add_grant("alice")
    tokens = rig.source()
    rig.server.fail_next(Fault(429, headers={"retry-after": "30"}))
    with pytest.raises(TokenUnavailable) as failed:
        await tokens.get(conn(grant.refresh_token))
    assert failed.value.reason == TOKEN_ERROR
    assert failed.value.retry_after is not None and failed.value.retry_after >= 30


async def test_a_still_valid_token_serves_while_the_endpoint_is_down(rig: Rig) -> None:
    grant = rig.server.add_grant("alice")
    tokens = rig.source()
    c = conn(grant.refresh_token)
    first = await tokens.get(c)
    rig.wall.now += 3600 - 200  # inside the refresh window, 200 s left
    rig.server.fail_next(Fault(500), Fault(500))
    assert await tokens.get(c) is first  # the refresh failed; the old one still works
    with pytest.raises(TokenUnavailable):  # but not when the server refused it
        await tokens.get(c, force=True)


async def test_slow_endpoint_is_cut_at_the_timeout(rig: Rig) -> None:
    grant = rig.server.add_grant("alice")
    tokens = rig.source(settings=settings_for(rig.server, oauth_timeout=0.5))
    rig.server.fail_next(Fault(status=None, delay=30))
    with trio.fail_after(5), pytest.raises(TokenUnavailable) as slow:
        await tokens.get(conn(grant.refresh_token))
    assert slow.value.reason == TOKEN_ERROR
    assert "within 0.5s" in str(slow.value)


async def test_dropped_connection_and_unreachable_endpoint(rig: Rig, tmp_path: Path) -> None:
    grant = rig.server.add_grant("alice")
    tokens = rig.source()
    rig.server.fail_next(Fault(disconnect=True))
    with pytest.raises(TokenUnavailable) as dropped:
        await tokens.get(conn(grant.refresh_token))
    assert dropped.value.reason == TOKEN_ERROR
    with trio.socket.socket() as sock:  # a port nobody listens on
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    gone = rig.source(
        settings=settings_for(rig.server, google_token_url=f"http://127.0.0.1:{port}/t")
    )
    with pytest.raises(TokenUnavailable) as refused:
        await gone.get(conn(grant.refresh_token))
    assert refused.value.reason == TOKEN_ERROR and "unreachable" in str(refused.value)


async def test_oversized_reply_is_refused(rig: Rig) -> None:
    grant = rig.server.add_grant("alice")
    tokens = rig.source()
    rig.server.fail_next(Fault(200, json={"access_token": "a" * 70_000, "expires_in": 3600}))
    with pytest.raises(TokenUnavailable) as big:
        await tokens.get(conn(grant.refresh_token))
    assert big.value.reason == TOKEN_ERROR and "64 KiB" in str(big.value)


async def test_proxy_from_the_environment_is_not_used(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    grant = rig.server.add_grant("alice")
    tokens = rig.source()
    await tokens.get(conn(grant.refresh_token))
    assert len(rig.server.token_requests()) == 1


async def test_provider_text_quoting_the_secrets_is_scrubbed(
    rig: Rig, capfd: pytest.CaptureFixture[str]
) -> None:
    grant = rig.server.add_grant("alice")
    tokens = rig.source()
    echo = f"refresh_token={grant.refresh_token}&client_secret={CLIENT_SECRET}"
    rig.server.fail_next(
        Fault(400, json={"error": "invalid_grant", "error_description": echo}),
    )
    with pytest.raises(TokenUnavailable) as revoked:
        await tokens.get(conn(grant.refresh_token))
    message = str(revoked.value)
    assert "invalid_grant" in message
    assert grant.refresh_token not in message and CLIENT_SECRET not in message
    quoted = urllib.parse.quote_plus(grant.refresh_token)
    assert quoted not in message


# -- rotation ---------------------------------------------------------------------------


def stored_rows(path: Path) -> list[tuple[str, str, str, float]]:
    with sqlite3.connect(path) as db:
        return list(db.execute("SELECT * FROM oauth_refresh_token"))


async def test_rotation_is_kept_across_a_restart_sqlite(rig: Rig, tmp_path: Path) -> None:
    grant = rig.server.add_grant("alice", rotate=True)
    row_token = grant.refresh_token
    c = conn(row_token)
    await rig.source().get(c)
    rotated = grant.refresh_token
    assert rotated != row_token and row_token in grant.retired  # the row's is dead now
    [(conn_id, encrypted, replaces, _at)] = stored_rows(tmp_path / "state.sqlite3")
    assert conn_id == c.id
    assert rotated not in encrypted and row_token not in replaces  # encrypted, hashed
    # a restart: a new source, the same store, the same (now stale) row
    token = await rig.source().get(c)
    assert rig.server.issued[token.token.reveal()].user == "alice"
    assert rig.server.token_requests()[-1].refresh_token == rotated
    # and it keeps following the chain
    newest = grant.refresh_token
    assert newest != rotated
    restarted = rig.source()
    await restarted.get(c)
    assert rig.server.token_requests()[-1].refresh_token == newest
    assert all(r.status == 200 for r in rig.server.token_requests())


async def test_a_new_row_token_wins_over_the_stored_rotation(rig: Rig) -> None:
    grant = rig.server.add_grant("alice", rotate=True)
    await rig.source().get(conn(grant.refresh_token))
    # the user signed in again in the app; the backend wrote a new refresh token
    again = rig.server.add_grant("alice-again")
    token = await rig.source().get(conn(again.refresh_token))
    assert rig.server.token_requests()[-1].refresh_token == again.refresh_token
    assert rig.server.issued[token.token.reveal()].user == "alice-again"


async def test_rotation_with_a_store_that_fails_is_used_from_memory(
    rig: Rig, tmp_path: Path
) -> None:
    broken_dir = tmp_path / "not-a-dir"
    broken_dir.write_text("a file where the state directory should be")
    rig.backend = SqliteBackend(broken_dir / "state.sqlite3")
    grant = rig.server.add_grant("alice", rotate=True)
    c = conn(grant.refresh_token)
    tokens = rig.source()
    with pytest.raises(TokenUnavailable) as unreadable:  # never spend a token blind
        await tokens.get(c)
    assert unreadable.value.reason == TOKEN_ERROR
    assert rig.server.token_requests() == []
    rig.backend = None  # TRIO_IDLE_STATE=none: memory only
    tokens = rig.source()
    await tokens.get(c)
    await tokens.get(c, force=True)  # uses the rotated token, which it kept
    assert [r.status for r in rig.server.token_requests()] == [200, 200]


@pytest.mark.postgres  # deselected by `nox -s unit`
async def test_rotation_is_kept_across_a_restart_postgres(rig: Rig, pg_dsn: str) -> None:
    async with open_asyncio_loop():
        backend = PostgresBackend(Secret(pg_dsn))
        await backend.migrate()  # what `trio-idle db migrate` runs
        await backend.migrate()  # idempotent
        rig.backend = backend
        grant = rig.server.add_grant("alice", rotate=True)
        c = conn(grant.refresh_token)
        await rig.source().get(c)
        rotated = grant.refresh_token
        token = await rig.source().get(c)  # a restart on the same database
    assert rig.server.token_requests()[-1].refresh_token == rotated
    assert rig.server.issued[token.token.reveal()].user == "alice"
    from tests.servers.postgres import fetch_sql

    rows = await trio.to_thread.run_sync(
        fetch_sql, pg_dsn, f"SELECT connection_id, encrypted_token FROM {POSTGRES_TOKEN_TABLE}"
    )
    assert [r[0] for r in rows] == [c.id]
    assert grant.refresh_token not in rows[0][1]


# -- the per-connection choice ----------------------------------------------------------


@attrs.define
class RecordingSource:
    calls: list[tuple[str, bool]] = attrs.field(factory=list)
    closed: bool = False

    async def get(self, conn: MailConnection, *, force: bool = False) -> AccessToken:
        self.calls.append((conn.id, force))
        return AccessToken(Secret(PREFIX + "at-backend"), 2e9)

    async def aclose(self) -> None:
        self.closed = True


async def test_per_connection_choice(rig: Rig) -> None:
    grant = rig.server.add_grant("alice")
    refreshing, backend = rig.source(), RecordingSource()
    tokens = PerConnectionTokens(refreshing, backend)
    with_refresh = conn(grant.refresh_token)
    without = attrs.evolve(conn("", "bob@gmail.com"), refresh_token=None)
    assert (await tokens.get(with_refresh)).source == "google"
    assert (await tokens.get(without, force=True)).source == "backend"
    assert backend.calls == [(without.id, True)]
    with pytest.raises(TokenUnavailable) as none:
        await PerConnectionTokens(refreshing, None).get(without)
    assert none.value.reason == TOKEN_UNAVAILABLE
    await tokens.aclose()
    assert backend.closed


@pytest.mark.postgres  # deselected by `nox -s unit`
async def test_postgres_before_migrate_uses_the_row_token_then_catches_up(
    rig: Rig, pg_dsn: str
) -> None:
    async with open_asyncio_loop():
        backend = PostgresBackend(Secret(pg_dsn))
        rig.backend = backend
        grant = rig.server.add_grant("alice", rotate=True)
        c = conn(grant.refresh_token)
        tokens = rig.source()
        await tokens.get(c)  # no table yet: the row's token; the rotation stays in memory
        await backend.migrate()  # the operator runs `trio-idle db migrate`
        await tokens.get(c, force=True)  # writes what was pending, then the new rotation
        newest = grant.refresh_token
        await rig.source().get(c)  # a restart finds the newest token
    assert rig.server.token_requests()[-1].refresh_token == newest
    assert [r.status for r in rig.server.token_requests()] == [200, 200, 200]
