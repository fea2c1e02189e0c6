"""The backend token source: replies judged as plain values, the cache and its limits
through ``httpx.MockTransport`` (no sockets)."""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
from typing import Any

import attrs
import httpx
import pytest
import trio
import trio.testing

from tests.fixtures import mail_connection
from trio_idle.accounts.connections import AUTH_OAUTH2, MailConnection
from trio_idle.accounts.credentials import (
    TOKEN_ERROR,
    TOKEN_UNAVAILABLE,
    AccessToken,
    TokenUnavailable,
)
from trio_idle.auth.token_backend import (
    DEFAULT_TOKEN_CONCURRENCY,
    BackendTokenSource,
    interpret_token_reply,
    make_token_source,
    parse_expiry,
    request_body,
    token_http,
)
from trio_idle.auth.token_refresh import RefreshingTokens
from trio_idle.backend.watch import BackendWatch
from trio_idle.backend.webhook import BackendAuth
from trio_idle.core.config import parse_settings
from trio_idle.core.secret import Secret

NOW = 1_800_000_000.0
TOKEN = "S3ntinel-oauth-access-token-1"
EIGHT = datetime.datetime(2027, 1, 15, 8, tzinfo=datetime.UTC).timestamp()


def conn(conn_id: str = "c1") -> MailConnection:
    return mail_connection(
        conn_id, email=f"{conn_id}@example.test", host="imap.example.test", auth=AUTH_OAUTH2
    )


def reply(obj: Any, status: int = 200) -> tuple[int, dict[str, str], bytes]:
    return status, {}, json.dumps(obj).encode()


# -- pure: expiry and replies ---------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [
        (NOW, NOW),
        (int(NOW), NOW),
        (NOW * 1000, NOW),  # JavaScript's Date.now()
        (str(int(NOW)), NOW),
        ("2027-01-15T08:00:00Z", EIGHT),
        ("2027-01-15T09:00:00+01:00", EIGHT),
        ("2027-01-15T08:00:00.500", EIGHT + 0.5),  # no zone: UTC
    ],
)
def test_expiry_forms(value: object, expected: float) -> None:
    assert parse_expiry(value) == pytest.approx(expected)


@pytest.mark.parametrize(
    "value", [None, True, float("nan"), float("inf"), -5, 0, "soon", "", [1], "9" * 100]
)
def test_unusable_expiry(value: object) -> None:
    assert parse_expiry(value) is None


def test_a_good_reply_is_a_secret_token() -> None:
    result = interpret_token_reply(
        *reply({"accessToken": TOKEN, "expiresAt": NOW + 3600, "user": "alice@x"}), now=NOW
    )
    assert isinstance(result, AccessToken)
    assert result.token.reveal() == TOKEN and result.expires_at == NOW + 3600
    assert result.user == "alice@x" and result.source == "backend"
    assert TOKEN not in repr(result) and TOKEN not in str(result.token)


def test_user_is_optional() -> None:
    result = interpret_token_reply(*reply({"accessToken": TOKEN, "expiresAt": NOW + 60}), now=NOW)
    assert isinstance(result, AccessToken) and result.user is None


@pytest.mark.parametrize("status", [404, 410])
def test_no_grant(status: int) -> None:
    result = interpret_token_reply(*reply({"error": "no grant"}, status), now=NOW)
    assert isinstance(result, TokenUnavailable) and result.reason == TOKEN_UNAVAILABLE
    assert str(status) in str(result)


@pytest.mark.parametrize("status", [500, 502, 503])
def test_server_errors_are_retried(status: int) -> None:
    result = interpret_token_reply(status, {"Retry-After": "7"}, b"", now=NOW)
    assert isinstance(result, TokenUnavailable) and result.reason == TOKEN_ERROR
    assert result.retry_after == 7.0


def test_rate_limit_honours_retry_after() -> None:
    result = interpret_token_reply(429, {"retry-after": "30"}, b"", now=NOW)
    assert isinstance(result, TokenUnavailable) and result.reason == TOKEN_ERROR
    assert result.retry_after == 30.0 and "429" in str(result)


