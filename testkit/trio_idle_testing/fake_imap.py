"""A scripted IMAP server behind the session's connector seam: no sockets, no asyncio.

:class:`FakeImapServer` hands out :class:`FakeImapLink` objects through
:attr:`FakeImapServer.connector` (an :class:`~trio_idle.imap.connector.ImapConnector`),
keeps one mailbox's EXISTS/UIDNEXT/UIDVALIDITY, and records every command a session sends
as a :class:`Call` with the trio time it was sent at. A test scripts the server while a
session runs against it, typically under ``trio.testing.MockClock(autojump_threshold=0)``
(pytest-trio's ``autojump_clock``), so a 25-minute renewal takes milliseconds and every
timestamp is exact:

- :meth:`~FakeImapServer.deliver` new mail (pushed as ``EXISTS`` during IDLE, or, with
  ``push=False``, reported only in the next NOOP's answer, as some servers do);
- :meth:`~FakeImapServer.renumber` (a new UIDVALIDITY), :meth:`~FakeImapServer.expunge`,
  :meth:`~FakeImapServer.bye`,
  :meth:`~FakeImapServer.drop` (connection reset);
- :meth:`~FakeImapServer.go_silent`: the connection stays open and answers nothing
  (half-open), so commands fail at the command timeout, as the real client's do;
- :meth:`~FakeImapServer.fail_next` a command, refuse connects
  (``refuse_connects``) or logins (``reject_logins``), accept only some OAuth2 access
  tokens (``valid_tokens``; the ones received are in ``tokens_seen``).

The links keep :class:`~trio_idle.imap.connector.ImapLink`'s contract: untagged lines go
to a real :class:`~trio_idle.imap.push_monitor.PushMonitor`, a command either answers or
raises an :class:`~trio_idle.core.errors.ImapError` within ``command_timeout``, LOGOUT is only
written on a healthy connection. A command sent out of order (IDLE while idling, SELECT
before LOGIN) raises :class:`AssertionError`: the session counts it as an internal
error, which a test sees in ``stats``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import attrs
import trio

from trio_idle.accounts.connections import MailConnection
from trio_idle.core.errors import ConnectionLost, ImapAuthError, ImapConnectError, ImapError
from trio_idle.imap.connector import ImapConnector, ImapLink
from trio_idle.imap.envelope import Envelope, FolderMail, NewMail
from trio_idle.imap.folders import ListEntry
from trio_idle.imap.notify import NotifyAnswer, NotifyWatch
from trio_idle.imap.push_monitor import PushMonitor
from trio_idle.imap.responses import MailboxState

__all__ = ["Call", "FakeImapLink", "FakeImapServer"]


@attrs.frozen
class Call:
    """One command as the server received it (passwords are never recorded)."""

    #: ``trio.current_time()`` when it was sent
    at: float
    #: which connection attempt (1-based) sent it
    link: int
    #: ``connect``, ``LOGIN``, ``AUTHENTICATE``, ``SELECT``, ``IDLE``, ``DONE``, ``NOOP``,
    #: ``UID SEARCH``, ``UID FETCH`` or ``LOGOUT``
    command: str
    #: the user for LOGIN and AUTHENTICATE, the mailbox for SELECT, else empty
    arg: str = ""


class FakeImapServer:
    """One mailbox on a scripted server; see the module doc. Trio thread only."""

    def __init__(
        self,
        *,
        exists: int = 0,
        uidnext: int = 1,
        uidvalidity: int = 1,
        idle: bool = True,
        push: bool = True,
        command_timeout: float = 30.0,
    ) -> None:
        self.exists = exists
        self.uidnext = uidnext
        self.uidvalidity = uidvalidity
        #: the UIDs of the messages present, ascending (the last ``exists`` below uidnext)
        self.uids: list[int] = list(range(max(1, uidnext - exists), uidnext))
        #: the IDLE capability is announced
        self.idle = idle
        #: new mail is pushed during IDLE; if False it shows only in NOOP/SELECT answers
        self.push = push
        self.command_timeout = command_timeout
        #: the next this many connect attempts are refused
        self.refuse_connects = 0
        #: the next this many LOGINs are rejected (bad password)
        self.reject_logins = 0
        #: the access tokens AUTHENTICATE accepts (None: any); others get status "401"
        self.valid_tokens: set[str] | None = None
        #: every access token AUTHENTICATE received, in order (fake tokens only)
        self.tokens_seen: list[str] = []
        self.calls: list[Call] = []
        #: folders beside the selected mailbox, by name: their state (STATUS answers)
        #: and attributes (LIST); a folder removed here is refused by STATUS
        self.folders: dict[str, MailboxState] = {}
        self.folder_attributes: dict[str, frozenset[str]] = {}
        #: NOTIFY (RFC 5465) is announced: a NOTIFY SET is accepted (unless
        #: ``notify_refusal``), and mail :meth:`deliver_to` a watched folder is pushed as
        #: ``* STATUS`` while idling
        self.notify = False
        #: NOTIFY SET is answered with this (``NO [BADEVENT] ...``) instead of OK
        self.notify_refusal: str | None = None
        #: the connections made, by attempt number (refused attempts make none)
        self.links: dict[int, FakeImapLink] = {}
        self._attempts = 0
        self._failures: dict[str, list[ImapError]] = {}
        self._changed = trio.Event()

    # -- the seam ------------------------------------------------------------------------

    @property
    def connector(self) -> ImapConnector:
        """Plug into ``SessionEnv(connector=...)``."""
        return self._connect

    async def _connect(self, conn: MailConnection) -> ImapLink:
        self._attempts += 1
        self._record(self._attempts, "connect", f"{conn.host}:{conn.port}")
        await trio.lowlevel.checkpoint()
        if self.refuse_connects:
            self.refuse_connects -= 1
            raise ImapConnectError(f"connection to {conn.host}:{conn.port} refused")
        link = self.links[self._attempts] = FakeImapLink(self, self._attempts)
        return link

    # -- the script ----------------------------------------------------------------------

    @property
    def link(self) -> FakeImapLink:
        """The most recent connection (open or not)."""
        assert self.links, "no session connected yet"
        return self.links[max(self.links)]

    def _open_link(self) -> FakeImapLink | None:
        link = self.link if self.links else None
        return link if link is not None and link.selected and not link.closed else None

    def deliver(self, count: int = 1) -> None:
        """``count`` new messages arrive (UIDNEXT moves with them)."""
        self.exists += count
        self.uids.extend(range(self.uidnext, self.uidnext + count))
        self.uidnext += count
        if (link := self._open_link()) is not None:
            link.pending.append(f"* {self.exists} EXISTS".encode())
            if self.push and link.idling:
                link.flush()

    def expunge(self) -> None:
        """The first message is deleted (by another client)."""
        assert self.exists > 0
        self.exists -= 1
        del self.uids[0]
        if (link := self._open_link()) is not None:
            link.pending.append(b"* 1 EXPUNGE")
            if self.push and link.idling:
                link.flush()

    def add_folder(self, name: str, *, attributes: Iterable[str] = (), uidnext: int = 1) -> None:
        """A folder beside the selected mailbox (LIST shows it, STATUS answers for it)."""
        self.folders[name] = MailboxState(0, uidnext, self.uidvalidity)
        self.folder_attributes[name] = frozenset(attributes)

    def deliver_to(self, folder: str, count: int = 1) -> None:
        """New mail in another folder: seen by its next STATUS — and pushed as
        ``* STATUS`` where the connection asked for NOTIFY on it."""
        state = self.folders[folder]
        assert state.uidnext is not None and state.exists is not None
        self.folders[folder] = state = MailboxState(
            state.exists + count, state.uidnext + count, state.uidvalidity
        )
        link = self._open_link()
        watch = link.monitor.notify if link is not None else None
        if link is not None and watch is not None and folder in watch.folders:
            link.pending.append(
                f'* STATUS "{folder}" (MESSAGES {state.exists} UIDNEXT {state.uidnext} '
                f"UIDVALIDITY {state.uidvalidity})".encode()
            )
            if link.idling:
                link.flush()
        self._notify()

    def notify_overflow(self) -> None:
        """The server gives up on NOTIFY (``* OK [NOTIFICATIONOVERFLOW]``, sent at once)."""
        self.link.monitor.untagged(b"* OK [NOTIFICATIONOVERFLOW] too many events")
        self._notify()

    def renumber(self, uidvalidity: int) -> None:
        """A new UIDVALIDITY: the messages are numbered 1..n again (as after a server
        rebuild); the next SELECT reports it."""
        self.uidvalidity = uidvalidity
        self.uids = list(range(1, self.exists + 1))
        self.uidnext = self.exists + 1

    def bye(self, text: str = "Server shutting down") -> None:
        """The server says ``* BYE`` on the current connection (sent at once)."""
        self.link.monitor.untagged(f"* BYE {text}".encode())
        self._notify()

    def drop(self) -> None:
        """The current connection is reset (as the transport would report it)."""
        self.link.monitor.connection_lost(ConnectionResetError("connection reset by peer"))
        self._notify()

    def go_silent(self) -> None:
        """The current connection stays open and never answers again (half-open)."""
        self.link.silent = True

    def fail_next(self, command: str, error: ImapError | None = None) -> None:
        """The next ``command`` (e.g. ``"NOOP"``) on any connection fails with ``error``."""
        self._failures.setdefault(command, []).append(
            error or ImapError(f"{command} failed: NO [SERVERBUG] scripted failure")
        )

    # -- what happened -------------------------------------------------------------------

    def commands(self, link: int | None = None) -> list[str]:
        """The commands received, in order (of one connection attempt if ``link``)."""
        return [c.command for c in self.calls if link is None or c.link == link]

    def times(self, command: str, link: int | None = None) -> list[float]:
        """When each ``command`` was received."""
        return [
            c.at for c in self.calls if c.command == command and (link is None or c.link == link)
        ]

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        """Return once ``condition()`` holds; re-checked after every command and every
        change of a connection (BYE, drop, selected, idling, closed). Bound it with
        ``trio.fail_after``; the session may still be mid-step when it returns (follow it
        with ``trio.testing.wait_all_tasks_blocked()`` to let it settle)."""
        while not condition():
            await self._changed.wait()

    # -- internals -----------------------------------------------------------------------

    def _record(self, link: int, command: str, arg: str = "") -> None:
        self.calls.append(Call(trio.current_time(), link, command, arg))
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _take_failure(self, command: str) -> ImapError | None:
        queued = self._failures.get(command)
        return queued.pop(0) if queued else None

    def _mailbox(self) -> MailboxState:
        return MailboxState(self.exists, self.uidnext, self.uidvalidity)


class FakeImapLink:
    """One connection to a :class:`FakeImapServer`; implements
    :class:`~trio_idle.imap.connector.ImapLink`."""

    def __init__(self, server: FakeImapServer, number: int) -> None:
        self._server = server
        self.number = number
        self.monitor = PushMonitor()
        #: untagged lines the server has not sent yet (sent with the next answer)
        self.pending: list[bytes] = []
        self.logged_in = False
        self.selected = False
        self.idling = False
        self.silent = False
        self.closed = False

    @property
    def has_idle(self) -> bool:
        return self._server.idle

    def flush(self) -> None:
        """Send the pending untagged lines to the client."""
        lines, self.pending = self.pending, []
        for line in lines:
            self.monitor.untagged(line)

    async def _command(self, name: str, arg: str = "") -> None:
        """Receive ``name``: answer at once, fail as scripted, or (silent) never answer,
        in which case the command timeout fails it, as the real client's deadline does."""
        if self.closed:
            raise AssertionError(f"{name} sent on a closed connection")
        self._server._record(self.number, name, arg)
        await trio.lowlevel.checkpoint()
        self._check()
        if (failure := self._server._take_failure(name)) is not None:
            raise failure
        if self.silent:
            timeout = self._server.command_timeout
            with self.monitor.guard() as guard, trio.move_on_after(timeout):
                await trio.sleep_forever()
            if guard.cancelled_caught:
                raise ConnectionLost(f"{name}: {self.monitor.problem() or 'connection lost'}")
            self.monitor.mark_dead(f"no answer to {name} within {timeout:g}s")
            raise ConnectionLost(f"no answer to {name} within {timeout:g}s")

    def _check(self) -> None:
        problem = self.monitor.problem()
        if problem is not None:
            raise ConnectionLost(problem)

    async def login(self, user: str, password: str) -> None:
        assert not self.logged_in, "LOGIN twice"
        await self._command("LOGIN", user)
        if self._server.reject_logins:
            self._server.reject_logins -= 1
            raise ImapAuthError(f"login rejected for {user}: NO [AUTHENTICATIONFAILED]")
        self.logged_in = True

    async def authenticate_oauth2(self, user: str, token: str) -> None:
        assert not self.logged_in, "AUTHENTICATE after LOGIN"
        await self._command("AUTHENTICATE", user)
        self._server.tokens_seen.append(token)
        valid = self._server.valid_tokens
        if self._server.reject_logins or (valid is not None and token not in valid):
            self._server.reject_logins = max(0, self._server.reject_logins - 1)
            raise ImapAuthError(
                f"OAuth2 sign-in (XOAUTH2) rejected for {user}: NO [AUTHENTICATIONFAILED] "
                "(token status 401)",
                sasl_status="401",
                mechanism="XOAUTH2",
            )
        self.logged_in = True

    async def select(self, mailbox: str, *, readonly: bool = False) -> MailboxState:
        assert self.logged_in, "SELECT before LOGIN"
        await self._command("EXAMINE" if readonly else "SELECT", mailbox)
        self.selected = True
        self.pending = [f"* {self._server.exists} EXISTS".encode()]  # the answer says it all
        self.flush()
        self._server._notify()
        return self._server._mailbox()

    async def noop(self) -> None:
        assert self.selected and not self.idling, "NOOP outside the selected state"
        await self._command("NOOP")
        self.flush()
        self._check()

    async def idle_start(self) -> None:
        assert self.selected and not self.idling, "IDLE while idling"
        await self._command("IDLE")
        self._enter_idle()

    async def wait(self) -> None:
        await self.monitor.wait()

    async def restart_idle(self, *, noop: bool) -> None:
        if not self.idling:
            raise ConnectionLost("not idling")
        self._check()
        await self._command("DONE")
        self.idling = False
        if noop:
            await self._command("NOOP")
            self.flush()
        await self._command("IDLE")
        self._enter_idle()

    def begin_restart(self, *, noop: bool) -> int | None:
        """Never written ahead here: the session runs :meth:`restart_idle` itself, whose
        commands and their timing the script records (the real link's passive restart is
        covered against real sockets)."""
        return None

    def check_restart(self, number: int) -> None:
        """Nothing is ever written ahead (:meth:`begin_restart`)."""

    async def fetch_new(self, since_uid: int, limit: int) -> NewMail:
        assert self.selected, "UID SEARCH outside the selected state"
        was_idling = self.idling
        if was_idling:
            self._check()
            await self._command("DONE")
            self.idling = False
        await self._command("UID SEARCH", f"{since_uid}:*")
        self.flush()
        uids = tuple(u for u in self._server.uids if u >= since_uid)
        envelopes: tuple[Envelope, ...] | None = None
        if len(uids) <= limit:
            envelopes = ()
            if uids:
                await self._command("UID FETCH", ",".join(map(str, uids)))
                envelopes = tuple(
                    Envelope(u, subject=f"message {u}", from_address="sender@example.test")
                    for u in uids
                )
        if was_idling:
            await self._command("IDLE")
            self._enter_idle()
        return NewMail(uids, envelopes)

    async def fetch_folder_new(
        self, folder: str, selected: str, since_uid: int, limit: int
    ) -> FolderMail:
        """The folder's UIDs from ``since_uid`` up to its UIDNEXT (its state is all the
        script keeps of a folder), with made-up envelopes; the commands recorded."""
        assert self.selected, "EXAMINE outside the selected state"
        was_idling = self.idling
        if was_idling:
            self._check()
            await self._command("DONE")
            self.idling = False
        exists_before = self.monitor.exists
        await self._command("EXAMINE", folder)
        state = self._server.folders.get(folder)
        if state is None:
            raise ImapError(f"EXAMINE {folder} failed: NO")
        await self._command("UID SEARCH", f"{since_uid}:*")
        uids = tuple(range(since_uid, state.uidnext or since_uid))
        envelopes: tuple[Envelope, ...] | None = None
        if len(uids) <= limit:
            envelopes = tuple(
                Envelope(u, subject=f"{folder} message {u}", from_address="sender@example.test")
                for u in uids
            )
        await self._command("SELECT", selected)
        self.pending = []  # the SELECT's answer says it all
        back = self._server._mailbox()
        self.monitor.exists = back.exists
        if was_idling:
            await self._command("IDLE")
            self._enter_idle()
        return FolderMail(NewMail(uids, envelopes), state, back, exists_before)

    async def list_folders(self) -> tuple[ListEntry, ...]:
        assert self.logged_in and not self.idling, "LIST outside the authenticated state"
        await self._command("LIST")
        entries = [ListEntry("INBOX", frozenset(), "/")]
        entries += [
            ListEntry(name, self._server.folder_attributes.get(name, frozenset()), "/")
            for name in self._server.folders
        ]
        return tuple(entries)

    async def check_folders(self, folders: Sequence[str]) -> dict[str, MailboxState | None]:
        assert self.selected, "STATUS outside the selected state"
        was_idling = self.idling
        if was_idling:
            self._check()
            await self._command("DONE")
            self.idling = False
        found: dict[str, MailboxState | None] = {}
        for folder in folders:
            await self._command("STATUS", folder)
            found[folder] = self._server.folders.get(folder)
        self.flush()
        if was_idling:
            await self._command("IDLE")
            self._enter_idle()
        return found

    async def notify_set(self, folders: Sequence[str]) -> NotifyAnswer:
        assert self.selected and not self.idling, "NOTIFY outside the selected state"
        if not self._server.notify:
            return NotifyAnswer(False, "not announced")
        await self._command("NOTIFY", ",".join(folders))
        if self._server.notify_refusal is not None:
            return NotifyAnswer(False, f"refused: {self._server.notify_refusal}", refused=True)
        self.monitor.notify = NotifyWatch(folders)
        return NotifyAnswer(True)

    def _enter_idle(self) -> None:
        self.idling = True
        self._server._notify()
        if self._server.push:
            self.flush()
        self._check()

    async def logout(self, limit: float) -> None:
        """LOGOUT on a healthy connection; a silent server is waited for up to ``limit``."""
        try:
            if not self.closed and self.monitor.problem() is None:
                self._server._record(self.number, "LOGOUT")
                if self.silent:
                    with self.monitor.guard(), trio.move_on_after(limit):
                        await trio.sleep_forever()
        finally:
            self.abort()

    def abort(self) -> None:
        self.closed = True
        self.idling = False
        self._server._notify()
