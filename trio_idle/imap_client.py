"""An IMAP connection for one session: aioimaplib's protocol, driven from trio.

aioimaplib is used for what it is good at (the command/response state machine) and
nothing else: we open the transport ourselves (so connect and TLS errors surface as real
errors, TCP keepalive is set, STARTTLS works), and every wait is a trio deadline rather
than an asyncio timer. Untagged lines go to a :class:`~trio_idle.push_monitor.PushMonitor`,
which also notices a lost connection — aioimaplib itself would keep waiting forever.

Guarantees: every method either returns within its deadline or raises an
:class:`~trio_idle.errors.ImapError` subclass; after *any* exception (including
cancellation) the connection is unusable and :meth:`ImapConnection.abort` or
:meth:`ImapConnection.logout` must be called. Nothing here logs or raises a password.

Every byte a server sends is framed and bounded before aioimaplib parses it
(:class:`ImapLimits`, :mod:`trio_idle.imap_framing`): one hostile server costs at most
its limits in memory and linear time, then its connection.

Whatever a server does, nothing reaches the asyncio loop's exception handler, which
trio-asyncio would turn into a crash of the whole daemon: an exception raised while
parsing server data marks the connection dead and closes it, a failed greeting is
recorded instead of left in an unretrieved task, and a lost connection and
:meth:`ImapConnection.abort` cancel the aioimaplib tasks still waiting (the greeting's
CAPABILITY, the IDLE command) so that none is garbage-collected while pending.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

import aioimaplib
import attrs
import trio
import trio_asyncio

from trio_idle.connections import MailConnection
from trio_idle.destinations import DEFAULT_NETWORKS, Network, refusal_message, refused
from trio_idle.errors import (
    KIND_DNS,
    KIND_REFUSED,
    KIND_SERVER_CLOSED,
    KIND_TIMEOUT,
    KIND_TLS,
    ConnectionLost,
    ImapAuthError,
    ImapConnectError,
    ImapError,
)
from trio_idle.imap_envelope import Envelope, NewMail, parse_fetch_envelopes, parse_search
from trio_idle.imap_framing import FrameError, FrameTooLarge, ResponseFramer, format_size
from trio_idle.imap_responses import MailboxState, parse_mailbox_state
from trio_idle.push_monitor import PushMonitor
from trio_idle.sasl import (
    challenge_text,
    choose_mechanism,
    error_ack,
    error_status,
    initial_response,
)
from trio_idle.scrub import MASK, Scrubber

T = TypeVar("T")

#: asyncio (3.11+) gives every TLS connection a 256 KiB read buffer (``SSLProtocol.max_size``),
#: allocated and touched per connection: 315 KiB RSS per TLS session (docs/performance.md).
#: It is only the chunk size in which socket bytes are fed to the TLS engine, which
#: reassembles records itself, so a smaller one costs a read call per 4 KiB of a large
#: answer and nothing else; IDLE traffic is a few lines. Not ``Final``: the benchmark's
#: ``gc_probe`` sets another size before the daemon applies it.
TLS_READ_BUFFER = 4 * 1024


def shrink_tls_read_buffer() -> None:
    """Give every TLS connection opened from now on a :data:`TLS_READ_BUFFER` read buffer.

    Process-wide (it sets asyncio's ``SSLProtocol.max_size``), so it is an explicit call
    of the entry points that open many connections (:func:`trio_idle.daemon.run_daemon`,
    ``check --login``), not a side effect of importing this module. Idempotent; does
    nothing on a Python whose asyncio has no such buffer.
    """
    if hasattr(asyncio.sslproto.SSLProtocol, "max_size"):
        asyncio.sslproto.SSLProtocol.max_size = TLS_READ_BUFFER


IMPLICIT_TLS_PORT: Final = 993
STARTTLS_PORT: Final = 143


def resolve_security(mode: str, port: int) -> str:
    """``auto`` picks by port: 993 → tls, 143 → starttls, anything else → tls."""
    if mode != "auto":
        return mode
    return "starttls" if port == STARTTLS_PORT else "tls"


def make_ssl_context(ca_file: str | None) -> ssl.SSLContext:
    """One verifying client context shared by all sessions (contexts are costly).

    System CAs are always trusted; ``ca_file`` adds private CAs on top.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


@attrs.frozen
class ImapTimeouts:
    connect: float
    command: float
    keepalive_idle: float


@attrs.frozen
class ImapLimits:
    """What one server may make us buffer (see :mod:`trio_idle.imap_framing`).

    ``max_line``: text of one response outside its literals; ``max_literal``: the
    literals of one response together. The untagged lines answering one command (all but
    IDLE, whose lines are not kept) may total ``max_line + max_literal``
    (:attr:`max_answer`), except a ``FETCH``'s: ``max_fetch_answer``, because the envelope
    fetch (:meth:`ImapConnection.fetch_new`) asks for up to
    :data:`~trio_idle.imap_envelope.MAX_ENVELOPES` envelopes in one command, and one
    envelope of a legitimate message (hundreds of recipients, a long subject) can be tens
    of KiB. Each of its responses is still bounded by ``max_line``/``max_literal``.
    """

    max_line: int = 1024 * 1024
    max_literal: int = 1024 * 1024
    max_fetch_answer: int = 8 * 1024 * 1024

    @property
    def max_answer(self) -> int:
        return self.max_line + self.max_literal


DEFAULT_LIMITS: Final = ImapLimits()


class _DiscardQueue:
    """Replaces aioimaplib's IDLE queue: the monitor already saw every line."""

    def put_nowait(self, item: object) -> None:
        pass

    async def put(self, item: object) -> None:
        pass


class _Protocol(aioimaplib.IMAP4ClientProtocol):  # type: ignore[misc]
    """aioimaplib's protocol behind our own bounded framing.

    Bytes go through a :class:`~trio_idle.imap_framing.ResponseFramer` first, and
    aioimaplib gets one complete response per ``data_received`` call. Its parser then never
    holds an unfinished line or literal between calls (it would buffer those without
    limit, and re-copy an unfinished line on every read) and recurses only over the
    lines and literals of that one response (thousands of lines in one read ran it out
    of stack). A bound exceeded, or anything else the parser raises, marks the
    connection dead with a one-line reason and closes it.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, monitor: PushMonitor, limits: ImapLimits
    ) -> None:
        super().__init__(loop, conn_lost_cb=self._lost)
        self.idle_queue = _DiscardQueue()
        self.monitor = monitor
        self.limits = limits
        self.framer = ResponseFramer(limits.max_line, limits.max_literal)
        self._protocol_error: Exception | None = None
        #: set once the greeting has been handled (well or not) or the connection is gone
        self.greeted = asyncio.Event()
        #: why the greeting (or the CAPABILITY after it) failed, if it did
        self.greeting_problem: str | None = None
        #: DONE was written for the IDLE command in progress (its answer may be pending)
        self.done_sent = False
        #: LOGOUT was written: what the server still sends is not parsed
        self.closing = False
        #: STARTTLS was accepted: nothing more is parsed until TLS is up (see _aio_handshake)
        self.tls_pending = False
        #: bytes of the answer to the command in progress (aioimaplib keeps them)
        self._answer_bytes = 0
        #: while a list: every untagged response, raw as framed (for the envelope fetch)
        self.capture: list[bytes] | None = None
        self._welcomed = False

    def _lost(self, exc: Exception | None) -> None:
        self.monitor.connection_lost(exc or self._protocol_error)
        self.greeted.set()
        self.discard_tasks()  # e.g. a greeting task waiting for a CAPABILITY that cannot come

    def data_received(self, d: bytes) -> None:
        self.monitor.activity()
        if self.closing or self._protocol_error is not None:
            return
        self.framer.feed(d)
        self._handle_buffered()

    def start_parsing_tls(self) -> None:
        """TLS is up after STARTTLS: parse again (what arrived since was decrypted)."""
        self.tls_pending = False
        self._handle_buffered()

    def _handle_buffered(self) -> None:
        try:
            if self.tls_pending:
                if self.framer.buffered > self.limits.max_line:  # held back: still bounded
                    raise FrameTooLarge("server sent data after accepting STARTTLS")
                return
            while not self.tls_pending and (response := self.framer.next_response()) is not None:
                self._handle_response(response)
        except FrameError as exc:
            self._drop(exc, str(exc))
        except Exception as exc:  # escaping here, it would crash the loop (see module doc)
            self._drop(exc, f"protocol error: {type(exc).__name__}: {exc}"[:200])

    def _handle_response(self, response: bytes) -> None:
        sync = self.pending_sync_command
        collecting = self._collecting()
        waiting = sync.name if sync is not None else "/".join(self.pending_async_commands)
        if self.capture is not None and response[:1] == b"*":
            self.capture.append(response)
        super().data_received(response)
        if self.incomplete_line or self.current_command is not None:
            # aioimaplib would wait for more of this response: it read a literal where the
            # framer read none (a bare LF before the CRLF), and would buffer without bound
            raise FrameError("server sent a malformed response (a bare LF next to a literal)")
        if sync is not None and sync.name == "STARTTLS" and self.pending_sync_command is None:
            self.tls_pending = True
        if collecting:
            self._answer_bytes += len(response)
            budget = self.limits.max_fetch_answer if waiting == "FETCH" else self.limits.max_answer
            if self._answer_bytes > budget:
                raise FrameTooLarge(
                    f"server sent more than {format_size(budget)} in answer to {waiting}"
                )
        if not self._collecting():
            self._answer_bytes = 0

    def _collecting(self) -> bool:
        """Whether aioimaplib keeps the untagged lines now (IDLE's it hands to a queue)."""
        sync = self.pending_sync_command
        return (sync is not None and sync.name != "IDLE") or bool(self.pending_async_commands)

    def _drop(self, exc: Exception, reason: str) -> None:
        self._protocol_error = exc
        self.monitor.mark_dead(reason)
        if self.transport is not None:
            self.transport.close()

    def _handle_line(self, line: bytes, current_cmd: Any) -> Any:
        if line and self.state == aioimaplib.CONNECTED:
            # aioimaplib starts a greeting handler per line until the first one has run
            # (each sends CAPABILITY): only the first line is the greeting
            if self._welcomed:
                return None
            self._welcomed = True
        return super()._handle_line(line, current_cmd)

    async def welcome(self, command: bytes) -> None:
        """aioimaplib's greeting handler (run in a task of its own), failures recorded."""
        try:
            await super().welcome(command)
        except Exception as exc:  # e.g. "* BYE Too many connections" as the greeting
            self.greeting_problem = f"{type(exc).__name__}: {exc}"[:200]
        finally:
            self.greeted.set()

    def discard_tasks(self, *extra: asyncio.Future[Any] | None) -> None:
        """Cancel aioimaplib tasks still waiting; mark finished ones' errors as seen."""
        for task in (*self.tasks, *extra):
            if task is None:
                continue
            if not task.done():
                task.cancel()
            elif not task.cancelled():
                task.exception()

    async def idle(self) -> Any:
        self.done_sent = False
        return await super().idle()

    def idle_done(self) -> None:
        self.done_sent = True
        super().idle_done()

    def _untagged_response(self, line: bytes) -> Any:
        self.monitor.untagged(line)
        return super()._untagged_response(line)


def _describe_connect_error(exc: BaseException, host: str, port: int) -> str:
    where = f"{host}:{port}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate of {where} not trusted: {exc.verify_message} (see --ca-file)"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake with {where} failed: {exc.reason or exc}"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve {host}: {exc.strerror}"
    if isinstance(exc, ConnectionRefusedError):
        return f"connection to {where} refused"
    if isinstance(exc, OSError):
        return f"cannot connect to {where}: {exc.strerror or exc}"
    return f"cannot connect to {where}: {type(exc).__name__}: {exc}"


def _connect_error_kind(exc: BaseException) -> str:
    """The :mod:`trio_idle.errors` kind of what :func:`_describe_connect_error` describes."""
    if isinstance(exc, ssl.SSLError):
        return KIND_TLS
    if isinstance(exc, socket.gaierror):
        return KIND_DNS
    if isinstance(exc, TimeoutError):
        return KIND_TIMEOUT
    if isinstance(exc, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)):
        return KIND_SERVER_CLOSED
    if isinstance(exc, OSError):
        return KIND_REFUSED
    return KIND_SERVER_CLOSED


def _set_keepalive(transport: asyncio.BaseTransport, idle: float) -> None:
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if hasattr(socket, "TCP_KEEPIDLE"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, int(idle)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 15)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 4)