def test_rejected_secret_says_so() -> None:
    result = interpret_token_reply(401, {}, b"", now=NOW)
    assert isinstance(result, TokenUnavailable) and "ADMIN_SECRET" in str(result)


@pytest.mark.parametrize(
    "body, why",
    [
        (b"not json", "without JSON"),
        (json.dumps([TOKEN]).encode(), "without JSON"),
        (json.dumps({"expiresAt": NOW + 60}).encode(), "no accessToken"),
        (json.dumps({"accessToken": TOKEN}).encode(), "expiresAt"),
        (json.dumps({"accessToken": TOKEN, "expiresAt": NOW - 1}).encode(), "expired"),
        (
            json.dumps({"accessToken": TOKEN + "\r\nx", "expiresAt": NOW + 60}).encode(),
            "not a usable",
        ),
        (
            json.dumps({"accessToken": TOKEN, "expiresAt": NOW + 60, "user": "a\nb"}).encode(),
            "user",
        ),
    ],
)
def test_bad_replies_are_token_errors_without_the_token(body: bytes, why: str) -> None:
    result = interpret_token_reply(200, {}, body, now=NOW)
    assert isinstance(result, TokenUnavailable) and result.reason == TOKEN_ERROR
    assert why in str(result) and TOKEN not in str(result)


# -- the source, through a mock transport -----------------------------------------------


class Backend:
    """A token endpoint handler: mints numbered tokens valid ``lifetime`` seconds."""

    def __init__(self, clock: list[float], lifetime: float = 3600.0) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self.requests: list[httpx.Request] = []
        self.bodies: list[dict[str, Any]] = []
        self.status = 200
        self.gate: trio.Event | None = None

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.bodies.append(json.loads(request.content))
        if self.gate is not None:
            await self.gate.wait()
        if self.status != 200:
            return httpx.Response(self.status, headers={"retry-after": "12"})
        n = len(self.requests)
        return httpx.Response(
            200, json={"accessToken": f"tok-{n}", "expiresAt": self.clock[0] + self.lifetime}
        )


def source(
    backend: Backend,
    *,
    total_timeout: float = 5.0,
    concurrency: int = DEFAULT_TOKEN_CONCURRENCY,
    transport: httpx.AsyncBaseTransport | None = None,
    watch: BackendWatch | None = None,
) -> BackendTokenSource:
    """The backend's token source, its requests going to ``backend`` in memory."""
    http = token_http(
        total_timeout,
        concurrency=concurrency,
        transport=transport or httpx.MockTransport(backend),
        watch=watch,
    )
    auth = BackendAuth("x-admin-secret", Secret("test-admin-secret-value"), Secret("sign-key"))
    return BackendTokenSource(
        "http://127.0.0.1:1/api/mail/imap-token-internal",
        auth,
        http,
        refresh_ahead=300.0,
        now=lambda: backend.clock[0],
    )


async def test_request_carries_the_contract() -> None:
    backend = Backend([NOW])
    tokens = source(backend)
    token = await tokens.get(conn(), force=False)
    assert token.token.reveal() == "tok-1"
    request = backend.requests[0]
    assert request.method == "POST" and request.url.path == "/api/mail/imap-token-internal"
    assert request.headers["x-admin-secret"] == "test-admin-secret-value"
    assert request.headers["content-type"] == "application/json"
    expected = "sha256=" + hmac.new(b"sign-key", request.content, hashlib.sha256).hexdigest()
    assert request.headers["x-signature"] == expected
    assert backend.bodies[0] == {
        "connectionId": "c1", "userId": "u1", "email": "c1@example.test", "force": False,
    }  # fmt: skip
    assert request.content == request_body(conn(), force=False)
    await tokens.aclose()


async def test_cached_until_refresh_ahead_then_fetched_again() -> None:
    clock = [NOW]
    backend = Backend(clock, lifetime=3600)
    tokens = source(backend)
    first = await tokens.get(conn())
    clock[0] = NOW + 3600 - 301  # still 301 s left: cached
    assert (await tokens.get(conn())) is first
    clock[0] = NOW + 3600 - 299  # under refresh_ahead: replaced before it is used
    second = await tokens.get(conn())
    assert second.token.reveal() == "tok-2" and len(backend.requests) == 2
    await tokens.aclose()


