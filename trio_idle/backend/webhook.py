"""The scan webhook: building the request and judging the reply (pure), and sending it.

Contract with the backend's scan endpoint (written down nowhere else in this repository:
this docstring, and ``tests/test_webhook_client.py`` against the test backend in
``trio_idle_testing.backend``, are its reference): ``POST {BACKEND_URL}{scan_path}`` with
the shared secret header, a ``user-agent``, a unique ``x-scan-id`` (kept across retries of
the same scan, so the backend can de-duplicate), an optional HMAC-SHA256 ``x-signature``
and a JSON body; a 2xx reply carries integer ``scanned`` and ``blocked``.
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import enum
import hashlib
import hmac
import json
import ssl
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Mapping
from http.cookiejar import Cookie, CookieJar, DefaultCookiePolicy
from typing import TYPE_CHECKING, Any, Final

import attrs
import httpx
import trio

from trio_idle import __version__
from trio_idle.backend.http_transport import TrioHTTPTransport, error_text
from trio_idle.backend.watch import BackendWatch
from trio_idle.core.scrub import PLAIN
from trio_idle.core.secret import Secret
from trio_idle.core.stats import Stats
from trio_idle.imap.envelope import Envelope
from trio_idle.state.scan_range import NO_RANGE, ScanRange

if TYPE_CHECKING:
    from trio_idle.core.config import WebhookSettings

USER_AGENT = f"trio-idle/{__version__}"
SCAN_ID_HEADER = "x-scan-id"
SIGNATURE_HEADER = "x-signature"
MAX_RETRY_AFTER = 3600.0
#: A scan reply is a few dozen bytes of JSON; a larger one fails the attempt unread.
MAX_REPLY_BYTES: Final = 64 * 1024
#: Idle keep-alive connections a client keeps. httpcore's pool walks every pooled
#: connection once per idle one on each request it assigns or ends: after a burst (10,000
#: startup scans and health reports in a ramp) 100 idle connections made every request cost
#: milliseconds of CPU (docs/performance.md, "Figures behind the code"). Ten cover steady
#: traffic; a burst opens more (up to the pool size) and they close as they go idle.
MAX_IDLE_CONNECTIONS: Final = 10
#: seconds an idle keep-alive connection is kept (a server closing it sooner is noticed
#: before the connection is reused)
KEEPALIVE_EXPIRY: Final = 30.0


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

    def body(self) -> bytes:
        data: dict[str, object] = {
            "connectionId": self.connection_id,
            "userId": self.user_id,
            "email": self.email,
            "mailbox": self.mailbox,
            "reason": self.reason,
        }
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


#: refusals that say the backend rejects this daemon itself (its ``ADMIN_SECRET``)
SECRET_REFUSED: Final = frozenset({401, 403})


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


def backend_failed(reply: ScanReply) -> bool:
    """Whether ``reply`` counts against the backend being up (pure): no answer, a
    timeout, a 5xx, or a refusal of ``ADMIN_SECRET`` (401/403) do; a 2xx, a 429 (busy
    but there) and other 4xx (about this one request) do not."""
    if reply.verdict is Verdict.OK or reply.status == 429:
        return False
    if reply.verdict is Verdict.REJECT:
        return reply.status in SECRET_REFUSED
    return True


class WebhookClient:
    """Sends scan requests (and the backend's other POSTs) as ``httpx.Request`` objects
    straight to a transport: :class:`~trio_idle.backend.http_transport.TrioHTTPTransport`, or
    with ``trust_env`` an ``httpx.AsyncClient`` (the only one that knows the environment's
    proxies). httpx's client layer (request building, cookies, hooks) cost a large share
    of a scan's CPU (docs/performance.md, "Figures behind the code") and has nothing a
    backend POST needs.

    Timeouts are explicit (:func:`request_timeout`, :func:`attempt_deadline`): connecting
    is bounded by ``min(10 s, total_timeout)``, each write and each read of the reply by
    ``total_timeout``; a trio deadline of ``total_timeout`` + 5 s bounds the whole
    attempt (a server trickling its reply resets the read timeout at every byte). A
    timed-out attempt's detail names the limit that fired and its value. On
    ``PoolTimeout`` from the ``trust_env`` client, it is rebuilt, because cancelled
    requests can leak httpcore's pool slots (httpcore issue #1093).

    A reply body is read as it arrives and at most ``max_reply_bytes`` of it are kept: a
    larger one (declared by ``content-length`` or found while reading) fails the attempt
    and its connection is closed without reading the rest. Redirects are not followed.
    With ``trust_env`` false (the default) proxies named in the environment
    (``HTTP_PROXY``, ``HTTPS_PROXY``, ``ALL_PROXY``) are ignored, so the secret header
    only ever goes to ``url``'s host; ``SSL_CERT_FILE``/``SSL_CERT_DIR`` are honoured
    either way.

    ``transport`` replaces the network transport (tests pass an ``httpx.MockTransport``;
    the reply cap applies to it all the same); ``max_connections`` and TLS verification
    are then its business. :meth:`aclose` closes the transport too. ``stats`` counts
    what our transport retried at once (a pooled connection the backend had closed:
    ``backend_stale_connection_retries``).
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
        trust_env: bool = False,
        max_reply_bytes: int = MAX_REPLY_BYTES,
        transport: httpx.AsyncBaseTransport | None = None,
        stats: Stats | None = None,
    ) -> None:
        if max_reply_bytes <= 0:
            raise ValueError("max_reply_bytes must be positive")
        self.url = url
        #: each URL posted to, parsed once: without credentials, and their header
        self._targets: dict[str, tuple[httpx.URL, tuple[tuple[str, str], ...]]] = {}
        self._secret_header = secret_header
        self._secret = secret
        self._signing_secret = signing_secret
        self._total_timeout = total_timeout
        self._max_connections = max_connections
        self._trust_env = trust_env
        self.max_reply_bytes: Final = max_reply_bytes
        #: requests past the pool size wait here, in order, not in httpcore's pool, whose
        #: queue is walked in full for every request it assigns or ends (quadratic in a
        #: burst of thousands)
        self._slots = trio.CapacityLimiter(max_connections)
        self._phase_timeouts = request_timeout(total_timeout)
        self._timeout = {"timeout": self._phase_timeouts.as_dict()}
        #: the whole attempt's bound, past the phases' own (see :func:`attempt_deadline`)
        self._deadline = attempt_deadline(total_timeout)
        #: whether the backend answers (readiness, pings); fed by every :meth:`post`
        self.backend = BackendWatch()
        #: where requests go: the given transport, ours, or (trust_env) the client
        self._direct: httpx.AsyncBaseTransport | None = transport
        self._client: httpx.AsyncClient | None = None
        if transport is None:
            if trust_env:
                self._client = self._new_client()
            else:
                self._direct = backend_transport(max_connections, stats)

    @classmethod
    def from_settings(cls, webhook: WebhookSettings, stats: Stats | None = None) -> WebhookClient:
        """The client ``webhook`` describes (``BACKEND_URL``, ``TRIO_IDLE_SCAN_*``, ...),
        counting its transport's faults in ``stats``."""
        return cls(
            webhook.scan_url,
            secret_header=webhook.secret_header,
            secret=webhook.admin_secret,
            signing_secret=webhook.signing_secret,
            total_timeout=webhook.scan_timeout,
            max_connections=webhook.http_max_connections,
            trust_env=webhook.http_trust_env,
            stats=stats,
        )

    def _new_client(self) -> httpx.AsyncClient:
        return new_http_client(self._total_timeout, self._max_connections, self._trust_env, None)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
        if self._direct is not None:
            await self._direct.aclose()

    def headers_for(self, job: ScanJob, body: bytes) -> dict[str, str]:
        return self.signed_headers(body, {SCAN_ID_HEADER: job.scan_id})

    def signed_headers(self, body: bytes, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The secret header, the content type, ``extra`` and (when configured) the
        signature of ``body``: what every request to the backend carries."""
        headers = backend_headers(self._secret_header, self._secret, self._signing_secret, body)
        headers.update(extra or {})
        return headers

    async def send(self, job: ScanJob) -> ScanReply:
        """One attempt. Never raises for network trouble or an oversized reply: those are
        RETRY verdicts. Cancellation abandons the attempt (its connection is closed)."""
        body = job.body()
        return await self.post(self.url, body, self.headers_for(job, body))

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> ScanReply:
        """One POST of ``body`` to ``url`` (another endpoint of the same backend) over this
        client's pool, bounded and judged like a scan (:func:`interpret_reply`; a 2xx
        without ``scanned``/``blocked`` is simply OK). Same guarantees as :meth:`send`.
        With every connection of the pool busy it first waits for one, first come first
        served; that wait is not part of the attempt's time limit (the requests ahead
        each have theirs)."""
        # from a cancelled scope nothing is sent (below, a free slot and a pooled
        # connection would let the request leave before the first real wait)
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            # a free slot is taken without a scheduler round trip
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            await self._slots.acquire()
        try:
            reply = await self._post(url, body, headers)
        finally:
            self._slots.release()
        if backend_failed(reply):
            self.backend.failed(trio.current_time())
        else:
            self.backend.answered()
        return reply

    def _target(self, url: str) -> tuple[httpx.URL, tuple[tuple[str, str], ...]]:
        """``url`` without its credentials, and the ``authorization`` header they make
        (``http://user:password@host`` is Basic authentication, as httpx's client does
        it). Worked out once per URL."""
        known = self._targets.get(url)
        if known is None:
            parsed = httpx.URL(url)
            auth: tuple[tuple[str, str], ...] = ()
            if parsed.userinfo:
                pair = f"{parsed.username}:{parsed.password}".encode()
                auth = (("authorization", "Basic " + base64.b64encode(pair).decode("ascii")),)
                parsed = parsed.copy_with(username=None, password=None)
            known = self._targets[url] = (parsed, auth)
        return known

    async def _post(self, url: str, body: bytes, headers: Mapping[str, str]) -> ScanReply:
        # httpx's own timeouts should fire first; this bound catches everything else
        # (a server trickling bytes resets httpx's per-chunk read timeout forever).
        target, auth = self._target(url)
        request = httpx.Request(
            "POST",
            target,
            content=body,
            headers=[*_DEFAULT_HEADERS, *auth, *headers.items()],
            extensions=self._timeout,
        )
        with trio.move_on_after(self._deadline):
            client = self._client
            try:
                if self._direct is not None:
                    response = await self._direct.handle_async_request(request)
                else:
                    assert client is not None
                    response = await client.send(request, stream=True)
                try:
                    reply_body = await read_capped(response, self.max_reply_bytes)
                finally:
                    # before the whole reply was read, this closes the connection
                    await response.aclose()
                    response.stream = _SPENT  # see streamed()
                if reply_body is None:
                    return ScanReply(
                        Verdict.RETRY,
                        f"backend reply larger than {_size_text(self.max_reply_bytes)}",
                    )
                return interpret_reply(response.status_code, response.headers, reply_body)
            except httpx.PoolTimeout:
                if client is None or client is not self._client:
                    return ScanReply(Verdict.RETRY, "HTTP pool exhausted")
                self._client = self._new_client()
                with trio.CancelScope(shield=True):
                    await client.aclose()
                return ScanReply(Verdict.RETRY, "HTTP pool exhausted; client rebuilt")
            except httpx.TimeoutException as exc:
                return ScanReply(Verdict.RETRY, timeout_detail(exc, self._phase_timeouts))
            except httpx.ConnectError as exc:
                return ScanReply(Verdict.RETRY, f"backend unreachable ({http_error_reason(exc)})")
            except httpx.HTTPError as exc:
                return ScanReply(Verdict.RETRY, f"request failed ({type(exc).__name__})")
        # Only reached when the deadline cancelled the attempt: every other path returns.
        return ScanReply(
            Verdict.RETRY,
            f"backend did not finish its reply within {self._deadline:g}s (the attempt's deadline)",
        )


def backend_headers(
    secret_header: str, secret: Secret, signing_secret: Secret | None, body: bytes
) -> dict[str, str]:
    """The headers every request to the backend carries: the shared secret, the JSON
    content type and, with a signing secret, the body's ``x-signature``."""
    headers = {secret_header: secret.reveal(), "content-type": "application/json"}
    if signing_secret is not None:
        headers[SIGNATURE_HEADER] = sign(signing_secret, body)
    return headers


