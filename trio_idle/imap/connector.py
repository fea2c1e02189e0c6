"""The seam between a session and its IMAP connection.

:func:`trio_idle.mailbox.session.run_session` never opens a socket itself: it asks the
:class:`ImapConnector` in its :class:`~trio_idle.mailbox.session.SessionEnv` for an
:class:`ImapLink` and uses nothing else. The daemon's connector is
:func:`trio_idle.imap.connect.connect` (real TCP, TLS, aioimaplib); tests plug in
:class:`trio_idle_testing.fake_imap.FakeImapServer`'s, which plays a script under trio's
virtual clock.

This module imports no I/O library: reading it (or implementing it) costs nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from trio_idle.accounts.connections import MailConnection
from trio_idle.imap.envelope import FolderMail, NewMail
from trio_idle.imap.folders import ListEntry
from trio_idle.imap.notify import NotifyAnswer
from trio_idle.imap.push_monitor import PushMonitor
from trio_idle.imap.responses import MailboxState


class RestartWriter(Protocol):
    """What the process ticker (:mod:`trio_idle.mailbox.ticker`) gets of a connection:
    two synchronous methods that write or close, and nothing that reads.

    Only the session task reads its connection (the parser, the framer's buffer and the
    command table are one task's); the ticker, another task, is typed against this
    interface, so it cannot read by construction (mypy strict), and
    ``tests/unit/test_restart_writer.py`` keeps this interface free of coroutines.
    """

    def begin_restart(self, *, noop: bool) -> int | None:
        """DONE, NOOP if ``noop``, IDLE written now, answered as
        :meth:`ImapLink.wait` reads: for the process ticker (another task). Synchronous,
        never raises; returns a number for :meth:`check_restart` (due within the command
        timeout), or ``None`` when the session must run :meth:`ImapLink.restart_idle`
        itself. An answer that is not OK ends the connection: :meth:`ImapLink.wait`
        returns and :attr:`PushMonitor.failure` says why."""
        ...

    def check_restart(self, number: int) -> None:
        """Restart ``number``'s answers are due: unanswered, the connection is dead
        (``no answer to NOOP within 30s``), closed, and :meth:`ImapLink.wait` returns."""
        ...


class ImapLink(RestartWriter, Protocol):
    """One connected, not yet authenticated IMAP connection, as a session drives it
    (and, through :class:`RestartWriter`, as the ticker writes its restarts).

    The contract every implementation keeps (the session relies on each point):

    - every async method returns or raises an :class:`~trio_idle.core.errors.ImapError`
      within the command timeout: a server that stops answering (a half-open
      connection) fails the command with :class:`~trio_idle.core.errors.ConnectionLost`
      naming it, e.g. ``no answer to NOOP within 30s``;
    - every untagged line the server sends goes to :attr:`monitor`, whatever command is
      in progress, so new mail between commands is counted, and a BYE or a lost
      connection wakes :meth:`PushMonitor.wait`;
    - after any exception, cancellation included, the link is unusable: the caller ends
      it with :meth:`logout` (or :meth:`abort`);
    - no method puts the password or the access token into a log line or an exception.
    """

    @property
    def monitor(self) -> PushMonitor:
        """Message count, BYE and loss of this connection (see :class:`PushMonitor`)."""
        ...

    @property
    def has_idle(self) -> bool:
        """Whether the server announced the IDLE capability (else the session polls)."""
        ...

    async def login(self, user: str, password: str) -> None:
        """LOGIN; :class:`~trio_idle.core.errors.ImapAuthError` when the server rejects it."""
        ...

    async def authenticate_oauth2(self, user: str, token: str) -> None:
        """SASL ``OAUTHBEARER`` (where offered) or ``XOAUTH2`` with an access token;
        :class:`~trio_idle.core.errors.ImapAuthError` (its ``status`` from the server's error
        challenge) when the server refuses the token. The token is never in an error."""
        ...

    async def select(self, mailbox: str, *, readonly: bool = False) -> MailboxState:
        """SELECT ``mailbox`` (EXAMINE with ``readonly``: the folder cannot be changed
        through this connection, ``\\Recent`` stays for others); its
        EXISTS/UIDNEXT/UIDVALIDITY as the server reported them.
        A UIDNEXT the SELECT answer left out is learnt otherwise (STATUS, FETCH) as a
        lower bound every later-announced message's UID is at or above; ``None`` only if
        the server gave no way to learn it."""
        ...

    async def wait(self) -> None:
        """Return once new mail, a BYE or the connection's loss is pending (at once if
        already so), reading the connection meanwhile: while idling, the session waits
        here. A checkpoint; cancellation loses nothing."""
        ...

    async def noop(self) -> None:
        """NOOP (servers report new mail in its answer); for servers without IDLE."""
        ...

    async def idle_start(self) -> None:
        """Send IDLE and return once the server confirmed it (``+ idling``)."""
        ...

    async def restart_idle(self, *, noop: bool) -> None:
        """DONE, then NOOP if ``noop``, then IDLE again, all within one command timeout."""
        ...

    async def fetch_new(self, since_uid: int, limit: int) -> NewMail:
        """The UIDs from ``since_uid`` on and (at most ``limit`` of them) their envelopes:
        DONE if idling, ``UID SEARCH``, ``UID FETCH (UID ENVELOPE RFC822.SIZE)``, IDLE
        again, all within one command timeout. Envelope text is never logged."""
        ...

    async def fetch_folder_new(
        self, folder: str, selected: str, since_uid: int, limit: int
    ) -> FolderMail:
        """:meth:`fetch_new` in another ``folder``: DONE if idling, ``EXAMINE <folder>``,
        ``UID SEARCH``/``UID FETCH``, ``SELECT <selected>`` again, IDLE again, all within
        one command timeout. The folder's EXISTS/EXPUNGE during the visit are not counted
        as new mail (:attr:`monitor`); the SELECT's answer (:attr:`FolderMail.selected`)
        tells the caller what reached the selected mailbox meanwhile. A failure leaves
        the link unusable, as always."""
        ...

    async def list_folders(self) -> tuple[ListEntry, ...]:
        """The server's folders with their attributes (``LIST``; special uses asked for
        where the server allows); nothing if it refused. Not while idling."""
        ...

    async def check_folders(self, folders: Sequence[str]) -> dict[str, MailboxState | None]:
        """``STATUS <folder> (UIDNEXT UIDVALIDITY)`` of each folder, leaving IDLE (DONE)
        first and entering it again after if idling, all within one command timeout;
        ``None`` for a folder the server refused (it does not exist)."""
        ...

    async def notify_set(self, folders: Sequence[str]) -> NotifyAnswer:
        """``NOTIFY SET`` for the selected mailbox and ``folders`` where the server
        announces NOTIFY (RFC 5465): in effect, :attr:`PushMonitor.notify` collects the
        STATUS the server pushes for them. Not while idling."""
        ...

    async def logout(self, limit: float) -> None:
        """End the connection politely: LOGOUT, wait up to ``limit`` seconds for the
        server to hang up, close. Never raises; call it shielded."""
        ...

    def abort(self) -> None:
        """Close the connection now, without LOGOUT. Never raises, never blocks."""
        ...


class ImapConnector(Protocol):
    """Opens the IMAP connection of one mailbox.

    Returns a connected :class:`ImapLink` (greeting and capabilities read, TLS up as
    configured) or raises :class:`~trio_idle.core.errors.ImapConnectError` with a one-line
    diagnosis, within the connect timeout. Cancellation leaves no connection open.
    """

    async def __call__(self, conn: MailConnection) -> ImapLink: ...
