"""WebhookClient over real sockets on 127.0.0.1: reply bodies are capped, and proxies from
the environment are ignored unless asked for (the secret header goes nowhere else)."""

from __future__ import annotations

import contextlib
import functools
import gc
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import trustme
from trio_idle_testing.backend import Reply, ScanBackend

from tests.fixtures import webhook_client
from tests.harness import poll_until
from tests.recording_proxy import PROXY_ANSWER, RecordingProxy, point_proxies_at
from trio_idle.accounts.connections import AUTH_OAUTH2, MailConnection
from trio_idle.accounts.credentials import TokenUnavailable
from trio_idle.auth.token_backend import BackendTokenSource
from trio_idle.backend.client import MAX_IDLE_CONNECTIONS, MAX_REPLY_BYTES
from trio_idle.backend.webhook import BackendAuth, ScanJob, Verdict, WebhookClient, backend_http
from trio_idle.core.secret import Secret
from trio_idle.core.stats import Stats

SECRET = "webhook-client-ADMIN-s3cret"
EMAIL = "alice@client.test"
TIMEOUT = 10.0
RSS_BOUND = 32 << 20


def job() -> ScanJob:
    return ScanJob(
        connection_id="c-1", user_id="u-1", email=EMAIL, mailbox="INBOX", reason="exists"
    )


def client_for(url: str, *, total_timeout: float = 5.0, **kw: Any) -> WebhookClient:
    """The daemon's scan client on loopback (``kw``: ``max_connections``, ``stats``,
    ``trust_env``, ``max_reply_bytes``)."""
    kw.setdefault("max_connections", 4)
    return webhook_client(url, secret=SECRET, total_timeout=total_timeout, **kw)


@pytest.fixture
async def backend(nursery: trio.Nursery) -> ScanBackend:
    server = ScanBackend(secret=SECRET)
    await nursery.start(server.serve)
    return server


@pytest.fixture
async def proxy(nursery: trio.Nursery) -> RecordingProxy:
    server = RecordingProxy()
    await nursery.start(server.serve)
    return server


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB$", text, re.MULTILINE)
    assert match, f"{field} missing from /proc/self/status"
    return int(match.group(1)) * 1024


def reset_peak_rss() -> int:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0) and return that RSS in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS")


# -- reply cap ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body_size", "chunked"),
    [
        (300 << 20, True),  # found while reading: no content-length
        (300 << 20, False),  # announced up front
        (1 << 40, False),  # a content-length of 1 TiB: never read
        (1 << 40, True),  # endless without content-length: closed, not drained
    ],
    ids=["300MB-chunked", "300MB-content-length", "1TiB-content-length", "1TiB-chunked"],
)
async def test_an_oversized_reply_is_a_retry_and_costs_no_memory(
    backend: ScanBackend, body_size: int, chunked: bool
) -> None:
    backend.script(EMAIL, [Reply(body_size=body_size, chunked=chunked)])
    client = client_for(backend.scan_url)
    try:
        before = reset_peak_rss()
        with trio.fail_after(TIMEOUT):
            reply = await client.send(job())
        grown = _status_kib("VmHWM") - before
        assert grown < RSS_BOUND, f"peak RSS grew by {grown / 2**20:.1f} MiB"
        assert reply.verdict is Verdict.RETRY
        assert reply.detail == "backend reply larger than 64 KiB"
        with trio.fail_after(TIMEOUT):
            # the connection was closed, not drained: the backend sees the end of it
            await backend.wait_for_requests(1, email=EMAIL, finished=True)
            again = await client.send(job())
        assert (again.verdict, again.scanned) == (Verdict.OK, 1)
        first, second = backend.requests_for(EMAIL)
        assert second.connection_number != first.connection_number
    finally:
        await client.aclose()


