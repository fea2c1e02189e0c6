"""The scan webhook: building the request and judging the reply (pure), and sending it.

Contract with the backend's scan endpoint (written down nowhere else in this repository:
this docstring, and ``tests/unit/test_webhook_client.py`` against the test backend in
``trio_idle_testing.backend``, are its reference): ``POST {BACKEND_URL}{scan_path}`` with
the shared secret header, a ``user-agent``, a unique ``x-scan-id`` (kept across retries of
the same scan, so the backend can de-duplicate), an optional HMAC-SHA256 ``x-signature``
and a JSON body; a 2xx reply carries integer ``scanned`` and ``blocked``.

The HTTP plumbing (pool, limits, timeouts, proxies, reply cap, the backend watch) is
:class:`~trio_idle.backend.client.HttpClient`'s.
"""

from __future__ import annotations

import email.utils
import enum
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final

import attrs
import httpx

from trio_idle.backend.client import MAX_REPLY_BYTES, HttpClient, HttpFailure, Limits, Timeouts
from trio_idle.backend.watch import SECRET_REFUSED, BackendWatch
from trio_idle.core.secret import Secret
from trio_idle.core.stats import Stats
from trio_idle.imap.envelope import Envelope
from trio_idle.state.scan_range import NO_RANGE, ScanRange

if TYPE_CHECKING:
    from trio_idle.core.config import WebhookSettings

SCAN_ID_HEADER = "x-scan-id"
SIGNATURE_HEADER = "x-signature"
MAX_RETRY_AFTER = 3600.0
#: how far a scan attempt's deadline lies past ``TRIO_IDLE_SCAN_TIMEOUT``: far enough that
#: a phase's own timeout fires first (and names itself) whenever one phase alone is slow
ATTEMPT_GRACE: Final = 5.0


@attrs.frozen
class ScanJob:
    """One scan to request. ``scan_id`` identifies it across retries.

    ``span`` adds the optional range fields (``uidValidity``, ``sinceUid``,
    ``uidValidityChanged``; :mod:`trio_idle.state.scan_range`), ``messages`` the optional
    envelopes of the new mail (every message of the range when the scan started).
    Backends that do not know them ignore them (docs/backend-contract.md).
    """

    connection_id: str
    user_id: str | None
    email: str
    mailbox: str
    reason: str
    scan_id: str = attrs.field(factory=lambda: uuid.uuid4().hex)
    span: ScanRange = NO_RANGE
    messages: tuple[Envelope, ...] | None = attrs.field(default=None, repr=False)
    #: a folder beside the session's mailbox (``\\Junk`` resolved, e.g. ``[Gmail]/Spam``;
    #: ``mailbox`` names it too); None: the session's mailbox (INBOX), no ``folder`` field
    folder: str | None = None

    def body(self) -> bytes:
        data: dict[str, object] = {
            "connectionId": self.connection_id,
            "userId": self.user_id,
            "email": self.email,
            "mailbox": self.mailbox,
            "reason": self.reason,
        }
        if self.folder is not None:
            data["folder"] = self.folder
        data.update(self.span.fields())
        if self.messages is not None:
            data["messages"] = [m.to_json() for m in self.messages]
        # ensure_ascii: envelope text from a mail server stays 7-bit on the wire
        return json.dumps(data, separators=(",", ":")).encode()


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
    if status in SECRET_REFUSED:
        return ScanReply(
            Verdict.REJECT,
            f"backend answered {status}: it rejected ADMIN_SECRET "
            "(check that it matches the backend's)",
            status=status,
        )
    return ScanReply(Verdict.REJECT, f"backend answered {status} (not retried)", status=status)


