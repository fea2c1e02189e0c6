"""In-process IMAP4rev1 test server on trio, built for fault injection and scale.

Usage::

    server = ImapTestServer(keepalive_interval=120.0)
    server.add_user("a@x.test", "pw")
    await nursery.start(server.serve)          # 127.0.0.1, ephemeral port → server.port
    server.append("a@x.test", b"Subject: hi\\r\\n\\r\\nbody")
    server.faults("a@x.test").silent = True   # half-open from now on

Guarantees:

* One trio task per connection and nothing else per connection (no helper tasks); an IDLE
  connection holds one cancel-scope deadline (its next keepalive) and no buffers beyond a
  small framer.
* Every public method that changes state (``append``, ``expunge``, fault switches, ``drop``
  ...) is synchronous and takes effect for the affected connections as soon as they run:
  idlers of the mailbox are woken directly (not polled), other connections are not touched.
* :meth:`ImapTestServer.wait_for` re-evaluates its predicate after every state change
  (connection opened/closed, command handled, login, IDLE start/stop, mailbox change,
  fault switch), so tests never need to sleep.
* :meth:`ImapTestServer.restart` rebinds the same port(s); mailboxes, users, faults,
  stats and log survive.
* :meth:`ImapTestServer.overlaps` records, per user, every interval during which two or
  more connections were logged in as that user at once (from the second one's login to
  the moment at most one is left), however short: a double watch cannot slip between two
  checks of a test.
"""

from __future__ import annotations

import collections
import functools
import ssl
import time
from collections.abc import Callable, Iterable
from typing import Literal, NamedTuple

import attrs
import trio

from .imap_faults import Faults
from .imap_session import CloseHow, ImapTestSession, next_session_id
from .imap_store import Mailbox, User

__all__ = ["ImapTestServer", "LogEntry", "Overlap", "ServerStats"]


class LogEntry(NamedTuple):
    """One protocol event. ``time`` is :func:`trio.current_time`.

    ``event`` is one of ``LOGIN``, ``LOGIN_FAILED`` (``user`` = the name tried), ``LOGOUT``
    (a clean LOGOUT command), ``IDLE`` (entered), ``DONE`` (left with DONE), ``DISCONNECT``
    (an authenticated connection ended, for any reason), ``DROP``, ``BYE`` (server-initiated
    close via the API) and ``RESTART`` (``user`` = ``"*"``).
    """

    time: float
    user: str
    event: str


class Overlap(NamedTuple):
    """An interval during which several connections were logged in as ``user`` at once.

    ``start`` is when the second one logged in, ``end`` when at most one was left (``None``
    while it lasts); both :func:`trio.current_time`. ``sessions`` are the ids of every
    connection logged in during the interval (:attr:`ImapTestSession.id`) and ``peers``
    their client addresses (``host:port``), in login order.
    """

    user: str
    start: float
    end: float | None
    sessions: tuple[int, ...]
    peers: tuple[str, ...]


@attrs.define
class ServerStats:
    """Counters since the server object was created (they survive :meth:`restart`)."""

    connections_total: int = 0
    connections_open: int = 0
    logins: int = 0
    login_failures: int = 0
    #: Clean LOGOUT commands of authenticated connections.
    logouts: int = 0
    #: Connections currently in IDLE.
    idle_clients: int = 0
    #: Untagged EXISTS/EXPUNGE lines pushed to clients in IDLE.
    pushes: int = 0
    keepalives: int = 0
    #: Messages stored (APPEND commands and :meth:`ImapTestServer.append`).
    appends: int = 0
    #: Lines answered BAD (unparsable, unknown, or not valid in the state): client bugs.
    bad: int = 0
    #: Commands by name (``UID FETCH`` etc. for UID commands; ``DONE`` counted too).
    commands: collections.Counter[str] = attrs.field(factory=collections.Counter)


