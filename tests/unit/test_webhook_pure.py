"""The scan webhook's pure parts: body, signature, judging replies, retry delays."""

from __future__ import annotations

import email.utils
import hashlib
import hmac
import json

import httpx
import pytest

from trio_idle.backend.webhook import (
    MAX_RETRY_AFTER,
    ScanJob,
    Verdict,
    interpret_reply,
    parse_retry_after,
    sign,
)
from trio_idle.core.secret import Secret

NOW = 1_700_000_000.0
ADMIN = "webhook-admin-S3CRET"


def job(**kw: object) -> ScanJob:
    values: dict[str, object] = {
        "connection_id": "c-1",
        "user_id": None,
        "email": "alice@example.com",
        "mailbox": "INBOX",
        "reason": "exists",
    }
    values.update(kw)
    return ScanJob(**values)  # type: ignore[arg-type]


# -- body and signature ---------------------------------------------------------------


def test_body_has_exactly_the_contract_fields_with_null_user_id() -> None:
    body = job().body()
    data = json.loads(body)
    assert list(data) == ["connectionId", "userId", "email", "mailbox", "reason"]
    assert data == {
        "connectionId": "c-1",
        "userId": None,
        "email": "alice@example.com",
        "mailbox": "INBOX",
        "reason": "exists",
    }
    assert b'"userId":null' in body


def test_body_carries_user_id_when_known() -> None:
    assert json.loads(job(user_id="u-9", reason="tick").body())["userId"] == "u-9"


def test_scan_id_is_unique_per_job() -> None:
    a, b = job(), job()
    assert a.scan_id != b.scan_id
    assert len(a.scan_id) == 32
    assert "scanId" not in json.loads(a.body())  # travels in the x-scan-id header


def test_sign_is_hmac_sha256_hex_with_prefix() -> None:
    body = job().body()
    expected = hmac.new(b"sig-key", body, hashlib.sha256).hexdigest()
    assert sign(Secret("sig-key"), body) == f"sha256={expected}"


def test_signature_depends_on_secret_and_body() -> None:
    body = job().body()
    assert sign(Secret("a"), body) != sign(Secret("b"), body)
    assert sign(Secret("a"), body) != sign(Secret("a"), body + b" ")


# -- interpret_reply ------------------------------------------------------------------


def test_ok_with_numbers() -> None:
    reply = interpret_reply(200, {}, b'{"scanned": 4, "blocked": 1}', now=NOW)
    assert reply.verdict is Verdict.OK
    assert (reply.scanned, reply.blocked, reply.status) == (4, 1, 200)
    assert reply.detail == "scanned=4 blocked=1"


def test_any_2xx_is_ok() -> None:
    assert interpret_reply(202, {}, b'{"scanned":0,"blocked":0}').verdict is Verdict.OK


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{}",
        b'{"ok": true}',
        b"not json",
        b"\xff\xfe",
        b'{"scanned": true, "blocked": false}',
        b'{"scanned": "4", "blocked": 1}',
        b'{"scanned": 4.5, "blocked": 1}',
        b"[1, 2]",
        b'{"scanned": 4}',
    ],
)
def test_ok_without_usable_numbers(body: bytes) -> None:
    reply = interpret_reply(200, {}, body, now=NOW)
    assert reply.verdict is Verdict.OK
    assert reply.scanned is None and reply.blocked is None
    assert "without scanned/blocked" in reply.detail


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_server_errors_are_retried(status: int) -> None:
    reply = interpret_reply(status, {}, b"oops", now=NOW)
    assert reply.verdict is Verdict.RETRY
    assert reply.status == status
    assert reply.retry_after is None


def test_503_with_retry_after_hint() -> None:
    reply = interpret_reply(503, httpx.Headers({"Retry-After": "12"}), b"", now=NOW)
    assert reply.verdict is Verdict.RETRY
    assert reply.retry_after == 12.0


def test_429_with_retry_after_seconds() -> None:
    reply = interpret_reply(429, httpx.Headers({"Retry-After": "7"}), b"", now=NOW)
    assert reply.verdict is Verdict.RETRY
    assert reply.retry_after == 7.0
    assert "429" in reply.detail


def test_429_with_retry_after_http_date() -> None:
    date = email.utils.formatdate(NOW + 90, usegmt=True)
    reply = interpret_reply(429, httpx.Headers({"retry-after": date}), b"", now=NOW)
    assert reply.verdict is Verdict.RETRY
    assert reply.retry_after == pytest.approx(90.0)


def test_429_without_hint() -> None:
    reply = interpret_reply(429, {}, b"", now=NOW)
    assert reply.verdict is Verdict.RETRY
    assert reply.retry_after is None


@pytest.mark.parametrize("status", [401, 403])
def test_auth_rejection_points_at_admin_secret(status: int) -> None:
    headers = httpx.Headers({"x-admin-secret": ADMIN, "www-authenticate": ADMIN})
    reply = interpret_reply(status, headers, ADMIN.encode(), now=NOW)
    assert reply.verdict is Verdict.REJECT
    assert "ADMIN_SECRET" in reply.detail
    assert str(status) in reply.detail
    assert ADMIN not in reply.detail and ADMIN not in repr(reply)


@pytest.mark.parametrize("status", [400, 404, 301, 422])
def test_other_client_errors_are_not_retried(status: int) -> None:
    reply = interpret_reply(status, {}, b'{"error":"x"}', now=NOW)
    assert reply.verdict is Verdict.REJECT
    assert "not retried" in reply.detail


# -- parse_retry_after ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, None),
        ("", None),
        ("0", 0.0),
        ("7", 7.0),
        (" 30 ", 30.0),
        ("999999", MAX_RETRY_AFTER),
        ("soon", None),
        ("-5", None),
        ("1.5", None),
    ],
)
def test_parse_retry_after(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after(value, NOW) == seconds


def test_parse_retry_after_date_in_the_past_is_zero() -> None:
    assert parse_retry_after(email.utils.formatdate(NOW - 60, usegmt=True), NOW) == 0.0


def test_parse_retry_after_far_date_is_capped() -> None:
    date = email.utils.formatdate(NOW + 86400, usegmt=True)
    assert parse_retry_after(date, NOW) == MAX_RETRY_AFTER


def test_garbled_retry_after_is_ignored_not_raised() -> None:
    headers = httpx.Headers([(b"retry-after", b"\xb2")])
    reply = interpret_reply(503, headers, b"", now=NOW)
    assert reply.verdict is Verdict.RETRY
    assert reply.retry_after is None