class ImapConnection:
    """A connected, not yet authenticated IMAP client. Use :func:`connect` to make one."""

    def __init__(
        self,
        protocol: _Protocol,
        monitor: PushMonitor,
        timeouts: ImapTimeouts,
        *,
        host: str = "",
        port: int = 0,
    ) -> None:
        self.protocol = protocol
        self.monitor = monitor
        self.timeouts = timeouts
        #: the server as the user named it (OAUTHBEARER tells the server which it is)
        self.host = host
        self.port = port
        self._idle_task: asyncio.Future[Any] | None = None

    # -- plumbing ----------------------------------------------------------------------

    async def _call(
        self,
        what: str | _Step,
        fn: Callable[..., Awaitable[T]],
        *args: Any,
        limit: float | None = None,
    ) -> T:
        """Run one aioimaplib coroutine under a trio deadline; fail fast on a lost connection.

        ``what`` names the command in errors (a :class:`_Step` names the one in progress).
        """
        limit = self.timeouts.command if limit is None else limit
        with self.monitor.guard() as guard:
            try:
                with trio.fail_after(limit):
                    result: T = await trio_asyncio.aio_as_trio(fn)(*args)
                    return result
            except trio.TooSlowError:
                self.monitor.mark_dead(f"no answer to {what} within {limit:g}s")
                raise ConnectionLost(
                    f"no answer to {what} within {limit:g}s", kind=KIND_TIMEOUT
                ) from None
            except aioimaplib.AioImapException as exc:
                raise ImapError(f"{what} failed: {exc}") from None
            except (TimeoutError, OSError) as exc:
                raise ConnectionLost(f"{what} failed: {type(exc).__name__}: {exc}") from None
        assert guard.cancelled_caught
        raise ConnectionLost(f"{what}: {self.monitor.problem() or 'connection lost'}")

    def _check(self) -> None:
        problem = self.monitor.problem()
        if problem is not None:
            raise ConnectionLost(problem)

    # -- commands ----------------------------------------------------------------------

    async def login(self, user: str, password: str) -> None:
        # aioimaplib quotes the password but sends the user as it is: a user name with a
        # space or a quote would garble the command, so quote it here (always valid IMAP).
        quoted_user = aioimaplib.quoted(user)
        response = await self._call("LOGIN", self.protocol.login, quoted_user, password)
        if response.result != "OK":
            text = b" ".join(bytes(x) for x in response.lines).decode("utf-8", "replace")
            text = text.replace(password, "********") if password else text
            if "[UNAVAILABLE]" in text.upper():  # RFC 5530: temporary, not a bad password
                raise ImapError(f"login temporarily unavailable: {text[:200]}")
            raise ImapAuthError(f"login rejected for {user}: {response.result} {text[:200]}")

    async def authenticate_oauth2(self, user: str, token: str) -> None:
        """AUTHENTICATE with an OAuth2 access token: ``OAUTHBEARER`` where the server
        offers it, else ``XOAUTH2`` (:func:`trio_idle.sasl.choose_mechanism`).

        The client response goes on the command line where the server announced
        ``SASL-IR``, else after its first ``+`` continuation. A server refusing the token
        sends a continuation with a JSON status: it is acknowledged (so the server ends
        the exchange with its tagged ``NO``) and the status is kept in the
        :class:`ImapAuthError` (``status``). ``[UNAVAILABLE]`` (RFC 5530) is a temporary
        :class:`ImapError`, not a refusal. The whole exchange runs under one command
        deadline. Neither the token nor the client response reaches an exception
        message (every message is scrubbed of both), nor aioimaplib's debug log.
        """
        mechanism = choose_mechanism(self.protocol.capabilities)
        try:
            response_b64 = initial_response(mechanism, user, token, self.host, self.port)
        except ValueError as exc:
            raise ImapAuthError(str(exc), mechanism=mechanism) from None
        scrub = Scrubber((token, response_b64))
        command = _SaslCommand(
            self.protocol, mechanism, response_b64, sasl_ir="SASL-IR" in self.protocol.capabilities
        )
        try:
            response = await self._call("AUTHENTICATE", _aio_authenticate, self.protocol, command)
        except ImapError as exc:
            raise type(exc)(scrub(exc)) from None
        if response.result == "OK":
            return
        status = error_status(command.challenge) if command.challenge is not None else None
        lines = [bytes(x) for x in response.lines if not bytes(x).startswith(b"+")]
        text = scrub(b" ".join(lines).decode("utf-8", "replace"))
        if "[UNAVAILABLE]" in text.upper():
            raise ImapError(f"sign-in temporarily unavailable: {text}")
        about = f" (token status {status})" if status else ""
        raise ImapAuthError(
            f"OAuth2 sign-in ({mechanism}) rejected for {user}: {response.result} {text}{about}",
            sasl_status=status,
            mechanism=mechanism,
        )

    async def select(self, mailbox: str) -> MailboxState:
        response = await self._call("SELECT", self.protocol.select, mailbox)
        if response.result != "OK":
            raise ImapError(f"SELECT {mailbox} failed: {response.result}")
        return parse_mailbox_state(response.lines)

    @property
    def has_idle(self) -> bool:
        return "IDLE" in self.protocol.capabilities

    async def noop(self) -> None:
        response = await self._call("NOOP", self.protocol.simple_command, "NOOP")
        if response.result != "OK":
            raise ImapError(f"NOOP failed: {response.result}")
        self._check()

    async def idle_start(self) -> None:
        """Send IDLE and wait for the server's continuation (``+ idling``)."""
        self._idle_task = await self._call("IDLE", _aio_idle_start, self.protocol)
        self._check()

    async def idle_done(self) -> None:
        """Send DONE and wait for the IDLE command's tagged answer."""
        task = self._idle_task
        if task is None:
            return
        self._check()
        self.protocol.idle_done()
        response = await self._call("DONE", _aio_wait, task)
        self._idle_task = None
        if response.result != "OK":
            raise ImapError(f"IDLE ended with {response.result}")

    async def restart_idle(self, *, noop: bool) -> None:
        """Leave IDLE (DONE), NOOP if ``noop``, and enter IDLE again, in one hand-over to asyncio.

        The tick and the renewal run this on every session every few minutes: as three
        :func:`trio_asyncio.aio_as_trio` calls a tick cost 0.76 ms of CPU, as one 0.62 ms
        (docs/performance.md). The whole sequence must be answered
        within the command timeout; an error names the command that was not answered.
        Same guarantees as every command: a failure leaves the connection unusable.
        """
        task = self._idle_task
        if task is None:
            raise ConnectionLost("not idling")
        self._check()
        step = _Step("DONE")
        self._idle_task = await self._call(step, _aio_restart_idle, self.protocol, task, noop, step)
        self._check()

    async def fetch_new(self, since_uid: int, limit: int) -> NewMail:
        """What arrived from ``since_uid`` on: leave IDLE (DONE) if idling,
        ``UID SEARCH UID <since_uid>:*``, and, when at most ``limit`` messages were found,
        ``UID FETCH <their UIDs> (UID ENVELOPE RFC822.SIZE)``, then IDLE again — all in one
        hand-over to asyncio and within one command timeout (an error names the command
        not answered). The answers are parsed from the raw framed responses
        (:mod:`trio_idle.imap_envelope`: decoded, bounded, never logged); EXISTS lines
        among them reach the monitor as always. Same guarantees as every command: a
        failure leaves the connection unusable.
        """
        self._check()
        step = _Step("DONE" if self._idle_task is not None else "UID SEARCH")
        try:
            self._idle_task, found = await self._call(
                step, _aio_fetch_new, self.protocol, self._idle_task, since_uid, limit, step
            )
        finally:
            self.protocol.capture = None
        self._check()
        return found

    async def logout(self, limit: float) -> None:
        """Send LOGOUT, wait up to ``limit`` seconds for the server to close, close. Never raises.

        One write and no aioimaplib command: ending 10,000 sessions at shutdown must not
        cost 10,000 round trips through the trio-asyncio bridge (docs/performance.md). An
        IDLE in progress is ended with ``DONE`` in the same write; a command still waiting
        for its answer (a NOOP, an IDLE being entered) is answered by the server before
        the LOGOUT, as IMAP pipelining allows. From here on the server's lines are not
        parsed: nothing they say can change what happens next.
        """
        protocol = self.protocol
        transport = protocol.transport
        try:
            if (
                self.monitor.problem() is None
                and transport is not None
                and not transport.is_closing()
                and protocol.state in (aioimaplib.NONAUTH, aioimaplib.AUTH, aioimaplib.SELECTED)
            ):
                end_idle = protocol.has_pending_idle_command() and not protocol.done_sent
                protocol.closing = True
                transport.write(
                    (b"DONE\r\n" if end_idle else b"") + f"{protocol.new_tag()} LOGOUT\r\n".encode()
                )
                with self.monitor.guard(), trio.move_on_after(limit):
                    await trio.sleep_forever()  # until the server closes (the guard)
        except OSError:
            pass  # LOGOUT is a courtesy to the server; failing it changes nothing for us
        finally:
            self.abort()

    def abort(self) -> None:
        """Close the socket now (no LOGOUT); cancel the commands still waiting."""
        task, self._idle_task = self._idle_task, None
        self.protocol.discard_tasks(task)
        transport = self.protocol.transport
        if transport is not None and not transport.is_closing():
            transport.close()


