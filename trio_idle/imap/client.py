"""An IMAP connection for one session: aioimaplib's parser, driven from trio.

aioimaplib is used for what it is good at — its response parser and command table
(``IMAP4ClientProtocol``, ``Command``) — and fed by trio, h11-style: the socket (and its
TLS) is ours (:mod:`trio_idle.net.transport`), bytes read are framed and bounded
(:mod:`trio_idle.imap.framing`) and handed to the parser one response at a time, and a
command is written, then the *calling* task reads until the parser says it is answered.
No asyncio task, future or transport exists per connection and nothing crosses the
trio-asyncio bridge: a keepalive line costs one wake-up of the session task, a tick one
write (``DONE``, ``NOOP`` and ``IDLE`` pipelined, RFC 3501 §5.5: by the process ticker,
:meth:`ImapConnection.begin_restart`) and one wake-up for its answers.

Untagged lines go to a :class:`~trio_idle.imap.push_monitor.PushMonitor` whatever command is
in progress, so new mail between commands is counted; while idling the session reads
in :meth:`ImapConnection.wait`.

Guarantees: every method either returns within its deadline or raises an
:class:`~trio_idle.core.errors.ImapError` subclass; after *any* exception (including
cancellation) the connection is unusable and :meth:`ImapConnection.abort` or
:meth:`ImapConnection.logout` must be called. Nothing here logs or raises a password.
Only the task that owns the connection (its session) may call its methods — but
:meth:`ImapConnection.begin_restart` and :meth:`ImapConnection.check_restart`, which are
synchronous, only write or close, and are the ticker's; the connection is never read by
two tasks at once.

Every byte a server sends is framed and bounded before aioimaplib parses it
(:class:`ImapLimits`): one hostile server costs at most its limits in memory and linear
time, then its connection. An exception raised while parsing server data marks the
connection dead and closes it; nothing a server sends can raise out of a session.
"""

from __future__ import annotations

import math
import random
import socket
import ssl
from collections.abc import Callable
from typing import Any, Final, NoReturn

import aioimaplib
import attrs
import trio