#: headers of every backend request besides the caller's. The cap on the reply counts
#: bytes as they arrive: a compressed reply could inflate far past it inside one decoding
#: step, so none is asked for.
_DEFAULT_HEADERS: Final = (("user-agent", USER_AGENT), ("accept-encoding", "identity"))


def request_timeout(total_timeout: float) -> httpx.Timeout:
    """The per-phase timeouts of a backend request: each phase ``total_timeout``, the
    connect at most 10 s."""
    return httpx.Timeout(total_timeout, connect=min(10.0, total_timeout))


#: how far the whole attempt's deadline lies past ``total_timeout``: far enough that a
#: phase's own timeout (an httpx exception, which leaves httpcore's pool consistent)
#: fires first whenever one phase alone is slow
ATTEMPT_GRACE: Final = 5.0


def attempt_deadline(total_timeout: float) -> float:
    """Seconds one attempt may take in all, however its phases went."""
    return total_timeout + ATTEMPT_GRACE


def timeout_detail(exc: httpx.TimeoutException, timeouts: httpx.Timeout) -> str:
    """The log-safe detail of an attempt ended by a phase's timeout: which limit fired
    and its value (the attempt as a whole may have taken longer: each phase has its own,
    and each read of the reply starts the read timeout again)."""
    if isinstance(exc, httpx.ConnectTimeout):
        limit = _limit(timeouts.connect)
        return f"backend did not accept a connection within {limit} (connect timeout)"
    if isinstance(exc, httpx.WriteTimeout):
        return f"backend took none of the request for {_limit(timeouts.write)} (write timeout)"
    if isinstance(exc, httpx.ReadTimeout):
        return f"backend sent nothing for {_limit(timeouts.read)} (read timeout)"
    return f"backend request timed out ({type(exc).__name__})"