class _Step:
    """The command a multi-command call is waiting for; formats as its name."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __str__(self) -> str:
        return self.name


async def _aio_restart_idle(
    protocol: _Protocol, idle: asyncio.Future[Any], noop: bool, step: _Step
) -> asyncio.Future[Any]:
    protocol.idle_done()
    response = await idle
    if response.result != "OK":
        raise aioimaplib.Abort(f"IDLE ended with {response.result}")
    if noop:
        step.name = "NOOP"
        response = await protocol.simple_command("NOOP")
        if response.result != "OK":
            raise aioimaplib.Abort(response.result)
    step.name = "IDLE"
    return await _aio_idle_start(protocol)


async def _aio_fetch_new(
    protocol: _Protocol, idle: asyncio.Future[Any] | None, since: int, limit: int, step: _Step
) -> tuple[asyncio.Future[Any] | None, NewMail]:
    if idle is not None:
        protocol.idle_done()
        response = await idle
        if response.result != "OK":
            raise aioimaplib.Abort(f"IDLE ended with {response.result}")
    step.name = "UID SEARCH"
    protocol.capture = []
    response = await protocol.execute(
        aioimaplib.Command(
            "SEARCH", protocol.new_tag(), "UID", f"{since}:*", prefix="UID", loop=protocol.loop
        )
    )
    if response.result != "OK":
        raise aioimaplib.Abort(f"UID SEARCH failed: {response.result}")
    # "n:*" also matches the highest UID when it is below n (RFC 3501 6.4.8)
    uids = tuple(uid for uid in parse_search(protocol.capture) if uid >= since)
    envelopes: tuple[Envelope, ...] | None = None
    if len(uids) <= limit:
        envelopes = ()
        if uids:
            step.name = "UID FETCH"
            protocol.capture = []
            # a plain Command: aioimaplib's FetchCommand counts parentheses across the
            # lines, and a subject with an unbalanced "(" would leave it waiting forever
            response = await protocol.execute(
                aioimaplib.Command(
                    "FETCH",
                    protocol.new_tag(),
                    ",".join(map(str, uids)),
                    "(UID ENVELOPE RFC822.SIZE)",
                    prefix="UID",
                    untagged_resp_name="FETCH",
                    loop=protocol.loop,
                )
            )
            if response.result != "OK":
                raise aioimaplib.Abort(f"UID FETCH failed: {response.result}")
            wanted = set(uids)
            envelopes = tuple(e for e in parse_fetch_envelopes(protocol.capture) if e.uid in wanted)
    protocol.capture = None
    if idle is None:
        return None, NewMail(uids, envelopes)
    step.name = "IDLE"
    return await _aio_idle_start(protocol), NewMail(uids, envelopes)


class _SaslCommand(aioimaplib.Command):  # type: ignore[misc]
    """``AUTHENTICATE <mechanism> [<response>]`` answering the server's continuations.

    aioimaplib hands every continuation of the pending command to :meth:`flush` (after
    adding it to the response lines; it also calls it after every read). The first one
    asks for the client response when it was not sent on the command line (no SASL-IR);
    any other is the server refusing the token: it is kept as :attr:`challenge` and
    acknowledged once; a further one cancels the exchange (``*``). The repr never shows
    the response (aioimaplib quotes commands in its errors and debug log), so the
    command line is written by
    :func:`_aio_authenticate`, not by aioimaplib's ``execute`` (which sends the repr).
    """

    def __init__(
        self, protocol: _Protocol, mechanism: str, response: str, *, sasl_ir: bool
    ) -> None:
        super().__init__("AUTHENTICATE", protocol.new_tag(), mechanism, loop=protocol.loop)
        self._protocol = protocol
        self._mechanism = mechanism
        self.line = f"{self.tag} AUTHENTICATE {mechanism}" + (f" {response}" if sasl_ir else "")
        self._unsent: str | None = None if sasl_ir else response
        self._acknowledged = False
        self._answered_lines = 0
        #: the server's error challenge (``+ <base64 JSON>``), if it sent one
        self.challenge: bytes | None = None

    def __repr__(self) -> str:
        return f"{self.tag} AUTHENTICATE {self._mechanism} {MASK}"

    def flush(self) -> None:
        # aioimaplib also calls this at the end of every read while the command is
        # pending: only a continuation line that has just arrived is answered
        if len(self._resp_lines) == self._answered_lines:
            return
        self._answered_lines = len(self._resp_lines)
        line = bytes(self._resp_lines[-1])
        if not line.startswith(b"+"):
            return
        if self._unsent is not None and not challenge_text(line):
            data, self._unsent = self._unsent.encode(), None
        elif not self._acknowledged:
            self._unsent = None
            self._acknowledged = True
            self.challenge = line
            data = error_ack(self._mechanism)
        else:
            data = b"*"
        _write(self._protocol, data + b"\r\n")


def _write(protocol: _Protocol, data: bytes) -> None:
    transport = protocol.transport
    if transport is not None and not transport.is_closing():
        transport.write(data)


async def _aio_authenticate(protocol: _Protocol, command: _SaslCommand) -> Any:
    """aioimaplib's ``execute`` for a sync command, writing :attr:`_SaslCommand.line`."""
    async with protocol.state_condition:  # as aioimaplib's own login does
        if protocol.state != aioimaplib.NONAUTH:
            raise aioimaplib.Abort(f"AUTHENTICATE illegal in state {protocol.state}")
        if protocol.pending_sync_command is not None:
            await protocol.pending_sync_command.wait()
        if protocol.pending_async_commands:
            await protocol.wait_async_pending_commands()
        protocol.pending_sync_command = command
        _write(protocol, command.line.encode() + b"\r\n")
        await command.wait()
        response = command.response
        if response.result == "OK":
            protocol.state = aioimaplib.AUTH
        protocol.state_condition.notify_all()
    return response


