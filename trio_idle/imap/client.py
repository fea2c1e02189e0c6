"""An IMAP connection for one session: the commands, driven from trio.

aioimaplib's parser and command table are used through one adapter,
:mod:`trio_idle.imap.aioimap` (the only module that imports aioimaplib), and fed by
trio, h11-style: the socket (and its TLS) is ours (:mod:`trio_idle.net.transport`),
bytes read are framed and bounded (:mod:`trio_idle.imap.framing`) and handed to the
parser one response at a time, and a command is written, then the *calling* task reads
until the parser says it is answered. No asyncio task, future or transport exists per
connection: a keepalive line costs one wake-up of the session task, a tick one write
(``DONE``, ``NOOP`` and ``IDLE`` pipelined, RFC 3501 §5.5: by the process ticker,
:meth:`ImapConnection.begin_restart`) and one wake-up for its answers. Opening a
connection (TCP, TLS, STARTTLS, the errors that say why it failed) is
:mod:`trio_idle.imap.connect`.

Untagged lines go to a :class:`~trio_idle.imap.push_monitor.PushMonitor` whatever command is
in progress, so new mail between commands is counted; while idling the session reads
in :meth:`ImapConnection.wait`.

Guarantees: every method either returns within its deadline or raises an
:class:`~trio_idle.core.errors.ImapError` subclass; after *any* exception (including
cancellation) the connection is unusable and :meth:`ImapConnection.abort` or
:meth:`ImapConnection.logout` must be called. Nothing here logs or raises a password.
Only the task that owns the connection (its session) may call its methods — but
:meth:`ImapConnection.begin_restart` and :meth:`ImapConnection.check_restart`, which are
synchronous, only write or close, and are the ticker's (which holds the connection as a
:class:`~trio_idle.imap.connector.RestartWriter`, so it cannot read it); the connection
is never read by two tasks at once. The IDLE restarts are a pure
:class:`~trio_idle.imap.restart.RestartMachine` this class drives: it writes the bytes
``begin`` returns, and the parser (:attr:`ImapProtocol.on_answer`) feeds it each answer
— the read path, so only the session task feeds it, whoever wrote the restart.

Every byte a server sends is framed and bounded before aioimaplib parses it
(:class:`~trio_idle.imap.framing.ImapLimits`): one hostile server costs at most its
limits in memory and linear time, then its connection. An exception raised while
parsing server data marks the connection dead and closes it; nothing a server sends can
raise out of a session.
"""

from __future__ import annotations

import math
import ssl
from collections.abc import Callable, Sequence
from typing import NoReturn

import attrs
import trio

from trio_idle.core.errors import (
    KIND_TIMEOUT,
    ConnectionLost,
    ImapAuthError,
    ImapError,
    MailboxRefused,
)
from trio_idle.core.scrub import MASK, Scrubber
from trio_idle.imap.aioimap import (
    AUTH,
    NONAUTH,
    SELECTED,
    CapturedCommand,
    Command,
    ContinuationCommand,
    ImapProtocol,
    quote,
)
from trio_idle.imap.envelope import (
    Envelope,
    FolderMail,
    NewMail,
    ParseMeter,
    parse_search,
    parse_steps,
)
from trio_idle.imap.folders import ListEntry, list_command_args, mailbox_arg, parse_list
from trio_idle.imap.notify import NotifyAnswer, NotifyWatch, notify_set_args, status_lines_for
from trio_idle.imap.push_monitor import PushMonitor
from trio_idle.imap.responses import (
    MailboxState,
    needs_uidnext,
    parse_fetch_uid,
    parse_mailbox_state,
    parse_status,
    with_learnt_uidnext,
)
from trio_idle.imap.restart import (
    Answered,
    Failed,
    IdleResumed,
    RestartMachine,
    SendIdle,
)
from trio_idle.imap.sasl import (
    challenge_text,
    choose_mechanism,
    error_ack,
    error_status,
    initial_response,
)
from trio_idle.net.transport import ImapTransport, TransportClosed


@attrs.frozen
class ImapTimeouts:
    connect: float
    command: float
    keepalive_idle: float


