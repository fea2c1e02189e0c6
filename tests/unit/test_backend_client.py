"""The daemon's one HTTP client (trio_idle/backend/client.py) over an in-memory network
(httpx.MockTransport): no sockets, virtual time. What every caller gets: one limiter,
one timeout model whose texts name the limit that fired, the reply cap, the backend
watch, redirects only when asked. (The same client on real sockets:
tests/unit/test_backend_client_loopback.py.)"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from trio_idle.backend.client import (
    MAX_REDIRECTS,
    HttpClient,
    HttpFailure,
    HttpReply,
    Limits,
    Problem,
    Timeouts,
)
from trio_idle.backend.watch import BackendWatch, failed_answer

URL = "http://backend.invalid/api/thing"


def client(
    handler: Callable[[httpx.Request], Any],
    *,
    timeouts: Timeouts | None = None,
    max_connections: int = 4,
    max_reply_bytes: int = 64 * 1024,
    watch: BackendWatch | None = None,
) -> HttpClient:
    return HttpClient(
        timeouts=timeouts or Timeouts.within(5.0, grace=5.0),
        limits=Limits(max_connections, max_reply_bytes=max_reply_bytes),
        transport=httpx.MockTransport(handler),
        watch=watch,
    )


def ok(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={"ok": True})


# -- the timeout model (pure) ----------------------------------------------------------


def test_phases_within_a_total_cap_the_connect_and_add_the_grace_to_the_attempt() -> None:
    assert Timeouts.within(60.0, grace=5.0) == Timeouts(10.0, 60.0, 60.0, 65.0)
    assert Timeouts.within(3.0) == Timeouts(3.0, 3.0, 3.0, 3.0)


@pytest.mark.parametrize(
    ("exc", "total", "detail"),
    [
        (
            httpx.ConnectTimeout("x"),
            60.0,
            "backend did not accept a connection within 10s (connect timeout)",
        ),
        (
            httpx.ConnectTimeout("x"),
            3.0,
            "backend did not accept a connection within 3s (connect timeout)",
        ),
        (httpx.WriteTimeout("x"), 3.0, "backend took none of the request for 3s (write timeout)"),
        (httpx.ReadTimeout("x"), 2.5, "backend sent nothing for 2.5s (read timeout)"),
    ],
    ids=["connect-capped", "connect", "write", "read"],
)
def test_a_phase_timeout_names_its_limit(
    exc: httpx.TimeoutException, total: float, detail: str
) -> None:
    failure = HttpFailure(Problem.TIMEOUT, Timeouts.within(total).expired(exc))
    assert failure.text("backend") == detail


@pytest.mark.parametrize(
    ("status", "failed"),
    [
        *[(None, True), (500, True), (503, True), (401, True), (403, True)],
        *[(200, False), (204, False), (301, False), (404, False), (410, False), (429, False)],
    ],
)
def test_what_counts_against_the_backend(status: int | None, failed: bool) -> None:
    assert failed_answer(status) is failed


# -- one limiter -------------------------------------------------------------------------


async def test_requests_past_the_pool_wait_their_turn_outside_the_attempt_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """At most max_connections requests reach the network at once; the others wait, in
    order, and their wait does not eat into their own deadline (4 s each, 2 s of which
    the network takes: the last of six waits 4 s first and still gets through)."""
    inside = peak = 0
    order: list[str] = []

    async def slow(request: httpx.Request) -> httpx.Response:
        nonlocal inside, peak
        inside += 1
        peak = max(peak, inside)
        order.append(request.headers["x-n"])
        await trio.sleep(2.0)
        inside -= 1
        return httpx.Response(200)

    http = client(slow, timeouts=Timeouts(1.0, 1.0, 1.0, 4.0), max_connections=2)
    outcomes: list[object] = []

    async def one(n: int) -> None:
        outcomes.append(await http.request("POST", URL, headers={"x-n": str(n)}))

    async with trio.open_nursery() as nursery:
        for n in range(6):
            nursery.start_soon(one, n)
            await trio.testing.wait_all_tasks_blocked()
    assert peak == 2
    # first come first served, two at a time (trio wakes each pair in either order)
    assert [sorted(order[i : i + 2]) for i in (0, 2, 4)] == [["0", "1"], ["2", "3"], ["4", "5"]]
    assert all(isinstance(o, HttpReply) and o.status == 200 for o in outcomes)
    assert http.in_flight == 0


@pytest.mark.parametrize("ending", ["cancelled", "failed", "deadline"])
async def test_a_request_however_it_ends_gives_its_slot_back(
    autojump_clock: trio.testing.MockClock, ending: str
) -> None:
    calls = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            if ending == "failed":
                raise httpx.ReadError("reset", request=request)
            await trio.sleep_forever()
        return httpx.Response(200)

    http = client(handler, max_connections=1)
    with trio.move_on_after(1.0 if ending == "cancelled" else 60.0):
        first = await http.request("GET", URL)
        assert isinstance(first, HttpFailure)
    with trio.fail_after(1.0):
        second = await http.request("GET", URL)
    assert isinstance(second, HttpReply) and second.status == 200


async def test_a_request_from_a_cancelled_scope_sends_nothing() -> None:
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200)

    http = client(record)
    with trio.CancelScope() as scope:
        scope.cancel()
        await http.request("POST", URL, content=b"{}")
    assert scope.cancelled_caught and seen == []


# -- the attempt deadline ----------------------------------------------------------------


async def test_a_request_the_network_never_answers_ends_at_the_deadline_saying_so(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def hang(request: httpx.Request) -> httpx.Response:
        await trio.sleep_forever()
        raise AssertionError

    http = client(hang, timeouts=Timeouts.within(3.0, grace=5.0))
    started = trio.current_time()
    outcome = await http.request("POST", URL)
    assert isinstance(outcome, HttpFailure) and outcome.problem is Problem.TIMEOUT
    assert outcome.text("backend") == (
        "backend did not finish its reply within 8s (the attempt's deadline)"
    )
    assert trio.current_time() - started == pytest.approx(8.0)


async def test_a_per_request_timeouts_replace_the_clients(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def hang(request: httpx.Request) -> httpx.Response:
        assert request.extensions["timeout"]["connect"] == 1.0
        await trio.sleep_forever()
        raise AssertionError

    outcome = await client(hang).request("GET", URL, timeouts=Timeouts(1.0, 1.0, 1.0, 2.0))
    assert isinstance(outcome, HttpFailure) and "within 2s" in outcome.detail


# -- the reply cap and the body ----------------------------------------------------------


async def test_a_streamed_reply_past_the_cap_is_not_read_further() -> None:
    sent = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(1000):
            sent += 1
            yield b"x" * 1024

    http = client(lambda request: httpx.Response(200, content=chunks()), max_reply_bytes=4096)
    outcome = await http.request("POST", URL)
    assert outcome == HttpFailure(Problem.TOO_LARGE, "reply larger than 4 KiB")
    assert sent <= 5


async def test_without_read_body_the_body_is_never_read() -> None:
    sent = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal sent
        sent += 1
        yield b"x" * 1024

    http = client(lambda request: httpx.Response(204, content=chunks()))
    outcome = await http.request("GET", URL, read_body=False)
    assert isinstance(outcome, HttpReply) and (outcome.status, outcome.body) == (204, b"")
    assert sent == 0


async def test_the_request_carries_the_clients_headers_and_no_compression() -> None:
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200)

    await client(record).request("POST", "http://u:p%40ss@h.invalid/x", content=b"{}")
    (request,) = seen
    assert request.headers["user-agent"].startswith("trio-idle/")
    assert request.headers["accept-encoding"] == "identity"
    assert request.headers["authorization"] == "Basic dTpwQHNz"  # u:p@ss
    assert request.url.userinfo == b""


async def test_a_connect_error_never_quotes_the_url() -> None:
    target = "http://receiver.invalid/ping/s3cret-check-token"

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(f"cannot reach {target}", request=request)

    outcome = await client(refuse).request("GET", target)
    assert isinstance(outcome, HttpFailure) and outcome.problem is Problem.UNREACHABLE
    assert "s3cret-check-token" not in outcome.detail and "<url>" in outcome.detail


# -- redirects ---------------------------------------------------------------------------


def redirecting(hops: int) -> Callable[[httpx.Request], httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        n = int(request.url.path.rsplit("/", 1)[1])
        if n < hops:
            return httpx.Response(302, headers={"location": f"/hop/{n + 1}"})
        return httpx.Response(200, text=str(n))

    return handler


async def test_redirects_are_followed_only_when_asked_and_only_so_far() -> None:
    http = client(redirecting(3))
    plain = await http.request("GET", "http://r.invalid/hop/0")
    assert isinstance(plain, HttpReply) and plain.status == 302
    followed = await http.request("GET", "http://r.invalid/hop/0", follow_redirects=True)
    assert isinstance(followed, HttpReply) and (followed.status, followed.body) == (200, b"3")
    posted = await http.request("POST", "http://r.invalid/hop/0", follow_redirects=True)
    assert isinstance(posted, HttpReply) and posted.status == 302
    endless = await client(redirecting(1000)).request(
        "GET", "http://r.invalid/hop/0", follow_redirects=True
    )
    assert isinstance(endless, HttpReply) and endless.status == 302
    assert endless.headers["location"] == f"/hop/{MAX_REDIRECTS + 1}"


# -- the backend watch -------------------------------------------------------------------


async def test_every_request_of_a_watched_client_feeds_the_watch(
    autojump_clock: trio.testing.MockClock,
) -> None:
    answers: list[int | None] = [503, 401, 429, 404, None, 200]

    def handler(request: httpx.Request) -> httpx.Response:
        status = answers.pop(0)
        if status is None:
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        return httpx.Response(status)

    watch = BackendWatch()
    http = client(handler, watch=watch)
    seen: list[bool] = []
    for _ in range(6):
        await http.request("POST", URL)
        seen.append(watch.failing_since is not None)
    assert seen == [True, True, False, False, True, False]


async def test_a_client_without_a_watch_judges_no_backend() -> None:
    watch = BackendWatch()
    http = client(lambda request: httpx.Response(503))  # not given the watch
    await http.request("POST", URL)
    assert watch.failing_since is None and http.watch is None