async def _aio_wait(future: asyncio.Future[T]) -> T:
    return await future


async def _aio_idle_start(protocol: _Protocol) -> asyncio.Future[Any]:
    """aioimaplib's ``idle_start`` without its asyncio timer (we renew with trio)."""
    idle = asyncio.ensure_future(protocol.idle())
    ack = asyncio.ensure_future(protocol.wait_for_idle_response())
    try:
        await asyncio.wait({idle, ack}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        idle.cancel()
        ack.cancel()
        raise
    if not protocol.has_pending_idle_command():
        ack.cancel()
        if not idle.done():
            idle.cancel()
        if idle.done() and not idle.cancelled() and idle.exception() is None:
            raise aioimaplib.Abort(f"server refused IDLE: {idle.result().result}")
        raise aioimaplib.Abort("server refused IDLE")
    result: asyncio.Future[Any] = idle
    return result


async def _aio_resolve(
    loop: asyncio.AbstractEventLoop, host: str, port: int
) -> list[tuple[int, Any]]:
    """Every ``(family, sockaddr)`` of ``host`` for TCP, in the resolver's order."""
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    if not infos:
        raise socket.gaierror(socket.EAI_NONAME, "no addresses")
    return [(family, sockaddr) for family, _, _, _, sockaddr in infos]


async def _aio_open_socket(
    loop: asyncio.AbstractEventLoop, conn: MailConnection, refuse: tuple[Network, ...]
) -> socket.socket:
    """A TCP socket connected to an address of ``conn.host`` that ``refuse`` allows.

    The host is resolved once, here, and the socket connected to exactly the addresses
    that were checked: nothing resolves the name again (no DNS-rebinding gap). Allowed
    addresses are tried in the resolver's order; if none connects, the first error is
    raised. Never leaks a socket, also when cancelled.
    """
    addresses = await _aio_resolve(loop, conn.host, conn.port)
    allowed = [(f, a) for f, a in addresses if refused(a[0], refuse) is None]
    if not allowed:
        shown = list(dict.fromkeys(str(a[0]) for _, a in addresses))
        raise _Refused(refusal_message(conn.host, shown))
    errors: list[OSError] = []
    for family, sockaddr in allowed:
        try:
            sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        except OSError as exc:  # e.g. no IPv6 on this machine: try the next address
            errors.append(exc)
            continue
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, sockaddr)
        except OSError as exc:
            sock.close()
            errors.append(exc)
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    raise errors[0]


