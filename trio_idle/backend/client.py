"""The one HTTP client of the daemon: scans and account health reports to the backend,
access tokens from the backend and from the providers' token endpoints, health pings.

Each caller keeps its own request and reply semantics (a scan's verdict, a token's
parsing, a ping's URL); what they share is here: one :class:`HttpClient` per caller, and
in every one of them

* **one limiter**: at most ``limits.max_connections`` requests in flight; more wait in
  a ``trio.CapacityLimiter``, first come first served (the wait is not part of a
  request's time limits: the requests ahead each have theirs);
* **one timeout model** (:class:`Timeouts`): per-phase timeouts (connect, each write,
  each read) and a trio deadline on the whole attempt; a request ended by one of them
  says which limit fired and its value (:class:`HttpFailure`);
* **one proxy decision**: ``trust_env`` false (the default) ignores the environment's
  proxies (``HTTP_PROXY``, ``HTTPS_PROXY``, ``ALL_PROXY``), so a secret header only ever
  goes to the URL's host; ``SSL_CERT_FILE``/``SSL_CERT_DIR`` are honoured either way;
* **one reply cap**: a body is read as it arrives and at most ``limits.max_reply_bytes``
  of it are kept; a larger one (declared or found while reading) fails the request and
  its connection is closed unread; no compressed reply is asked for, so the cap counts
  what arrives;
* **one watch**: given a :class:`~trio_idle.backend.watch.BackendWatch` (the clients of
  *our* backend, not the providers' endpoints nor pings), every request feeds it
  (:func:`~trio_idle.backend.watch.failed_answer` says what counts as a failure);
* **one stale-connection retry** (our transport's), counted in ``stats`` as
  ``backend_stale_connection_retries``.

The transport is an implementation detail: :class:`~trio_idle.backend.http_transport.
TrioHTTPTransport` (HTTP/1.1 on our sockets), or with ``trust_env`` httpx's own (only
it knows the environment's proxies and ``NO_PROXY``), or the ``transport`` a test hands
over (an ``httpx.MockTransport``; the limiter, deadline, cap and watch apply to it all
the same). Redirects are not followed unless a request asks (pings).

Cancellation: a cancelled request abandons its attempt (its connection is closed, its
slot freed); nothing is fed to the watch. A request made from a cancelled scope sends
nothing.
"""

from __future__ import annotations

import base64
import enum
import ssl
from collections.abc import Iterable, Mapping
from typing import Final

import attrs
import httpx
import trio

from trio_idle import __version__
from trio_idle.backend.http_transport import TrioHTTPTransport, error_text
from trio_idle.backend.watch import BackendWatch, failed_answer
from trio_idle.core.scrub import PLAIN
from trio_idle.core.stats import Stats

USER_AGENT: Final = f"trio-idle/{__version__}"
#: a reply the daemon reads is a few dozen bytes to a few KiB of JSON
MAX_REPLY_BYTES: Final = 64 * 1024
#: Idle keep-alive connections a client keeps. A pool that walks every pooled connection
#: per request (httpcore's) made a burst's 100 idle connections cost milliseconds of CPU
#: per request; ten cover steady traffic, a burst opens more and they close as they go idle.
MAX_IDLE_CONNECTIONS: Final = 10
#: seconds an idle keep-alive connection is kept (a server closing it sooner is noticed
#: before the connection is reused)
KEEPALIVE_EXPIRY: Final = 30.0
#: the longest connect timeout, whatever the caller's total
MAX_CONNECT_TIMEOUT: Final = 10.0
#: how many redirects a request that follows them follows
MAX_REDIRECTS: Final = 5
#: URLs whose parsed form is remembered (a ping's failure URL varies with its reason)
_MAX_TARGETS: Final = 32


@attrs.frozen
class Timeouts:
    """The limits of one attempt: ``connect`` (TCP and TLS), each ``write`` of the
    request, each ``read`` of the reply (a server trickling bytes starts it again at
    every byte), and ``attempt``, a trio deadline on the whole (which catches the
    trickle)."""

    connect: float
    write: float
    read: float
    attempt: float

    @classmethod
    def within(cls, total: float, *, grace: float = 0.0) -> Timeouts:
        """Each phase ``total`` (the connect at most :data:`MAX_CONNECT_TIMEOUT`), the
        attempt ``total + grace``: with a grace a slow phase's own timeout fires first
        and names itself; without, no attempt outlasts ``total``."""
        return cls(min(MAX_CONNECT_TIMEOUT, total), total, total, total + grace)

    def extension(self) -> dict[str, float]:
        """httpx's ``timeout`` request extension, which transports read. ``pool`` only
        matters to httpx's own pool (``trust_env``), which ours never lets fill."""
        return {
            "connect": self.connect,
            "write": self.write,
            "read": self.read,
            "pool": self.attempt,
        }

    def expired(self, exc: httpx.TimeoutException) -> str:
        """What ``exc`` says of the peer, naming the phase's limit (pure)."""
        if isinstance(exc, httpx.ConnectTimeout):
            return f"did not accept a connection within {self.connect:g}s (connect timeout)"
        if isinstance(exc, httpx.WriteTimeout):
            return f"took none of the request for {self.write:g}s (write timeout)"
        if isinstance(exc, httpx.ReadTimeout):
            return f"sent nothing for {self.read:g}s (read timeout)"
        if isinstance(exc, httpx.PoolTimeout):
            return "left no connection of the pool free (pool timeout; pool rebuilt)"
        return f"timed out ({type(exc).__name__})"

    def deadline_passed(self) -> str:
        return f"did not finish its reply within {self.attempt:g}s (the attempt's deadline)"