class ImapTestServer:
    """IMAP4rev1 + IDLE (+ STARTTLS / implicit TLS) server with run-time fault injection.

    ``keepalive_interval``: seconds between ``* OK Still here`` lines while a client is in
    IDLE (``None`` disables). The first one comes after a random delay in
    ``[interval/2, interval]`` from IDLE start, then every ``interval``, so many clients do
    not fire together. ``tls_context``: server-side :class:`ssl.SSLContext`; enables
    STARTTLS on the plaintext listener and is required for ``implicit_tls`` (a second
    listener, ``tls_port``). ``idle_capability=False`` hides IDLE and rejects the command.
    ``uidvalidity``: UIDVALIDITY of new mailboxes (default: the current UNIX time).
    ``log_limit``: the :attr:`log` and :attr:`command_lines` keep the newest entries only.
    ``coalesce_replies``: the answers to commands that arrived together (pipelined, e.g. a
    client's ``DONE``, ``NOOP``, ``IDLE`` in one write) go out in one write, as servers
    that cork their output do; a client that waits for each answer gets one write per
    answer either way. Off by default: each answer is written as it is made.

    NOTIFY (RFC 5465): with :attr:`notify_capability` the server announces ``NOTIFY`` and
    accepts ``NOTIFY SET`` (and ``NOTIFY NONE``); while a client idles, each change of a
    mailbox named in its ``mailboxes`` filter is pushed as ``* STATUS "<name>" (MESSAGES n
    UIDNEXT n UIDVALIDITY n)`` (counted in :attr:`ServerStats.pushes`), the selected
    mailbox's as ``EXISTS``/``EXPUNGE`` as always. ``MessageNew`` without
    ``MessageExpunge`` is refused with ``NO [BADEVENT]``, as the RFC requires; with
    :attr:`notify_refusal` set, every ``NOTIFY`` is answered with it instead (``NO
    [NOTIFICATIONOVERFLOW] ...``). :meth:`notification_overflow` gives up on it later.

    OAuth2: set :attr:`oauth2_check` (``(user, token) -> bool``) and the server offers
    ``AUTH=XOAUTH2 AUTH=OAUTHBEARER`` (:attr:`oauth2_mechanisms`) and, with
    :attr:`sasl_ir`, ``SASL-IR``. A refused token gets Gmail's answer: a ``+``
    continuation with base64 JSON ``{"status":"401",...}``, then, after the client's
    acknowledgement, ``NO [AUTHENTICATIONFAILED]``. The user must exist (:meth:`add_user`).
    Strict as Gmail and Dovecot are, so a client bug fails here (``BAD``, counted in
    :attr:`ServerStats.bad`): a response on the AUTHENTICATE line without ``SASL-IR``
    announced, a client response without its ``^A^A`` trailer or a field, an
    acknowledgement other than an empty line (XOAUTH2) or ``AQ==`` (OAUTHBEARER).
    """

    def __init__(
        self,
        keepalive_interval: float | None = 120.0,
        tls_context: ssl.SSLContext | None = None,
        implicit_tls: bool = False,
        idle_capability: bool = True,
        *,
        uidvalidity: int | None = None,
        log_limit: int = 100_000,
        coalesce_replies: bool = False,
    ) -> None:
        if implicit_tls and tls_context is None:
            raise ValueError("implicit_tls needs a tls_context")
        if keepalive_interval is not None and keepalive_interval <= 0:
            raise ValueError("keepalive_interval must be positive or None")
        self.keepalive_interval = keepalive_interval
        self.coalesce_replies = coalesce_replies
        self.tls_context = tls_context
        self.implicit_tls = implicit_tls
        self.idle_capability = idle_capability
        #: decides which OAuth2 access tokens are valid for a user; None: no OAuth2
        self.oauth2_check: Callable[[str, str], bool] | None = None
        #: the OAuth2 mechanisms offered (with :attr:`oauth2_check`)
        self.oauth2_mechanisms: tuple[str, ...] = ("XOAUTH2", "OAUTHBEARER")
        #: offer SASL-IR (the client response on the AUTHENTICATE line)
        self.sasl_ir = True
        #: the mechanism of every OAuth2 sign-in attempt, in order
        self.oauth2_attempts: list[str] = []
        #: announce NOTIFY (RFC 5465) and push STATUS for the mailboxes a client names
        self.notify_capability = False
        #: when set, the answer to every NOTIFY after the tag (``NO [BADEVENT] ...``)
        self.notify_refusal: str | None = None
        #: Plaintext listening port (0 until :meth:`serve` has bound it).
        self.port = 0
        #: Implicit-TLS listening port (0 unless ``implicit_tls``).
        self.tls_port = 0
        self.host = "127.0.0.1"
        self.stats = ServerStats()
        self.log: collections.deque[LogEntry] = collections.deque(maxlen=log_limit)
        #: Every command line of a logged-in connection, as received (literals inline,
        #: no CRLF), with the user's name; none before login, so no credentials.
        self.command_lines: collections.deque[tuple[str, bytes]] = collections.deque(
            maxlen=log_limit
        )
        #: Called synchronously with every new :class:`LogEntry`.
        self.on_event: Callable[[LogEntry], None] | None = None
        #: Called synchronously with (user, command name) as each command of a logged-in
        #: connection arrives, before it is answered (``UID SEARCH`` for UID commands):
        #: a test changes a mailbox at an exact point of a client's command sequence.
        self.on_command: Callable[[str, str], None] | None = None
        self.global_faults = Faults()
        self.global_faults.bind(self._global_faults_changed)
        self._uidvalidity = int(time.time()) if uidvalidity is None else uidvalidity
        self._users: dict[str, User] = {}
        self._sessions: set[ImapTestSession] = set()
        self._by_user: dict[str, set[ImapTestSession]] = {}
        self._idlers: dict[Mailbox, set[ImapTestSession]] = {}
        self._overlaps: list[Overlap] = []
        self._open_overlaps: dict[str, Overlap] = {}
        self._change: trio.Event | None = None
        self._nursery: trio.Nursery | None = None
        self._generation_scope: trio.CancelScope | None = None
        self._generation_done: trio.Event | None = None
        self._restart_lock = trio.Lock()

    # ---- accounts and mail --------------------------------------------------------------

    def add_user(
        self,
        name: str,
        password: str,
        *,
        mailboxes: Iterable[str] = ("INBOX",),
        uidvalidity: int | None = None,
    ) -> None:
        """Create an account with the given mailboxes (``INBOX`` by default).

        Raises :class:`ValueError` if the user exists.
        """
        if name in self._users:
            raise ValueError(f"user {name!r} exists")
        user = User(name, password)
        user.faults.bind(functools.partial(self._user_faults_changed, name))
        self._users[name] = user
        for mailbox in mailboxes:
            self.add_mailbox(name, mailbox, uidvalidity=uidvalidity)

    def add_mailbox(
        self,
        user: str,
        name: str,
        *,
        uidvalidity: int | None = None,
        special_use: tuple[str, ...] = (),
    ) -> Mailbox:
        """Create a mailbox (``inbox`` in any case is stored as ``INBOX``); LIST shows
        its ``special_use`` attributes (``("\\Junk",)``)."""
        account = self._user(user)
        if name.upper() == "INBOX":
            name = "INBOX"
        if name in account.mailboxes:
            raise ValueError(f"mailbox {name!r} exists")
        mailbox = Mailbox(
            name,
            self._uidvalidity if uidvalidity is None else uidvalidity,
            special_use=special_use,
            _on_change=self._mailbox_changed,
        )
        account.mailboxes[name] = mailbox
        return mailbox

    def delete_mailbox(self, user: str, name: str) -> None:
        """Remove a mailbox (not INBOX): LIST no longer shows it, STATUS and SELECT
        answer ``NO [NONEXISTENT]``; a session that has it selected keeps its object."""
        if name.upper() == "INBOX":
            raise ValueError("INBOX cannot be deleted")
        del self._user(user).mailboxes[name]

    def mailbox(self, user: str, name: str = "INBOX") -> Mailbox:
        """The live mailbox object (``uidvalidity``, ``uidnext``, ``exists``, ``messages``)."""
        mailbox = self._user(user).find_mailbox(name)
        if mailbox is None:
            raise KeyError(f"no mailbox {name!r} for {user!r}")
        return mailbox

    def append(
        self,
        user: str,
        data: bytes,
        mailbox: str = "INBOX",
        *,
        flags: Iterable[str] = (),
        internaldate: float | None = None,
    ) -> int:
        """Store a message and return its UID; IDLE clients of that mailbox get ``EXISTS``."""
        self.stats.appends += 1
        when = time.time() if internaldate is None else internaldate
        return self.mailbox(user, mailbox).append(data, flags, when)

    def expunge(self, user: str, uid: int, mailbox: str = "INBOX") -> bool:
        """Remove one message; IDLE clients get ``EXPUNGE``. False if no such UID."""
        return bool(self.mailbox(user, mailbox).expunge_uids([uid]))

    def set_uidvalidity(self, user: str, value: int, mailbox: str | None = None) -> None:
        """Change UIDVALIDITY of one mailbox, or of all the user's mailboxes.

        UIDs are kept; clients learn the value on their next SELECT/EXAMINE/STATUS.
        """
        account = self._user(user)
        targets = account.mailboxes.values() if mailbox is None else [self.mailbox(user, mailbox)]
        for box in targets:
            box.uidvalidity = value
            box.changed()

    # ---- faults and actions -------------------------------------------------------------

    def faults(self, user: str) -> Faults:
        """The user's :class:`Faults` (combined with :attr:`global_faults` and per-session)."""
        return self._user(user).faults

    def sessions(self, user: str | None = None) -> list[ImapTestSession]:
        """Open connections: all of them, or those logged in as ``user``."""
        if user is None:
            return sorted(self._sessions, key=lambda s: s.id)
        return sorted(self._by_user.get(user, ()), key=lambda s: s.id)

    def connections(self, user: str) -> int:
        """Number of open connections logged in as ``user``."""
        return len(self._by_user.get(user, ()))

    def idle_count(self, user: str | None = None) -> int:
        """Number of connections in IDLE (of ``user``, or in total)."""
        if user is None:
            return self.stats.idle_clients
        return sum(1 for s in self._by_user.get(user, ()) if s.idling)

    def overlaps(self, user: str | None = None) -> list[Overlap]:
        """Every interval during which two or more connections were logged in as one user
        (of ``user``, or of all), ended ones first in the order they ended, then the ones
        still going on (``end`` is ``None``). A connection counts from its successful
        LOGIN / AUTHENTICATE until it is closed (a LOGOUT closes it at once).

        One client reconnecting before the server noticed its previous connection was gone
        counts too: tests that cut connections look at ``sessions`` / ``peers``.
        """
        found = [*self._overlaps, *self._open_overlaps.values()]
        return [o for o in found if user is None or o.user == user]

    def drop(self, user: str, how: Literal["rst", "fin"] = "rst") -> int:
        """Abruptly close the user's connections; return how many.

        ``rst``: SO_LINGER 0 then close (the client sees a reset); ``fin``: plain close.
        Nothing is sent first. Takes effect when the sessions next run (immediately in
        trio terms: they are cancelled).
        """
        self._user(user)
        return self._close_sessions(self.sessions(user), _check_how(how), "DROP")

    def drop_all(self, how: Literal["rst", "fin"] = "rst") -> int:
        """Like :meth:`drop` for every open connection (logged in or not)."""
        return self._close_sessions(self.sessions(), _check_how(how), "DROP")

    def bye(self, user: str, text: str = "") -> int:
        """Send ``* BYE server shutting down`` (or ``* BYE <text>``, one line: a provider's
        own words) to the user's connections and close them."""
        self._user(user)
        sessions = self.sessions(user)
        for session in sessions:
            session.bye(text)
        return self._close_sessions(sessions, "bye", "BYE")

    def bye_all(self) -> int:
        """Like :meth:`bye` for every open connection."""
        return self._close_sessions(self.sessions(), "bye", "BYE")

    async def restart(
        self, new_uidvalidity: bool = False, *, how: CloseHow = "fin", downtime: float = 0.0
    ) -> None:
        """Stop listening, close every connection (``how``), wait ``downtime`` seconds, listen
        again on the same port(s). With ``new_uidvalidity`` every mailbox gets UIDVALIDITY + 1
        and its messages are renumbered from UID 1. Returns once listening again.
        """
        if self._nursery is None or self._generation_scope is None:
            raise RuntimeError("server is not serving")
        async with self._restart_lock:
            for session in self._sessions:
                session.close_how = how
            self._generation_scope.cancel()
            assert self._generation_done is not None
            await self._generation_done.wait()
            if new_uidvalidity:
                for user in self._users.values():
                    for mailbox in user.mailboxes.values():
                        mailbox.renumber(mailbox.uidvalidity + 1)
            self._log("*", "RESTART")
            if downtime > 0:
                await trio.sleep(downtime)
            await self._start_generation()

    async def wait_for(self, predicate: Callable[[], object]) -> None:
        """Return once ``predicate()`` is true; it is re-checked after every state change.

        Always checkpoints. Wrap in :func:`trio.fail_after`.
        """
        await trio.lowlevel.checkpoint()
        while not predicate():
            if self._change is None:
                self._change = trio.Event()
            await self._change.wait()

    # ---- serving ------------------------------------------------------------------------

    async def serve(
        self,
        port: int = 0,
        *,
        tls_port: int = 0,
        host: str = "127.0.0.1",
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``host:port`` (and ``host:tls_port`` with implicit TLS) until cancelled.

        ``task_status.started()`` is called once listening; :attr:`port` / :attr:`tls_port`
        then hold the actual ports. On cancellation every connection is closed.
        """
        if self._nursery is not None:
            raise RuntimeError("already serving")
        self.host, self.port, self.tls_port = host, port, tls_port
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await self._start_generation()
                task_status.started()
                await trio.sleep_forever()  # keeps the nursery open across restarts
        finally:
            self._nursery = None
            self._generation_scope = None

    async def _start_generation(self) -> None:
        assert self._nursery is not None
        listeners: list[tuple[trio.SocketListener, bool]] = []
        plain = await trio.open_tcp_listeners(self.port, host=self.host)
        self.port = plain[0].socket.getsockname()[1]
        listeners += [(listener, False) for listener in plain]
        if self.implicit_tls:
            secure = await trio.open_tcp_listeners(self.tls_port, host=self.host)
            self.tls_port = secure[0].socket.getsockname()[1]
            listeners += [(listener, True) for listener in secure]
        await self._nursery.start(self._generation, listeners)
        self._notify()

    async def _generation(
        self,
        listeners: list[tuple[trio.SocketListener, bool]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        done = self._generation_done = trio.Event()
        try:
            with trio.CancelScope() as scope:
                self._generation_scope = scope
                async with trio.open_nursery() as nursery:
                    for listener, tls in listeners:
                        handler = functools.partial(self._handle, tls=tls)
                        nursery.start_soon(
                            functools.partial(
                                trio.serve_listeners, handler, [listener], handler_nursery=nursery
                            )
                        )
                    task_status.started()
        finally:
            for listener, _ in listeners:
                await trio.aclose_forcefully(listener)
            done.set()

    async def _handle(self, stream: trio.SocketStream, *, tls: bool) -> None:
        session = ImapTestSession(self, stream, next_session_id(), tls)
        self._sessions.add(session)
        self.stats.connections_total += 1
        self.stats.connections_open += 1
        self._notify()
        try:
            await session.serve()
        finally:
            self._sessions.discard(session)
            self.stats.connections_open -= 1
            name = session.user
            if name is not None:
                peers = self._by_user.get(name)
                if peers is not None:
                    peers.discard(session)
                    if not peers:
                        del self._by_user[name]
                    self._close_overlap(name, len(peers))
                self._log(name, "DISCONNECT")
            self._notify()

    # ---- callbacks from sessions, the store and faults ----------------------------------

    def _user(self, name: str) -> User:
        try:
            return self._users[name]
        except KeyError:
            raise KeyError(f"no user {name!r}") from None

    def _notify(self) -> None:
        if self._change is not None:
            self._change.set()
            self._change = None

    def _log(self, user: str, event: str) -> None:
        entry = LogEntry(trio.current_time(), user, event)
        self.log.append(entry)
        if self.on_event is not None:
            self.on_event(entry)
        self._notify()

    def _close_sessions(self, sessions: list[ImapTestSession], how: CloseHow, event: str) -> int:
        for session in sessions:
            session.close(how)
            if session.user is not None:
                self._log(session.user, event)
        self._notify()
        return len(sessions)

    def notification_overflow(self, user: str) -> int:
        """The server gives up on NOTIFY for ``user``'s connections: each gets
        ``* OK [NOTIFICATIONOVERFLOW]`` (at once if idling, else before its next answer)
        and no STATUS push any more. Returns how many had NOTIFY on."""
        count = 0
        for session in list(self._by_user.get(user, ())):
            if session.overflow_notify():
                count += 1
        return count

    def _mailbox_changed(self, mailbox: Mailbox) -> None:
        for session in self._idlers.get(mailbox, ()):
            session.wake()
        self._notify()

    def _global_faults_changed(self) -> None:
        for session in self._sessions:
            session.wake()
        self._notify()

    def _user_faults_changed(self, name: str) -> None:
        for session in self._by_user.get(name, ()):
            session.wake()
        self._notify()

    def _logged_in(self, session: ImapTestSession) -> None:
        assert session.user is not None
        peers = self._by_user.setdefault(session.user, set())
        peers.add(session)
        if len(peers) > 1:
            self._open_overlap(session.user, session, peers)
        self.stats.logins += 1
        self._log(session.user, "LOGIN")

    def _open_overlap(
        self, user: str, session: ImapTestSession, peers: set[ImapTestSession]
    ) -> None:
        current = self._open_overlaps.get(user)
        if current is None:
            others = sorted((p for p in peers if p is not session), key=lambda p: p.id)
            joined = [*others, session]
            self._open_overlaps[user] = Overlap(
                user,
                trio.current_time(),
                None,
                tuple(p.id for p in joined),
                tuple(p.peer for p in joined),
            )
        else:
            self._open_overlaps[user] = current._replace(
                sessions=(*current.sessions, session.id), peers=(*current.peers, session.peer)
            )

    def _close_overlap(self, user: str, left: int) -> None:
        if left <= 1 and user in self._open_overlaps:
            ended = self._open_overlaps.pop(user)._replace(end=trio.current_time())
            self._overlaps.append(ended)

    def _login_failed(self, name: str) -> None:
        self.stats.login_failures += 1
        self._log(name, "LOGIN_FAILED")

    def _logged_out(self, session: ImapTestSession) -> None:
        if session.user is not None:
            self.stats.logouts += 1
            self._log(session.user, "LOGOUT")

    def _idle_changed(self, session: ImapTestSession, idling: bool, event: str | None) -> None:
        selected = session.selected_mailbox
        # woken by a change of the selected mailbox, and of those it asked NOTIFY for
        watched = [selected] if selected is not None else []
        watched += session.notify_mailboxes
        if idling:
            self.stats.idle_clients += 1
            for mailbox in watched:
                self._idlers.setdefault(mailbox, set()).add(session)
        else:
            self.stats.idle_clients -= 1
            for mailbox in watched:
                peers = self._idlers.get(mailbox)
                if peers is not None:
                    peers.discard(session)
                    if not peers:
                        del self._idlers[mailbox]
        if event is not None:
            self._log(session.user or "", event)
        self._notify()


def _check_how(how: str) -> Literal["rst", "fin"]:
    if how == "rst":
        return "rst"
    if how == "fin":
        return "fin"
    raise ValueError(f"how must be 'rst' or 'fin', not {how!r}")