@attrs.frozen(repr=False)
class BackendAuth:
    """What every request to the backend carries (scans, health reports, tokens): the
    shared secret in ``secret_header``, the JSON content type and, with a signing secret,
    the body's ``x-signature``."""

    secret_header: str
    secret: Secret
    signing_secret: Secret | None = None

    @classmethod
    def from_settings(cls, webhook: WebhookSettings) -> BackendAuth:
        return cls(webhook.secret_header, webhook.admin_secret, webhook.signing_secret)

    def headers(self, body: bytes, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        headers = {self.secret_header: self.secret.reveal(), "content-type": "application/json"}
        if self.signing_secret is not None:
            headers[SIGNATURE_HEADER] = sign(self.signing_secret, body)
        headers.update(extra or {})
        return headers

    def __repr__(self) -> str:
        return f"BackendAuth(secret_header={self.secret_header!r}, secret=********)"


def backend_http(
    total_timeout: float,
    max_connections: int,
    *,
    grace: float = 0.0,
    max_reply_bytes: int = MAX_REPLY_BYTES,
    trust_env: bool = False,
    watch: BackendWatch | None = None,
    stats: Stats | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> HttpClient:
    """A client of our backend: phases of ``total_timeout`` (the connect at most 10 s),
    the attempt ``total_timeout + grace``, ``max_connections`` in flight, replies capped
    at ``max_reply_bytes``, every request feeding ``watch`` (a new one when none is
    given)."""
    return HttpClient(
        timeouts=Timeouts.within(total_timeout, grace=grace),
        limits=Limits(max_connections, max_reply_bytes),
        trust_env=trust_env,
        transport=transport,
        watch=BackendWatch() if watch is None else watch,
        stats=stats,
    )


class WebhookClient:
    """Sends scan requests and the backend's other POSTs over ``http``, a client of our
    backend (:func:`backend_http`; its watch is :attr:`backend`), and judges the replies.

    A scan attempt's phases are bounded by ``TRIO_IDLE_SCAN_TIMEOUT`` (the connect by at
    most 10 s) and the whole by that plus :data:`ATTEMPT_GRACE`; a timed-out attempt's
    detail names the limit that fired and its value. :meth:`aclose` closes ``http``.
    """

    def __init__(self, url: str, auth: BackendAuth, http: HttpClient) -> None:
        if http.watch is None:
            raise ValueError("the backend's client needs a BackendWatch")
        self.url = url
        self.auth = auth
        self.http = http
        #: whether the backend answers (readiness, pings); fed by every request of ``http``
        self.backend: BackendWatch = http.watch

    @classmethod
    def from_settings(
        cls,
        webhook: WebhookSettings,
        stats: Stats | None = None,
        *,
        watch: BackendWatch | None = None,
    ) -> WebhookClient:
        """The client ``webhook`` describes (``BACKEND_URL``, ``TRIO_IDLE_SCAN_*``, ...),
        counting its transport's faults in ``stats``, feeding ``watch``."""
        http = backend_http(
            webhook.scan_timeout,
            webhook.http_max_connections,
            grace=ATTEMPT_GRACE,
            trust_env=webhook.http_trust_env,
            watch=watch,
            stats=stats,
        )
        return cls(webhook.scan_url, BackendAuth.from_settings(webhook), http)

    @property
    def max_reply_bytes(self) -> int:
        return self.http.limits.max_reply_bytes

    async def aclose(self) -> None:
        await self.http.aclose()

    def headers_for(self, job: ScanJob, body: bytes) -> dict[str, str]:
        return self.auth.headers(body, {SCAN_ID_HEADER: job.scan_id})

    def signed_headers(self, body: bytes, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The secret header, the content type, ``extra`` and (when configured) the
        signature of ``body``: what every request to the backend carries."""
        return self.auth.headers(body, extra)

    async def send(self, job: ScanJob) -> ScanReply:
        """One attempt. Never raises for network trouble or an oversized reply: those are
        RETRY verdicts. Cancellation abandons the attempt (its connection is closed)."""
        body = job.body()
        return await self.post(self.url, body, self.headers_for(job, body))

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> ScanReply:
        """One POST of ``body`` to ``url`` (another endpoint of the same backend), judged
        like a scan (:func:`interpret_reply`; a 2xx without ``scanned``/``blocked`` is
        simply OK). Same guarantees as :meth:`send`; waiting for a free connection slot
        comes first and is not part of the attempt's time limit."""
        outcome = await self.http.request("POST", url, content=body, headers=headers)
        if isinstance(outcome, HttpFailure):
            return ScanReply(Verdict.RETRY, outcome.text("backend"))
        return interpret_reply(outcome.status, outcome.headers, outcome.body)
