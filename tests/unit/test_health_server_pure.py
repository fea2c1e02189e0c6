"""The health port's decisions without sockets: the /status bearer check, each route's
answer, the log rate limit and which client a newcomer pushes out."""

from __future__ import annotations

import json

import pytest
from prometheus_client import CollectorRegistry

from tests.harness import LogCapture
from trio_idle.core.config import OPTIONS, ConfigError, parse_settings
from trio_idle.core.secret import Secret
from trio_idle.core.stats import Stats
from trio_idle.ops.health_server import (
    ROUTES,
    Auth,
    ClientTable,
    HealthRoutes,
    LogThrottle,
    Request,
    Response,
    check_bearer,
    json_response,
)

TOKEN = "Zq7-status-token-0123456789abcdef"
ENV = {"ADMIN_SECRET": "s", "ENCRYPTION_KEY": "k" * 32, "DATABASE_URL": "postgresql://x@h/db"}


# -- the bearer check ------------------------------------------------------------------


def test_bearer_check_accepts_only_the_token() -> None:
    token = Secret(TOKEN)
    assert check_bearer(token, f"Bearer {TOKEN}".encode()) is Auth.OK
    assert check_bearer(token, f"bearer   {TOKEN} ".encode()) is Auth.OK  # scheme: any case
    assert check_bearer(token, None) is Auth.MISSING
    for wrong in (
        b"",
        b"Bearer",
        b"Bearer ",
        f"Bearer {TOKEN[:-1]}".encode(),  # a prefix
        f"Bearer {TOKEN}x".encode(),  # longer
        f"Bearer {TOKEN.upper()}".encode(),  # the token itself is case-sensitive
        f"Basic {TOKEN}".encode(),  # right secret, wrong scheme
        TOKEN.encode(),  # no scheme
    ):
        assert check_bearer(token, wrong) is Auth.WRONG, wrong


def test_no_token_configured_means_off_whatever_the_client_sends() -> None:
    assert check_bearer(None, f"Bearer {TOKEN}".encode()) is Auth.OFF
    assert check_bearer(None, None) is Auth.OFF


# -- route answers ---------------------------------------------------------------------


def routes(token: str | None = TOKEN, stats: Stats | None = None) -> HealthRoutes:
    return HealthRoutes(
        healthz=lambda: json_response(200, {"ok": True}),
        readyz=lambda: json_response(503, {"ready": False}),
        status=lambda: json_response(200, {"connections": [{"email": "a@x.test"}]}),
        registry=CollectorRegistry(),
        stats=stats or Stats(),
        status_token=None if token is None else Secret(token),
    )


def get(r: HealthRoutes, target: str, auth: bytes | None = None, now: float = 0.0) -> Response:
    return r.answer(Request("GET", target, auth, peer="127.0.0.1:5555"), now)


def test_status_answers_only_with_the_token() -> None:
    stats = Stats()
    r = routes(stats=stats)
    ok = get(r, "/status", f"Bearer {TOKEN}".encode())
    assert ok.status == 200 and b"a@x.test" in ok.body

    missing = get(r, "/status")
    assert missing.status == 401
    assert dict(missing.headers)["www-authenticate"] == 'Bearer realm="trio-idle"'
    assert b"a@x.test" not in missing.body

    wrong = get(r, "/status?x=1", b"Bearer nope")
    assert wrong.status == 401
    assert dict(wrong.headers)["www-authenticate"].startswith("Bearer ")
    assert 'error="invalid_token"' in dict(wrong.headers)["www-authenticate"]
    assert b"a@x.test" not in wrong.body and TOKEN.encode() not in wrong.body

    assert stats.get("status_auth_failures", "missing") == 1
    assert stats.get("status_auth_failures", "wrong") == 1


def test_status_without_a_configured_token_is_off_and_says_how_to_enable_it() -> None:
    stats = Stats()
    off = get(routes(token=None, stats=stats), "/status", f"Bearer {TOKEN}".encode())
    assert off.status == 404
    body = json.loads(off.body)
    assert body["error"] == "/status is off"
    assert "TRIO_IDLE_STATUS_TOKEN" in body["enable"]
    assert stats.get("status_auth_failures") == 0  # nothing to guess: not a failed attempt


def test_only_restricts_the_routes_of_an_address() -> None:
    r = routes()
    health_port = r.only(route for route in ROUTES if route != "/status")
    status_port = r.only(["/status"])
    auth = f"Bearer {TOKEN}".encode()
    moved = get(health_port, "/status", auth)
    assert moved.status == 404 and json.loads(moved.body)["routes"] == [
        "/healthz",
        "/readyz",
        "/metrics",
    ]
    assert get(health_port, "/healthz").status == 200
    assert get(health_port, "/metrics").status == 200
    assert get(status_port, "/status", auth).status == 200
    for route in ("/healthz", "/readyz", "/metrics"):
        assert get(status_port, route).status == 404


def test_methods_and_unknown_routes() -> None:
    r = routes()
    assert r.answer(Request("POST", "/healthz"), 0.0).status == 405
    assert r.answer(Request("HEAD", "/readyz"), 0.0).status == 503
    assert get(r, "/nope").status == 404


