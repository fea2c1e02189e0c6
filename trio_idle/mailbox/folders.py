"""The folders a session watches beside its selected mailbox (``TRIO_IDLE_FOLDERS``).

The session IDLEs on one mailbox (``TRIO_IDLE_MAILBOX``, INBOX); every other watched
folder (``\\Junk`` resolved to the server's folder, :mod:`trio_idle.imap.folders`) is
checked on the same connection with ``STATUS <folder> (UIDNEXT UIDVALIDITY)`` — once
after SELECT, then once per tick, or, where the server NOTIFYs (RFC 5465), as the server
pushes its STATUS during IDLE — and a moved UIDNEXT or a new UIDVALIDITY requests a
scan of that folder. Each folder has what the selected mailbox has, per (connection,
folder): its accepted mark and last seen state (:class:`FolderMemory`), its own
coalescer (1 active + 1 pending per folder) and scan task, and its row in the state
store under the folder's name (INBOX rows keep their key), so the catch-up after a
reconnect or a restart works per folder. With envelopes switched on, a folder's scan
worker asks the session for the folder's new mail at the folder's own
:class:`~trio_idle.mailbox.fetch_desk.FetchDesk` (:attr:`FolderMemory.desk`, made on first
use: only for folders actually watched); the session visits the folder (EXAMINE,
UID SEARCH/FETCH, SELECT back) and :func:`missed_during_visit` says what reached the
selected mailbox meanwhile. What this module decides is pure (:func:`folder_decision`,
:func:`missed_during_visit`, :func:`split_connections`).

With ``TRIO_IDLE_FOLDER_WATCH=idle`` (or a row's ``imapFolderWatch``) each folder gets an
IDLE connection of its own instead (:func:`trio_idle.mailbox.session.run_folder_session`):
the mailbox's session still resolves the folders (one LIST) and hands the server names
over (:meth:`Folders.hand_over`); the reconciler runs one folder session per name in the
connection's child nursery. A :class:`FolderMemory` then is also that session's memory
(state, desk, ...), fed by pushes like the mailbox's. The provider's connection limit
caps how many folders get one; the rest stay on STATUS.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Final

import attrs

from trio_idle.accounts.outcome_text import Failure
from trio_idle.imap.responses import CatchUp, MailboxState, catch_up_decision
from trio_idle.mailbox.account_health import Connected
from trio_idle.mailbox.coalescer import ScanCoalescer
from trio_idle.mailbox.fetch_desk import FetchDesk
from trio_idle.mailbox.session_states import CONNECTING
from trio_idle.state.catch_up import startup_decision
from trio_idle.state.records import ScannedState
from trio_idle.state.scan_range import ScanMark, ScanRange, advance, on_connect, scan_range


def _no_outcome(outcome: Connected | Failure) -> None:
    """A folder's own connection says nothing about the account's health: the mailbox's
    session reports it (one account, one health; a second voice would make it flap)."""


@attrs.define(eq=False)
class FolderMemory:
    """What outlives one session for one folder beside the selected mailbox.

    With a connection of its own (:attr:`own_connection`), it is also that session's
    memory: the fields below ``last_scan`` are what
    :func:`~trio_idle.mailbox.session.run_session` keeps of every session."""

    #: the folder as the server names it (``[Gmail]/Spam``)
    name: str
    #: 1 active + 1 pending scan of this folder
    coalescer: ScanCoalescer = attrs.field(factory=ScanCoalescer)
    #: the folder as last checked (STATUS); None: not checked in this process yet
    mailbox: MailboxState | None = None
    #: every UID below ``mark.uidnext`` (in its UIDVALIDITY) was accepted by the backend
    mark: ScanMark | None = None
    last_scan: float | None = None
    #: a folder session of its own runs for it now (``idle`` mode), not STATUS
    own_connection: bool = False
    state: str = CONNECTING
    last_error: str | None = None
    connected_since: float | None = None
    sessions: int = 0
    last_push: float | None = None
    on_outcome: Callable[[Connected | Failure], None] = attrs.field(default=_no_outcome, repr=False)
    _desk: FetchDesk | None = attrs.field(default=None, init=False, repr=False)

    @property
    def desk(self) -> FetchDesk:
        """Where this folder's scan worker asks the session for the folder's new mail."""
        if self._desk is None:
            self._desk = FetchDesk()
        return self._desk

    def close_desk(self) -> None:
        """No session serves this folder now: a waiting request is answered ``None``."""
        if self._desk is not None:
            self._desk.close()

    def scan_range(self, covered: MailboxState | None) -> ScanRange:
        return scan_range(self.mark, covered)

    def accepted(self, covered: MailboxState) -> None:
        self.mark = advance(self.mark, covered)
        self.last_scan = time.time()


def _no_sessions(names: tuple[str, ...]) -> None:
    """Between two connection subtrees no folder gets a session of its own."""


#: what a connection that watches no other folder holds: nothing of its own
_NONE: Final[Mapping[str, FolderMemory]] = MappingProxyType({})
_NO_NAMES: Final[Mapping[str, str]] = MappingProxyType({})


@attrs.define(eq=False, weakref_slot=False)  # one per connection: no weakref slot
class Folders:
    """A connection's folders beside the selected mailbox: their memories, the folders
    already reported missing (once per connection row, never in a loop), and the
    reconciler's hook that gives a new folder's coalescer its scan task.

    Every connection has one, most watch INBOX only: until a folder is made, it holds
    shared empty values and no container of its own."""

    _by_name: dict[str, FolderMemory] | None = None
    reported_missing: frozenset[str] = frozenset()
    #: the last connection's resolution: each wanted entry (``\\Junk``) → server folder
    resolved: Mapping[str, str] = _NO_NAMES
    #: called once for each folder made (the reconciler attaches its coalescer)
    on_new: Callable[[FolderMemory], None] = attrs.field(default=lambda folder: None, repr=False)
    #: told the server folders that get an IDLE connection of their own, after each
    #: resolution (the reconciler starts and stops their sessions to match)
    on_own: Callable[[tuple[str, ...]], None] = attrs.field(default=_no_sessions, repr=False)
    #: the connection limit was reported (once per connection row)
    capped_reported: bool = False

    @property
    def by_name(self) -> Mapping[str, FolderMemory]:
        return _NONE if self._by_name is None else self._by_name

    def get(self, name: str) -> FolderMemory:
        if self._by_name is None:
            self._by_name = {}
        folder = self._by_name.get(name)
        if folder is None:
            folder = self._by_name[name] = FolderMemory(name)
            self.on_new(folder)
        return folder

    def hand_over(self, names: tuple[str, ...]) -> None:
        """These server folders (and no others) get a session of their own from now on."""
        self.on_own(names)

    def missing(self, wanted: str) -> bool:
        """Whether ``wanted`` is missing for the first time (then it is to be reported)."""
        if wanted in self.reported_missing:
            return False
        self.reported_missing = self.reported_missing | {wanted}
        return True

    def gone(self, name: str) -> bool:
        """Server folder ``name`` stopped existing while watched: whether that is news
        (then it is to be reported). The entries that resolved to it count as reported,
        so the next connection, not finding them, says nothing more."""
        wanted = [w for w, server in self.resolved.items() if server == name] or [name]
        news = any(w not in self.reported_missing for w in wanted)
        self.reported_missing = self.reported_missing | set(wanted)
        return news


@attrs.frozen
class ConnectionSplit:
    """Which folders get an IDLE connection of their own (``own``) and which are checked
    with STATUS on the mailbox's connection (``polled``); ``capped``: the provider's
    connection limit moved some of them to ``polled``."""

    own: tuple[str, ...]
    polled: tuple[str, ...]
    capped: bool = False


def split_connections(
    folders: tuple[str, ...], *, idle: bool, max_connections: int | None
) -> ConnectionSplit:
    """How ``folders`` (server names, beside the selected mailbox) are watched. Pure.

    ``status`` mode (``idle`` false): all polled. ``idle`` mode: one connection each, in
    the order wanted, as long as the mailbox's connections (its own + one per folder)
    stay within ``max_connections`` (the provider's simultaneous connections per account;
    ``None``: not published, no cap); the folders past it are polled."""
    if not idle:
        return ConnectionSplit((), folders)
    room = len(folders) if max_connections is None else max(0, max_connections - 1)
    own, polled = folders[:room], folders[room:]
    return ConnectionSplit(own, polled, capped=bool(polled))


@attrs.frozen
class FolderDecision:
    """What one STATUS answer means for a folder: scan or not, and why; the state a
    first check stores when nothing is to be scanned (``start_from=now``)."""

    catch_up: CatchUp
    reason: str
    store_now: bool = False


def folder_decision(
    folder: FolderMemory,
    current: MailboxState,
    stored: ScannedState | None,
    *,
    store_enabled: bool,
    start_from: str,
    reason: str,
) -> FolderDecision:
    """Scan ``folder`` now that STATUS says ``current``? Pure.

    First check in this process with a state store: as a restart (``startup``): the
    stored state against ``current``. First check without one: nothing to compare,
    what the folder holds counts as handled. Later checks (``reason``: ``reconnect``
    after a new connection, ``tick`` between two): a moved UIDNEXT or a changed
    UIDVALIDITY since the last check."""
    if folder.mailbox is None:
        if not store_enabled:
            return FolderDecision(CatchUp(False, "first check"), "startup")
        decision = startup_decision(stored, current, start_from)
        return FolderDecision(decision, "startup", store_now=stored is None and not decision.scan)
    return FolderDecision(catch_up_decision(folder.mailbox, current), reason)


def apply_check(
    folder: FolderMemory,
    current: MailboxState,
    stored: ScannedState | None,
    decision: FolderDecision,
) -> None:
    """Update ``folder`` after a check decided as ``decision``: its last seen state, and
    its mark (loaded from ``stored`` on the first check; set to ``current`` when nothing
    is scanned and none was known; lowered to a server that went back)."""
    if folder.mailbox is None and stored is not None and folder.mark is None:
        folder.mark = ScanMark(stored.uidvalidity, stored.uidnext)
    folder.mailbox = current
    folder.mark = on_connect(folder.mark, current, scanning=decision.catch_up.scan)


def missed_during_visit(
    known: MailboxState | None, exists_before: int | None, back: MailboxState
) -> int | None:
    """How many messages reached the selected mailbox while the session visited another
    folder (its EXISTS unseen), from the SELECT that ended the visit (``back``); None:
    its UIDVALIDITY changed (every UID known is void: the catch-up decides). Pure.

    ``known`` is the selected mailbox as the session knows it, the mail announced before
    the visit included (its UIDNEXT a lower bound: more found is scanned, never less);
    without UIDNEXT on either side, the counts are compared (``exists_before``: the
    monitor's before the visit), which misses one expunged plus one arrived."""
    if known is None:
        return 0
    if (
        known.uidvalidity is not None
        and back.uidvalidity is not None
        and known.uidvalidity != back.uidvalidity
    ):
        return None
    if known.uidnext is not None and back.uidnext is not None:
        return max(0, back.uidnext - known.uidnext)
    if exists_before is not None and back.exists is not None:
        return max(0, back.exists - exists_before)
    return 0
