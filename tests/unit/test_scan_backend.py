"""ScanBackend over real sockets, driven by a real httpx.AsyncClient on trio.

Every wait is bounded by ``trio.fail_after``; nothing sleeps in the hope that something
has happened by then.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from email.message import EmailMessage
from typing import Any

import httpx
import pytest
import trio
import trio.lowlevel
import trio.testing
from trio_idle_testing.backend import KeywordScanner, Reply, ScanBackend, ScanRequest

SECRET = "s3cret"
PATH = "/api/mail/scan-internal"
TIMEOUT = 10.0


@pytest.fixture
async def backend(nursery: trio.Nursery) -> ScanBackend:
    server = ScanBackend(secret=SECRET, path=PATH)
    url = await nursery.start(server.serve)
    assert url == server.url == f"http://127.0.0.1:{server.port}"
    assert server.port != 0
    return server


@pytest.fixture
async def client() -> Any:
    async with httpx.AsyncClient(timeout=TIMEOUT) as http:
        yield http


_scan_counter = 0


def scan_body(email: str, reason: str = "exists", **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "connectionId": f"conn-{email}",
        "userId": "user-1",
        "email": email,
        "mailbox": "INBOX",
        "reason": reason,
    }
    body.update(extra)
    return body


def scan_headers(secret: str | None = SECRET, **extra: str) -> dict[str, str]:
    global _scan_counter
    _scan_counter += 1
    headers = {"user-agent": "trio-idle/0.1.0", "x-scan-id": f"scan-{_scan_counter}"}
    if secret is not None:
        headers["x-admin-secret"] = secret
    headers.update(extra)
    return headers


async def post(
    client: httpx.AsyncClient,
    backend: ScanBackend,
    email: str,
    *,
    secret: str | None = SECRET,
    body: dict[str, Any] | None = None,
    path: str = PATH,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    with trio.fail_after(TIMEOUT):
        return await client.post(
            backend.url + path,
            json=scan_body(email) if body is None else body,
            headers=scan_headers(secret) if headers is None else headers,
        )


async def test_records_and_answers_default(backend: ScanBackend, client: httpx.AsyncClient) -> None:
    response = await post(client, backend, "a@example.com")
    assert response.status_code == 200
    assert response.json() == {"scanned": 1, "blocked": 0}
    assert response.headers["content-type"] == "application/json"

    [request] = backend.requests
    assert backend.requests_for("a@example.com") == [request]
    assert backend.requests_for("other@example.com") == []
    assert request.email == "a@example.com"
    assert request.body == scan_body("a@example.com")
    assert request.connection_id == "conn-a@example.com"
    assert request.reason == "exists"
    assert request.method == "POST" and request.path == PATH
    assert request.headers["x-admin-secret"] == SECRET
    assert request.headers["content-type"] == "application/json"
    assert request.headers["user-agent"] == "trio-idle/0.1.0"
    assert request.scan_id is not None and request.scan_id.startswith("scan-")
    assert all(name == name.lower() for name in request.headers)
    assert request.status == 200 and request.problems == []
    assert request.finished_at is not None
    assert request.received_at <= request.finished_at <= trio.current_time()
    assert backend.in_flight("a@example.com") == 0
    assert backend.max_in_flight("a@example.com") == 1


async def test_wait_for_requests_blocks_until_enough(
    backend: ScanBackend, client: httpx.AsyncClient
) -> None:
    got: list[ScanRequest] = []

    async def waiter() -> None:
        with trio.fail_after(TIMEOUT):
            got.extend(await backend.wait_for_requests(2, email="w@example.com"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await post(client, backend, "w@example.com")
        await post(client, backend, "other@example.com")
        await trio.testing.wait_all_tasks_blocked()
        assert got == []  # one matching request is not enough
        await post(client, backend, "w@example.com")
    assert [r.email for r in got] == ["w@example.com"] * 2
    # already satisfied: returns at once; finished=True counts only completed requests
    with trio.fail_after(TIMEOUT):
        assert len(await backend.wait_for_requests(3)) == 3
        assert len(await backend.wait_for_requests(3, finished=True)) == 3


@pytest.mark.parametrize("secret", [None, "wrong", "s3cret-and-more", ""])
async def test_bad_or_missing_secret_is_401_and_recorded(
    backend: ScanBackend, client: httpx.AsyncClient, secret: str | None
) -> None:
    backend.script("a@example.com", [Reply(500)])
    response = await post(client, backend, "a@example.com", secret=secret)
    assert response.status_code == 401
    assert response.json() == {"error": "unauthorized"}
    [request] = backend.requests
    assert request.status == 401 and request.email == "a@example.com"
    assert backend.scripted_left("a@example.com") == 1  # 401 does not consume the script


async def test_unknown_path_404_and_get_405(
    backend: ScanBackend, client: httpx.AsyncClient
) -> None:
    response = await post(client, backend, "a@example.com", path="/api/other")
    assert response.status_code == 404
    with trio.fail_after(TIMEOUT):
        response = await client.get(backend.url + PATH, headers=scan_headers())
    assert response.status_code == 405
    assert [(r.path, r.method, r.status) for r in backend.requests] == [
        ("/api/other", "POST", 404),
        (PATH, "GET", 405),
    ]


async def test_contract_violations_are_400_when_strict(
    backend: ScanBackend, client: httpx.AsyncClient
) -> None:
    bad = scan_body("a@example.com", reason="because")
    del bad["userId"]
    response = await post(client, backend, "a@example.com", body=bad)
    assert response.status_code == 400
    problems = response.json()["problems"]
    assert any("reason" in p for p in problems)
    assert any("userId" in p for p in problems)
    assert backend.requests[-1].problems == problems

    response = await post(
        client, backend, "a@example.com", headers={"x-admin-secret": SECRET}
    )  # no user-agent of ours, no x-scan-id
    assert response.status_code == 400
    assert {"user-agent must be trio-idle/<version>", "x-scan-id header missing"} <= set(
        response.json()["problems"]
    )

    with trio.fail_after(TIMEOUT):
        response = await client.post(backend.scan_url, content=b"not json", headers=scan_headers())
    assert response.status_code == 400
    assert backend.requests[-1].body == {} and backend.requests[-1].email is None

    backend.strict = False
    response = await post(client, backend, "a@example.com", body=bad)
    assert response.status_code == 200
    assert backend.requests[-1].problems  # still recorded


async def test_signature_checked_when_signing_key_given(
    nursery: trio.Nursery, client: httpx.AsyncClient
) -> None:
    backend = ScanBackend(secret=SECRET, signing_key="sign-key")
    await nursery.start(backend.serve)
    raw = json.dumps(scan_body("a@example.com")).encode()
    good = "sha256=" + hmac.new(b"sign-key", raw, hashlib.sha256).hexdigest()
    base = {**scan_headers(), "content-type": "application/json"}
    with trio.fail_after(TIMEOUT):
        ok = await client.post(backend.scan_url, content=raw, headers={**base, "x-signature": good})
        missing = await client.post(backend.scan_url, content=raw, headers=base)
        wrong = await client.post(
            backend.scan_url, content=raw, headers={**base, "x-signature": "sha256=" + "0" * 64}
        )
    assert [ok.status_code, missing.status_code, wrong.status_code] == [200, 400, 400]
    assert backend.requests[0].signature_matches("sign-key")
    assert not backend.requests[0].signature_matches("other-key")
    assert not backend.requests[1].signature_matches("sign-key")


async def test_hold_blocks_one_email_and_counts_in_flight(
    backend: ScanBackend, client: httpx.AsyncClient
) -> None:
    held = "held@example.com"
    gate = backend.hold(held)
    assert backend.hold(held) is gate  # holding again: the same gate
    responses: list[httpx.Response] = []

    async def send(email: str) -> None:
        responses.append(await post(client, backend, email))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send, held)
        nursery.start_soon(send, held)
        with trio.fail_after(TIMEOUT):
            await backend.wait_for_requests(2, email=held)
        # another email is not held
        free = await post(client, backend, "free@example.com")
        assert free.status_code == 200
        await trio.testing.wait_all_tasks_blocked()
        assert responses == []  # both held requests still unanswered
        assert backend.in_flight(held) == 2 and gate.waiting == 2
        assert backend.in_flight("free@example.com") == 0
        assert backend.in_flight() == 2
        assert all(r.status is None and r.finished_at is None for r in backend.requests_for(held))
        gate.release()
    assert [r.status_code for r in responses] == [200, 200]
    assert backend.in_flight(held) == 0 and gate.waiting == 0
    assert backend.max_in_flight(held) == 2
    assert backend.max_in_flight("free@example.com") == 1
    assert backend.max_in_flight() == 3  # 2 held + the free one
    # released: later requests pass straight through
    assert (await post(client, backend, held)).status_code == 200


async def test_release_all(backend: ScanBackend, client: httpx.AsyncClient) -> None:
    gates = [backend.hold("a@example.com"), backend.hold("b@example.com")]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(post, client, backend, "a@example.com")
        nursery.start_soon(post, client, backend, "b@example.com")
        with trio.fail_after(TIMEOUT):
            await backend.wait_for_requests(2)
        backend.release_all()
    assert all(g.released for g in gates)
    assert [r.status for r in backend.requests] == [200, 200]


async def test_script_consumed_in_order_then_default(
    backend: ScanBackend, client: httpx.AsyncClient
) -> None:
    email = "s@example.com"
    backend.script(
        email,
        [
            Reply(status=500),
            Reply(status=429, headers={"Retry-After": "1"}),
            Reply(200, json={"scanned": 7, "blocked": 3}),
            Reply(
                status=502, body=b"<html>bad gateway</html>", headers={"content-type": "text/html"}
            ),
        ],
    )
    backend.default_reply = lambda request: Reply(json={"scanned": 0, "blocked": 0})
    other = await post(client, backend, "other@example.com")  # scripts are per email
    assert other.json() == {"scanned": 0, "blocked": 0}

    r500 = await post(client, backend, email)
    assert r500.status_code == 500 and r500.json() == {"error": "HTTP 500"}
    r429 = await post(client, backend, email)
    assert r429.status_code == 429 and r429.headers["retry-after"] == "1"
    r200 = await post(client, backend, email)
    assert r200.status_code == 200 and r200.json() == {"scanned": 7, "blocked": 3}
    r502 = await post(client, backend, email)
    assert r502.status_code == 502 and r502.text == "<html>bad gateway</html>"
    assert r502.headers["content-type"] == "text/html"
    assert backend.scripted_left(email) == 0
    after = await post(client, backend, email)
    assert after.json() == {"scanned": 0, "blocked": 0}
    assert [r.status for r in backend.requests_for(email)] == [500, 429, 200, 502, 200]
    assert backend.requests_for(email)[1].reply == Reply(429, headers={"Retry-After": "1"})


async def test_scripted_delay(backend: ScanBackend, client: httpx.AsyncClient) -> None:
    backend.script("d@example.com", [Reply(delay=0.3)])
    response = await post(client, backend, "d@example.com")
    assert response.status_code == 200
    [request] = backend.requests
    assert request.finished_at is not None
    assert request.finished_at - request.received_at >= 0.3


async def test_scripted_delay_outlasting_client_timeout(
    backend: ScanBackend,
) -> None:
    backend.script("slow@example.com", [Reply(delay=30)])
    async with httpx.AsyncClient(timeout=0.2) as impatient:
        with trio.fail_after(TIMEOUT), pytest.raises(httpx.ReadTimeout):
            await impatient.post(
                backend.scan_url, json=scan_body("slow@example.com"), headers=scan_headers()
            )
    assert backend.in_flight("slow@example.com") == 1  # the backend is still "scanning"


async def test_disconnect_and_close_replies(
    backend: ScanBackend, client: httpx.AsyncClient
) -> None:
    backend.script("x@example.com", [Reply(disconnect=True), Reply(close=True)])
    with pytest.raises(httpx.RemoteProtocolError):
        await post(client, backend, "x@example.com")
    assert backend.requests[0].status is None and backend.requests[0].finished_at is not None
    assert (await post(client, backend, "x@example.com")).status_code == 200  # close=True
    assert (await post(client, backend, "x@example.com")).status_code == 200
    assert [r.connection_number for r in backend.requests] == [1, 2, 3]


async def test_keep_alive_connection_is_reused(
    backend: ScanBackend, client: httpx.AsyncClient
) -> None:
    for _ in range(5):
        assert (await post(client, backend, "k@example.com")).status_code == 200
    assert backend.connections_accepted == 1
    assert {r.connection_number for r in backend.requests} == {1}
    assert backend.open_connections == 1  # kept open, idle


async def test_head_gets_a_head_without_a_body_and_the_connection_serves_on(
    backend: ScanBackend, client: httpx.AsyncClient
) -> None:
    with trio.fail_after(TIMEOUT):
        head = await client.head(backend.url + PATH, headers=scan_headers())
    assert head.status_code == 405 and head.content == b""
    assert int(head.headers["content-length"]) == len(b'{"error": "method not allowed"}')
    assert (await post(client, backend, "h@example.com")).status_code == 200
    assert backend.connections_accepted == 1  # the same connection
    assert [(r.method, r.status) for r in backend.requests] == [("HEAD", 405), ("POST", 200)]


async def test_down_refuses_then_up_accepts_on_same_port(
    backend: ScanBackend, client: httpx.AsyncClient
) -> None:
    port = backend.port
    assert (await post(client, backend, "u@example.com")).status_code == 200
    backend.down()
    assert not backend.is_up
    backend.down()  # idempotent
    with trio.fail_after(TIMEOUT):
        await _wait_until(lambda: backend.open_connections == 0)
    with pytest.raises(httpx.ConnectError):
        await post(client, backend, "u@example.com")  # pooled connection gone, connect refused
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient() as fresh:
            with trio.fail_after(TIMEOUT):
                await fresh.get(backend.url)
    backend.up()
    assert backend.is_up and backend.port == port
    assert (await post(client, backend, "u@example.com")).status_code == 200
    assert [r.status for r in backend.requests] == [200, 200]
    assert backend.connections_accepted == 2


async def test_down_aborts_requests_in_progress(
    backend: ScanBackend, client: httpx.AsyncClient
) -> None:
    backend.hold("h@example.com")
    errors: list[Exception] = []

    async def send() -> None:
        try:
            await post(client, backend, "h@example.com")
        except httpx.TransportError as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        with trio.fail_after(TIMEOUT):
            await backend.wait_for_requests(1)
        backend.down()
    assert len(errors) == 1
    [request] = backend.requests
    assert request.status is None and request.finished_at is not None
    assert backend.in_flight("h@example.com") == 0


async def _wait_until(predicate: Any) -> None:
    """Let every task run until blocked, until ``predicate()`` holds (caller bounds it)."""
    while not predicate():
        await trio.testing.wait_all_tasks_blocked()
        await trio.lowlevel.checkpoint()


def _message(subject: str, text: str, *, cte: str | None = None) -> bytes:
    msg = EmailMessage()
    msg["From"] = "sender@example.com"
    msg["To"] = "k@example.com"
    msg["Subject"] = subject
    if cte is None:
        msg.set_content(text)
    else:
        msg.set_content(text, cte=cte)
    return bytes(msg)


def test_keyword_scanner_classifies_messages() -> None:
    scanner = KeywordScanner(lambda email: [])
    assert scanner.is_gambling(_message("Your JACKPOT awaits", "hello"))
    assert scanner.is_gambling(_message("Hi", "Claim 50 Bonus\n  Spins today"))
    assert scanner.is_gambling(_message("Hi", "Best online CASINO, place your bets", cte="base64"))
    assert scanner.is_gambling(_message("=?utf-8?q?Free_slots_=F0=9F=8E=B0?=", "hi"))
    assert scanner.is_gambling(_message("Hi", "poker night", cte="quoted-printable"))
    assert not scanner.is_gambling(_message("Better alphabet", "Quarterly report attached"))
    assert not scanner.is_gambling(_message("Lunch?", "Let's meet at noon"))
    assert not scanner.is_gambling(b"\xff\xfe not a real message")


async def test_keyword_scanner_as_default_reply(
    backend: ScanBackend, client: httpx.AsyncClient
) -> None:
    inbox: dict[str, list[bytes]] = {
        "k@example.com": [
            _message("Weekly report", "numbers attached"),
            _message("Mega JACKPOT", "click here"),
            _message("hello", "bonus spins waiting for you"),
        ]
    }
    asked: list[str] = []

    def fetch_new(email: str) -> list[bytes]:
        asked.append(email)
        new, inbox[email] = inbox.get(email, []), []
        return new

    scanner = KeywordScanner(fetch_new)
    backend.default_reply = scanner
    first = await post(client, backend, "k@example.com")
    assert first.json() == {"scanned": 3, "blocked": 2}
    second = await post(client, backend, "k@example.com")
    assert second.json() == {"scanned": 0, "blocked": 0}
    assert asked == ["k@example.com", "k@example.com"]
    assert (scanner.scanned_total, scanner.blocked_total) == (3, 2)
    assert scanner.blocked_subjects == ["Mega JACKPOT", "hello"]


def test_reply_validation() -> None:
    with pytest.raises(ValueError):
        Reply(status=100)
    with pytest.raises(ValueError):
        Reply(delay=-1)
    assert json.loads(Reply().encoded_body()) == {"scanned": 1, "blocked": 0}
    assert json.loads(Reply(503).encoded_body()) == {"error": "HTTP 503"}
    with pytest.raises(ValueError):
        ScanBackend(secret="")
    with pytest.raises(ValueError):
        Reply(body_size=3)  # shorter than the JSON body
    with pytest.raises(ValueError):
        Reply(chunked=True)  # chunked needs body_size


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_sized_reply_is_streamed_padded_json(
    backend: ScanBackend, client: httpx.AsyncClient, chunked: bool
) -> None:
    size = 3 * 65536 + 17
    backend.script(
        "big@example.com",
        [Reply(json={"scanned": 2, "blocked": 1}, body_size=size, chunked=chunked)],
    )
    response = await post(client, backend, "big@example.com")
    assert len(response.content) == size
    assert response.json() == {"scanned": 2, "blocked": 1}
    if chunked:
        assert response.headers["transfer-encoding"] == "chunked"
        assert "content-length" not in response.headers
    else:
        assert response.headers["content-length"] == str(size)