from trio_idle.accounts.connections import MailConnection
from trio_idle.core.destinations import DEFAULT_NETWORKS, Network
from trio_idle.core.errors import (
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
from trio_idle.core.scrub import MASK, Scrubber
from trio_idle.imap.envelope import Envelope, NewMail, ParseMeter, parse_search, parse_steps
from trio_idle.imap.framing import FrameError, FrameTooLarge, ResponseFramer, format_size
from trio_idle.imap.push_monitor import PushMonitor
from trio_idle.imap.responses import (
    MailboxState,
    needs_uidnext,
    parse_fetch_uid,
    parse_mailbox_state,
    parse_status,
    with_learnt_uidnext,
)
from trio_idle.imap.restart import DONE, IDLE, NOOP, Next, RestartAnswers
from trio_idle.imap.sasl import (
    challenge_text,
    choose_mechanism,
    error_ack,
    error_status,
    initial_response,
)
from trio_idle.net.tcp_connect import RefusedDestination, open_socket
from trio_idle.net.transport import ImapTransport, TransportClosed

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
    """What one server may make us buffer (see :mod:`trio_idle.imap.framing`).

    ``max_line``: text of one response outside its literals; ``max_literal``: the
    literals of one response together. The untagged lines answering one command (all but
    IDLE, whose lines are not kept) may total ``max_line + max_literal``
    (:attr:`max_answer`), except a ``FETCH``'s: ``max_fetch_answer``, because the envelope
    fetch (:meth:`ImapConnection.fetch_new`) asks for up to
    :data:`~trio_idle.imap.envelope.MAX_ENVELOPES` envelopes in one command, and one
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


class _NoLoop:
    """What aioimaplib's ``Command`` needs of an event loop when it has no timeout: a
    ``get_debug()`` for the placeholder handle it makes. Commands here never get an
    aioimaplib timer (deadlines are trio's), so no asyncio loop is involved at all."""

    __slots__ = ()

    def get_debug(self) -> bool:
        return False


_NO_LOOP: Any = _NoLoop()


class _DiscardQueue:
    """Replaces aioimaplib's IDLE queue: the monitor already saw every line."""

    __slots__ = ()

    def put_nowait(self, item: object) -> None:
        pass

    async def put(self, item: object) -> None:
        pass


_DISCARD: Final = _DiscardQueue()


class _Flag:
    """Stands in for a command's ``asyncio.Event``: set when the server answered it.

    Nothing ever waits on it (the connection checks :meth:`is_set` after each read),
    so it needs no loop and no waiter queue — an asyncio.Event is ≈ 0.5 KiB with its
    deque, and every tick makes two commands."""

    __slots__ = ("_value",)

    def __init__(self) -> None:
        self._value = False

    def set(self) -> None:
        self._value = True

    def is_set(self) -> bool:
        return self._value


class _NoTimer:
    """A command's timer where there is none (deadlines are trio cancel scopes)."""

    __slots__ = ()

    def cancel(self) -> None:
        pass


_NO_TIMER: Final = _NoTimer()


class _Command(aioimaplib.Command):  # type: ignore[misc]
    """aioimaplib's ``Command`` without its asyncio parts: the parser fills and closes
    it as any other; the connection polls :func:`_done` instead of awaiting it."""

    def __init__(
        self,
        name: str,
        tag: str,
        *args: str,
        prefix: str | None = None,
        untagged_resp_name: str | None = None,
    ) -> None:
        for arg in args:  # as aioimaplib: a CR or LF in an argument would end the line
            if arg is not None and aioimaplib.CONTROL_CHARS.search(str(arg)):
                raise ValueError(f"NUL, CR and LF are not allowed in {name} command arguments")
        self.name = name
        self.tag = tag
        self.args = args
        self.prefix = prefix + " " if prefix else None
        self.untagged_resp_name = untagged_resp_name or name
        self._exception = None
        self._loop = _NO_LOOP
        self._event = _Flag()
        self._timeout = None
        self._timer = _NO_TIMER
        self._expected_size = 0
        self._resp_literal_data = bytearray()
        self._resp_result = "Init"
        self._resp_lines: list[bytes] = []

    def _set_timer(self) -> None:
        pass

    def _reset_timer(self) -> None:
        pass


class _IdleCommand(_Command):
    """aioimaplib's ``IdleCommand`` (lines while idling are not kept: the monitor saw
    them) on :class:`_Command`."""

    def __init__(self, tag: str) -> None:
        super().__init__("IDLE", tag)

    def append_to_resp(self, line: bytes, result: str = "Pending") -> None:
        if result != "Pending":
            super().append_to_resp(line, result)


def _command(name: str, tag: str, *args: str, **kwargs: Any) -> aioimaplib.Command:
    return _Command(name, tag, *args, **kwargs)


def _done(command: aioimaplib.Command) -> bool:
    """Whether the server has answered ``command`` (its tagged response was parsed)."""
    return bool(command._event.is_set())


class _Protocol(aioimaplib.IMAP4ClientProtocol):  # type: ignore[misc]
    """aioimaplib's parser behind our own bounded framing, fed from trio.

    Bytes go through a :class:`~trio_idle.imap.framing.ResponseFramer` first, and
    aioimaplib gets one complete response per ``data_received`` call. Its parser then never
    holds an unfinished line or literal between calls (it would buffer those without
    limit, and re-copy an unfinished line on every read) and recurses only over the
    lines and literals of that one response (thousands of lines in one read ran it out
    of stack). A bound exceeded, or anything else the parser raises, marks the
    connection dead with a one-line reason and closes it.

    Between two responses, the next of the commands written ahead (:attr:`queued`,
    pipelining) is entered into aioimaplib's table once nothing is pending, so each
    response is matched to the command the server is answering.
    """

    def __init__(self, monitor: PushMonitor, limits: ImapLimits) -> None:
        # Not aioimaplib's __init__: it makes an asyncio Condition, Queue and Event per
        # connection (≈ 2 KiB) for its coroutine API, which is not used here. These are
        # the attributes its parser reads.
        self.loop = _NO_LOOP
        self.transport: Any = None
        self.state = aioimaplib.STARTED
        self.capabilities: set[str] = set()
        self.pending_async_commands: dict[str, aioimaplib.Command] = {}
        self.pending_sync_command: aioimaplib.Command | None = None
        self.idle_queue = _DISCARD
        self._idle_event = _Flag()  # set by the parser at IDLE's "+" continuation
        self.imap_version: str | None = None
        self.literal_data = None
        self.incomplete_line = b""
        self.current_command = None
        self.conn_lost_cb: Callable[[Exception | None], None] | None = self._lost
        self.tasks: set[Any] = set()
        self.tagnum = 0
        self.tagpre = aioimaplib.int2ap(random.randint(4096, 65535))
        self.monitor = monitor
        self.limits = limits
        self.framer = ResponseFramer(limits.max_line, limits.max_literal)
        self._protocol_error: Exception | None = None
        #: the server's greeting line, once it came
        self.greeting: bytes | None = None
        #: an IDLE was written and no DONE for it yet (LOGOUT must end it first)
        self.idle_outstanding = False
        #: LOGOUT was written: what the server still sends is not parsed
        self.closing = False
        #: STARTTLS was accepted: nothing more is parsed until TLS is up
        self.tls_pending = False
        #: bytes of the answer to the command in progress (aioimaplib keeps them)
        self._answer_bytes = 0
        #: while a list: every untagged response, raw as framed (for the envelope fetch)
        self.capture: list[bytes] | None = None
        #: commands already written, entered into aioimaplib's table one after the other
        self.queued: list[aioimaplib.Command] = []
        #: told after the responses of each read were parsed, while a restart written by
        #: :meth:`ImapConnection.begin_restart` waits for its answers
        self.after_parse: Callable[[], None] | None = None
        self._lost_seen = False

    def _lost(self, exc: Exception | None) -> None:
        self.monitor.connection_lost(exc or self._protocol_error)

    def lost(self, exc: Exception | None) -> None:
        """The connection ended (server close, read error, or our own close): once.

        Also drops what referred back to this object (its bound callback, the commands
        still pending), so an ended connection is freed by reference counting, without
        waiting for a full garbage collection."""
        if not self._lost_seen:
            self._lost_seen = True
            self.connection_lost(exc)
            self.conn_lost_cb = None
            self.after_parse = None
            self.pending_sync_command = None
            self.pending_async_commands.clear()
            self.queued.clear()

    def data_received(self, d: bytes) -> None:
        self.monitor.activity()
        if self.closing or self._protocol_error is not None:
            return
        self.framer.feed(d)
        self._handle_buffered()
        if self.after_parse is not None:
            self.after_parse()

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
                if self._protocol_error is not None:
                    return
        except FrameError as exc:
            self._drop(exc, str(exc))
        except Exception as exc:  # escaping here, it would end the session's task
            self._drop(exc, f"protocol error: {type(exc).__name__}: {exc}"[:200])

    def _handle_response(self, response: bytes) -> None:
        sync = self.pending_sync_command
        collecting = self._collecting()
        # named now: the answer may end the command
        waiting = (
            ""
            if not collecting
            else sync.name
            if sync is not None
            else "/".join(self.pending_async_commands)
        )
        if self.capture is not None and response[:1] == b"*":
            self.capture.append(response)
        try:
            # aioimaplib's data_received minus its eager debug formatting of every read
            self._handle_responses(response, self._handle_line)
        except aioimaplib.IncompleteRead:
            # aioimaplib would wait for more of this response: it read a literal where the
            # framer read none (a bare LF before the CRLF), and would buffer without bound
            raise FrameError(
                "server sent a malformed response (a bare LF next to a literal)"
            ) from None
        if sync is not None and sync.name == "STARTTLS" and self.pending_sync_command is None:
            self.tls_pending = True
        if collecting:
            self._answer_bytes += len(response)
            budget = self.limits.max_fetch_answer if waiting == "FETCH" else self.limits.max_answer
            if self._answer_bytes > budget:
                raise FrameTooLarge(
                    f"server sent more than {format_size(budget)} in answer to {waiting}"
                )
        self.advance_queue()
        if not self._collecting():
            self._answer_bytes = 0

    def advance_queue(self) -> None:
        """Enter the next queued command into the table if nothing is pending."""
        if self.queued and self.pending_sync_command is None and not self.pending_async_commands:
            self.register(self.queued.pop(0))

    def register(self, command: aioimaplib.Command) -> None:
        """Enter ``command`` into aioimaplib's table of pending commands, as its
        ``execute`` does (without writing it)."""
        if aioimaplib.Commands[command.name].exec == aioimaplib.Exec.is_sync:
            self.pending_sync_command = command
        else:
            self.pending_async_commands[command.untagged_resp_name] = command

    def _collecting(self) -> bool:
        """Whether aioimaplib keeps the untagged lines now (IDLE's it hands to a queue)."""
        sync = self.pending_sync_command
        return (sync is not None and sync.name != "IDLE") or bool(self.pending_async_commands)

    def _drop(self, exc: Exception, reason: str) -> None:
        self._protocol_error = exc
        self.monitor.mark_dead(reason)
        if self.transport is not None:
            self.transport.close()
        self.lost(exc)

    def _handle_line(self, line: bytes, current_cmd: Any) -> Any:
        if line and self.state == aioimaplib.CONNECTED:
            # aioimaplib would start a greeting task per line until the first one ran:
            # only the first line is the greeting, and the connection handles it
            if self.greeting is None:
                self.greeting = line
            return None
        return super()._handle_line(line, current_cmd)

    def idle_done(self) -> None:
        self.idle_outstanding = False
        self.write(b"DONE\r\n")

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

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
    """The :mod:`trio_idle.core.errors` kind of what :func:`_describe_connect_error` describes."""
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


def _set_keepalive(sock: socket.socket, idle: float) -> None:
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
        transport: ImapTransport,
        *,
        host: str = "",
        port: int = 0,
    ) -> None:
        self.protocol = protocol
        self.monitor = monitor
        self.timeouts = timeouts
        self.transport = transport
        #: the server as the user named it (OAUTHBEARER tells the server which it is)
        self.host = host
        self.port = port
        self._idle: aioimaplib.Command | None = None
        #: write a tick's IDLE together with its DONE and NOOP; switched off for the rest
        #: of this connection if the server refuses an IDLE written that way
        self._pipeline_idle = True
        #: a restart written by :meth:`begin_restart`, answered as the session reads
        self._restart: _Restart | None = None
        self._restarts = 0
        #: what the last envelope parse cost (:meth:`fetch_new`; for tests)
        self.envelope_meter: ParseMeter | None = None

    # -- plumbing ----------------------------------------------------------------------

    async def _pump(self) -> None:
        """Read once and parse what came. A closed or broken connection is handed to the
        monitor (never raised); only cancellation escapes."""
        protocol = self.protocol
        try:
            data = await self.transport.receive()
        except (TransportClosed, trio.ClosedResourceError):
            protocol.lost(None)
            return
        except OSError as exc:  # ssl.SSLError included
            self.transport.close()
            protocol.lost(exc)
            return
        if data:
            protocol.data_received(data)
        else:
            self.transport.close()
            protocol.lost(None)

    async def _until(
        self, what: str | _Step | _Restart, done: Callable[[], bool], deadline: float
    ) -> None:
        """Read and parse until ``done()``, by ``deadline``; fail fast on a lost connection.

        ``what`` names the command in errors (a :class:`_Step` or :class:`_Restart` names
        the one in progress when the error happens).
        """
        with trio.move_on_at(deadline):
            await self._read_until(what, done)
            return
        self._timed_out(what)

    async def _read_until(self, what: str | _Step | _Restart, done: Callable[[], bool]) -> None:
        """:meth:`_until` without a deadline of its own (the caller's scope has it)."""
        monitor = self.monitor
        while not done():
            if monitor.lost is not None:
                if monitor.failure is not None:
                    raise monitor.failure
                raise ConnectionLost(f"{what}: {monitor.problem() or 'connection lost'}")
            await self._pump()

    def _timed_out(self, what: str | _Step | _Restart) -> NoReturn:
        error = self._no_answer(what)
        self.monitor.mark_dead(str(error))
        raise error

    def _no_answer(self, what: str | _Step | _Restart) -> ConnectionLost:
        """The error of a command not answered within the command timeout."""
        return ConnectionLost(
            f"no answer to {what} within {self.timeouts.command:g}s", kind=KIND_TIMEOUT
        )

    def _deadline(self) -> float:
        return trio.current_time() + self.timeouts.command

    def _send(self, command: aioimaplib.Command, line: bytes | None = None) -> None:
        """Write ``command`` and enter it into aioimaplib's table (nothing else pending)."""
        protocol = self.protocol
        spec = aioimaplib.Commands[command.name]
        if protocol.state not in spec.valid_states:
            raise ImapError(
                f"{command.name} failed: command {command.name} illegal in state {protocol.state}"
            )
        protocol.register(command)
        protocol.write(line if line is not None else f"{command}\r\n".encode())

    async def _run(
        self, what: str, command: aioimaplib.Command, deadline: float | None = None
    ) -> Any:
        self._send(command)
        await self._until(what, lambda: _done(command), deadline or self._deadline())
        return command.response

    def _check(self) -> None:
        problem = self.monitor.problem()
        if problem is not None:
            raise ConnectionLost(problem)

    def _new_idle(self) -> aioimaplib.Command:
        protocol = self.protocol
        protocol._idle_event = _Flag()
        return _IdleCommand(protocol.new_tag())

    async def _idle_answered(
        self, what: str | _Step, idle: aioimaplib.Command, deadline: float
    ) -> bool:
        """Wait for IDLE's continuation: True once idling, False if the server refused it
        (answered with a tagged NO/BAD)."""
        with trio.move_on_at(deadline):
            return await self._idle_read(what, idle)
        self._timed_out(what)

    async def _idle_read(self, what: str | _Step, idle: aioimaplib.Command) -> bool:
        """:meth:`_idle_answered` without a deadline of its own."""
        protocol = self.protocol
        await self._read_until(what, lambda: protocol._idle_event.is_set() or _done(idle))
        if _done(idle):
            return False
        self._idle = idle
        return True

    # -- the connect-time handshake ----------------------------------------------------

    async def _handshake(self, security: str, context: ssl.SSLContext | None) -> None:
        """Greeting, CAPABILITY, and STARTTLS (+ CAPABILITY again) when asked: bounded
        by the caller's connect deadline only."""
        protocol = self.protocol
        await self._until("greeting", lambda: protocol.greeting is not None, math.inf)
        greeting = protocol.greeting
        if greeting is None:
            raise _BadGreeting(self.monitor.problem() or "connection lost")
        if b"PREAUTH" in greeting:
            protocol.state = aioimaplib.AUTH
        elif b"OK" in greeting:
            protocol.state = aioimaplib.NONAUTH
        else:  # e.g. "* BYE Too many connections" as the greeting
            raise _BadGreeting(f"Error: {greeting.decode('utf-8', 'replace')}"[:200])
        await self._capability()
        if security != "starttls":
            return
        if "STARTTLS" not in protocol.capabilities:
            raise _NoStartTls()
        response = await self._run("STARTTLS", _command("STARTTLS", protocol.new_tag()), math.inf)
        if response.result != "OK":
            raise _NoStartTls()
        if protocol.framer.buffered:
            # plaintext sent after the answer would pass for TLS-protected (RFC 3207 §4.2)
            raise _BadGreeting("server sent data after accepting STARTTLS (refused)")
        assert context is not None
        await self.transport.start_tls(context, self.host)
        protocol.start_parsing_tls()
        await self._capability()  # capabilities may differ once encrypted

    async def _capability(self) -> None:
        protocol = self.protocol
        response = await self._run(
            "CAPABILITY", _command("CAPABILITY", protocol.new_tag()), math.inf
        )
        words = (
            bytes(response.lines[0]).decode("utf-8", "replace").split() if response.lines else []
        )
        protocol.capabilities = set(words)
        versions = [w.upper() for w in words if w.upper() in aioimaplib.AllowedVersions]
        if not versions:
            raise _BadGreeting("Error: server not IMAP4 compliant")
        protocol.imap_version = versions[-1]

    # -- commands ----------------------------------------------------------------------

    async def login(self, user: str, password: str) -> None:
        # aioimaplib's LOGIN quotes the password but sends the user as it is: a user name
        # with a space or a quote would garble the command, so both are quoted (always
        # valid IMAP).
        protocol = self.protocol
        command = _command(
            "LOGIN", protocol.new_tag(), aioimaplib.quoted(user), aioimaplib.quoted(password)
        )
        response = await self._run("LOGIN", command)
        if response.result == "OK":
            protocol.state = aioimaplib.AUTH
            for line in response.lines:  # servers may announce new capabilities here
                if b"CAPABILITY" in line:
                    words = bytes(line).decode("utf-8", "replace").replace("CAPABILITY", "")
                    protocol.capabilities |= set(words.split())
            return
        text = b" ".join(bytes(x) for x in response.lines).decode("utf-8", "replace")
        text = text.replace(password, "********") if password else text
        if "[UNAVAILABLE]" in text.upper():  # RFC 5530: temporary, not a bad password
            raise ImapError(f"login temporarily unavailable: {text[:200]}")
        raise ImapAuthError(f"login rejected for {user}: {response.result} {text[:200]}")

    async def authenticate_oauth2(self, user: str, token: str) -> None:
        """AUTHENTICATE with an OAuth2 access token: ``OAUTHBEARER`` where the server
        offers it, else ``XOAUTH2`` (:func:`trio_idle.imap.sasl.choose_mechanism`).

        The client response goes on the command line where the server announced
        ``SASL-IR``, else after its first ``+`` continuation. A server refusing the token
        sends a continuation with a JSON status: it is acknowledged (so the server ends
        the exchange with its tagged ``NO``) and the status is kept in the
        :class:`ImapAuthError` (``status``). ``[UNAVAILABLE]`` (RFC 5530) is a temporary
        :class:`ImapError`, not a refusal. The whole exchange runs under one command
        deadline. Neither the token nor the client response reaches an exception
        message (every message is scrubbed of both).
        """
        protocol = self.protocol
        mechanism = choose_mechanism(protocol.capabilities)
        try:
            response_b64 = initial_response(mechanism, user, token, self.host, self.port)
        except ValueError as exc:
            raise ImapAuthError(str(exc), mechanism=mechanism) from None
        scrub = Scrubber((token, response_b64))
        command = _SaslCommand(
            protocol, mechanism, response_b64, sasl_ir="SASL-IR" in protocol.capabilities
        )
        try:
            self._send(command, command.line.encode() + b"\r\n")
            await self._until("AUTHENTICATE", lambda: _done(command), self._deadline())
        except ImapError as exc:
            raise type(exc)(scrub(exc)) from None
        response = command.response
        if response.result == "OK":
            protocol.state = aioimaplib.AUTH
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
        """SELECT ``mailbox``; its EXISTS, UIDNEXT and UIDVALIDITY.

        A server that leaves UIDNEXT out of its SELECT answer (Courier-IMAP; RFC 3501
        requires it) has it learnt another way, so catch-up and ``sinceUid`` never rely
        on message counts (one message expunged and one arrived leave the count as it
        was): ``STATUS <mailbox> (UIDNEXT UIDVALIDITY MESSAGES)``, then SELECT again;
        if the STATUS gave no UIDNEXT, ``FETCH <exists> (UID)`` of the last message.
        Servers that send UIDNEXT pay nothing: one SELECT, as always. Each command has
        its own command timeout; a STATUS or FETCH the server refuses only means
        nothing was learnt (:func:`~trio_idle.imap.responses.with_learnt_uidnext`).
        """
        selected = await self._select(mailbox)
        if not needs_uidnext(selected):
            return selected
        # Why STATUS *before* a second SELECT, not after the first one: STATUS's UIDNEXT
        # must be a lower bound for the SELECT whose EXISTS is the session's baseline.
        # Taken after the SELECT, it would include mail that arrived in between, whose
        # EXISTS the session then announces and adds again: a UIDNEXT above the UID of
        # mail not scanned yet, a ``sinceUid`` that skips it. STATUS on the selected
        # mailbox is allowed (RFC 3501 6.3.10 only discourages it because it need not
        # agree with the session's view, which is why its answer is not used as the
        # view: the second SELECT is). The cost, one STATUS and one SELECT per connect,
        # falls only on servers that omit UIDNEXT.
        status = await self._status(mailbox)
        self.monitor.rebase()
        selected = await self._select(mailbox)
        last_uid = None
        if needs_uidnext(selected) and status.uidnext is None and selected.exists:
            last_uid = await self._last_uid(selected.exists)
        return with_learnt_uidnext(selected, status, last_uid)

    async def _select(self, mailbox: str) -> MailboxState:
        protocol = self.protocol
        response = await self._run("SELECT", _command("SELECT", protocol.new_tag(), mailbox))
        if response.result != "OK":
            raise ImapError(f"SELECT {mailbox} failed: {response.result}")
        protocol.state = aioimaplib.SELECTED
        return parse_mailbox_state(response.lines)

    async def _status(self, mailbox: str) -> MailboxState:
        """STATUS's UIDNEXT, UIDVALIDITY and MESSAGES; nothing if the server refused it."""
        command = _command(
            "STATUS", self.protocol.new_tag(), mailbox, "(UIDNEXT UIDVALIDITY MESSAGES)"
        )
        ok, answer = await self._run_captured("STATUS", command)
        return parse_status(answer) if ok else MailboxState()

    async def _last_uid(self, number: int) -> int | None:
        """The UID of message ``number`` (``FETCH <number> (UID)``); None if refused.
        A plain FETCH: no EXPUNGE may come during it (RFC 3501 7.4.1), so ``number`` is
        still the SELECT's last message."""
        command = _command(
            "FETCH", self.protocol.new_tag(), str(number), "(UID)", untagged_resp_name="FETCH"
        )
        ok, answer = await self._run_captured("FETCH", command)
        return parse_fetch_uid(answer, number) if ok else None

    async def _run_captured(
        self, what: str, command: aioimaplib.Command
    ) -> tuple[bool, list[bytes]]:
        """Run ``command``; whether it was answered OK, and its untagged responses raw as
        framed (aioimaplib hands an async command's lines over cut up)."""
        protocol = self.protocol
        captured: list[bytes] = []
        protocol.capture = captured
        try:
            response = await self._run(what, command)
        finally:
            protocol.capture = None
        self._check()
        return response.result == "OK", captured

    @property
    def has_idle(self) -> bool:
        return "IDLE" in self.protocol.capabilities

    async def wait(self) -> None:
        """Read the connection until new mail, BYE or its loss is pending (at once if
        already so); see :meth:`PushMonitor.wait`. Always a checkpoint; cancellation
        loses nothing (bytes are read only after the wait for them)."""
        monitor = self.monitor
        if monitor.pending():
            await trio.lowlevel.checkpoint()
            return
        while not monitor.pending():
            await self._pump()

    async def noop(self) -> None:
        response = await self._run("NOOP", _command("NOOP", self.protocol.new_tag()))
        if response.result != "OK":
            raise ImapError(f"NOOP failed: {response.result}")
        self._check()

    async def idle_start(self) -> None:
        """Send IDLE and wait for the server's continuation (``+ idling``)."""
        if not self.has_idle:
            raise ImapError("IDLE failed: server has not IDLE capability")
        idle = self._new_idle()
        self._send(idle)
        self.protocol.idle_outstanding = True
        if not await self._idle_answered("IDLE", idle, self._deadline()):
            raise ImapError(f"IDLE failed: server refused IDLE: {idle.response.result}")
        self._check()

    async def idle_done(self) -> None:
        """Send DONE and wait for the IDLE command's tagged answer."""
        await self._settle(self._deadline())
        idle = self._idle
        if idle is None:
            return
        self._check()
        self.protocol.idle_done()
        await self._until("DONE", lambda: _done(idle), self._deadline())
        self._idle = None
        if idle.response.result != "OK":
            raise ImapError(f"IDLE ended with {idle.response.result}")

    async def restart_idle(self, *, noop: bool) -> None:
        """Leave IDLE (DONE), NOOP if ``noop``, and enter IDLE again, run by the session.

        The session runs this when the ticker hands it a restart (:meth:`begin_restart`
        returned ``None``) or when there is no ticker. ``DONE``, ``NOOP`` and ``IDLE`` go
        out in one write (IMAP pipelining, RFC 3501 §5.5: none of them is ambiguous
        after the one before) — or, on a connection whose server once refused an IDLE
        written that way, ``IDLE`` alone once ``NOOP`` is answered — and their answers
        are followed by the same machine as the ticker's restarts
        (:class:`~trio_idle.imap.restart.RestartAnswers`): same errors, and a refused
        pipelined IDLE is sent again on its own and this connection stops pipelining it.

        A restart the ticker wrote and that is still unanswered is followed to its end
        first, and its failure raised. Everything must be answered within one command
        timeout; an error names the command not answered (``no answer to NOOP within
        30s``) or refused (``NOOP failed: NO``). Same guarantees as every command: any
        exception, cancellation included, leaves the connection unusable.
        """
        deadline = self._deadline()
        await self._settle(deadline)
        old = self._idle
        if old is None:
            raise ConnectionLost("not idling")
        self._check()
        restart = self._write_restart(old, noop=noop, pipelined=self._pipeline_idle)
        try:
            with trio.move_on_at(deadline):
                # the answers are followed here, between reads, so a refusal is raised
                # as is instead of failing the monitor (which the ticker's path must do)
                await self._read_until(restart, lambda: self._advance(restart))
                self._check()
                return
            self._timed_out(restart)
        finally:
            self.protocol.queued.clear()

    def _write_restart(self, old: aioimaplib.Command, *, noop: bool, pipelined: bool) -> _Restart:
        """Write ``DONE``, ``NOOP`` if ``noop`` and ``IDLE`` if ``pipelined``, in one write,
        and queue the commands to be matched with their answers in order. Synchronous,
        never blocks; the caller follows the answers with :meth:`_advance`."""
        protocol = self.protocol
        data = "DONE\r\n"
        noop_command: aioimaplib.Command | None = None
        if noop:
            noop_command = _Command("NOOP", protocol.new_tag())
            data += f"{noop_command.tag} NOOP\r\n"
            protocol.queued.append(noop_command)
        idle: aioimaplib.Command | None = None
        if pipelined:
            idle = self._new_idle()
            data += f"{idle.tag} IDLE\r\n"
            protocol.queued.append(idle)
        protocol.idle_outstanding = pipelined
        self._idle = None
        self._restarts += 1
        restart = _Restart(self._restarts, old, noop_command, idle, RestartAnswers(noop, pipelined))
        protocol.write(data.encode())
        protocol.advance_queue()  # the server may have ended the old IDLE already
        return restart

    def _advance(self, restart: _Restart) -> bool:
        """Feed ``restart``'s machine every answer parsed since the last call, in order,
        and do what it says: True once idling again. An answer that ends the restart
        raises the machine's :class:`ImapError`. Synchronous, never blocks: called after
        each read by the task that reads (the session), whoever wrote the restart."""
        answers = restart.answers
        protocol = self.protocol
        while True:
            awaiting = answers.awaiting
            if awaiting == DONE:
                command: aioimaplib.Command | None = restart.old
            elif awaiting == NOOP:
                command = restart.noop
            else:
                command = restart.idle
            assert command is not None  # each is awaited only once it was written
            if _done(command):
                todo = answers.answered(command.response.result)
            elif awaiting == IDLE and protocol._idle_event.is_set():
                todo = answers.continued()
            else:
                return False
            if todo is Next.IDLING:
                self._idle = command
                return True
            if todo is not Next.WAIT:  # IDLE on its own: not pipelined, or refused so
                if todo is Next.RESEND_IDLE:
                    self._pipeline_idle = False
                restart.idle = idle = self._new_idle()
                self._send(idle)
                protocol.idle_outstanding = True

    # -- the restart the process ticker writes (passive) ------------------------------

    def begin_restart(self, *, noop: bool) -> int | None:
        """Write ``DONE``, ``NOOP`` if ``noop``, and ``IDLE`` now, and return without
        waiting: the answers are parsed as the session task reads (:meth:`wait`), so a
        tick wakes that task once, for the answers, and never through a cancellation.

        For the process's ticker (:mod:`trio_idle.mailbox.ticker`), which runs in another task:
        synchronous, never blocks, never raises. Returns a number for
        :meth:`check_restart`, which must follow within the command timeout (the
        deadline of the answers), or ``None`` when this cannot be done now — not idling,
        a command or restart in progress, the server once refused a pipelined IDLE, the
        connection unusable: the session then runs :meth:`restart_idle` itself.

        The answers are followed by the machine :meth:`restart_idle` uses
        (:class:`~trio_idle.imap.restart.RestartAnswers`): an answer that is not ``OK``
        ends the connection with the error :meth:`restart_idle` would raise
        (:attr:`PushMonitor.failure`), and a refused pipelined IDLE is sent again on its
        own. Mail counted until IDLE is confirmed is the tick's (:attr:`PushMonitor.ticking`).
        """
        old = self._idle
        protocol = self.protocol
        if (
            old is None
            or self._restart is not None
            or not self._pipeline_idle
            or protocol.queued
            or self.monitor.problem() is not None
            or self.transport.is_closing()
        ):
            return None
        restart = self._write_restart(old, noop=noop, pipelined=True)
        self._restart = restart
        self.monitor.ticking = noop
        protocol.after_parse = self._restart_progress
        return restart.number

    def check_restart(self, number: int) -> None:
        """The answers to restart ``number`` are due: if they are not all in, the
        connection is dead (``no answer to NOOP within 30s``) and closed, which wakes the
        session. Synchronous, never raises; a restart already answered (or a connection
        already lost) is left alone."""
        restart = self._restart
        if restart is None or restart.number != number or self.monitor.lost is not None:
            return
        self.monitor.fail(self._no_answer(restart))
        self.transport.close()

    def _restart_progress(self) -> None:
        """After each read while a restart the ticker wrote is in flight: follow its
        answers (:meth:`_advance`). The session is waiting in :meth:`wait`, so an answer
        that ends the restart fails the monitor, which wakes it with that error."""
        restart = self._restart
        if restart is None or self.monitor.lost is not None:
            return
        try:
            if not self._advance(restart):
                return
        except ImapError as exc:
            self.monitor.fail(exc)
        else:
            self.monitor.ticking = False
        self._restart = None
        self.protocol.after_parse = None

    async def _settle(self, deadline: float) -> None:
        """Read until a restart the ticker wrote (:meth:`begin_restart`) is over, by
        ``deadline``; raise its failure if it failed (:attr:`PushMonitor.failure`), so
        the command that waited reports why the connection ended, not that it did."""
        restart = self._restart
        if restart is None:
            return
        await self._until(restart, lambda: self._restart is None, deadline)
        if (failure := self.monitor.failure) is not None:
            raise failure

    async def fetch_new(self, since_uid: int, limit: int) -> NewMail:
        """What arrived from ``since_uid`` on: leave IDLE (DONE) if idling,
        ``UID SEARCH UID <since_uid>:*``, and, when at most ``limit`` messages were found,
        ``UID FETCH <their UIDs> (UID ENVELOPE RFC822.SIZE)``, then IDLE again — all
        within one command timeout (an error names the command not answered). The
        answers are parsed from the raw framed responses (:mod:`trio_idle.imap.envelope`:
        decoded, bounded, never logged), in slices with a checkpoint between them; an
        answer that would cost more than
        :data:`~trio_idle.imap.envelope.MAX_ANSWER_WORK` to parse gives the range only
        (``envelopes`` None). EXISTS lines among them reach the monitor as always.
        Same guarantees as every command: a failure leaves the connection unusable.
        """
        self._check()
        protocol = self.protocol
        deadline = self._deadline()
        await self._settle(deadline)
        old = self._idle
        step = _Step("DONE" if old is not None else "UID SEARCH")
        try:
            if old is not None:
                protocol.idle_done()
                self._idle = None
                await self._until(step, lambda: _done(old), deadline)
                if old.response.result != "OK":
                    raise ImapError(f"{step} failed: IDLE ended with {old.response.result}")
            step.name = "UID SEARCH"
            protocol.capture = []
            search = _command("SEARCH", protocol.new_tag(), "UID", f"{since_uid}:*", prefix="UID")
            response = await self._run_step(step, search, deadline)
            if response.result != "OK":
                raise ImapError(f"{step} failed: UID SEARCH failed: {response.result}")
            # "n:*" also matches the highest UID when it is below n (RFC 3501 6.4.8)
            uids = tuple(uid for uid in parse_search(protocol.capture) if uid >= since_uid)
            envelopes: tuple[Envelope, ...] | None = None
            if len(uids) <= limit:
                envelopes = ()
                if uids:
                    step.name = "UID FETCH"
                    protocol.capture = []
                    # a plain Command: aioimaplib's FetchCommand counts parentheses across
                    # the lines, and a subject with an unbalanced "(" would leave it waiting
                    fetch = _command(
                        "FETCH",
                        protocol.new_tag(),
                        ",".join(map(str, uids)),
                        "(UID ENVELOPE RFC822.SIZE)",
                        prefix="UID",
                        untagged_resp_name="FETCH",
                    )
                    response = await self._run_step(step, fetch, deadline)
                    if response.result != "OK":
                        raise ImapError(f"{step} failed: UID FETCH failed: {response.result}")
                    found = await self._parse_envelopes(protocol.capture, set(uids))
                    envelopes = None if found is None else tuple(found)
            protocol.capture = None
            if old is not None:
                step.name = "IDLE"
                idle = self._new_idle()
                self._send(idle)
                protocol.idle_outstanding = True
                if not await self._idle_answered(step, idle, deadline):
                    raise ImapError(f"{step} failed: server refused IDLE: {idle.response.result}")
        finally:
            protocol.capture = None
        self._check()
        return NewMail(uids, envelopes)

    async def _parse_envelopes(
        self, responses: list[bytes], wanted: set[int]
    ) -> list[Envelope] | None:
        """:func:`~trio_idle.imap.envelope.parse_steps`, with a checkpoint after each of
        its slices: an answer of the largest size (``max_fetch_answer``) holds the event
        loop for one slice at a time, never for the whole parse. Cancelled at a
        checkpoint, the parse is abandoned."""
        meter = self.envelope_meter = ParseMeter()
        steps = parse_steps(responses, wanted, meter)
        try:
            while True:
                try:
                    next(steps)
                except StopIteration as done:
                    result: list[Envelope] | None = done.value
                    return result
                await trio.lowlevel.checkpoint()
        finally:
            steps.close()

    async def _run_step(self, step: _Step, command: aioimaplib.Command, deadline: float) -> Any:
        self._send(command)
        await self._until(step, lambda: _done(command), deadline)
        return command.response

    async def logout(self, limit: float) -> None:
        """Send LOGOUT, wait up to ``limit`` seconds for the server to close, close. Never raises.

        One write, no waiting for the answer: ending 10,000 sessions at shutdown must not
        cost 10,000 round trips. An IDLE in progress (or written) is ended with ``DONE``
        in the same write; a command still waiting for its answer (a NOOP, an IDLE being
        entered) is answered by the server before the LOGOUT, as IMAP pipelining allows.
        From here on the server's lines are not parsed: nothing they say can change what
        happens next.
        """
        protocol = self.protocol
        transport = self.transport
        try:
            if (
                self.monitor.problem() is None
                and not transport.is_closing()
                and protocol.state in (aioimaplib.NONAUTH, aioimaplib.AUTH, aioimaplib.SELECTED)
            ):
                end_idle = protocol.idle_outstanding
                protocol.closing = True
                transport.write(
                    (b"DONE\r\n" if end_idle else b"") + f"{protocol.new_tag()} LOGOUT\r\n".encode()
                )
                with trio.move_on_after(limit):
                    while self.monitor.lost is None and not transport.is_closing():
                        await self._pump()  # until the server closes
        finally:
            self.abort()

    def abort(self) -> None:
        """Close the socket now (no LOGOUT)."""
        self._idle = None
        self._restart = None
        self.protocol.queued.clear()
        self.transport.close()
        self.protocol.lost(None)


class _Restart:
    """A restart on the wire: its commands, matched with their answers in order by
    :attr:`answers`. Formats as the command whose answer is awaited (errors name it)."""

    __slots__ = ("answers", "idle", "noop", "number", "old")

    def __init__(
        self,
        number: int,
        old: aioimaplib.Command,
        noop: aioimaplib.Command | None,
        idle: aioimaplib.Command | None,
        answers: RestartAnswers,
    ) -> None:
        self.number = number
        #: the IDLE being left: its tagged answer is DONE's
        self.old = old
        self.noop = noop
        #: the IDLE entered again; None until written when it was not pipelined
        self.idle = idle
        self.answers = answers

    def __str__(self) -> str:
        return self.answers.awaiting


class _Step:
    """The command a multi-command call is waiting for; formats as its name."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __str__(self) -> str:
        return self.name


class _SaslCommand(_Command):
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
        super().__init__("AUTHENTICATE", protocol.new_tag(), mechanism)
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
        self._protocol.write(data + b"\r\n")


class _NoStartTls(Exception):
    pass


class _BadGreeting(Exception):
    pass


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
    see :mod:`trio_idle.core.destinations`): if the host has no other address, the error says
    so. TLS verifies the certificate against ``conn.host``, not the address.

    What the server sends is bounded by ``limits`` from the first byte on. Cancelled or
    failed, it leaves no socket open.
    """
    monitor = PushMonitor()
    where = f"{conn.host}:{conn.port}"
    imap: ImapConnection | None = None
    try:
        with trio.fail_after(timeouts.connect):
            sock = await open_socket(conn.host, conn.port, refuse)
            transport = ImapTransport(sock)
            protocol = _Protocol(monitor, limits)
            protocol.connection_made(transport)
            imap = ImapConnection(
                protocol, monitor, timeouts, transport, host=conn.host, port=conn.port
            )
            _set_keepalive(sock, timeouts.keepalive_idle)
            if security != "plain" and context is None:
                context = make_ssl_context(None)  # never plaintext for want of a context
            if security == "tls":
                assert context is not None
                await transport.start_tls(context, conn.host)
            await imap._handshake(security, context)
    except BaseException as exc:
        if imap is not None:
            imap.abort()
        if not isinstance(exc, Exception):
            raise
        raise _connect_error(exc, conn, where, timeouts, monitor) from None
    if monitor.problem() is not None:
        imap.abort()
        raise ImapConnectError(f"{where}: {monitor.problem()}", kind=KIND_SERVER_CLOSED)
    return imap


def _connect_error(
    exc: Exception, conn: MailConnection, where: str, timeouts: ImapTimeouts, monitor: PushMonitor
) -> Exception:
    """The :class:`ImapConnectError` a failed :func:`connect` raises (or ``exc`` itself
    if it is not a connect failure, e.g. a bug)."""
    if isinstance(exc, trio.TooSlowError):
        return ImapConnectError(
            f"no IMAP greeting from {where} within {timeouts.connect:g}s", kind=KIND_TIMEOUT
        )
    if isinstance(exc, _NoStartTls):
        return ImapConnectError(f"{where} does not offer STARTTLS", kind=KIND_TLS)
    if isinstance(exc, _BadGreeting):
        return ImapConnectError(f"{where} failed the IMAP greeting: {exc}", kind=KIND_SERVER_CLOSED)
    if isinstance(exc, RefusedDestination):
        return ImapConnectError(str(exc), kind=KIND_REFUSED)
    if isinstance(exc, (ConnectionLost, TransportClosed)):
        problem = monitor.problem() or "connection lost (closed by server)"
        return ImapConnectError(f"{where}: {problem}", kind=KIND_SERVER_CLOSED)
    if isinstance(exc, ImapError):
        return ImapConnectError(f"{where}: {exc}", kind=KIND_SERVER_CLOSED)
    if isinstance(exc, (TimeoutError, OSError)):
        return ImapConnectError(
            _describe_connect_error(exc, conn.host, conn.port), kind=_connect_error_kind(exc)
        )
    return exc