async def _aio_connect(
    conn: MailConnection,
    security: str,
    context: ssl.SSLContext | None,
    monitor: PushMonitor,
    timeouts: ImapTimeouts,
    refuse: tuple[Network, ...],
    limits: ImapLimits,
) -> _Protocol:
    loop = asyncio.get_running_loop()
    protocol = _Protocol(loop, monitor, limits)
    tls_now = context if security == "tls" else None
    sock = await _aio_open_socket(loop, conn, refuse)
    try:
        # The certificate is checked against the name the user typed, not the address.
        transport, _ = await loop.create_connection(
            lambda: protocol,
            sock=sock,
            ssl=tls_now,
            server_hostname=conn.host if tls_now else None,
            ssl_handshake_timeout=timeouts.connect if tls_now else None,
        )
    except BaseException:
        sock.close()
        raise
    try:
        _set_keepalive(transport, timeouts.keepalive_idle)
        await _aio_handshake(loop, conn, security, context, protocol, transport, timeouts)
    except BaseException:
        protocol.discard_tasks()
        transport.close()  # cancelled or failed mid-handshake: never leak the socket
        raise
    return protocol


async def _aio_handshake(
    loop: asyncio.AbstractEventLoop,
    conn: MailConnection,
    security: str,
    context: ssl.SSLContext | None,
    protocol: _Protocol,
    transport: Any,
    timeouts: ImapTimeouts,
) -> None:
    # Not ``protocol.wait()``: its asyncio.Condition cannot be cancelled while the greeting
    # task holds the lock waiting for a CAPABILITY answer that never comes.
    await protocol.greeted.wait()
    if protocol.greeting_problem is not None:
        raise _BadGreeting(protocol.greeting_problem)
    if protocol.state not in (aioimaplib.AUTH, aioimaplib.NONAUTH):
        raise _BadGreeting(protocol.monitor.problem() or "connection lost")
    if security == "starttls":
        if "STARTTLS" not in protocol.capabilities:
            raise _NoStartTls()
        response = await protocol.execute(
            aioimaplib.Command("STARTTLS", protocol.new_tag(), loop=loop)
        )
        if response.result != "OK":
            raise _NoStartTls()
        if protocol.framer.buffered:
            # plaintext sent after the answer would pass for TLS-protected (RFC 3207 §4.2)
            raise _BadGreeting("server sent data after accepting STARTTLS (refused)")
        assert context is not None
        protocol.transport = await loop.start_tls(
            transport,
            protocol,
            context,
            server_hostname=conn.host,
            ssl_handshake_timeout=timeouts.connect,
        )
        protocol.start_parsing_tls()
        await protocol.capability()  # capabilities may differ once encrypted


