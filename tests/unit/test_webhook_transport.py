"""WebhookClient over an injected httpx transport (httpx.MockTransport): no sockets.

The real-HTTP behaviour (timeouts, pools, TLS) is tested in tests/unit/test_webhook_client.py;
here: what goes out, how a reply is judged, and that the reply cap holds whatever the
transport hands over.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import trio

from tests.fixtures import Handler, webhook_client
from trio_idle.backend.client import MAX_REPLY_BYTES
from trio_idle.backend.webhook import ScanJob, Verdict, WebhookClient

JOB = ScanJob("conn-1", "user-1", "alice@example.test", "INBOX", "exists", scan_id="scan-42")


def client(handler: Handler) -> WebhookClient:
    return webhook_client(
        "http://backend.invalid/api/mail/scan-internal",
        handler,
        secret="transport-admin-secret",
        total_timeout=5.0,
    )


async def test_the_request_and_a_2xx_reply_go_through_the_transport() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"scanned": 3, "blocked": 1})

    webhook = client(handler)
    reply = await webhook.send(JOB)
    await webhook.aclose()
    assert (reply.verdict, reply.scanned, reply.blocked) == (Verdict.OK, 3, 1)
    (request,) = seen
    assert request.method == "POST"
    assert str(request.url) == "http://backend.invalid/api/mail/scan-internal"
    assert request.headers["x-admin-secret"] == "transport-admin-secret"
    assert request.headers["x-scan-id"] == "scan-42"
    assert request.headers["accept-encoding"] == "identity"
    assert json.loads(request.content)["reason"] == "exists"


async def test_a_reply_held_in_memory_over_the_cap_fails_the_attempt() -> None:
    big = b'{"scanned":1,"blocked":0,"pad":"' + b"x" * MAX_REPLY_BYTES + b'"}'
    webhook = client(lambda request: httpx.Response(200, content=big))
    reply = await webhook.send(JOB)
    await webhook.aclose()
    assert reply.verdict is Verdict.RETRY
    assert reply.detail == "backend reply larger than 64 KiB"


async def test_a_streamed_reply_without_length_is_cut_off_at_the_cap() -> None:
    sent = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(1000):  # 16 MiB if it were all read
            sent += 1
            yield b"x" * 16384

    webhook = client(lambda request: httpx.Response(200, content=chunks()))
    reply = await webhook.send(JOB)
    await webhook.aclose()
    assert reply.verdict is Verdict.RETRY
    assert reply.detail == "backend reply larger than 64 KiB"
    assert sent <= MAX_REPLY_BYTES // 16384 + 1  # stopped reading at the cap


async def test_a_reply_at_the_cap_is_accepted() -> None:
    body = json.dumps({"scanned": 2, "blocked": 0}).encode()
    body += b" " * (MAX_REPLY_BYTES - len(body))
    webhook = client(lambda request: httpx.Response(200, content=body))
    reply = await webhook.send(JOB)
    await webhook.aclose()
    assert (reply.verdict, reply.scanned) == (Verdict.OK, 2)


async def test_transport_errors_are_retry_verdicts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    webhook = client(refuse)
    reply = await webhook.send(JOB)
    await webhook.aclose()
    assert (reply.verdict, reply.detail) == (
        Verdict.RETRY,
        "backend unreachable (connection refused)",
    )