def test_refused_status_requests_are_logged_at_most_once_a_minute(logs: LogCapture) -> None:
    stats = Stats()
    r = routes(stats=stats)
    for i in range(500):  # a client hammering with guesses
        assert get(r, "/status", f"Bearer guess-{i}".encode(), now=10.0 + i * 0.01).status == 401
    refused = logs.matching("/status refused")
    assert refused == ["[idle/health] /status refused: wrong bearer token (from 127.0.0.1:5555)"]
    assert stats.get("status_auth_failures", "wrong") == 500
    # a minute later the next one is logged, with how many were not
    get(r, "/status", now=80.0)
    assert logs.matching("/status refused")[1] == (
        "[idle/health] /status refused: missing bearer token (from 127.0.0.1:5555) "
        "(499 more since the last such line)"
    )
    assert "guess-" not in logs.text() and TOKEN not in logs.text()


def test_log_throttle() -> None:
    throttle = LogThrottle(every=60.0)
    assert throttle.line(0.0, "a") == "a"
    assert throttle.line(59.9, "b") is None
    assert throttle.line(60.0, "c") == "c (1 more since the last such line)"
    assert throttle.line(200.0, "d") == "d"


# -- which client a newcomer pushes out ------------------------------------------------


def test_clients_are_admitted_below_the_capacity() -> None:
    table = ClientTable(capacity=3, grace=0.2)
    table.waiting(1, 0.0)
    table.waiting(2, 0.0)
    assert table.room(0.0).action == "admit"


def test_a_newcomer_evicts_the_client_waiting_longest() -> None:
    table = ClientTable(capacity=3, grace=0.2)
    table.waiting(1, 0.0)  # connected first, then answered: busy
    table.waiting(2, 1.0)
    table.waiting(3, 2.0)
    table.busy(1)
    room = table.room(5.0)
    assert (room.action, room.client) == ("evict", 2)
    assert table.remove(2) and not table.remove(2)
    assert table.room(5.0).action == "admit"


def test_a_client_that_got_its_answer_queues_up_again_behind_the_others() -> None:
    table = ClientTable(capacity=3, grace=0.2)
    table.waiting(1, 0.0)
    table.waiting(2, 1.0)
    table.waiting(3, 2.0)
    table.busy(1)
    table.waiting(1, 3.0)  # keep-alive after its response: the youngest waiting client
    assert table.room(5.0).client == 2


def test_busy_clients_are_never_evicted() -> None:
    table = ClientTable(capacity=2, grace=0.2)
    table.waiting(1, 0.0)
    table.waiting(2, 0.0)
    table.busy(1)
    table.busy(2)
    room = table.room(100.0)
    assert room.action == "wait" and room.client is None and room.until == float("inf")


def test_clients_younger_than_the_grace_are_not_evicted_yet() -> None:
    """A burst of honest clients each about to send its request is not cut down: the
    newcomer waits until the oldest has had ``grace`` seconds."""
    table = ClientTable(capacity=2, grace=0.2)
    table.waiting(1, 10.0)
    table.waiting(2, 10.05)
    room = table.room(10.1)
    assert room.action == "wait" and room.until == pytest.approx(10.2)
    assert table.room(10.2).client == 1


# -- the two settings ------------------------------------------------------------------


def test_status_token_is_a_secret_from_the_environment_only() -> None:
    s = parse_settings({**ENV, "TRIO_IDLE_STATUS_TOKEN": TOKEN})
    assert isinstance(s.health.status_token, Secret) and s.health.status_token.reveal() == TOKEN
    assert TOKEN not in repr(s)
    assert parse_settings(ENV).health.status_token is None
    (option,) = [o for o in OPTIONS if o.env == "TRIO_IDLE_STATUS_TOKEN"]
    assert option.secret and option.flag is None  # argv is visible in ps


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("short-token", "expected 16 to 512 characters, got 11"),
        ("x" * 513, "expected 16 to 512 characters, got 513"),
        ("has a space inside it!", "expected only the characters"),
        ("line\nbreak-0123456789", "expected only the characters"),
        ("=leading-equals-0123456789", "expected only the characters"),
    ],
)
def test_a_bad_status_token_is_a_one_line_error_that_does_not_echo_it(
    value: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as err:
        parse_settings({**ENV, "TRIO_IDLE_STATUS_TOKEN": value})
    message = str(err.value)
    assert message.startswith("TRIO_IDLE_STATUS_TOKEN: ") and expected in message
    assert value not in message and "\n" not in message


def test_status_addr_is_parsed_like_the_health_addr() -> None:
    assert parse_settings(ENV).health.status_addr is None
    assert parse_settings({**ENV, "TRIO_IDLE_STATUS_ADDR": "9311"}).health.status_addr == (
        "127.0.0.1",
        9311,
    )
    assert parse_settings({**ENV, "TRIO_IDLE_STATUS_ADDR": "[::1]:9311"}).health.status_addr == (
        "::1",
        9311,
    )
    flag_wins = parse_settings({**ENV, "TRIO_IDLE_STATUS_ADDR": "1"}, {"status_addr": "2"})
    assert flag_wins.health.status_addr == ("127.0.0.1", 2)
    with pytest.raises(ConfigError, match="--status-addr: expected PORT or HOST:PORT"):
        parse_settings(ENV, {"status_addr": "nope"})