def _limit(seconds: float | None) -> str:
    return "no limit" if seconds is None else f"{seconds:g}s"


def backend_transport(max_connections: int, stats: Stats | None = None) -> TrioHTTPTransport:
    """Our HTTP transport as the backend clients use it: ``max_connections`` in flight,
    at most :data:`MAX_IDLE_CONNECTIONS` kept idle for :data:`KEEPALIVE_EXPIRY` seconds,
    ``https`` verified as :func:`tls_verify_context` says, its stale-connection retries
    counted in ``stats``."""
    return TrioHTTPTransport(
        ssl_context=tls_verify_context(),
        max_connections=max_connections,
        max_idle=min(max_connections, MAX_IDLE_CONNECTIONS),
        idle_expiry=KEEPALIVE_EXPIRY,
        stats=stats,
    )


def new_http_client(
    total_timeout: float,
    max_connections: int,
    trust_env: bool,
    transport: httpx.AsyncBaseTransport | None,
) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` for the backend, as :class:`WebhookClient` documents it:
    explicit timeouts, no redirects, no compression, no cookies (none kept, none sent:
    each request stands on its own headers), proxies only with ``trust_env``.

    Requests go through :class:`~trio_idle.backend.http_transport.TrioHTTPTransport` (unless
    ``transport`` replaces it), with the same limits; with ``trust_env`` through httpx's
    own transport instead, which knows the environment's proxies and ``NO_PROXY``."""
    if transport is None and not trust_env:
        transport = backend_transport(max_connections)
    return httpx.AsyncClient(
        timeout=request_timeout(total_timeout),
        limits=httpx.Limits(
            max_connections=max_connections,
            max_keepalive_connections=min(max_connections, MAX_IDLE_CONNECTIONS),
            keepalive_expiry=KEEPALIVE_EXPIRY,
        ),
        headers=dict(_DEFAULT_HEADERS),
        follow_redirects=False,
        cookies=CookieJar(policy=_REFUSE_COOKIES),
        trust_env=trust_env,
        # httpx ignores it with a transport given (ours has its own); loading the CAs
        # costs milliseconds
        verify=tls_verify_context() if transport is None else True,
        transport=transport,
    )


class _RefuseCookies(DefaultCookiePolicy):
    """A cookie policy that keeps none and returns none: a token client shared by every
    connection must not carry one reply's state into the next request."""

    def set_ok(self, cookie: Cookie, request: urllib.request.Request) -> bool:
        return False

    def return_ok(self, cookie: Cookie, request: urllib.request.Request) -> bool:
        return False


_REFUSE_COOKIES: Final = _RefuseCookies()


def tls_verify_context() -> ssl.SSLContext:
    """What httpx verifies servers with by default, ``SSL_CERT_FILE``/``SSL_CERT_DIR``
    included, whether or not the client trusts the environment for proxies."""
    return httpx.create_ssl_context(trust_env=True)


#: what a closed response's stream is replaced with (see :func:`streamed`)
_SPENT: Final = httpx.ByteStream(b"")


@contextlib.asynccontextmanager
async def streamed(
    client: httpx.AsyncClient, method: str, url: str, **options: Any
) -> AsyncIterator[httpx.Response]:
    """``client.stream(method, url, **options)`` that leaves no reference cycle behind.

    httpx binds a response and its stream to each other (``Response.stream._response``):
    without this every request left about 40 objects (the request, its headers, the
    pool's bookkeeping) for the cyclic collector, whose young collections then stopped
    every session more often (docs/performance.md, "Figures behind the code"). Once the stream
    is closed (leaving the block, however it is left) the response gets an empty one, and
    reference counting frees it all at once. Same exceptions and cancellation as
    ``client.stream``.
    """
    response: httpx.Response | None = None
    try:
        async with client.stream(method, url, **options) as response:
            yield response
    finally:
        if response is not None:
            response.stream = _SPENT


async def read_capped(response: httpx.Response, limit: int) -> bytes | None:
    """The body of a streamed ``response`` as sent, or ``None`` as soon as it is known to
    be larger than ``limit`` bytes (from ``content-length``, or once more has arrived).
    At most ``limit`` plus one network read is held in memory.

    A transport may hand over a body it already holds (``httpx.MockTransport`` given
    ``content=`` bytes): it is judged by the same limit."""
    declared = response.headers.get("content-length", "").strip()
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        return None
    if response.is_stream_consumed:
        body = response.content
        return body if len(body) <= limit else None
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_raw():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _size_text(count: int) -> str:
    if count % 1024 == 0:
        return f"{count // 1024} KiB"
    return f"{count} bytes"


def http_error_reason(exc: BaseException) -> str:
    # httpx's messages carry no URL today, but a proxy or a future httpx could: the text
    # goes through the scrubber (URL credentials, control characters, length).
    text = error_text(exc)
    if "refused" in text.lower():
        return "connection refused"
    return PLAIN.scrub(text, 120)