async def test_a_reply_of_exactly_the_cap_is_read(backend: ScanBackend) -> None:
    backend.script(
        EMAIL,
        [
            Reply(json={"scanned": 4, "blocked": 2}, body_size=MAX_REPLY_BYTES, chunked=True),
            Reply(body_size=MAX_REPLY_BYTES + 1, chunked=True),
        ],
    )
    client = client_for(backend.scan_url)
    try:
        with trio.fail_after(TIMEOUT):
            exact = await client.send(job())
            over = await client.send(job())
    finally:
        await client.aclose()
    assert (exact.verdict, exact.scanned, exact.blocked) == (Verdict.OK, 4, 2)
    assert (over.verdict, over.detail) == (Verdict.RETRY, "backend reply larger than 64 KiB")


async def test_the_cap_is_a_constructor_parameter(backend: ScanBackend) -> None:
    backend.script(EMAIL, [Reply(body_size=200), Reply(body_size=100)])
    client = client_for(backend.scan_url, max_reply_bytes=100)
    try:
        with trio.fail_after(TIMEOUT):
            over = await client.send(job())
            fits = await client.send(job())
    finally:
        await client.aclose()
    assert (over.verdict, over.detail) == (Verdict.RETRY, "backend reply larger than 100 bytes")
    assert (fits.verdict, fits.scanned) == (Verdict.OK, 1)


async def test_no_compressed_reply_is_asked_for(backend: ScanBackend) -> None:
    # the cap counts bytes as sent; a gzip reply could inflate past it in one step
    client = client_for(backend.scan_url)
    try:
        with trio.fail_after(TIMEOUT):
            await client.send(job())
    finally:
        await client.aclose()
    (request,) = backend.requests_for(EMAIL)
    assert request.headers["accept-encoding"] == "identity"


# -- proxies from the environment ------------------------------------------------------