class _NoStartTls(Exception):
    pass


class _BadGreeting(Exception):
    pass


class _Refused(Exception):
    """Every address of the host is in a refused network; ``str()`` is the log line."""


async def connect(
    conn: MailConnection,
    *,
    security: str,
    context: ssl.SSLContext | None,
    timeouts: ImapTimeouts,
    refuse: tuple[Network, ...] = DEFAULT_NETWORKS,
    limits: ImapLimits = DEFAULT_LIMITS,
) -> ImapConnection:
    """Open TCP (+TLS or STARTTLS), wait for the greeting and capabilities.

    Raises :class:`ImapConnectError` with a diagnosis (DNS, refused, TLS trust, no or a
    refusing greeting, closed during the handshake) within ``timeouts.connect`` seconds.
    No connection is attempted to an address in ``refuse`` (``TRIO_IDLE_REFUSE_NETWORKS``;
    see :mod:`trio_idle.destinations`): if the host has no other address, the error says
    so. TLS still verifies the certificate against ``conn.host``.

    What the server sends is bounded by ``limits`` from the first byte on.
    """
    monitor = PushMonitor()
    where = f"{conn.host}:{conn.port}"
    try:
        with trio.fail_after(timeouts.connect):
            protocol = await trio_asyncio.aio_as_trio(_aio_connect)(
                conn, security, context, monitor, timeouts, refuse, limits
            )
    except trio.TooSlowError:
        raise ImapConnectError(
            f"no IMAP greeting from {where} within {timeouts.connect:g}s", kind=KIND_TIMEOUT
        ) from None
    except _NoStartTls:
        raise ImapConnectError(f"{where} does not offer STARTTLS", kind=KIND_TLS) from None
    except _BadGreeting as exc:
        raise ImapConnectError(
            f"{where} failed the IMAP greeting: {exc}", kind=KIND_SERVER_CLOSED
        ) from None
    except _Refused as exc:
        raise ImapConnectError(str(exc), kind=KIND_REFUSED) from None
    except (TimeoutError, OSError, aioimaplib.AioImapException) as exc:
        raise ImapConnectError(
            _describe_connect_error(exc, conn.host, conn.port), kind=_connect_error_kind(exc)
        ) from None
    imap = ImapConnection(protocol, monitor, timeouts, host=conn.host, port=conn.port)
    if monitor.problem() is not None:
        imap.abort()
        raise ImapConnectError(f"{where}: {monitor.problem()}", kind=KIND_SERVER_CLOSED)
    return imap
