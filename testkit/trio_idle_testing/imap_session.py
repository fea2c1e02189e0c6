"""One client connection of the test server: a single trio task running the IMAP dialogue.

Design for scale: a session is one task and a handful of small objects. It never spawns
helper tasks; while waiting for input it sits in ``receive_some`` under a cancel scope that
the server cancels to *wake* it (new mail for IDLE, fault switched) and whose deadline is the
next IDLE keepalive. Cancelling a pending receive loses no data (for ``SSLStream`` once the
handshake is done, too), so waking is safe at any time.

Guarantees:

* With NOTIFY (RFC 5465) set, a change of a mailbox named in its ``mailboxes`` filter is
  pushed in IDLE as ``* STATUS`` (and before the tagged reply of NOOP).
* Untagged ``EXISTS``/``EXPUNGE`` are sent only in IDLE (pushed as soon as the session runs
  after the change), and before the tagged reply of NOOP, CHECK, APPEND, EXPUNGE, DONE and
  the UID commands. ``EXPUNGE`` numbers refer to the client's view and are sent highest first.
* While any applicable :class:`~trio_idle_testing.Faults` says ``silent``, the session neither
  reads nor writes; the socket stays open.
* ``drop``/``bye``/server restart end the session at any point (even while silent).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import itertools
import math
import random
import socket
import ssl
import struct
import time
from collections.abc import Awaitable, Callable, Iterable
from enum import Enum
from typing import TYPE_CHECKING, Final, Literal

import trio

from .imap_faults import Faults
from .imap_parser import (
    Arg,
    Command,
    CommandFramer,
    CommandLine,
    NeedContinuation,
    ParseError,
    as_text,
    format_flags,
    parse_command,
    parse_sequence_set,
    quote,
)
from .imap_render import (
    SEARCH_FLAGS,
    canonical_flag,
    expand_fetch_macros,
    fetch_item,
    list_match,
    parse_internaldate,
)
from .imap_store import Mailbox, Message, User

if TYPE_CHECKING:
    from .imap_server import ImapTestServer

#: How a session is closed: ``fin`` (normal close), ``rst`` (SO_LINGER 0, RST),
#: ``bye`` (``* BYE server shutting down`` then normal close).
CloseHow = Literal["fin", "rst", "bye"]

RECEIVE_SIZE: Final = 4 * 1024
BYE_SEND_TIMEOUT: Final = 2.0
#: the text of a server-initiated BYE unless a test gives its own
BYE_TEXT: Final = "server shutting down"


class State(Enum):
    """RFC 3501 connection states."""

    NOT_AUTHENTICATED = "not authenticated"
    AUTHENTICATED = "authenticated"
    SELECTED = "selected"
    LOGOUT = "logout"


_ANY: Final = frozenset(State)
_NOT_AUTH: Final = frozenset({State.NOT_AUTHENTICATED})
_AUTH: Final = frozenset({State.AUTHENTICATED, State.SELECTED})
_SELECTED: Final = frozenset({State.SELECTED})


class _EndSession(Exception):
    """Raised inside the session to end it after a LOGOUT or fatal protocol error."""


class ImapTestSession:
    """One client connection. Obtain via :meth:`ImapTestServer.sessions`.

    Public, read-only: ``id``, ``peer`` (the client's ``host:port``), ``user`` (login name
    or ``None``), ``selected`` (mailbox name or ``None``), ``idling``, ``tls``, ``state``.
    Public, writable: ``faults`` (this connection's own :class:`Faults`, combined with the
    user's and the global one).
    """

    __slots__ = (
        "_faults", "_framer", "_idle_tag", "_keepalive_at", "_known", "_notify", "_out",
        "_overflow", "_raw", "_readonly",
        "_sasl_failed", "_sasl_mech", "_sasl_tag", "_scope", "_seen_version", "_selected",
        "_server", "_stream", "_user", "_wake_scope", "_woken", "bye_text", "close_how", "id",
        "peer", "state", "tls",
    )  # fmt: skip

    def __init__(
        self, server: ImapTestServer, stream: trio.SocketStream, session_id: int, tls: bool
    ) -> None:
        self._server = server
        self._raw = stream
        self._stream: trio.abc.Stream = stream
        self.id = session_id
        self.peer = _peer_name(stream)
        self.tls = tls
        self.state = State.NOT_AUTHENTICATED
        self.close_how: CloseHow = "fin"
        #: what follows ``* BYE`` when the session is closed with ``bye``
        self.bye_text = BYE_TEXT
        self._scope = trio.CancelScope()
        self._framer = CommandFramer()
        self._user: User | None = None
        self._faults: Faults | None = None
        self._selected: Mailbox | None = None
        self._readonly = False
        self._known: tuple[int, ...] = ()
        self._seen_version = -1
        self._idle_tag: str | None = None
        self._sasl_tag: str | None = None
        self._sasl_mech = "PLAIN"
        self._sasl_failed = False
        self._keepalive_at = math.inf
        self._wake_scope: trio.CancelScope | None = None
        #: answers held back while more pipelined commands wait (``coalesce_replies``)
        self._out = b""
        self._woken = False
        #: NOTIFY's mailboxes (not the selected one) → the version last pushed
        self._notify: dict[Mailbox, int] = {}
        #: ``* OK [NOTIFICATIONOVERFLOW]`` is due (the server gave up on NOTIFY)
        self._overflow = False

    def __repr__(self) -> str:
        return f"<ImapTestSession {self.id} user={self.user!r} state={self.state.value}>"

    # ---- public handle ------------------------------------------------------------------

    @property
    def user(self) -> str | None:
        """Login name once authenticated."""
        return None if self._user is None else self._user.name

    @property
    def selected(self) -> str | None:
        """Name of the selected mailbox, if any."""
        return None if self._selected is None else self._selected.name

    @property
    def selected_mailbox(self) -> Mailbox | None:
        """The selected mailbox object, if any."""
        return self._selected

    @property
    def notify_mailboxes(self) -> list[Mailbox]:
        """The mailboxes NOTIFY pushes STATUS for (empty without NOTIFY)."""
        return list(self._notify)

    def overflow_notify(self) -> bool:
        """Give up on NOTIFY (:meth:`ImapTestServer.notification_overflow`): whether it
        was on."""
        if not self._notify:
            return False
        idling = self._idle_tag is not None
        if idling:  # out of the server's wake-up sets first, as after DONE
            self._server._idle_changed(self, False, None)
        self._notify = {}
        self._overflow = True
        if idling:
            self._server._idle_changed(self, True, None)
        self.wake()
        return True

    @property
    def idling(self) -> bool:
        """True between ``+ idling`` and ``DONE``."""
        return self._idle_tag is not None

    @property
    def faults(self) -> Faults:
        """This connection's own fault switches (created on first use)."""
        if self._faults is None:
            self._faults = Faults()
            self._faults.bind(self._faults_changed)
        return self._faults

    def drop(self, how: Literal["fin", "rst"] = "rst") -> None:
        """Close this connection abruptly (``rst``: SO_LINGER 0 → RST; ``fin``: plain close)."""
        self.close(how)

    def bye(self, text: str = "") -> None:
        """Send ``* BYE server shutting down`` (or ``* BYE <text>``) and close."""
        if "\r" in text or "\n" in text:
            raise ValueError("a BYE text is one line")
        self.bye_text = text or BYE_TEXT
        self.close("bye")

    def close(self, how: CloseHow) -> None:
        """End the session (asynchronously: the session task closes the socket)."""
        self.close_how = how
        self._scope.cancel()

    # ---- server internals ---------------------------------------------------------------

    def wake(self) -> None:
        """Make the session re-check mailbox changes, keepalive and faults."""
        self._woken = True
        if self._wake_scope is not None:
            self._wake_scope.cancel()

    def _faults_changed(self) -> None:
        self.wake()
        self._server._notify()

    def _fault_objects(self) -> Iterable[Faults]:
        yield self._server.global_faults
        if self._user is not None:
            yield self._user.faults
        if self._faults is not None:
            yield self._faults

    def _flag(self, name: str) -> bool:
        return any(bool(getattr(f, name)) for f in self._fault_objects())

    def _delay(self, name: str) -> float:
        return max(float(getattr(f, name)) for f in self._fault_objects())

    async def serve(self) -> None:
        """Run the dialogue until LOGOUT, EOF, error or :meth:`close`; then close the socket.

        Never raises for network errors or client misbehaviour.
        """
        try:
            with self._scope:
                await self._run()
        except (trio.BrokenResourceError, trio.ClosedResourceError, _EndSession):
            pass
        finally:
            if self._idle_tag is not None:
                self._idle_tag = None
                self._server._idle_changed(self, False, None)
            if self.close_how == "bye":
                with (
                    trio.CancelScope(shield=True),
                    trio.move_on_after(BYE_SEND_TIMEOUT),
                    contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
                ):
                    await self._stream.send_all(f"* BYE {self.bye_text}\r\n".encode())
            self._close_socket()
            self.state = State.LOGOUT

    def _close_socket(self) -> None:
        sock = self._raw.socket
        if self.close_how == "rst":
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    async def _run(self) -> None:
        await self._pause_if_silent()
        if self.tls:
            self._stream = trio.SSLStream(self._raw, self._require_tls_context(), server_side=True)
            await self._stream.do_handshake()
        delay = self._delay("greeting_delay")
        if delay > 0:
            await trio.sleep(delay)
        await self._send(
            f"* OK [CAPABILITY {self._capabilities()}] trio-idle test server ready\r\n".encode()
        )
        while True:
            try:
                event = self._framer.next_event()
            except ParseError as exc:
                await self._send(f"* BYE {exc}\r\n".encode())
                return
            if event is None:
                if not await self._fill():
                    return
            elif isinstance(event, NeedContinuation):
                await self._send(b"+ Ready for literal data\r\n")
            else:
                assert isinstance(event, CommandLine)
                await self._pause_if_silent()
                await self._handle_line(event.raw)
                self._server._notify()

    def _require_tls_context(self) -> ssl.SSLContext:
        context = self._server.tls_context
        if context is None:
            raise RuntimeError("TLS requested but the server has no tls_context")
        return context

    # ---- I/O primitives -----------------------------------------------------------------

    async def _pause_if_silent(self) -> None:
        while self._flag("silent"):
            with trio.CancelScope() as scope:
                self._wake_scope = scope
                try:
                    await trio.sleep_forever()
                finally:
                    self._wake_scope = None

    async def _send(self, data: bytes) -> None:
        await self._pause_if_silent()
        if self._out:
            data, self._out = self._out + data, b""
        if self._server.coalesce_replies and self._framer.has_line():
            self._out = data  # the next command's answer takes it along
            return
        await self._stream.send_all(data)

    async def _flush(self) -> None:
        if self._out:
            data, self._out = self._out, b""
            await self._stream.send_all(data)

    async def _fill(self) -> bool:
        """Wait for input, doing IDLE pushes and keepalives meanwhile. False on EOF."""
        await self._flush()
        while True:
            self._woken = False
            await self._pause_if_silent()
            deadline = math.inf
            if self._idle_tag is not None:
                out = b"" if self._flag("no_push") else self._updates(counting=True)
                out += self._notify_updates()
                interval = self._server.keepalive_interval
                now = trio.current_time()
                if interval is not None and self._keepalive_at <= now:
                    out += b"* OK Still here\r\n"
                    self._server.stats.keepalives += 1
                    self._keepalive_at = max(self._keepalive_at + interval, now + interval / 2)
                if out:
                    await self._send(out)
                    self._server._notify()
                    continue
                deadline = self._keepalive_at
            if self._woken:
                continue
            with trio.CancelScope(deadline=deadline) as scope:
                self._wake_scope = scope
                try:
                    data = await self._stream.receive_some(RECEIVE_SIZE)
                finally:
                    self._wake_scope = None
            if scope.cancelled_caught:
                continue
            if not data:
                return False
            self._framer.feed(data)
            return True

    def _updates(self, *, counting: bool = False) -> bytes:
        """Untagged EXPUNGE/EXISTS the client has not seen yet; marks them as seen."""
        mailbox = self._selected
        if mailbox is None or mailbox.version == self._seen_version:
            return b""
        self._seen_version = mailbox.version
        current = mailbox.uids()
        known = self._known
        self._known = current
        if known is current:
            return b""
        lines: list[bytes] = []
        present = set(current)
        view_len = len(known)
        for index in range(len(known) - 1, -1, -1):
            if known[index] not in present:
                lines.append(b"* %d EXPUNGE\r\n" % (index + 1))
                view_len -= 1
        if len(current) != view_len:
            lines.append(b"* %d EXISTS\r\n" % len(current))
        if counting:
            self._server.stats.pushes += len(lines)
        return b"".join(lines)

    def _notify_updates(self) -> bytes:
        """``* STATUS`` for NOTIFY's mailboxes changed since last pushed, and a due
        ``* OK [NOTIFICATIONOVERFLOW]``; marks them sent."""
        lines: list[bytes] = []
        if self._overflow:
            self._overflow = False
            lines.append(b"* OK [NOTIFICATIONOVERFLOW] NOTIFY is off now\r\n")
        for mailbox, seen in self._notify.items():
            if mailbox.version != seen:
                self._notify[mailbox] = mailbox.version
                lines.append(
                    f"* STATUS {quote(mailbox.name)} (MESSAGES {mailbox.exists} UIDNEXT "
                    f"{mailbox.uidnext} UIDVALIDITY {mailbox.uidvalidity})\r\n".encode()
                )
                self._server.stats.pushes += 1
        return b"".join(lines)

    # ---- dispatch -----------------------------------------------------------------------

    def _capabilities(self) -> str:
        caps = ["IMAP4rev1"]
        if self._server.idle_capability:
            caps.append("IDLE")
        if self._server.notify_capability:
            caps.append("NOTIFY")
        if (
            self._server.tls_context is not None
            and not self.tls
            and self.state is State.NOT_AUTHENTICATED
        ):
            caps.append("STARTTLS")
        caps.append("AUTH=PLAIN")
        if self._server.oauth2_check is not None:
            caps += [f"AUTH={m}" for m in self._server.oauth2_mechanisms]
            if self._server.sasl_ir:
                caps.append("SASL-IR")
        return " ".join(caps)

    async def _handle_line(self, raw: bytes) -> None:
        if self._idle_tag is not None:
            await self._idle_input(raw)
            return
        if self._sasl_tag is not None:
            await self._sasl_response(raw)
            return
        try:
            command = parse_command(raw)
        except ParseError as exc:
            self._server.stats.bad += 1
            await self._send(f"{exc.tag or '*'} BAD {exc}\r\n".encode())
            return
        name = command.name
        if name == "UID" and command.args and isinstance(command.args[0], str):
            name = "UID " + command.args[0].upper()
        self._server.stats.commands[name] += 1
        if self._user is not None:
            self._server.command_lines.append((self._user.name, raw))
            if (hook := self._server.on_command) is not None:
                hook(self._user.name, name)
        delay = self._delay("response_delay")
        if delay > 0:
            await trio.sleep(delay)
        entry = _HANDLERS.get(command.name)
        if entry is None or (
            (command.name == "IDLE" and not self._server.idle_capability)
            or (command.name == "NOTIFY" and not self._server.notify_capability)
        ):
            await self._tagged(command, "BAD", "Unknown command")
            return
        handler, states = entry
        if self.state not in states:
            await self._tagged(command, "BAD", f"{command.name} not valid in this state")
            return
        try:
            await handler(self, command)
        except (ValueError, IndexError) as exc:
            await self._tagged(command, "BAD", f"Invalid arguments: {exc}")

    async def _tagged(self, command: Command, status: str, text: str, pre: bytes = b"") -> None:
        if status == "BAD":
            self._server.stats.bad += 1
        await self._send(pre + f"{command.tag} {status} {text}\r\n".encode())

    # ---- any state ----------------------------------------------------------------------

    async def _cmd_capability(self, command: Command) -> None:
        pre = f"* CAPABILITY {self._capabilities()}\r\n".encode()
        await self._tagged(command, "OK", "CAPABILITY completed", pre)

    async def _cmd_noop(self, command: Command) -> None:
        pre = self._updates() + self._notify_updates()
        await self._tagged(command, "OK", f"{command.name} completed", pre)

    async def _cmd_logout(self, command: Command) -> None:
        self._server._logged_out(self)
        self.state = State.LOGOUT
        await self._tagged(command, "OK", "LOGOUT completed", b"* BYE Logging out\r\n")
        await self._flush()
        raise _EndSession

    # ---- not authenticated --------------------------------------------------------------

    async def _cmd_starttls(self, command: Command) -> None:
        context = self._server.tls_context
        if context is None or self.tls:
            await self._tagged(command, "BAD", "STARTTLS not available")
            return
        await self._tagged(command, "OK", "Begin TLS negotiation now")
        await self._flush()
        self._framer.reset()  # plaintext pipelined after STARTTLS must not be executed
        self._stream = trio.SSLStream(self._raw, context, server_side=True)
        self.tls = True
        await self._stream.do_handshake()

    async def _cmd_login(self, command: Command) -> None:
        if len(command.args) != 2:
            raise ValueError("LOGIN takes a user name and a password")
        await self._authenticate(command.tag, as_text(command.args[0]), as_text(command.args[1]))

    async def _cmd_authenticate(self, command: Command) -> None:
        mechanism = as_text(command.args[0]).upper() if command.args else ""
        oauth2 = self._server.oauth2_check is not None and mechanism in (
            self._server.oauth2_mechanisms
        )
        if mechanism != "PLAIN" and not oauth2:
            await self._tagged(command, "NO", "Unsupported authentication mechanism")
            return
        self._sasl_mech = mechanism
        if len(command.args) > 1:
            # RFC 4959: a client may send its response on the command line only where the
            # server announced SASL-IR (Gmail and Dovecot do; a server without it answers BAD)
            if "SASL-IR" not in self._capabilities().split():
                await self._tagged(command, "BAD", "Initial response without SASL-IR")
                return
            await self._sasl_step(command.tag, as_text(command.args[1]).encode())
            return
        self._sasl_tag = command.tag
        await self._send(b"+ \r\n")

    async def _sasl_response(self, raw: bytes) -> None:
        tag, self._sasl_tag = self._sasl_tag, None
        assert tag is not None
        line = raw.rstrip(b"\r\n")
        if line == b"*":
            self._sasl_failed = False
            await self._send(f"{tag} BAD Authentication aborted\r\n".encode())
            return
        if self._sasl_failed:  # the client's answer to the error challenge
            self._sasl_failed = False
            # XOAUTH2 (Google's document): an empty response; OAUTHBEARER (RFC 7628
            # section 3.2.3): a lone %x01, base64 "AQ=="
            if line != _ERROR_ACK.get(self._sasl_mech, b""):
                self._server.stats.bad += 1
                await self._send(f"{tag} BAD Invalid SASL error acknowledgement\r\n".encode())
                return
            await self._send(f"{tag} NO [AUTHENTICATIONFAILED] Invalid credentials\r\n".encode())
            return
        await self._sasl_step(tag, line)

    async def _sasl_step(self, tag: str, encoded: bytes) -> None:
        if self._sasl_mech == "PLAIN":
            await self._sasl_plain(tag, encoded)
            return
        try:
            decoded = base64.b64decode(encoded, validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            decoded = ""
        user, token = _oauth2_fields(self._sasl_mech, decoded)
        if user is None or token is None:
            self._server.stats.bad += 1
            await self._send(f"{tag} BAD Invalid SASL {self._sasl_mech} response\r\n".encode())
            return
        self._server.oauth2_attempts.append(self._sasl_mech)
        account = self._server._users.get(user)
        check = self._server.oauth2_check
        if account is None or check is None or self._flag("refuse_login") or not check(user, token):
            self._server._login_failed(user)
            error = b'{"status":"401","schemes":"Bearer","scope":"https://mail.google.com/"}'
            self._sasl_tag, self._sasl_failed = tag, True
            await self._send(b"+ " + base64.b64encode(error) + b"\r\n")
            return
        await self._signed_in(tag, account)

    async def _sasl_plain(self, tag: str, encoded: bytes) -> None:
        try:
            parts = base64.b64decode(encoded, validate=True).split(b"\0")
        except (binascii.Error, ValueError):
            parts = []
        if len(parts) != 3:
            await self._send(f"{tag} BAD Invalid SASL PLAIN response\r\n".encode())
            return
        await self._authenticate(tag, parts[1].decode("utf-8", "replace"),
                                 parts[2].decode("utf-8", "replace"))  # fmt: skip

    async def _authenticate(self, tag: str, name: str, password: str) -> None:
        user = self._server._users.get(name)
        refused = self._flag("refuse_login") or (user is not None and user.faults.refuse_login)
        if user is None or refused or password != user.password:
            self._server._login_failed(name)
            # not logged in yet, so the user's faults are not among _fault_objects()
            candidates = [self._faults, user.faults if user else None, self._server.global_faults]
            reply = next(
                (f.login_reply for f in candidates if f is not None and f.login_reply),
                "[AUTHENTICATIONFAILED] Authentication failed.",
            )
            await self._send(f"{tag} NO {reply}\r\n".encode())
            return
        await self._signed_in(tag, user)

    async def _signed_in(self, tag: str, user: User) -> None:
        self._user = user
        self.state = State.AUTHENTICATED
        self._server._logged_in(self)
        await self._send(f"{tag} OK LOGIN completed\r\n".encode())

    # ---- authenticated ------------------------------------------------------------------

    def _account(self) -> User:
        assert self._user is not None
        return self._user

    def _deselect(self) -> None:
        self._selected = None
        self._known = ()
        self._seen_version = -1
        self.state = State.AUTHENTICATED

    async def _cmd_select(self, command: Command) -> None:
        if not command.args:
            raise ValueError("mailbox name missing")
        self._deselect()
        name = as_text(command.args[0])
        mailbox = self._account().find_mailbox(name)
        if mailbox is None:
            await self._tagged(command, "NO", "[NONEXISTENT] Mailbox doesn't exist")
            return
        self._selected = mailbox
        self._readonly = command.name == "EXAMINE"
        self._known = mailbox.uids()
        self._seen_version = mailbox.version
        self.state = State.SELECTED
        lines = [
            "* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)",
            f"* {mailbox.exists} EXISTS",
            "* 0 RECENT",
        ]
        for seq, message in enumerate(mailbox.messages, start=1):
            if "\\Seen" not in message.flags:
                lines.append(f"* OK [UNSEEN {seq}] First unseen.")
                break
        lines += [
            "* OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft \\*)] Flags",
            f"* OK [UIDVALIDITY {mailbox.uidvalidity}] UIDs valid",
        ]
        if not self._flag("no_select_uidnext"):
            lines.append(f"* OK [UIDNEXT {mailbox.uidnext}] Predicted next UID")
        pre = ("\r\n".join(lines) + "\r\n").encode()
        mode = "[READ-ONLY]" if self._readonly else "[READ-WRITE]"
        await self._tagged(command, "OK", f"{mode} {command.name} completed", pre)

    async def _cmd_status(self, command: Command) -> None:
        if len(command.args) != 2 or not isinstance(command.args[1], tuple):
            raise ValueError("STATUS takes a mailbox and a list of items")
        name = as_text(command.args[0])
        mailbox = self._account().find_mailbox(name)
        if mailbox is None:
            await self._tagged(command, "NO", "[NONEXISTENT] Mailbox doesn't exist")
            return
        values = {
            "MESSAGES": mailbox.exists,
            "RECENT": 0,
            "UIDNEXT": mailbox.uidnext,
            "UIDVALIDITY": mailbox.uidvalidity,
            "UNSEEN": mailbox.unseen,
        }
        items = []
        for item in command.args[1]:
            key = as_text(item).upper()
            if key not in values:
                raise ValueError(f"unknown STATUS item {key}")
            if key != "UIDNEXT" or not self._flag("no_status_uidnext"):
                items.append(f"{key} {values[key]}")
        pre = f"* STATUS {quote(mailbox.name)} ({' '.join(items)})\r\n".encode()
        await self._tagged(command, "OK", "STATUS completed", pre)

    async def _cmd_list(self, command: Command) -> None:
        if len(command.args) != 2:
            raise ValueError("LIST takes a reference and a pattern")
        pattern = as_text(command.args[0]) + as_text(command.args[1])
        lines = []
        if pattern == "":
            lines.append('* LIST (\\Noselect) "/" ""')
        else:
            for name, mailbox in self._account().mailboxes.items():
                if list_match(pattern, name):
                    attributes = " ".join(("\\HasNoChildren", *mailbox.special_use))
                    lines.append(f'* LIST ({attributes}) "/" {quote(name)}')
        pre = "".join(line + "\r\n" for line in lines).encode()
        await self._tagged(command, "OK", "LIST completed", pre)

    async def _cmd_append(self, command: Command) -> None:
        args = list(command.args)
        if len(args) < 2 or not isinstance(args[-1], bytes):
            raise ValueError("APPEND takes a mailbox, optional flags and date, and a literal")
        name = as_text(args[0])
        data = args[-1]
        flags: list[str] = []
        internaldate = time.time()
        for extra in args[1:-1]:
            if isinstance(extra, tuple):
                flags = [as_text(f) for f in extra]
            else:
                internaldate = parse_internaldate(as_text(extra), internaldate)
        mailbox = self._account().find_mailbox(name)
        if mailbox is None:
            await self._tagged(command, "NO", "[TRYCREATE] Mailbox doesn't exist")
            return
        self._server.stats.appends += 1
        mailbox.append(data, flags, internaldate)
        await self._tagged(command, "OK", "APPEND completed", self._updates())

    async def _cmd_notify(self, command: Command) -> None:
        """``NOTIFY NONE`` / ``NOTIFY SET <event-group>...`` (RFC 5465 §6; no STATUS
        indicator): the ``mailboxes`` groups' mailboxes get STATUS pushes."""
        refusal = self._server.notify_refusal
        if refusal is not None:
            await self._send(f"{command.tag} {refusal}\r\n".encode())
            return
        args = command.args
        if not args or not isinstance(args[0], str):
            raise ValueError("NOTIFY takes SET or NONE")
        if args[0].upper() == "NONE" and len(args) == 1:
            self._notify = {}
            await self._tagged(command, "OK", "NOTIFY completed")
            return
        if args[0].upper() != "SET" or len(args) < 2:
            raise ValueError("NOTIFY takes SET or NONE")
        boxes: dict[Mailbox, int] = {}
        for group in args[1:]:
            if not isinstance(group, tuple) or len(group) < 2:
                raise ValueError("an event group is (filter events)")
            kind, events = as_text(group[0]).lower(), group[-1]
            names = {as_text(e).lower() for e in events} if isinstance(events, tuple) else set()
            if "messagenew" in names and "messageexpunge" not in names:
                await self._tagged(command, "NO", "[BADEVENT] MessageNew needs MessageExpunge")
                return
            if kind == "mailboxes" and len(group) == 3:
                listed = group[1] if isinstance(group[1], tuple) else (group[1],)
                for name in listed:
                    mailbox = self._account().find_mailbox(as_text(name))
                    if mailbox is not None and mailbox is not self._selected:
                        boxes[mailbox] = mailbox.version
            elif kind not in ("selected", "selected-delayed"):
                raise ValueError(f"filter {kind} not supported here")
        self._notify = boxes
        await self._tagged(command, "OK", "NOTIFY completed")

    async def _cmd_idle(self, command: Command) -> None:
        self._idle_tag = command.tag
        interval = self._server.keepalive_interval
        self._keepalive_at = (
            math.inf
            if interval is None
            else trio.current_time() + interval * random.uniform(0.5, 1.0)
        )
        self._server._idle_changed(self, True, "IDLE")
        await self._send(b"+ idling\r\n")

    async def _idle_input(self, raw: bytes) -> None:
        tag, self._idle_tag = self._idle_tag, None
        self._keepalive_at = math.inf
        done = raw.strip().upper() == b"DONE"
        self._server._idle_changed(self, False, "DONE" if done else "IDLE_ABORTED")
        if not done:
            await self._send(f"{tag} BAD Expected DONE\r\n".encode())
            return
        self._server.stats.commands["DONE"] += 1
        delay = self._delay("response_delay")
        if delay > 0:
            await trio.sleep(delay)
        pre = b"" if self._flag("no_push") else self._updates()
        await self._send(pre + f"{tag} OK IDLE terminated\r\n".encode())

    # ---- selected -----------------------------------------------------------------------

    def _mailbox(self) -> Mailbox:
        assert self._selected is not None
        return self._selected

    async def _cmd_close(self, command: Command) -> None:
        if not self._readonly and command.name == "CLOSE":
            self._mailbox().expunge_deleted()
        self._deselect()
        await self._tagged(command, "OK", f"{command.name} completed")

    async def _cmd_expunge(self, command: Command) -> None:
        if self._readonly:
            await self._tagged(command, "NO", "[READ-ONLY] Mailbox is read-only")
            return
        self._mailbox().expunge_deleted()
        await self._tagged(command, "OK", "EXPUNGE completed", self._updates())

    def _targets(self, spec: str, by_uid: bool) -> list[tuple[int, Message]]:
        """(sequence number, message) pairs addressed by a sequence set or UID set."""
        mailbox = self._mailbox()
        by_uid_map = {m.uid: m for m in mailbox.messages}
        view = self._known
        out: list[tuple[int, Message]] = []
        if by_uid:
            wanted = parse_sequence_set(spec, view[-1] if view else 0)
            for seq, uid in enumerate(view, start=1):
                if uid in wanted and uid in by_uid_map:
                    out.append((seq, by_uid_map[uid]))
        else:
            numbers = parse_sequence_set(spec, len(view))
            for seq in sorted(numbers):
                if seq <= len(view) and (message := by_uid_map.get(view[seq - 1])):
                    out.append((seq, message))
        return out

    async def _cmd_uid(self, command: Command) -> None:
        if not command.args:
            raise ValueError("UID needs a command")
        sub = as_text(command.args[0]).upper()
        inner = Command(command.tag, sub, command.args[1:])
        pre = self._updates()  # EXPUNGE/EXISTS are allowed before UID command responses
        if sub == "FETCH":
            await self._fetch(inner, by_uid=True, pre=pre)
        elif sub == "SEARCH":
            await self._search(inner, by_uid=True, pre=pre)
        elif sub == "STORE":
            await self._store(inner, by_uid=True, pre=pre)
        else:
            await self._tagged(command, "BAD", f"Unknown UID command {sub}", pre)

    async def _cmd_fetch(self, command: Command) -> None:
        await self._fetch(command, by_uid=False, pre=b"")

    async def _cmd_search(self, command: Command) -> None:
        await self._search(command, by_uid=False, pre=b"")

    async def _cmd_store(self, command: Command) -> None:
        await self._store(command, by_uid=False, pre=b"")

    async def _fetch(self, command: Command, *, by_uid: bool, pre: bytes) -> None:
        if len(command.args) != 2:
            raise ValueError("FETCH takes a sequence set and items")
        raw_items = command.args[1]
        items = (
            [as_text(i) for i in raw_items]
            if isinstance(raw_items, tuple)
            else [as_text(raw_items)]
        )
        items = expand_fetch_macros([i.upper() for i in items])
        if by_uid and "UID" not in items:
            items.insert(0, "UID")
        chunks: list[bytes] = [pre]
        changed = False
        for seq, message in self._targets(as_text(command.args[0]), by_uid):
            parts: list[bytes] = []
            for item in items:
                part, marks_seen = fetch_item(item, message)
                parts.append(part)
                if marks_seen and not self._readonly and "\\Seen" not in message.flags:
                    message.flags.add("\\Seen")
                    changed = True
                    if "FLAGS" not in items:
                        items.append("FLAGS")
            chunks.append(b"* %d FETCH (" % seq + b" ".join(parts) + b")\r\n")
        if changed:
            self._mailbox().changed()
            self._seen_version = self._mailbox().version
        await self._tagged(command, "OK", "FETCH completed", b"".join(chunks))

    async def _search(self, command: Command, *, by_uid: bool, pre: bytes) -> None:
        args = [as_text(a) for a in command.args]
        if len(args) >= 2 and args[0].upper() == "CHARSET":
            args = args[2:]
        view = self._known
        candidates = {seq: uid for seq, uid in enumerate(view, start=1)}
        by_uid_map = {m.uid: m for m in self._mailbox().messages}
        index = 0
        while index < len(args):
            key = args[index].upper()
            index += 1
            if key == "ALL":
                continue
            if key == "UID":
                wanted = parse_sequence_set(args[index], view[-1] if view else 0)
                index += 1
                candidates = {s: u for s, u in candidates.items() if u in wanted}
            elif key in SEARCH_FLAGS:
                flag, present = SEARCH_FLAGS[key]
                candidates = {
                    s: u
                    for s, u in candidates.items()
                    if u in by_uid_map and (flag in by_uid_map[u].flags) == present
                }
            else:
                numbers = parse_sequence_set(args[index - 1], len(view))
                candidates = {s: u for s, u in candidates.items() if s in numbers}
        hits = [u if by_uid else s for s, u in candidates.items() if u in by_uid_map]
        line = "* SEARCH" + "".join(f" {n}" for n in hits) + "\r\n"
        await self._tagged(command, "OK", "SEARCH completed", pre + line.encode())

    async def _store(self, command: Command, *, by_uid: bool, pre: bytes) -> None:
        if len(command.args) != 3:
            raise ValueError("STORE takes a sequence set, an item and flags")
        if self._readonly:
            await self._tagged(command, "NO", "[READ-ONLY] Mailbox is read-only", pre)
            return
        item = as_text(command.args[1]).upper()
        silent = item.endswith(".SILENT")
        mode = item.removesuffix(".SILENT")
        if mode not in ("FLAGS", "+FLAGS", "-FLAGS"):
            raise ValueError(f"unknown STORE item {item}")
        raw_flags = command.args[2]
        flag_args: tuple[Arg, ...] = raw_flags if isinstance(raw_flags, tuple) else (raw_flags,)
        flags = {canonical_flag(as_text(f)) for f in flag_args}
        chunks = [pre]
        targets = self._targets(as_text(command.args[0]), by_uid)
        for seq, message in targets:
            if mode == "FLAGS":
                message.flags = set(flags)
            elif mode == "+FLAGS":
                message.flags |= flags
            else:
                message.flags -= flags
            if not silent:
                uid = f"UID {message.uid} " if by_uid else ""
                chunks.append(
                    f"* {seq} FETCH ({uid}FLAGS {format_flags(message.flags)})\r\n".encode()
                )
        if targets:
            self._mailbox().changed()
            self._seen_version = self._mailbox().version
        await self._tagged(command, "OK", "STORE completed", b"".join(chunks))


ImapTestSessionHandler = Callable[[ImapTestSession, Command], Awaitable[None]]

_HANDLERS: Final[dict[str, tuple[ImapTestSessionHandler, frozenset[State]]]] = {
    "CAPABILITY": (ImapTestSession._cmd_capability, _ANY),
    "NOOP": (ImapTestSession._cmd_noop, _ANY),
    "LOGOUT": (ImapTestSession._cmd_logout, _ANY),
    "STARTTLS": (ImapTestSession._cmd_starttls, _NOT_AUTH),
    "LOGIN": (ImapTestSession._cmd_login, _NOT_AUTH),
    "AUTHENTICATE": (ImapTestSession._cmd_authenticate, _NOT_AUTH),
    "SELECT": (ImapTestSession._cmd_select, _AUTH),
    "EXAMINE": (ImapTestSession._cmd_select, _AUTH),
    "STATUS": (ImapTestSession._cmd_status, _AUTH),
    "LIST": (ImapTestSession._cmd_list, _AUTH),
    "APPEND": (ImapTestSession._cmd_append, _AUTH),
    "IDLE": (ImapTestSession._cmd_idle, _AUTH),
    "NOTIFY": (ImapTestSession._cmd_notify, _AUTH),
    "CHECK": (ImapTestSession._cmd_noop, _SELECTED),
    "CLOSE": (ImapTestSession._cmd_close, _SELECTED),
    "UNSELECT": (ImapTestSession._cmd_close, _SELECTED),
    "EXPUNGE": (ImapTestSession._cmd_expunge, _SELECTED),
    "FETCH": (ImapTestSession._cmd_fetch, _SELECTED),
    "SEARCH": (ImapTestSession._cmd_search, _SELECTED),
    "STORE": (ImapTestSession._cmd_store, _SELECTED),
    "UID": (ImapTestSession._cmd_uid, _SELECTED),
}

_session_ids = itertools.count(1)


#: the answer a client must give to the error challenge of a refused token
_ERROR_ACK: Final = {"XOAUTH2": b"", "OAUTHBEARER": b"AQ=="}


def _oauth2_fields(mechanism: str, message: str) -> tuple[str | None, str | None]:
    """``(user, token)`` of an XOAUTH2 or OAUTHBEARER client response; ``(None, None)``
    unless it is well formed, as Gmail and Dovecot require:

    - XOAUTH2: ``user=<user>^Aauth=Bearer <token>^A^A``;
    - OAUTHBEARER (RFC 7628): ``n,a=<saslname>,^A`` then ``key=value^A`` pairs, one of
      them ``auth=Bearer <token>``, then ``^A``.

    Both end with the ``^A^A`` trailer; a pair without ``=`` or an empty one is refused.
    """
    if not message.endswith("\x01\x01"):
        return None, None
    parts = message[:-2].split("\x01")
    user: str | None = None
    if mechanism == "OAUTHBEARER":
        gs2 = parts.pop(0).split(",")
        if len(gs2) != 3 or gs2[0] not in ("n", "y") or gs2[2] != "":
            return None, None
        if gs2[1].startswith("a="):
            user = gs2[1][2:].replace("=2C", ",").replace("=3D", "=")
    pairs: dict[str, str] = {}
    for part in parts:
        key, eq, value = part.partition("=")
        if not eq or not key or key in pairs:
            return None, None
        pairs[key] = value
    if mechanism == "XOAUTH2":
        if set(pairs) != {"user", "auth"}:
            return None, None
        user = pairs["user"]
    auth = pairs.get("auth", "")
    if not auth.startswith("Bearer ") or not user:
        return None, None
    return user, auth[len("Bearer ") :]


def next_session_id() -> int:
    """Process-wide unique session ids (starting at 1)."""
    return next(_session_ids)


def _peer_name(stream: trio.SocketStream) -> str:
    """``host:port`` of the client (``?`` if the socket is gone already)."""
    try:
        address = stream.socket.getpeername()
    except OSError:
        return "?"
    return f"{address[0]}:{address[1]}"
