"""The scan webhook: building the request and judging the reply (pure), and sending it.

Contract (``../shared/README.md``): ``POST {BACKEND_URL}{scan_path}`` with the shared secret
header, a ``user-agent``, a unique ``x-scan-id`` (kept across retries of the same scan, so the
backend can de-duplicate), an optional HMAC-SHA256 ``x-signature`` and a JSON body; a 2xx
reply carries integer ``scanned`` and ``blocked``.
"""

from __future__ import annotations

import email.utils
import enum
import hashlib
import hmac
import json
import math
import time
import uuid
from collections.abc import Mapping

import attrs
import httpx
import trio

from trio_idle import __version__
from trio_idle.secret import Secret

USER_AGENT = f"trio-idle/{__version__}"
SCAN_ID_HEADER = "x-scan-id"
SIGNATURE_HEADER = "x-signature"
MAX_RETRY_AFTER = 3600.0


@attrs.frozen
class ScanJob:
    """One scan to request. ``scan_id`` identifies it across retries."""

    connection_id: str
    user_id: str | None
    email: str
    mailbox: str
    reason: str
    scan_id: str = attrs.field(factory=lambda: uuid.uuid4().hex)

    def body(self) -> bytes:
        return json.dumps(
            {
                "connectionId": self.connection_id,
                "userId": self.user_id,
                "email": self.email,
                "mailbox": self.mailbox,
                "reason": self.reason,
            },
            separators=(",", ":"),
        ).encode()


def sign(secret: Secret, body: bytes) -> str:
    """``sha256=<hex HMAC-SHA256 of the exact body bytes>``, as EmailEngine does."""
    return "sha256=" + hmac.new(secret.reveal().encode(), body, hashlib.sha256).hexdigest()


class Verdict(enum.Enum):
    OK = "ok"
    RETRY = "retry"  # 5xx, 429, timeouts, refused connections
    REJECT = "reject"  # other 4xx (and 3xx): retrying would not help


@attrs.frozen
class ScanReply:
    """What one attempt came to. ``detail`` is a log-safe description."""

    verdict: Verdict
    detail: str
    status: int | None = None
    scanned: int | None = None
    blocked: int | None = None
    retry_after: float | None = None


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return min(float(value), MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None:
        return None
    return min(max(0.0, when.timestamp() - now), MAX_RETRY_AFTER)


def _int_field(data: object, name: str) -> int | None:
    if not isinstance(data, dict):
        return None
    value = data.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


def interpret_reply(
    status: int, headers: Mapping[str, str], body: bytes, *, now: float | None = None
) -> ScanReply:
    """Judge a backend reply. Pure: tested with plain values. Header names are case-insensitive."""
    headers = {k.lower(): v for k, v in headers.items()}
    if 200 <= status < 300:
        try:
            data = json.loads(body) if body else None
        except ValueError:
            data = None
        scanned, blocked = _int_field(data, "scanned"), _int_field(data, "blocked")
        if scanned is None or blocked is None:
            return ScanReply(
                Verdict.OK, f"backend answered {status} without scanned/blocked", status=status
            )
        return ScanReply(
            Verdict.OK,
            f"scanned={scanned} blocked={blocked}",
            status=status,
            scanned=scanned,
            blocked=blocked,
        )
    if status == 429:
        wait = parse_retry_after(headers.get("retry-after"), time.time() if now is None else now)
        return ScanReply(
            Verdict.RETRY, "backend answered 429 (rate limited)", status=status, retry_after=wait
        )
    if status >= 500:
        wait = parse_retry_after(headers.get("retry-after"), time.time() if now is None else now)
        return ScanReply(
            Verdict.RETRY, f"backend answered {status}", status=status, retry_after=wait
        )
    if status in (401, 403):
        return ScanReply(
            Verdict.REJECT,
            f"backend answered {status}: it rejected ADMIN_SECRET "
            "(check that it matches the backend's)",
            status=status,
        )
    return ScanReply(Verdict.REJECT, f"backend answered {status} (not retried)", status=status)


class WebhookClient:
    """Sends scan requests over one shared ``httpx.AsyncClient``.

    Timeouts are explicit: httpx's per-phase timeouts fire first; a trio deadline of
    ``total_timeout`` bounds the whole attempt. On ``PoolTimeout`` the client is rebuilt,
    because cancelled requests can leak pool slots (httpcore issue #1093).
    """

    def __init__(
        self,
        url: str,
        *,
        secret_header: str,
        secret: Secret,
        signing_secret: Secret | None,
        total_timeout: float,
        max_connections: int,
    ) -> None:
        self.url = url
        self._secret_header = secret_header
        self._secret = secret
        self._signing_secret = signing_secret
        self._total_timeout = total_timeout
        self._max_connections = max_connections
        self._client = self._new_client()

    def _new_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            timeout=httpx.Timeout(self._total_timeout, connect=min(10.0, self._total_timeout)),
            limits=httpx.Limits(
                max_connections=self._max_connections,
                max_keepalive_connections=self._max_connections,
                keepalive_expiry=30.0,
            ),
            headers={"user-agent": USER_AGENT},
            follow_redirects=False,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    def headers_for(self, job: ScanJob, body: bytes) -> dict[str, str]:
        headers = {
            self._secret_header: self._secret.reveal(),
            "content-type": "application/json",
            SCAN_ID_HEADER: job.scan_id,
        }
        if self._signing_secret is not None:
            headers[SIGNATURE_HEADER] = sign(self._signing_secret, body)
        return headers

    async def send(self, job: ScanJob) -> ScanReply:
        """One attempt. Never raises for network trouble: that is a RETRY verdict."""
        body = job.body()
        # httpx's own timeouts should fire first; this bound catches everything else
        # (a server trickling bytes resets httpx's per-chunk read timeout forever).
        with trio.move_on_after(self._total_timeout + 5.0) as scope:
            try:
                response = await self._client.post(
                    self.url, content=body, headers=self.headers_for(job, body)
                )
            except httpx.PoolTimeout:
                old, self._client = self._client, self._new_client()
                with trio.CancelScope(shield=True):
                    await old.aclose()
                return ScanReply(Verdict.RETRY, "HTTP pool exhausted; client rebuilt")
            except httpx.TimeoutException:
                return ScanReply(
                    Verdict.RETRY, f"backend did not answer within {self._total_timeout:g}s"
                )
            except httpx.ConnectError as exc:
                return ScanReply(Verdict.RETRY, f"backend unreachable ({_reason(exc)})")
            except httpx.HTTPError as exc:
                return ScanReply(Verdict.RETRY, f"request failed ({type(exc).__name__})")
        if scope.cancelled_caught:
            return ScanReply(
                Verdict.RETRY, f"backend did not answer within {self._total_timeout:g}s"
            )
        return interpret_reply(response.status_code, response.headers, response.content)


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if "refused" in text.lower():
        return "connection refused"
    return text[:120]


def retry_delay(
    attempt: int, initial: float, cap: float, hint: float | None, jitter: float
) -> float:
    """Delay before retry ``attempt`` (1-based). A server hint (Retry-After) wins.

    ``jitter`` in [0, 1) comes from the caller's RNG, so the function stays pure.
    """
    if hint is not None:
        return max(hint, initial)  # "Retry-After: 0" or a past date must not become a hot loop
    bound = min(cap, initial * math.pow(2.0, attempt - 1))
    return max(initial, bound * (0.5 + jitter / 2))