@attrs.frozen
class Limits:
    """How much one client holds: requests in flight, idle keep-alive connections and
    for how long, bytes of one reply."""

    max_connections: int
    max_reply_bytes: int = MAX_REPLY_BYTES
    max_idle: int = MAX_IDLE_CONNECTIONS
    keepalive_expiry: float = KEEPALIVE_EXPIRY

    def __attrs_post_init__(self) -> None:
        if self.max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if self.max_reply_bytes <= 0:
            raise ValueError("max_reply_bytes must be positive")


@attrs.frozen
class HttpReply:
    """A complete answer: the status, the headers and the body (empty when the request
    asked not to read it)."""

    status: int
    headers: httpx.Headers = attrs.field(repr=False)
    body: bytes = attrs.field(repr=False)


class Problem(enum.Enum):
    TIMEOUT = "timeout"
    UNREACHABLE = "unreachable"
    TOO_LARGE = "too_large"
    FAILED = "failed"


@attrs.frozen
class HttpFailure:
    """No usable answer. ``detail`` is log-safe and reads after the peer's name
    (:meth:`text`): ``"did not accept a connection within 10s (connect timeout)"``."""

    problem: Problem
    detail: str

    def text(self, peer: str) -> str:
        """``peer`` (``"backend"``, ``"google token endpoint"``) and what it did."""
        return f"{peer} {self.detail}"


HttpOutcome = HttpReply | HttpFailure

#: headers of every request besides the caller's (see the module doc for the encoding)
_DEFAULT_HEADERS: Final = (("user-agent", USER_AGENT), ("accept-encoding", "identity"))
_REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})