async def test_force_always_fetches_and_says_so() -> None:
    backend = Backend([NOW])
    tokens = source(backend)
    await tokens.get(conn())
    fresh = await tokens.get(conn(), force=True)
    assert fresh.token.reveal() == "tok-2"
    assert [b["force"] for b in backend.bodies] == [False, True]
    assert (await tokens.get(conn())) is fresh  # the forced one is cached
    await tokens.aclose()


async def test_one_request_in_flight_per_connection() -> None:
    backend = Backend([NOW])
    backend.gate = trio.Event()
    tokens = source(backend)
    got: list[AccessToken] = []

    async def one() -> None:
        got.append(await tokens.get(conn()))

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(one)
        await trio.testing.wait_all_tasks_blocked()
        assert len(backend.requests) == 1
        backend.gate.set()
    assert len(backend.requests) == 1 and {t.token.reveal() for t in got} == {"tok-1"}
    await tokens.aclose()


async def test_concurrency_is_bounded_across_connections() -> None:
    backend = Backend([NOW])
    backend.gate = trio.Event()
    tokens = source(backend, concurrency=3)
    async with trio.open_nursery() as nursery:
        for i in range(10):
            nursery.start_soon(tokens.get, conn(f"c{i}"))
        await trio.testing.wait_all_tasks_blocked()
        assert len(backend.requests) == 3
        backend.gate.set()
    assert len(backend.requests) == 10
    await tokens.aclose()


@pytest.mark.parametrize("status, reason", [(404, TOKEN_UNAVAILABLE), (503, TOKEN_ERROR)])
async def test_failures_raise_and_cache_nothing(status: int, reason: str) -> None:
    backend = Backend([NOW])
    backend.status = status
    tokens = source(backend)
    with pytest.raises(TokenUnavailable) as info:
        await tokens.get(conn())
    assert info.value.reason == reason
    if status == 503:
        assert info.value.retry_after == 12.0
    backend.status = 200
    assert (await tokens.get(conn())).token.reveal() == "tok-2"
    await tokens.aclose()


async def test_unreachable_endpoint_is_a_token_error() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused")

    tokens = source(Backend([NOW]), transport=httpx.MockTransport(refuse))
    with pytest.raises(TokenUnavailable) as info:
        await tokens.get(conn())
    assert info.value.reason == TOKEN_ERROR and "unreachable" in str(info.value)
    await tokens.aclose()


async def test_a_hanging_endpoint_fails_within_the_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = Backend([NOW])
    backend.gate = trio.Event()  # never set
    tokens = source(backend, total_timeout=5.0)
    start = trio.current_time()
    with pytest.raises(TokenUnavailable) as info:
        await tokens.get(conn())
    assert info.value.reason == TOKEN_ERROR and "5s" in str(info.value)
    assert trio.current_time() - start == pytest.approx(5.0)
    await tokens.aclose()


async def test_oversized_reply_fails_unread() -> None:
    def huge(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"x" * (200 * 1024))

    tokens = source(Backend([NOW]), transport=httpx.MockTransport(huge))
    with pytest.raises(TokenUnavailable, match="token endpoint reply larger than 64 KiB"):
        await tokens.get(conn())
    await tokens.aclose()


async def test_factory_serves_rows_with_a_refresh_token_itself_and_the_rest_from_the_backend() -> (
    None
):
    settings = parse_settings(
        {
            "ADMIN_SECRET": "s",
            "ENCRYPTION_KEY": "k" * 32,
            "TRIO_IDLE_SOURCE": "file",
            "TRIO_IDLE_CONNECTIONS_FILE": "unused.toml",
            "TRIO_IDLE_STATE": "none",
        }
    )
    tokens = make_token_source(settings, {})
    backend = tokens.source_for(conn())
    assert isinstance(backend, BackendTokenSource)
    assert backend.url == "http://127.0.0.1:3016/api/mail/imap-token-internal"
    assert backend.refresh_ahead == 300.0
    with_refresh = attrs.evolve(conn(), refresh_token=Secret("S3ntinel-rt-factory"))
    assert isinstance(tokens.source_for(with_refresh), RefreshingTokens)
    await tokens.aclose()