async def test_proxy_variables_are_ignored_by_default(
    backend: ScanBackend, proxy: RecordingProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    point_proxies_at(monkeypatch, proxy.url)
    client = client_for(backend.scan_url)
    try:
        with trio.fail_after(TIMEOUT):
            reply = await client.send(job())
    finally:
        await client.aclose()
    assert (reply.verdict, reply.scanned) == (Verdict.OK, 1)  # the backend's answer
    (request,) = backend.requests_for(EMAIL)
    assert request.headers["x-admin-secret"] == SECRET
    assert proxy.requests == []  # the secret header never went there


async def test_proxy_variables_are_used_with_trust_env(
    backend: ScanBackend, proxy: RecordingProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the counterpart that makes the test above meaningful: this environment does send
    # a trusting client to the proxy, loopback backend and all
    point_proxies_at(monkeypatch, proxy.url)
    client = client_for(backend.scan_url, trust_env=True)
    try:
        with trio.fail_after(TIMEOUT):
            reply = await client.send(job())
    finally:
        await client.aclose()
    assert (reply.scanned, reply.blocked) == (PROXY_ANSWER["scanned"], PROXY_ANSWER["blocked"])
    (seen,) = proxy.requests
    assert (seen.method, seen.target) == ("POST", backend.scan_url)
    assert seen.headers["x-admin-secret"] == SECRET
    assert backend.requests == []


# -- TLS trust from the environment stays ----------------------------------------------


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def tls_backend(nursery: trio.Nursery, ca: trustme.CA) -> AsyncIterator[RecordingProxy]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    server = RecordingProxy(ssl_context=context)
    await nursery.start(server.serve)
    yield server


@pytest.mark.parametrize("trust_env", [False, True])
async def test_ssl_cert_file_is_honoured_whatever_trust_env(
    tls_backend: RecordingProxy,
    ca: trustme.CA,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    trust_env: bool,
) -> None:
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    trusting = client_for(tls_backend.url + "/scan", trust_env=trust_env)
    monkeypatch.delenv("SSL_CERT_FILE")
    untrusting = client_for(tls_backend.url + "/scan", trust_env=trust_env)
    try:
        with trio.fail_after(TIMEOUT):
            accepted = await trusting.send(job())
            refused = await untrusting.send(job())
    finally:
        await trusting.aclose()
        await untrusting.aclose()
    assert (accepted.verdict, accepted.scanned) == (Verdict.OK, PROXY_ANSWER["scanned"])
    assert refused.verdict is Verdict.RETRY and "CERTIFICATE_VERIFY_FAILED" in refused.detail
    assert len(tls_backend.requests) == 1


async def test_requests_leave_no_cyclic_garbage(backend: ScanBackend) -> None:
    """Every request is freed by reference counting: garbage for the cyclic collector
    makes young collections run often, and each one stops every session (at 10,000
    sessions, 2-5 ms: the tail of the push latency)."""
    client = client_for(backend.url + "/api/mail/scan-internal")
    try:
        for _ in range(3):  # the pool's connection and first-use caches
            assert (await client.send(job())).verdict is Verdict.OK
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for _ in range(20):
                assert (await client.send(job())).verdict is Verdict.OK
            backend.script(EMAIL, [Reply(503)])  # a retry verdict takes the same path
            assert (await client.send(job())).verdict is Verdict.RETRY
            gc.collect()
            left = [type(o).__qualname__ for o in gc.garbage]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
        assert left == []
    finally:
        await client.aclose()


async def test_a_burst_past_the_pool_waits_its_turn_and_leaves_few_idle_connections(
    backend: ScanBackend,
) -> None:
    """A burst (a ramp's startup scans and health reports) larger than the pool: every
    request is answered, never more at once than the pool size, and afterwards at most
    MAX_IDLE_CONNECTIONS stay open (httpcore walks every pooled connection per idle one
    on each request, so a pool left full of idle connections makes each request costly)."""
    pool = 3 * MAX_IDLE_CONNECTIONS
    client = client_for(backend.url + "/api/mail/scan-internal", max_connections=pool)
    verdicts: list[Verdict] = []

    async def one() -> None:
        verdicts.append((await client.send(job())).verdict)

    try:
        gate = backend.hold(EMAIL)
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for _ in range(2 * pool):
                    nursery.start_soon(one)
                await poll_until(lambda: backend.in_flight(EMAIL) == pool)
                assert backend.open_connections == pool
                gate.release()
            assert verdicts == [Verdict.OK] * (2 * pool)
            assert backend.max_in_flight(EMAIL) == pool
            await poll_until(lambda: backend.open_connections <= MAX_IDLE_CONNECTIONS)
    finally:
        await client.aclose()


# -- what the request carries, and when it is not sent ---------------------------------


@pytest.mark.parametrize("trust_env", [False, True])
async def test_credentials_in_the_backend_url_are_sent_as_basic_auth(
    backend: ScanBackend, monkeypatch: pytest.MonkeyPatch, trust_env: bool
) -> None:
    """``BACKEND_URL=http://user:password@host`` authenticates the way httpx's client
    does, whichever path the request takes; the credentials are not in the request line."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    url = backend.scan_url.replace("http://", "http://svc:p%40ss@")
    client = client_for(url, trust_env=trust_env)
    try:
        with trio.fail_after(TIMEOUT):
            reply = await client.send(job())
    finally:
        await client.aclose()
    assert reply.verdict is Verdict.OK
    (request,) = backend.requests_for(EMAIL)
    assert request.headers["authorization"] == "Basic c3ZjOnBAc3M="  # svc:p@ss


COOKIE = "sid=b4ckend-session-cookie; Path=/; HttpOnly"


@pytest.mark.parametrize("trust_env", [False, True])
async def test_cookies_the_backend_sets_are_never_sent_back(
    backend: ScanBackend, monkeypatch: pytest.MonkeyPatch, trust_env: bool
) -> None:
    """A backend (or whatever answers at its address) that sets a cookie gets none back:
    every scan stands on the secret header alone, whichever path the request takes."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    backend.script(EMAIL, [Reply(headers={"set-cookie": COOKIE}), Reply(close=True), Reply()])
    client = client_for(backend.scan_url, trust_env=trust_env)
    try:
        with trio.fail_after(TIMEOUT):
            for _ in range(3):  # the same connection, then a new one
                assert (await client.send(job())).verdict is Verdict.OK
    finally:
        await client.aclose()
    later = backend.requests_for(EMAIL)[1:]
    assert len(later) == 2 and {r.connection_number for r in later} == {1, 2}
    assert [r.headers.get("cookie") for r in later] == [None, None]


@pytest.mark.parametrize("trust_env", [False, True])
async def test_cookies_the_token_endpoint_sets_are_never_sent_back(
    backend: ScanBackend, monkeypatch: pytest.MonkeyPatch, trust_env: bool
) -> None:
    """The token client is an httpx client, whose cookie jar would keep what the backend
    sets and send it with every later token request, for every connection."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    backend.token_reply = lambda request: Reply(
        json={"accessToken": "cookie-test-access-token-1", "expiresAt": 4e9},
        headers={"set-cookie": COOKIE},
    )
    source = BackendTokenSource(
        backend.url + backend.token_path,
        BackendAuth("x-admin-secret", Secret(SECRET)),
        backend_http(5.0, 1, trust_env=trust_env),
        refresh_ahead=60.0,
    )
    conn = MailConnection(
        "c-1", "u-1", EMAIL, "imap.example.test", 993, EMAIL, Secret(""), auth=AUTH_OAUTH2
    )
    try:
        with trio.fail_after(TIMEOUT):
            for _ in range(2):
                await source.get(conn, force=True)
    finally:
        await source.aclose()
    requests = [r for r in backend.requests if r.path == backend.token_path]
    assert len(requests) == 2 and requests[1].headers.get("cookie") is None


@pytest.mark.parametrize("trust_env", [False, True])
async def test_a_token_endpoint_redirect_is_not_followed(
    backend: ScanBackend, proxy: RecordingProxy, monkeypatch: pytest.MonkeyPatch, trust_env: bool
) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    backend.token_reply = lambda request: Reply(
        307, headers={"location": proxy.url + backend.token_path}
    )
    source = BackendTokenSource(
        backend.url + backend.token_path,
        BackendAuth("x-admin-secret", Secret(SECRET)),
        backend_http(5.0, 1, trust_env=trust_env),
        refresh_ahead=60.0,
    )
    conn = MailConnection(
        "c-1", "u-1", EMAIL, "imap.example.test", 993, EMAIL, Secret(""), auth=AUTH_OAUTH2
    )
    try:
        with trio.fail_after(TIMEOUT), pytest.raises(TokenUnavailable) as info:
            await source.get(conn)
    finally:
        await source.aclose()
    assert "307" in str(info.value) and proxy.url not in str(info.value)
    assert proxy.requests == []  # ADMIN_SECRET never went there


async def test_a_scan_posted_from_a_cancelled_scope_sends_nothing(backend: ScanBackend) -> None:
    """A free slot and a pooled connection must not let a request leave before the first
    wait notices the cancellation (shutdown, a passed deadline): the backend would run a
    scan whose answer nobody reads."""
    client = client_for(backend.scan_url)
    try:
        with trio.fail_after(TIMEOUT):
            assert (await client.send(job())).verdict is Verdict.OK  # pools a connection
            with trio.CancelScope() as scope:
                scope.cancel()
                await client.send(job())
            assert scope.cancelled_caught
            # a request that did leave would be read by now: the same connection is free
            assert (await client.send(job())).verdict is Verdict.OK
    finally:
        await client.aclose()
    assert len(backend.requests_for(EMAIL)) == 2


async def test_a_kept_alive_connection_the_backend_closed_costs_no_retry(
    backend: ScanBackend,
) -> None:
    """The backend drops a kept-alive connection as the next scan goes out on it (its
    keep-alive timeout): the scan goes again at once on a fresh connection, with the
    same scan id, and is answered within the one attempt: no RETRY verdict, so no
    backoff wait and no "scan failed" line. Counted, for the operator."""
    backend.script(EMAIL, [Reply(), Reply(disconnect=True)])
    stats = Stats()
    client = client_for(backend.scan_url, stats=stats)
    try:
        with trio.fail_after(TIMEOUT):
            assert (await client.send(job())).verdict is Verdict.OK
            reply = await client.send(job())
    finally:
        await client.aclose()
    assert (reply.verdict, reply.scanned) == (Verdict.OK, 1)
    first, dropped, answered = backend.requests_for(EMAIL)
    assert dropped.scan_id == answered.scan_id != first.scan_id
    assert (first.connection_number, dropped.connection_number) == (1, 1)
    assert answered.connection_number == 2
    assert stats.get("backend_stale_connection_retries") == 1


# -- which deadline ended an attempt ---------------------------------------------------


Handler = Callable[[trio.SocketStream], Awaitable[None]]


async def raw_server(nursery: trio.Nursery, handler: Handler) -> int:
    """A bare TCP server on 127.0.0.1 playing ``handler`` on each connection; its port.
    The client giving up mid-script is the normal end here, not a failure."""

    async def guarded(stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await handler(stream)

    listeners = await nursery.start(functools.partial(trio.serve_tcp, host="127.0.0.1"), guarded, 0)
    port: int = listeners[0].socket.getsockname()[1]
    return port


async def read_head(stream: trio.SocketStream) -> None:
    """Read until the end of the request head (the small JSON body comes with it or
    right after; nobody answers it anyway)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return
        data += chunk


async def trickle_forever(stream: trio.SocketStream) -> None:
    # every byte comes well within the read timeout: only the attempt's deadline ends it
    await read_head(stream)
    await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n")
    while True:
        await trio.sleep(2.0)
        await stream.send_all(b" ")


async def head_then_silence(stream: trio.SocketStream) -> None:
    await read_head(stream)
    await trio.sleep(2.0)
    await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n12345")
    await trio.sleep_forever()


async def never_greet(stream: trio.SocketStream) -> None:
    await trio.sleep_forever()  # a TLS ClientHello never answered


@pytest.mark.parametrize(
    ("handler", "scheme", "total", "detail", "ended_after"),
    [
        (
            trickle_forever,
            "http",
            3.0,
            "backend did not finish its reply within 8s (the attempt's deadline)",
            8.0,
        ),
        (head_then_silence, "http", 3.0, "backend sent nothing for 3s (read timeout)", 5.0),
        (
            never_greet,
            "https",
            30.0,
            "backend did not accept a connection within 10s (connect timeout)",
            10.0,
        ),
    ],
    ids=["trickle-past-the-attempt-deadline", "read-timeout-after-the-head", "connect-timeout"],
)
async def test_a_timed_out_attempt_names_the_deadline_that_ended_it(
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    handler: Handler,
    scheme: str,
    total: float,
    detail: str,
    ended_after: float,
) -> None:
    """The log line of a timed-out scan states the limit that fired and its value: an
    operator reading "within 3s" for an attempt that took 8 s looks for the wrong cause.
    (Virtual time: the server's pauses and the client's limits are jumped over.)"""
    port = await raw_server(nursery, handler)
    client = client_for(
        f"{scheme}://127.0.0.1:{port}/api/mail/scan-internal",
        total_timeout=total,
        max_connections=1,
    )
    try:
        started = trio.current_time()
        with trio.fail_after(60):
            reply = await client.send(job())
        took = trio.current_time() - started
    finally:
        await client.aclose()
    assert (reply.verdict, reply.detail) == (Verdict.RETRY, detail)
    assert took == pytest.approx(ended_after, abs=0.1)


# -- whether the backend answers (readiness) -------------------------------------------


async def test_the_backend_watch_follows_what_the_backend_answers(backend: ScanBackend) -> None:
    """Down, 5xx and a refused ADMIN_SECRET start a run of failures; a 429, another 4xx or
    a 2xx is an answer and ends it."""
    backend.script(
        EMAIL,
        [Reply(status=503), Reply(status=401), Reply(status=429), Reply(status=404), Reply()],
    )
    client = client_for(backend.scan_url)
    watch = client.backend
    try:
        with trio.fail_after(TIMEOUT):
            assert (await client.send(job())).status == 503
            first = watch.failing_since
            assert first is not None
            assert (await client.send(job())).status == 401
            assert watch.failing_since == first  # the run goes on
            assert (await client.send(job())).status == 429
            assert watch.failing_since is None
            assert (await client.send(job())).status == 404
            assert watch.failing_since is None
            backend.down()
            assert (await client.send(job())).verdict is Verdict.RETRY
            assert watch.failing_since is not None
            backend.up()
            assert (await client.send(job())).verdict is Verdict.OK
            assert watch.failing_since is None
    finally:
        await client.aclose()