class HttpClient:
    """Requests over one pool, within :class:`Limits` and :class:`Timeouts` (see the
    module doc for what every request gets). :meth:`aclose` closes the transport too.

    ``watch``: fed by every request (give it to the clients of our backend only).
    ``stats``: counts our transport's stale-connection retries. ``transport`` replaces
    the network transport (tests); TLS verification and keep-alive are then its business.
    """

    def __init__(
        self,
        *,
        timeouts: Timeouts,
        limits: Limits,
        trust_env: bool = False,
        transport: httpx.AsyncBaseTransport | None = None,
        watch: BackendWatch | None = None,
        stats: Stats | None = None,
    ) -> None:
        self.timeouts: Final = timeouts
        self.limits: Final = limits
        self.watch: Final = watch
        #: requests past the pool size wait here, in order
        self._slots = trio.CapacityLimiter(limits.max_connections)
        #: each URL requested, parsed once: without credentials, and their header
        self._targets: dict[str, tuple[httpx.URL, tuple[tuple[str, str], ...]]] = {}
        if transport is None:
            if trust_env:
                transport = _EnvironmentTransport(limits)
            else:
                transport = TrioHTTPTransport(
                    ssl_context=tls_verify_context(),
                    max_idle=min(limits.max_connections, limits.max_idle),
                    idle_expiry=limits.keepalive_expiry,
                    stats=stats,
                )
        self._transport: httpx.AsyncBaseTransport = transport

    @property
    def in_flight(self) -> int:
        """Requests holding a slot now."""
        return int(self._slots.borrowed_tokens)

    async def aclose(self) -> None:
        await self._transport.aclose()

    async def request(
        self,
        method: str,
        url: str,
        *,
        content: bytes = b"",
        headers: Mapping[str, str] | Iterable[tuple[str, str]] = (),
        read_body: bool = True,
        follow_redirects: bool = False,
        timeouts: Timeouts | None = None,
    ) -> HttpOutcome:
        """One request, waiting first for a slot. Never raises for network trouble, a
        timeout or an oversized reply: those are :class:`HttpFailure`. ``read_body``
        false: the answer's body is not read (its connection is closed instead).
        ``follow_redirects``: up to :data:`MAX_REDIRECTS` of them, for ``GET`` only,
        each hop within the same attempt deadline. ``timeouts`` replaces the client's
        for this request."""
        # from a cancelled scope nothing is sent (below, a free slot and a pooled
        # connection would let the request leave before the first real wait)
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            # a free slot is taken without a scheduler round trip
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            await self._slots.acquire()
        try:
            outcome = await self._attempt(
                method,
                url,
                content,
                headers.items() if isinstance(headers, Mapping) else headers,
                read_body,
                follow_redirects and method == "GET",
                timeouts or self.timeouts,
            )
        finally:
            self._slots.release()
        if self.watch is not None:
            status = outcome.status if isinstance(outcome, HttpReply) else None
            if failed_answer(status):
                self.watch.failed(trio.current_time())
            else:
                self.watch.answered()
        return outcome

    def _target(self, url: str) -> tuple[httpx.URL, tuple[tuple[str, str], ...]]:
        """``url`` without its credentials, and the ``authorization`` header they make
        (``http://user:password@host`` is Basic authentication, as httpx's client does
        it)."""
        known = self._targets.get(url)
        if known is None:
            parsed = httpx.URL(url)
            auth: tuple[tuple[str, str], ...] = ()
            if parsed.userinfo:
                pair = f"{parsed.username}:{parsed.password}".encode()
                auth = (("authorization", "Basic " + base64.b64encode(pair).decode("ascii")),)
                parsed = parsed.copy_with(username=None, password=None)
            if len(self._targets) >= _MAX_TARGETS:
                self._targets.clear()
            known = self._targets[url] = (parsed, auth)
        return known

    async def _attempt(
        self,
        method: str,
        url: str,
        content: bytes,
        headers: Iterable[tuple[str, str]],
        read_body: bool,
        follow_redirects: bool,
        timeouts: Timeouts,
    ) -> HttpOutcome:
        extensions = {"timeout": timeouts.extension()}
        extra = list(headers)
        hops = MAX_REDIRECTS if follow_redirects else 0
        # the phases' own timeouts fire first whenever one phase alone is slow; this
        # bounds everything else (a server trickling bytes resets the read timeout)
        with trio.move_on_after(timeouts.attempt):
            try:
                while True:
                    target, auth = self._target(url)
                    request = httpx.Request(
                        method,
                        target,
                        content=content or None,
                        headers=[*_DEFAULT_HEADERS, *auth, *extra],
                        extensions=extensions,
                    )
                    response = await self._transport.handle_async_request(request)
                    try:
                        location = response.headers.get("location")
                        if hops and response.status_code in _REDIRECTS and location:
                            hops -= 1
                            url = str(target.join(location))
                            continue
                        body = b""
                        if read_body:
                            capped = await read_capped(response, self.limits.max_reply_bytes)
                            if capped is None:
                                size = _size_text(self.limits.max_reply_bytes)
                                return HttpFailure(Problem.TOO_LARGE, f"reply larger than {size}")
                            body = capped
                        return HttpReply(response.status_code, response.headers, body)
                    finally:
                        # before the whole reply was read, this closes the connection
                        await response.aclose()
                        # httpx binds a response and its stream to each other: replaced,
                        # reference counting frees both at once (no cyclic garbage, whose
                        # collections stop every session)
                        response.stream = _SPENT
            except httpx.TimeoutException as exc:
                return HttpFailure(Problem.TIMEOUT, timeouts.expired(exc))
            except httpx.ConnectError as exc:
                return HttpFailure(Problem.UNREACHABLE, f"unreachable ({_reason(exc, url)})")
            except httpx.HTTPError as exc:
                return HttpFailure(Problem.FAILED, f"request failed ({type(exc).__name__})")
        # Only reached when the deadline cancelled the attempt: every other path returns.
        return HttpFailure(Problem.TIMEOUT, timeouts.deadline_passed())


class _EnvironmentTransport(httpx.AsyncBaseTransport):
    """httpx's client as a transport, for ``trust_env``: it alone picks the proxy the
    environment names for a URL (and honours ``NO_PROXY``). Same idle limits as ours;
    its pool never fills (the :class:`HttpClient`'s limiter lets no more requests in),
    but a ``PoolTimeout`` rebuilds it all the same, because cancelled requests can leak
    httpcore's pool slots (httpcore issue #1093)."""

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._client = self._new_client()

    def _new_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            limits=httpx.Limits(
                max_connections=self._limits.max_connections,
                max_keepalive_connections=min(self._limits.max_connections, self._limits.max_idle),
                keepalive_expiry=self._limits.keepalive_expiry,
            ),
            follow_redirects=False,
            trust_env=True,
            verify=tls_verify_context(),
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        client = self._client
        try:
            return await client.send(request, stream=True)
        except httpx.PoolTimeout:
            if client is self._client:
                self._client = self._new_client()
                with trio.CancelScope(shield=True):
                    await client.aclose()
            raise

    async def aclose(self) -> None:
        await self._client.aclose()


def tls_verify_context() -> ssl.SSLContext:
    """What httpx verifies servers with by default, ``SSL_CERT_FILE``/``SSL_CERT_DIR``
    included, whether or not the client trusts the environment for proxies."""
    return httpx.create_ssl_context(trust_env=True)


#: what a closed response's stream is replaced with
_SPENT: Final = httpx.ByteStream(b"")


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


def _reason(exc: BaseException, url: str) -> str:
    # Our transport's texts carry no URL, but a proxy's or a future httpx's could: the
    # request's URL (a ping's embeds its check's token) is cut out, and the rest goes
    # through the scrubber (other URLs' credentials, control characters, length).
    text = error_text(exc)
    if "refused" in text.lower():
        return "connection refused"
    return PLAIN.scrub(text.replace(url, "<url>"), 120)