class ImapConnection:
    """A connected, not yet authenticated IMAP client. Use
    :func:`trio_idle.imap.connect.connect` to make one."""

    # One per session: slots, no instance dict (≈ 50 bytes less). An attribute added in
    # __init__ must be named here.
    __slots__ = (
        "_idle",
        "_restart",
        "_restart_by_ticker",
        "_restart_error",
        "_restart_idle",
        "envelope_meter",
        "host",
        "monitor",
        "port",
        "protocol",
        "timeouts",
        "transport",
    )

    def __init__(
        self,
        protocol: ImapProtocol,
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
        self._idle: Command | None = None
        #: the IDLE restarts (pure: tags, bytes, state, the pipelining memory); fed only
        #: by the read path (:meth:`_restart_line`), which only the session task runs
        self._restart = RestartMachine(protocol, timeouts.command)
        #: the running restart was written by the ticker (its failure fails the monitor)
        self._restart_by_ticker = False
        #: the IDLE the running restart enters again, once written
        self._restart_idle: Command | None = None
        #: how the session's own restart ended, when an answer ended it
        self._restart_error: ImapError | None = None
        #: what the last envelope parse cost (:meth:`fetch_new`; for tests)
        self.envelope_meter: ParseMeter | None = None

    # -- plumbing ----------------------------------------------------------------------

    # The read loop's step, :meth:`_pump` (commands, LOGOUT), written out in :meth:`wait`
    # too (an idle session): while parsed responses wait (:attr:`ImapProtocol.backlog`),
    # checkpoint and parse the next batch of them without reading; else send what is
    # unsent (:meth:`_flush`), then wait for the socket in the loop's own frame and take
    # what it has (:meth:`_take`). One step parses at most
    # :data:`~trio_idle.imap.aioimap.STEP_PARTS` lines and literals, so an answer of
    # thousands of responses holds the loop for one batch at a time; cancelled at the
    # checkpoint or the wait, nothing is lost (the batch waits for the next step, bytes
    # are read only after the wait). A closed or broken connection is handed to the
    # monitor (never raised); only cancellation escapes. No helper coroutine runs on
    # the way to the socket: an idle session sleeps in :meth:`wait` itself.

    async def _pump(self) -> None:
        """One step of the read loop (see above): for the loops that are not hot."""
        protocol = self.protocol
        transport = self.transport
        if protocol.backlog:
            await trio.lowlevel.checkpoint()
            protocol.parse_some()
        elif transport.unsent:
            await self._flush()
        elif transport.is_closing():
            self._take()  # hands over what closed it
        else:
            try:
                await trio.lowlevel.wait_readable(transport.socket)
            except trio.ClosedResourceError:  # closed meanwhile (:meth:`check_restart`)
                protocol.lost(None)
            else:
                self._take()

    def _take(self) -> None:
        """After the socket was readable: parse what it has (the first batch of it), or
        hand a closed or broken connection to the monitor. Synchronous."""
        protocol = self.protocol
        transport = self.transport
        try:
            data = transport.receive_nowait()
        except TransportClosed:
            protocol.lost(None)
            return
        except OSError as exc:  # ssl.SSLError included
            transport.close()
            protocol.lost(exc)
            return
        if data:
            protocol.data_received(data)
        elif data is not None:  # the server closed it
            transport.close()
            protocol.lost(None)

    async def _flush(self) -> None:
        """Send what is unsent before reading; a connection that breaks meanwhile is
        handed to the monitor."""
        try:
            await self.transport.flush()
        except (TransportClosed, trio.ClosedResourceError):
            self.protocol.lost(None)
        except OSError as exc:
            self.transport.close()
            self.protocol.lost(exc)

    async def _until(
        self, what: str | _Step | RestartMachine, done: Callable[[], bool], deadline: float
    ) -> None:
        """Read and parse until ``done()``, by ``deadline``; fail fast on a lost connection.

        ``what`` names the command in errors (a :class:`_Step` or :class:`RestartMachine`
        names the one in progress when the error happens).
        """
        with trio.move_on_at(deadline):
            await self._read_until(what, done)
            return
        self._timed_out(what)

    async def _read_until(
        self, what: str | _Step | RestartMachine, done: Callable[[], bool]
    ) -> None:
        """:meth:`_until` without a deadline of its own (the caller's scope has it)."""
        monitor = self.monitor
        while not done():
            if monitor.lost is not None:
                if monitor.failure is not None:
                    raise monitor.failure
                raise ConnectionLost(f"{what}: {monitor.problem() or 'connection lost'}")
            await self._pump()

    def _timed_out(self, what: str | _Step | RestartMachine) -> NoReturn:
        error = self._no_answer(what)
        self.monitor.mark_dead(str(error))
        raise error

    def _no_answer(self, what: str | _Step | RestartMachine) -> ConnectionLost:
        """The error of a command not answered within the command timeout."""
        return ConnectionLost(
            f"no answer to {what} within {self.timeouts.command:g}s", kind=KIND_TIMEOUT
        )

    def _deadline(self) -> float:
        return trio.current_time() + self.timeouts.command

    def _send(self, command: Command, line: bytes | None = None) -> None:
        """Write ``command`` and enter it into aioimaplib's table (nothing else pending)."""
        protocol = self.protocol
        if not protocol.allows(command.name):
            raise ImapError(
                f"{command.name} failed: command {command.name} illegal in state {protocol.state}"
            )
        protocol.register(command)
        protocol.write(line if line is not None else f"{command}\r\n".encode())

    async def _run(self, what: str, command: Command, deadline: float | None = None) -> Command:
        self._send(command)
        await self._until(what, lambda: command.done, deadline or self._deadline())
        return command

    def _check(self) -> None:
        problem = self.monitor.problem()
        if problem is not None:
            raise ConnectionLost(problem)

    def _new_idle(self) -> Command:
        return self.protocol.new_idle()

    async def _idle_answered(self, what: str | _Step, idle: Command, deadline: float) -> bool:
        """Wait for IDLE's continuation: True once idling, False if the server refused it
        (answered with a tagged NO/BAD)."""
        with trio.move_on_at(deadline):
            return await self._idle_read(what, idle)
        self._timed_out(what)

    async def _idle_read(self, what: str | _Step, idle: Command) -> bool:
        """:meth:`_idle_answered` without a deadline of its own."""
        protocol = self.protocol
        await self._read_until(what, lambda: protocol.idle_continued or idle.done)
        if idle.done:
            return False
        self._idle = idle
        return True

    # -- the connect-time handshake ----------------------------------------------------

    async def handshake(self, security: str, context: ssl.SSLContext | None) -> None:
        """Greeting, CAPABILITY, and STARTTLS (+ CAPABILITY again) when asked: bounded
        by the caller's connect deadline only."""
        protocol = self.protocol
        await self._until("greeting", lambda: protocol.greeting is not None, math.inf)
        greeting = protocol.take_greeting()
        if greeting is None:
            raise BadGreeting(self.monitor.problem() or "connection lost")
        if b"PREAUTH" in greeting:
            protocol.state = AUTH
        elif b"OK" in greeting:
            protocol.state = NONAUTH
        else:  # e.g. "* BYE Too many connections" as the greeting
            raise BadGreeting(f"Error: {greeting.decode('utf-8', 'replace')}"[:200])
        await self._capability()
        if security != "starttls":
            return
        if "STARTTLS" not in protocol.capabilities:
            raise NoStartTls()
        response = await self._run("STARTTLS", Command("STARTTLS", protocol.new_tag()), math.inf)
        if response.result != "OK":
            raise NoStartTls()
        if protocol.framer.buffered:
            # plaintext sent after the answer would pass for TLS-protected (RFC 3207 §4.2)
            raise BadGreeting("server sent data after accepting STARTTLS (refused)")
        assert context is not None
        await self.transport.start_tls(context, self.host)
        protocol.start_parsing_tls()
        await self._capability()  # capabilities may differ once encrypted

    async def _capability(self) -> None:
        protocol = self.protocol
        response = await self._run(
            "CAPABILITY", Command("CAPABILITY", protocol.new_tag()), math.inf
        )
        words = (
            bytes(response.lines[0]).decode("utf-8", "replace").split() if response.lines else []
        )
        if not protocol.learn_capabilities(words):
            raise BadGreeting("Error: server not IMAP4 compliant")

    # -- commands ----------------------------------------------------------------------

    async def login(self, user: str, password: str) -> None:
        # aioimaplib's LOGIN quotes the password but sends the user as it is: a user name
        # with a space or a quote would garble the command, so both are quoted (always
        # valid IMAP).
        protocol = self.protocol
        command = Command("LOGIN", protocol.new_tag(), quote(user), quote(password))
        response = await self._run("LOGIN", command)
        if response.result == "OK":
            protocol.state = AUTH
            for line in response.lines:  # servers may announce new capabilities here
                if b"CAPABILITY" in line:
                    words = bytes(line).decode("utf-8", "replace").replace("CAPABILITY", "")
                    protocol.add_capabilities(words.split())
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
            await self._until("AUTHENTICATE", lambda: command.done, self._deadline())
        except ImapError as exc:
            raise type(exc)(scrub(exc)) from None
        response = command
        if response.result == "OK":
            protocol.state = AUTH
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

    async def select(self, mailbox: str, *, readonly: bool = False) -> MailboxState:
        """SELECT ``mailbox`` (EXAMINE with ``readonly``); its EXISTS, UIDNEXT and UIDVALIDITY.

        A server that leaves UIDNEXT out of its SELECT answer (Courier-IMAP; RFC 3501
        requires it) has it learnt another way, so catch-up and ``sinceUid`` never rely
        on message counts (one message expunged and one arrived leave the count as it
        was): ``STATUS <mailbox> (UIDNEXT UIDVALIDITY MESSAGES)``, then SELECT again;
        if the STATUS gave no UIDNEXT, ``FETCH <exists> (UID)`` of the last message.
        Servers that send UIDNEXT pay nothing: one SELECT, as always. Each command has
        its own command timeout; a STATUS or FETCH the server refuses only means
        nothing was learnt (:func:`~trio_idle.imap.responses.with_learnt_uidnext`).
        """
        selected = await self._select(mailbox, readonly)
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
        selected = await self._select(mailbox, readonly)
        last_uid = None
        if needs_uidnext(selected) and status.uidnext is None and selected.exists:
            last_uid = await self._last_uid(selected.exists)
        return with_learnt_uidnext(selected, status, last_uid)

    async def _select(self, mailbox: str, readonly: bool = False) -> MailboxState:
        protocol = self.protocol
        name = "EXAMINE" if readonly else "SELECT"
        # a folder from LIST may hold spaces ("Junk E-mail"): quoted then, as STATUS does
        command = Command(name, protocol.new_tag(), mailbox_arg(mailbox))
        response = await self._run(name, command)
        if response.result == "NO":
            raise MailboxRefused(f"{name} {mailbox} failed: {response.result}")
        if response.result != "OK":
            raise ImapError(f"{name} {mailbox} failed: {response.result}")
        protocol.state = SELECTED
        return parse_mailbox_state(response.lines)

    async def _status(self, mailbox: str) -> MailboxState:
        """STATUS's UIDNEXT, UIDVALIDITY and MESSAGES; nothing if the server refused it."""
        command = CapturedCommand(
            "STATUS", self.protocol.new_tag(), mailbox, "(UIDNEXT UIDVALIDITY MESSAGES)"
        )
        ok, answer = await self._run_captured("STATUS", command)
        return parse_status(answer) if ok else MailboxState()

    async def _last_uid(self, number: int) -> int | None:
        """The UID of message ``number`` (``FETCH <number> (UID)``); None if refused.
        A plain FETCH: no EXPUNGE may come during it (RFC 3501 7.4.1), so ``number`` is
        still the SELECT's last message."""
        command = CapturedCommand(
            "FETCH", self.protocol.new_tag(), str(number), "(UID)", untagged_resp_name="FETCH"
        )
        ok, answer = await self._run_captured("FETCH", command)
        return parse_fetch_uid(answer, number) if ok else None

    async def _run_captured(self, what: str, command: Command) -> tuple[bool, list[bytes]]:
        """Run ``command``; whether it was answered OK, and its untagged responses raw as
        framed (aioimaplib hands an async command's lines over cut up; a
        :class:`~trio_idle.imap.aioimap.CapturedCommand` does not keep them)."""
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
        loses nothing (bytes are read only after the wait for them). An idle session
        sleeps here, on the socket, in this one frame (the read loop's step of
        :meth:`_pump`, inline): a keepalive wakes it, is parsed, and it sleeps again."""
        monitor = self.monitor
        if monitor.pending():
            await trio.lowlevel.checkpoint()
            return
        protocol = self.protocol
        transport = self.transport
        wait_readable = trio.lowlevel.wait_readable
        while not monitor.pending():
            if protocol.backlog:
                await trio.lowlevel.checkpoint()
                protocol.parse_some()
            elif transport.unsent:
                await self._flush()
            elif transport.is_closing():
                self._take()
            else:
                try:
                    await wait_readable(transport.socket)
                except trio.ClosedResourceError:
                    protocol.lost(None)
                else:
                    self._take()

    async def noop(self) -> None:
        response = await self._run("NOOP", Command("NOOP", self.protocol.new_tag()))
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
            raise ImapError(f"IDLE failed: server refused IDLE: {idle.result}")
        self._check()

    async def idle_done(self) -> None:
        """Send DONE and wait for the IDLE command's tagged answer."""
        await self._settle(self._deadline())
        idle = self._idle
        if idle is None:
            return
        self._check()
        self.protocol.idle_done()
        await self._until("DONE", lambda: idle.done, self._deadline())
        self._idle = None
        if idle.result != "OK":
            raise ImapError(f"IDLE ended with {idle.result}")

    async def restart_idle(self, *, noop: bool) -> None:
        """Leave IDLE (DONE), NOOP if ``noop``, and enter IDLE again, run by the session.

        The session runs this when the ticker hands it a restart (:meth:`begin_restart`
        returned ``None``) or when there is no ticker. ``DONE``, ``NOOP`` and ``IDLE`` go
        out in one write (IMAP pipelining, RFC 3501 §5.5: none of them is ambiguous
        after the one before) — or, on a connection whose server once refused an IDLE
        written that way, ``IDLE`` alone once ``NOOP`` is answered — and their answers
        are followed by the same machine as the ticker's restarts
        (:class:`~trio_idle.imap.restart.RestartMachine`): same errors, and a refused
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
        machine = self._restart
        self._write_restart(old, noop=noop, pipelined=machine.pipelines, by_ticker=False)
        if old.done:  # the server ended that IDLE before DONE: its answer was parsed
            self._restart_line(f"{old.tag} {old.result}".encode())
        try:
            with trio.move_on_at(deadline):
                # an answer that ends the restart is raised as is here, instead of failing
                # the monitor (which the ticker's path must do: the session only waits)
                await self._read_until(machine, lambda: not machine.running)
                if (error := self._restart_error) is not None:
                    raise error
                self._check()
                return
            self._timed_out(machine)
        finally:
            self.protocol.queued.clear()

    def _write_restart(self, old: Command, *, noop: bool, pipelined: bool, by_ticker: bool) -> None:
        """Write the machine's ``DONE``, ``NOOP`` if ``noop`` and ``IDLE`` if ``pipelined``
        in one write, queue the commands under the machine's tags (the parser matches
        each answer to its command in order), and have the read path feed the machine
        (:attr:`ImapProtocol.on_answer`). Synchronous, never blocks, reads nothing."""
        protocol = self.protocol
        machine = self._restart
        data = machine.begin(trio.current_time(), old.tag, noop=noop, pipelined=pipelined)
        if machine.noop_tag is not None:
            protocol.queued.append(Command("NOOP", machine.noop_tag))
        idle: Command | None = None
        if machine.idle_tag is not None:
            idle = protocol.new_idle(machine.idle_tag)
            protocol.queued.append(idle)
        protocol.idle_outstanding = pipelined
        self._idle = None
        self._restart_idle = idle
        self._restart_by_ticker = by_ticker
        self._restart_error = None
        protocol.on_answer = self._restart_line
        protocol.write(data)
        protocol.advance_queue()

    def _restart_line(self, line: bytes) -> None:
        """The read path's hook while a restart runs: each tagged line and continuation,
        as parsed, goes to the machine, and this does what it says. Only the task that
        reads (the session) gets here, whoever wrote the restart."""
        event = self._restart.feed(line)
        if event is None or isinstance(event, Answered):
            return
        protocol = self.protocol
        if isinstance(event, SendIdle):  # IDLE on its own: not pipelined, or refused so
            idle = protocol.new_idle(event.tag)
            self._restart_idle = idle
            self._send(idle, event.data)
            protocol.idle_outstanding = True
            return
        protocol.on_answer = None
        if isinstance(event, IdleResumed):
            self._idle = self._restart_idle
            self.monitor.ticking = False
        elif isinstance(event, Failed):
            error = ImapError(event.text)
            if self._restart_by_ticker:
                self.monitor.fail(error)  # wakes the session's wait with it
            else:
                self._restart_error = error
        self._restart_idle = None

    # -- the restart the process ticker writes (passive) ------------------------------

    def begin_restart(self, *, noop: bool) -> int | None:
        """Write ``DONE``, ``NOOP`` if ``noop``, and ``IDLE`` now, and return without
        waiting: the answers are parsed as the session task reads (:meth:`wait`), so a
        tick wakes that task once, for the answers, and never through a cancellation.

        For the process's ticker (:mod:`trio_idle.mailbox.ticker`), which runs in another task:
        synchronous, never blocks, never raises, never reads. Returns a number for
        :meth:`check_restart`, which must follow within the command timeout (the
        deadline of the answers), or ``None`` when this cannot be done now — not idling
        (or the server already ended the IDLE), a command or restart in progress, the
        server once refused a pipelined IDLE, the connection unusable: the session then
        runs :meth:`restart_idle` itself.

        The answers are followed by the machine :meth:`restart_idle` uses
        (:class:`~trio_idle.imap.restart.RestartMachine`), fed by the session's reads:
        an answer that is not ``OK`` ends the connection with the error
        :meth:`restart_idle` would raise (:attr:`PushMonitor.failure`), and a refused
        pipelined IDLE is sent again on its own. Mail counted until IDLE is confirmed is
        the tick's (:attr:`PushMonitor.ticking`).
        """
        old = self._idle
        protocol = self.protocol
        machine = self._restart
        if (
            old is None
            or old.done  # its answer is parsed already: the session's restart feeds it
            or machine.running
            or not machine.pipelines
            or protocol.queued
            or self.monitor.problem() is not None
            or self.transport.is_closing()
        ):
            return None
        self._write_restart(old, noop=noop, pipelined=True, by_ticker=True)
        self.monitor.ticking = noop
        return machine.number

    def check_restart(self, number: int) -> None:
        """The answers to restart ``number`` are due: if they are not all in, the
        connection is dead (``no answer to NOOP within 30s``) and closed, which wakes the
        session. Synchronous, never raises, never reads; a restart already answered (or
        a connection already lost) is left alone."""
        if self.monitor.lost is not None:
            return
        timed_out = self._restart.check(number)
        if timed_out is None:
            return
        self.protocol.on_answer = None
        self.monitor.fail(self._no_answer(timed_out.which))
        self.transport.close()

    async def _settle(self, deadline: float) -> None:
        """Read until a restart the ticker wrote (:meth:`begin_restart`) is over, by
        ``deadline``; raise its failure if it failed (:attr:`PushMonitor.failure`), so
        the command that waited reports why the connection ended, not that it did."""
        machine = self._restart
        if not machine.running:
            return
        await self._until(machine, lambda: not machine.running, deadline)
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
        step = _Step("DONE" if self._idle is not None else "UID SEARCH")
        try:
            old = await self._leave_idle(step, deadline)
            mail = await self._search_and_fetch(step, since_uid, limit, deadline)
            protocol.capture = None
            if old is not None:
                await self._resume_idle(step, deadline)
        finally:
            protocol.capture = None
        self._check()
        return mail

    async def _search_and_fetch(
        self, step: _Step, since_uid: int, limit: int, deadline: float
    ) -> NewMail:
        """``UID SEARCH UID <since_uid>:*`` in the selected (or examined) mailbox and, for
        at most ``limit`` messages found, ``UID FETCH`` of their envelopes, parsed in slices
        (``envelopes`` None: too many, or an answer too costly to parse). Leaves
        ``protocol.capture`` to the caller's ``finally``."""
        protocol = self.protocol
        step.name = "UID SEARCH"
        protocol.capture = []
        search = CapturedCommand(
            "SEARCH", protocol.new_tag(), "UID", f"{since_uid}:*", prefix="UID"
        )
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
                # not aioimaplib's FetchCommand: it counts parentheses across the
                # lines, and a subject with an unbalanced "(" would leave it waiting
                fetch = CapturedCommand(
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
        return NewMail(uids, envelopes)

    async def fetch_folder_new(
        self, folder: str, selected: str, since_uid: int, limit: int
    ) -> FolderMail:
        """:meth:`fetch_new` in ``folder``, beside the selected mailbox ``selected``: leave
        IDLE (DONE) if idling, ``EXAMINE <folder>`` (read-only: no flag changes), ``UID
        SEARCH`` and ``UID FETCH`` as :meth:`fetch_new` (same ``limit``, same parse
        budget), ``SELECT <selected>`` again, then IDLE again — all within one command
        timeout (an error names the command not answered or refused).

        Between EXAMINE and the SELECT's answer the untagged EXISTS/EXPUNGE/RECENT lines
        are the folder's: the monitor's count of new mail and its baseline are restored
        after, and the baseline becomes the SELECT's EXISTS. Mail that reached the
        selected mailbox during the visit is not counted by the monitor: the caller
        compares :attr:`FolderMail.selected` (UIDNEXT, UIDVALIDITY, EXISTS) with what it
        knew. Same guarantees as every command: any failure, cancellation included,
        leaves the connection unusable (in whichever mailbox), never quietly in the
        folder."""
        self._check()
        protocol, monitor = self.protocol, self.monitor
        deadline = self._deadline()
        await self._settle(deadline)
        step = _Step("DONE" if self._idle is not None else f"EXAMINE {folder}")
        try:
            old = await self._leave_idle(step, deadline)
            # mail counted until here (DONE's answer included) is the selected mailbox's
            exists_before, new_mail, tick_mail = monitor.exists, monitor.new_mail, monitor.tick_mail
            step.name = f"EXAMINE {folder}"
            examine = await self._run_step(
                step, Command("EXAMINE", protocol.new_tag(), quote(folder)), deadline
            )
            if examine.result != "OK":
                raise ImapError(f"{step} failed: {examine.result}")
            examined = parse_mailbox_state(examine.lines)
            mail = await self._search_and_fetch(step, since_uid, limit, deadline)
            protocol.capture = None
            step.name = f"SELECT {selected}"
            reselect = await self._run_step(
                step, Command("SELECT", protocol.new_tag(), mailbox_arg(selected)), deadline
            )
            if reselect.result != "OK":
                raise ImapError(f"{step} failed: {reselect.result}")
            protocol.state = SELECTED
            back = parse_mailbox_state(reselect.lines)
            # the folder's EXISTS counted meanwhile are void; the SELECT's is the baseline
            monitor.exists, monitor.new_mail, monitor.tick_mail = back.exists, new_mail, tick_mail
            if old is not None:
                await self._resume_idle(step, deadline)
        finally:
            protocol.capture = None
        self._check()
        return FolderMail(mail, examined, back, exists_before)

    async def list_folders(self) -> tuple[ListEntry, ...]:
        """The server's folders and their attributes: ``LIST "" "*"`` (with ``RETURN
        (SPECIAL-USE)`` where the server announces LIST-EXTENDED), under the command
        timeout; a refused LIST gives nothing. Not while idling (the session lists its
        folders once, after SELECT, before IDLE)."""
        self._check()
        command = CapturedCommand(
            "LIST",
            self.protocol.new_tag(),
            *list_command_args(self.protocol.capabilities),
            untagged_resp_name="LIST",
        )
        ok, answer = await self._run_captured("LIST", command)
        return parse_list(answer) if ok else ()

    async def check_folders(self, folders: Sequence[str]) -> dict[str, MailboxState | None]:
        """``STATUS <folder> (UIDNEXT UIDVALIDITY)`` for each folder: DONE first if
        idling, IDLE again after, all within one command timeout (an error names the
        command not answered). A folder whose STATUS the server refused (it does not
        exist, or no longer) maps to ``None``. Same guarantees as every command."""
        self._check()
        protocol = self.protocol
        deadline = self._deadline()
        await self._settle(deadline)
        step = _Step("DONE")
        found: dict[str, MailboxState | None] = {}
        try:
            old = await self._leave_idle(step, deadline)
            for folder in folders:
                step.name = f"STATUS {folder}"
                protocol.capture = []
                status = CapturedCommand(
                    "STATUS", protocol.new_tag(), quote(folder), "(UIDNEXT UIDVALIDITY)"
                )
                response = await self._run_step(step, status, deadline)
                # only this folder's line: under NOTIFY another's may be pushed meanwhile
                answer = status_lines_for(protocol.capture, folder)
                found[folder] = parse_status(answer) if response.result == "OK" else None
            protocol.capture = None
            if old is not None:
                await self._resume_idle(step, deadline)
        finally:
            protocol.capture = None
        self._check()
        return found

    async def notify_set(self, folders: Sequence[str]) -> NotifyAnswer:
        """Ask for NOTIFY (RFC 5465) on the selected mailbox and ``folders``, where the
        server announces it: ``NOTIFY SET (selected (MessageNew MessageExpunge))
        (mailboxes (<folders>) (MessageNew MessageExpunge))``
        (:func:`~trio_idle.imap.notify.notify_set_args`), under the command timeout.

        Accepted, :attr:`PushMonitor.notify` collects the ``STATUS`` the server pushes for
        ``folders`` from then on (the selected mailbox keeps its ``EXISTS`` pushes); not
        sent (not announced, a name that cannot be quoted) or refused (``NO``/``BAD``,
        e.g. ``[NOTIFICATIONOVERFLOW]``, ``[BADEVENT]``), the answer says why and nothing
        changes. Not while idling (the session asks once, after SELECT, before IDLE).
        Same guarantees as every command."""
        self._check()
        protocol = self.protocol
        if not any(c.upper() == "NOTIFY" for c in protocol.capabilities):
            return NotifyAnswer(False, "not announced")
        args = notify_set_args(folders)
        if args is None:
            return NotifyAnswer(False, "a folder name cannot be sent as a quoted string")
        # watching before the command is written: a push may come before its answer
        self.monitor.notify = NotifyWatch(folders)
        response = await self._run("NOTIFY", Command("NOTIFY", protocol.new_tag(), *args))
        self._check()
        if response.result == "OK":
            return NotifyAnswer(True)
        self.monitor.notify = None
        text = bytes(response.lines[-1]).decode("utf-8", "replace") if response.lines else ""
        return NotifyAnswer(False, f"refused: {response.result} {text}"[:200], refused=True)

    async def _leave_idle(self, step: _Step, deadline: float) -> Command | None:
        """End the IDLE in progress, if any (DONE, then its tagged answer, by
        ``deadline``): the IDLE it ended, None when not idling. For commands that run
        between two IDLEs (:meth:`fetch_new`, :meth:`check_folders`); an error names
        ``step``."""
        old = self._idle
        if old is not None:
            self.protocol.idle_done()
            self._idle = None
            await self._until(step, lambda: old.done, deadline)
            if old.result != "OK":
                raise ImapError(f"{step} failed: IDLE ended with {old.result}")
        return old

    async def _resume_idle(self, step: _Step, deadline: float) -> None:
        """Enter IDLE again after :meth:`_leave_idle` and its commands, by ``deadline``."""
        step.name = "IDLE"
        idle = self._new_idle()
        self._send(idle)
        self.protocol.idle_outstanding = True
        if not await self._idle_answered(step, idle, deadline):
            raise ImapError(f"{step} failed: server refused IDLE: {idle.result}")

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

    async def _run_step(self, step: _Step, command: Command, deadline: float) -> Command:
        self._send(command)
        await self._until(step, lambda: command.done, deadline)
        return command

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
                and protocol.state in (NONAUTH, AUTH, SELECTED)
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
        self._restart.abandon()
        self.protocol.queued.clear()
        self.transport.close()
        self.protocol.lost(None)


class _Step:
    """The command a multi-command call is waiting for; formats as its name."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __str__(self) -> str:
        return self.name


class _SaslCommand(ContinuationCommand):
    """``AUTHENTICATE <mechanism> [<response>]`` answering the server's continuations.

    The first continuation asks for the client response when it was not sent on the
    command line (no SASL-IR); any other is the server refusing the token: it is kept as
    :attr:`challenge` and acknowledged once; a further one cancels the exchange (``*``).
    The repr never shows the response (aioimaplib quotes commands in its errors), so the
    command line written is :attr:`line`, not the repr.
    """

    def __init__(
        self, protocol: ImapProtocol, mechanism: str, response: str, *, sasl_ir: bool
    ) -> None:
        super().__init__("AUTHENTICATE", protocol.new_tag(), mechanism)
        self._protocol = protocol
        self._mechanism = mechanism
        self.line = f"{self.tag} AUTHENTICATE {mechanism}" + (f" {response}" if sasl_ir else "")
        self._unsent: str | None = None if sasl_ir else response
        self._acknowledged = False
        #: the server's error challenge (``+ <base64 JSON>``), if it sent one
        self.challenge: bytes | None = None

    def __repr__(self) -> str:
        return f"{self.tag} AUTHENTICATE {self._mechanism} {MASK}"

    def continued(self, line: bytes) -> None:
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


class NoStartTls(Exception):
    """The server does not offer STARTTLS, or refused it (:meth:`ImapConnection.handshake`)."""


class BadGreeting(Exception):
    """No usable greeting or CAPABILITY (:meth:`ImapConnection.handshake`); ``str()``
    says why."""
